"""VTW (``vtw``): hand-computed schedules and withdrawals; the official prefill transcribed from lzhxmu/VTW@a3d8cfc
(``llava/model/language_model/VTW.py`` ``VTWLlamaModel.forward`` L300-333, ``pe_type="keep"``, ``mode="vtw"``) and
run on the tiny LLaVA's own layers: identical logits; and on every tiny family: ratio 1.0 (``k=ratio``) == unpruned,
per-layer counts measured inside the model by forward pre-hooks, cached == uncached, batch of 2 == alone.
The K search (``tokenprune calibrate vtw``) is tested in test_calibrate.py.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import tokenprune as tp
import tokenprune.methods.vtw  # noqa: F401  registers "vtw" (methods/__init__.py does not import it yet)
from tokenprune.adapters.decoder import DecoderRunner
from tokenprune.pruner import PrunerNeeds, PruningInputs
from tokenprune.testing import recording

from test_adapters import FAMILIES, PROMPTS, LayerInputCounter, images, lvlm_for
from tokenprune.testing import check_cached_and_batched

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
NEW_TOKENS = 6


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty tokenprune cache dir (where calibrate stores K)."""
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def bind_hook(monkeypatch):
    """The decoder's ``bind_decoder`` call (/work/notes/vtw_decoder.diff) until it lands in decoder.py: the same
    three lines, around ``DecoderRunner.schedule``."""
    if "bind_decoder" in inspect.getsource(DecoderRunner.schedule):
        return
    original = DecoderRunner.schedule

    def schedule(self, pruner):
        bind = getattr(pruner, "bind_decoder", None)
        if bind is not None:
            bind(self.model)
        return original(self, pruner)

    monkeypatch.setattr(DecoderRunner, "schedule", schedule)


def visual_mask(lvlm, batch) -> torch.Tensor:
    """``[B, L]`` bool: the visual tokens (LLaVA-NeXT's newlines left out)."""
    visual = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for v in lvlm.encode_images(batch, PrunerNeeds()):
        if v.prunable:
            visual[v.sample, v.seq_index] = True
    return visual


# -- hand-computed ---------------------------------------------------------------------------------
def test_hand_computed_withdrawal_and_schedules():
    p = tp.create_pruner("vtw", k=16)
    red = p(PruningInputs(tokens=torch.randn(2, 6, 4), grid=(2, 3)))
    assert red.indices.shape == (2, 0) and red.indices.dtype == torch.long  # every visual token goes
    assert red.apply(torch.randn(2, 6, 4)).shape == (2, 0, 4)
    assert [st.layer for st in p.llm_schedule(32)] == [16] and p.num_kept(576, (24, 24)) == 0
    assert p.layer_average_share(32) == 0.5  # 576 x 16 / 32 = 288 tokens per layer on average
    assert not p.uses_ratio and p.position_policy == "keep"
    # k="ratio": K = round(ratio * L), half up, within 1..L-1
    assert tp.create_pruner("vtw", k="ratio", ratio=0.5).withdraw_layer(32) == 16
    assert tp.create_pruner("vtw", k="ratio", ratio=0.25).withdraw_layer(30) == 8  # 7.5 -> 8
    assert tp.create_pruner("vtw", k="ratio", ratio=0.01).withdraw_layer(30) == 1  # 0.3 -> 0 -> at least 1
    assert tp.create_pruner("vtw", k="ratio", ratio=0.99).withdraw_layer(30) == 29
    one = tp.create_pruner("vtw", k="ratio", ratio=1.0)
    assert one.llm_schedule(30) == () and one.num_kept(6, (2, 3)) == 6 and one.uses_ratio
    assert one(PruningInputs(tokens=torch.randn(1, 6, 4), grid=(2, 3))).indices.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_bad_options_and_missing_k_are_one_line(store):
    for kwargs, match in [({"k": 0}, "k must be >= 1"), ({"k": "abc"}, "k must be a layer index >= 1, 'ratio', or unset"), ({"k": 2.5}, "integer"),
                          ({"model": 3}, "model must be a model id"), ({"ratio": 0}, r"\(0, 1\]")]:
        with pytest.raises(tp.OptionError, match=match) as exc:
            tp.create_pruner("vtw", **kwargs)
        assert "\n" not in str(exc.value)
    with pytest.raises(tp.OptionError, match=r"k=40 but this decoder has 30 layers") as exc:
        tp.create_pruner("vtw", k=40).llm_schedule(30)
    assert "\n" not in str(exc.value)
    with pytest.raises(tp.OptionError, match=r"run `tokenprune calibrate vtw --model M --task T` first") as exc:
        tp.create_pruner("vtw").llm_schedule(30)
    assert "\n" not in str(exc.value)
    with pytest.raises(tp.OptionError, match=r"for model 'nope'"):
        tp.create_pruner("vtw", model="nope").llm_schedule(30)
    lvlm = lvlm_for("llava")  # 4 decoder layers: k=4 withdraws after the last one, which is no withdrawal
    with pytest.raises(tp.OptionError, match=r"k=4 but this decoder has 4 layers"):
        lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("vtw", k=4), max_new_tokens=1)
    with pytest.raises(tp.OptionError, match="run `tokenprune calibrate vtw"):
        lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("vtw"), max_new_tokens=1)


