"""The decoder loop calls the layers as Hugging Face does: the cache under the keyword the installed
transformers takes (no FutureWarning), and no attention mask where none is needed (SDPA runs causal)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters.decoder import DecoderRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(n)]


def _masks_seen(lvlm, images, prompts, **kw):
    seen = []
    layer = lvlm.runner.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
    try:
        out = lvlm.generate(images, prompts, max_new_tokens=3, ignore_eos=True, **kw)
    finally:
        hook.remove()
    return seen, out


def test_no_cache_keyword_warning():
    lvlm = tp.load("tiny-llava")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lvlm.generate(_images(2), ["What is it?", "Which colour is the thing?"], max_new_tokens=3,
                      pruner=tp.create_pruner("fastv", ratio=0.5))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_cache_keyword_follows_the_layer_signature():
    class Old(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
            return hidden_states

    class New(Old):
        def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, **kwargs):
            return hidden_states

    for cls, kw in ((Old, "past_key_values"), (New, "cache")):
        text = torch.nn.Module()
        text.layers = torch.nn.ModuleList([cls()])
        assert DecoderRunner(text, torch.nn.Identity(), 0, [1]).cache_kw == kw


def test_unpadded_prefill_and_decode_pass_no_mask_padded_ones_do():
    lvlm = tp.load("tiny-llava")
    same = ["What is it?", "What is it?"]
    seen, out = _masks_seen(lvlm, _images(2), same)
    assert all(m is None for m in seen)  # prefill and the 2 decode steps, as HF with SDPA
    padded, out2 = _masks_seen(lvlm, _images(2), ["What is it?", "Which colour is the thing in the picture?"])
    assert all(m is not None and m.dtype == torch.bool for m in padded)
    # and the answers do not depend on it: a sample alone (no mask) == in a padded batch (mask)
    alone, one = _masks_seen(lvlm, _images(2)[1:], ["Which colour is the thing in the picture?"])
    assert all(m is None for m in alone)
    assert torch.equal(one.token_ids[0], out2.token_ids[1])
    torch.testing.assert_close(one.first_logits[0], out2.first_logits[1], rtol=1e-5, atol=1e-5)


def test_eager_attention_always_gets_the_causal_mask():
    """A kernel that does not apply causality itself (eager) is never handed ``None`` for a prefill."""
    lvlm = tp.load("tiny-llava")
    for layer in lvlm.runner.layers:
        layer.self_attn.config._attn_implementation = "eager"
    try:
        assert not lvlm.runner.implicit_causal
        seen, _ = _masks_seen(lvlm, _images(1), ["What is it?"])
    finally:
        for layer in lvlm.runner.layers:
            layer.self_attn.config._attn_implementation = "sdpa"
    assert seen[0] is not None and seen[0].shape[-2] > 1  # the prefill's causal mask
    assert lvlm.runner.implicit_causal


def test_eager_loaded_model_matches_hf():
    """A model loaded with eager attention: HF's eager function adds a mask to the scores, so tokenprune's boolean
    masks would mask nothing there; the adapter runs its decoder on SDPA, and the logits are HF's own."""
    from tokenprune.zoo import tiny

    img = _images(1)[0]
    model, processor = tiny.tiny_llava(attn_implementation="eager")
    lvlm = tp.wrap(model, processor)
    ours = lvlm.generate([img, img], ["Is there a dog?", "What colour is the big square in the upper left?"],
                         max_new_tokens=1).first_logits[0]
    with torch.no_grad():
        hf = model(**lvlm.prepare([img], ["Is there a dog?"])).logits[0, -1]
    assert (ours - hf).abs().max() < 1e-4
