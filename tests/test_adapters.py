"""Exactness tests of every adapter family x every built-in pruner, on tiny random models.

What is checked, per family:
1. unpruned == the Hugging Face model's own forward (logits) and ``generate`` (tokens);
2. ratio 1.0 == no pruner (tokens identical, logits within 1e-5);
3. the decoder really receives text + kept visual tokens (counted by a pre-hook inside the model);
4. cached decoding == a no-cache reference that re-runs the whole pruned sequence per token;
5. a batch of 2 (different prompt lengths and images) == each sample alone;
6. FoPru's cheap attention equals an eager ``output_attentions`` reference of the vision tower;
7. one shared vision pass (``encode``) reused by several pruners == each pruner encoding alone.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import wrap
from tokenprune.pruner import PrunerNeeds, Stage
from tokenprune.zoo import tiny

BUILTIN = ["fopru_rank", "fopru_row", "random", "pool", "fastv", "divprune", "fastervlm", "vispruner", "cdpruner", "visionzip"]
FAMILIES = {name: getattr(tiny, f"tiny_{name}") for name in tiny.FAMILIES}
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]
NEW_TOKENS = 8


@functools.lru_cache(maxsize=None)
def lvlm_for(family: str):
    model, processor = FAMILIES[family]()
    return wrap(model, processor)


def images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(96, 96), (80, 112)]  # Qwen: 6x6 and 5x7 merged tokens
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(n)]


def pruner(name: str, ratio: float, **kw):
    # FastV after layer 2 of 4: both halves of the decoder are exercised.
    return tp.create_pruner(name, ratio=ratio, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_matches_hugging_face(family):
    lvlm = lvlm_for(family)
    imgs, prompts = images(1), PROMPTS[:1]
    out = lvlm.generate(imgs, prompts, max_new_tokens=NEW_TOKENS)
    batch = lvlm.prepare(imgs, prompts)
    with torch.no_grad():
        ref_logits = lvlm.model(**batch).logits[:, -1].float()
        ref_tokens = lvlm.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert (out.first_logits - ref_logits).abs().max().item() <= 1e-5
    n = out.stats[0].new_tokens
    assert out.token_ids[0, :n].tolist() == ref_tokens[0, batch["input_ids"].shape[1]:][:n].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BUILTIN)
def test_ratio_one_equals_unpruned(family, name):
    lvlm = lvlm_for(family)
    ref = lvlm.generate(images(), PROMPTS, max_new_tokens=NEW_TOKENS)
    out = lvlm.generate(images(), PROMPTS, pruner=pruner(name, 1.0), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.token_ids, ref.token_ids)
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-5


class LayerInputCounter:
    """Forward pre-hooks on decoder layers recording the sequence length each one receives."""

    def __init__(self, layers):
        self.lengths: dict[int, list[int]] = {}
        self.handles = [
            layer.register_forward_pre_hook(functools.partial(self._hook, i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.lengths.setdefault(i, []).append(hidden.shape[1])

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_llm_receives_text_plus_kept_tokens(family, name, ratio):
    lvlm = lvlm_for(family)
    p = pruner(name, ratio)
    imgs, prompts = images(1), PROMPTS[:1]
    batch = lvlm.prepare(imgs, prompts)
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable]  # not LLaVA-NeXT newlines
    n_visual = sum(v.tokens.shape[0] for v in views)
    n_text = batch["input_ids"].shape[1] - n_visual
    expected_kept = sum(p.num_kept(v.tokens.shape[0], v.grid) for v in views)
    if p.stage is Stage.IN_LLM or p.views == "global":  # the sample's visual tokens pruned as one set
        expected_kept = tp.keep_count(ratio, n_visual)
    layers = lvlm.runner.layers
    counter = LayerInputCounter(layers)
    try:
        lvlm.generate(imgs, prompts, pruner=p, max_new_tokens=1)
    finally:
        counter.close()
    prefill = {i: lengths[0] for i, lengths in counter.lengths.items()}
    k = p.k if p.stage is Stage.IN_LLM else 0
    for i in range(len(layers)):
        expected = n_text + n_visual if i < k else n_text + expected_kept
        assert prefill[i] == expected, f"layer {i}: {prefill[i]} tokens, expected {expected}"
    assert expected_kept < n_visual


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BUILTIN + ["fastv:query=mean"])
def test_cached_decoding_matches_no_cache_reference(family, name):
    lvlm = lvlm_for(family)
    p = tp.pruner_from_spec(name, ratio=0.25)
    cached = lvlm.generate(images(), PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ref = lvlm.generate(images(), PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, use_cache=False, ignore_eos=True)
    assert all(s.new_tokens == NEW_TOKENS for s in cached.stats)
    assert torch.equal(cached.token_ids, ref.token_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [None] + BUILTIN)
def test_batch_equals_samples_alone(family, name):
    lvlm = lvlm_for(family)
    p = None if name is None else pruner(name, 0.25)
    imgs = images()
    both = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, sample_ids=["a", "b"])
    for i, sid in enumerate(["a", "b"]):
        alone = lvlm.generate(imgs[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=NEW_TOKENS, sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], both.token_ids[i])
        assert alone.stats[0] == both.stats[i]
        torch.testing.assert_close(alone.first_logits[0], both.first_logits[i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_vision_pass_equals_own_pass(family):
    """A sweep encodes a batch once for every pruner with the same needs; results must not change."""
    lvlm = lvlm_for(family)
    imgs = images()
    for names in (["none", "random", "pool", "fastv"], ["fopru_rank", "fopru_row"]):
        prs = [None if n == "none" else pruner(n, 0.25) for n in names]
        shared = lvlm.encode(imgs, PROMPTS, lvlm.vision_needs(prs[0]))
        for p in prs:
            a = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, encoded=shared)
            b = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS)
            assert torch.equal(a.token_ids, b.token_ids) and a.stats == b.stats
            torch.testing.assert_close(a.first_logits, b.first_logits, rtol=0, atol=1e-5)
            assert a.timings["vision"] == shared.seconds
    plain = lvlm.encode(imgs, PROMPTS)
    with pytest.raises(tp.OptionError, match="encoded batch was computed for no pruner needs"):
        lvlm.generate(imgs, PROMPTS, pruner=pruner("fopru_rank", 0.5), encoded=plain)
    with pytest.raises(tp.OptionError, match="holds 2 samples, got 1 prompts"):
        lvlm.generate(imgs[:1], PROMPTS[:1], encoded=plain)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-2, 0])
def test_fopru_attention_equals_eager_reference(family, layer):
    lvlm = lvlm_for(family)
    batch = lvlm.prepare(images(), PROMPTS)
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=layer)) if v.prunable]
    reference = tiny.eager_vision_attention(lvlm, batch, layer)  # list of [T, T], one per view
    assert len(reference) == len(views)
    for view, ref in zip(views, reference):
        assert view.vision_attention.shape == ref.shape
        assert (view.vision_attention - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_position_policies(family):
    lvlm = lvlm_for(family)
    p = pruner("pool", 0.25)  # window centres leave gaps on every axis, so compact really renumbers
    keep = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2)
    compact = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2, position_policy="compact")
    assert keep.stats == compact.stats
    assert not torch.allclose(keep.first_logits, compact.first_logits)  # positions really differ
    with pytest.raises(tp.OptionError, match="position_policy"):
        lvlm.generate(images(1), PROMPTS[:1], position_policy="shuffle")


def test_unsupported_model_type_names_supported_ones():
    class Fake:
        class config:
            model_type = "blip-2"

    with pytest.raises(tp.UnknownNameError, match="supported: .*llava"):
        wrap(Fake(), None)


def test_compact_positions_hand_computed():
    from tokenprune.adapters.base import PrunableLVLM

    mask = torch.tensor([[False, True, True, True, True]])
    # 1-D: kept tokens at 0, 3, 7, 8 (one pad) -> 0, 1, 2, 3
    assert PrunableLVLM.compact_positions(torch.tensor([[0, 0, 3, 7, 8]]), mask).tolist() == [[0, 0, 1, 2, 3]]
    # M-RoPE: text at 0; image tokens (t,h,w) = (1,1,1), (1,3,1); text after at 4.
    pos = torch.tensor([[[0, 0, 1, 1, 4]], [[0, 0, 1, 3, 4]], [[0, 0, 1, 1, 4]]])
    # values in use {0, 1, 3, 4} -> {0, 1, 2, 3}: the freed row 2 is gone, layout kept.
    expected = [[[0, 0, 1, 1, 3]], [[0, 0, 1, 2, 3]], [[0, 0, 1, 1, 3]]]
    assert PrunableLVLM.compact_positions(pos, mask).tolist() == expected