# -- the official prefill, transcribed ----------------------------------------------------------------
def official_vtw_logits(text_model, lm_head, inputs_embeds, system_token_nums, image_token_nums, k):
    """lzhxmu/VTW@a3d8cfc VTW.py ``VTWLlamaModel.forward`` L300-333 (no gradient checkpointing, ``use_vtw``,
    ``pe_type == "keep"``, ``mode == "vtw"``), batch 1, then ``self.norm`` and ``lm_head`` at the last position.
    The official attention mask is SDPA's ``None`` (causal by ``is_causal``) and is not sliced; here an explicit
    causal mask of the current length stands for it (the tiny layers may run eager attention)."""
    hidden_states = inputs_embeds
    seq_length = hidden_states.shape[1]
    position_ids = torch.arange(seq_length)[None]
    for decoder_layer in text_model.layers:
        if decoder_layer.self_attn.layer_idx == k and seq_length > 1:
            hidden_states = torch.cat([hidden_states[:, :system_token_nums],
                                       hidden_states[:, system_token_nums + image_token_nums:]], dim=1)
            position_ids = torch.cat([position_ids[:, :system_token_nums],
                                      position_ids[:, system_token_nums + image_token_nums:]], dim=1)
        n = hidden_states.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        hidden_states = decoder_layer(hidden_states, attention_mask=causal, position_ids=position_ids,
                                      position_embeddings=text_model.rotary_emb(hidden_states, position_ids))
        if isinstance(hidden_states, tuple):
            hidden_states = hidden_states[0]
    hidden_states = text_model.norm(hidden_states)
    return lm_head(hidden_states[:, -1]).float()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefill_equals_official_withdrawal(k):
    lvlm = lvlm_for("llava")
    for i in range(2):
        img, prompt = images(2)[i:i + 1], PROMPTS[i:i + 1]
        batch = lvlm.prepare(img, prompt)
        image = (batch["input_ids"][0] == lvlm.model.config.image_token_id).nonzero().flatten()
        system, n_image = int(image[0]), len(image)
        assert image.tolist() == list(range(system, system + n_image))  # one contiguous span, as the official assumes
        with torch.no_grad():
            embeds = lvlm.model(**batch, output_hidden_states=True).hidden_states[0]
            ref = official_vtw_logits(lvlm.runner.model, lvlm.runner.lm_head, embeds, system, n_image, k)
        out = lvlm.generate(img, prompt, pruner=tp.create_pruner("vtw", k=k), max_new_tokens=1)
        assert (out.first_logits - ref).abs().max().item() <= 1e-5
        unpruned = lvlm.generate(img, prompt, max_new_tokens=1)
        assert (unpruned.first_logits - ref).abs().max().item() > 1e-3  # the withdrawal changes the logits


# -- every family --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_on_every_family(family):
    lvlm = lvlm_for(family)
    imgs = images()
    ref = lvlm.generate(imgs, PROMPTS, max_new_tokens=NEW_TOKENS)
    one = lvlm.generate(imgs, PROMPTS, pruner=tp.create_pruner("vtw", k="ratio", ratio=1.0), max_new_tokens=NEW_TOKENS)
    assert torch.equal(one.token_ids, ref.token_ids)
    assert (one.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    p = tp.create_pruner("vtw", k=2)
    calls = recording(p)
    batch = lvlm.prepare(imgs[:1], PROMPTS[:1])
    n_visual = int(visual_mask(lvlm, batch)[0].sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    counter = LayerInputCounter(lvlm.runner.layers)  # what each decoder layer receives, measured inside the model
    try:
        out = lvlm.generate(imgs[:1], PROMPTS[:1], pruner=p, max_new_tokens=2)
    finally:
        counter.close()
    # prefill: layers 0-1 see text + visual, layers 2-3 the text alone; each decode step: one token per layer
    assert [counter.lengths[i][0] for i in range(4)] == [n_text + n_visual] * 2 + [n_text] * 2
    assert [counter.lengths[i][1] for i in range(4)] == [1] * 4
    assert out.stats[0].visual_per_layer == [n_visual, n_visual, 0, 0] and out.stats[0].visual_tokens_kept == 0
    assert [inp.layer for inp, _ in calls] == [2] and calls[0][0].num_tokens == n_visual

    check_cached_and_batched(lvlm, imgs, PROMPTS, p, NEW_TOKENS)


def test_original_positions_are_kept():
    """``pe_type="keep"``: the text after the image keeps its original position ids (``compact`` differs)."""
    lvlm = lvlm_for("llava")
    p = tp.create_pruner("vtw", k=1)
    default = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1)
    keep = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1, position_policy="keep")
    compact = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1, position_policy="compact")
    assert torch.equal(default.first_logits, keep.first_logits)
    assert not torch.allclose(keep.first_logits, compact.first_logits)


def test_stored_k_is_used_for_that_model(store, bind_hook):
    """With no ``k``: the K stored for the running model's weights (found by fingerprint), or by model id."""
    from tokenprune.calibrate import model_fingerprint, store_k

    lvlm = lvlm_for("llava")
    store_k("tiny-llava", 3, model_fingerprint(lvlm.runner.model))
    store_k("tiny-qwen2-vl", 1, model_fingerprint(lvlm_for("qwen2_vl").runner.model))
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("vtw"), max_new_tokens=1)
    finally:
        counter.close()
    n_visual = out.stats[0].visual_tokens_in
    assert out.stats[0].visual_per_layer == [n_visual] * 3 + [0]
    lengths = [counter.lengths[i][0] for i in range(4)]
    assert lengths[:3] == [lengths[0]] * 3 and lengths[0] - lengths[3] == n_visual
    assert tp.create_pruner("vtw", model="tiny-qwen2-vl").withdraw_layer(4) == 1
    explicit = lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("vtw", k=3), max_new_tokens=1)
    assert torch.equal(explicit.first_logits, out.first_logits)
