"""V2Drop (``v2drop``): hand-computed selections and schedules; the official rule transcribed from
xuyang-liu16/V2Drop@219e03e (LLaVA ``llava/model/language_model/V2Drop.py`` L121-174, Qwen2-VL
``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py`` L336-384) and driven over whole decoders of toy
layers on random states (576 image tokens, 32 / 28 layers): identical kept tokens at every stage; and on
every tiny family: the states the pruner receives == Hugging Face's layer inputs (pre-hooks), ratio 1.0 ==
unpruned, per-layer counts measured inside the model, cached == uncached, batch of 2 == alone.

Needs the framework's ``LLMStage(previous_hidden=True)`` -> ``PruningInputs.previous_tokens`` and the decoder
asking ``TokenPruner.llm_schedule(depth)``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import tokenprune as tp
import tokenprune.methods.v2drop as v2  # registers "v2drop" (methods/__init__.py does not import it yet)
from tokenprune.methods.pdrop import layer_average
from tokenprune.pruner import PrunerNeeds, PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs

from test_adapters import FAMILIES, PROMPTS, LayerInputCounter, images, lvlm_for
from test_in_llm_methods import eager_forward, recording
from tokenprune.testing import check_cached_and_batched

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
NEW_TOKENS = 6


# -- hand-computed ---------------------------------------------------------------------------------
def hand_inputs(stage: int = 0, dtype=torch.float32) -> PruningInputs:
    prev = torch.tensor([[[0, 0], [1, 1], [2, 0], [0, 0], [5, 5], [1, 0]]], dtype=dtype)
    cur = torch.tensor([[[3, 4], [1, 1], [2, 1], [0, 2], [5, 5], [4, 4]]], dtype=dtype)
    return PruningInputs(tokens=cur, previous_tokens=prev, grid=(2, 3), stage=stage, num_layers=32, num_original=6)


def test_hand_computed_variation_and_selection():
    # variation ||cur - prev||: [5, 0, 1, 2, 0, 5]; the norm of cur alone would rank token 4 (7.07) first.
    p = tp.create_pruner("v2drop", schedule="official")
    red = p(hand_inputs(0))
    assert red.indices.tolist() == [[0, 3, 5]]  # int(6 * 0.5) = 3 largest: 5, 5, 2
    torch.testing.assert_close(red.scores, torch.tensor([[5.0, 0, 1, 2, 0, 5]]))
    assert p(hand_inputs(1)).indices.tolist() == [[0, 3, 5]]  # layer 17: 0.5 of the 6 entering
    assert p(hand_inputs(2)).indices.tolist() == [[0]]  # layer 22: max(1, int(6 * 0)) = 1; the tie 0/5 to the lower
    qwen = tp.create_pruner("v2drop", schedule="official", base="qwen2vl")
    assert qwen(hand_inputs(0)).indices.tolist() == [[0]]  # max(1, int(6 * 0.25)) = 1


def test_precision_model_is_the_official_half_precision_norm():
    inputs = hand_inputs(0, torch.bfloat16)
    model = tp.create_pruner("v2drop", schedule="official")(inputs)
    assert model.scores.dtype == torch.bfloat16
    assert torch.equal(model.scores, torch.norm(inputs.tokens - inputs.previous_tokens, p=2, dim=-1))
    fp32 = tp.create_pruner("v2drop", schedule="official", precision="float32")(inputs)
    assert fp32.scores.dtype == torch.float32 and fp32.indices.tolist() == model.indices.tolist()


def test_official_and_paper_schedules():
    official = tp.create_pruner("v2drop", schedule="official")
    assert official.layers_for(32) == (3, 17, 22) and official.stage_counts(576, 32) == [288, 144, 1]
    assert layer_average(576, 32, (3, 17, 22), [288, 144, 1]) == pytest.approx(202.8125)  # METHODS.md: ~203
    assert not official.uses_ratio
    qwen = tp.create_pruner("v2drop", schedule="official", base="qwen2vl")
    assert qwen.layers_for(28) == (3, 16, 22) and qwen.stage_counts(576, 28) == [144, 7, 1]
    # the paper's 192 / 128 / 64 settings: prune 50/70/100, 72/75/100, 95/95/100 % of the tokens entering
    for tokens, counts, avg in [(192, [288, 86, 1], 193.75), (128, [161, 40, 1], 131.0), (64, [28, 1, 1], 66.71875)]:
        paper = tp.create_pruner("v2drop", ratio=tokens / 576, schedule="paper")
        assert paper.stage_counts(576, 32) == counts
        assert layer_average(576, 32, (3, 17, 22), counts) == pytest.approx(avg)


def test_ratio_is_the_layer_average_worked_table():
    # docs' worked table (32 layers, 576 tokens): lam solves 3*576 + 14*576 lam + 5*576 lam^2 + 10 = 32 * target
    for tokens, counts in [(192, [269, 125, 1]), (128, [153, 40, 1]), (64, [21, 1, 1])]:
        p = tp.create_pruner("v2drop", ratio=tokens / 576)
        assert p.stage_counts(576, 32) == counts
        assert 0 <= tokens - layer_average(576, 32, (3, 17, 22), counts) <= 1  # the floors: less than a token below
        lam = p.stage_shares(576, 32)[0]
        assert p.stage_shares(576, 32) == (lam, lam, 0.0)  # the official (r, r, 0) shape
    lam = tp.create_pruner("v2drop", ratio=192 / 576).stage_shares(576, 32)[0]
    assert lam == pytest.approx((-8064 + math.sqrt(8064 ** 2 + 4 * 2880 * 4406)) / (2 * 2880), abs=1e-9)
    # by hand, N = 8 on 4 layers (stages 1, 2, 3), ratio 0.5: 8 + 8 lam + 8 lam^2 + 1 = 16 -> lam = (sqrt(4.5) - 1) / 2
    small = tp.create_pruner("v2drop", ratio=0.5)
    assert small.layers_for(4) == (1, 2, 3)
    assert small.stage_shares(8, 4)[0] == pytest.approx((math.sqrt(4.5) - 1) / 2, abs=1e-9)
    assert small.stage_counts(8, 4) == [4, 2, 1]
    # qwen2vl's 0.25, 0.05 bent by one exponent: the second share is the first to the power log .05 / log .25
    q = tp.create_pruner("v2drop", ratio=0.2, base="qwen2vl").stage_shares(576, 28)
    assert q[1] == pytest.approx(q[0] ** (math.log(0.05) / math.log(0.25))) and q[2] == 0.0
    assert tp.create_pruner("v2drop", ratio=1.0).stage_counts(576, 32) == [576, 576, 576]


def test_unreachable_ratios_and_bad_options_are_one_line():
    p = tp.create_pruner("v2drop", ratio=0.05)
    assert p.min_ratio(576, 32) == pytest.approx((3 * 576 + 29) / (32 * 576))
    with pytest.raises(tp.OptionError, match=r"smallest reachable ratio is 0\.095"):
        p.stage_counts(576, 32)
    with pytest.raises(tp.OptionError, match=r"largest reachable ratio below 1 is 0\.688"):
        tp.create_pruner("v2drop", ratio=0.8).stage_counts(576, 32)
    for bad, match in [(dict(base="qwen3"), "base must be one of"), (dict(schedule="fast"), "schedule must be one of"),
                       (dict(layers="3,17"), "3 stages"), (dict(layers="17,3,22"), "increasing"),
                       (dict(precision="fp8"), "precision must be one of"),
                       (dict(schedule="paper", ratio=0.5), "192/576, 128/576 or 64/576"),
                       (dict(schedule="paper", ratio=1 / 3, base="qwen2vl"), "LLaVA-1.5 table")]:
        with pytest.raises(tp.OptionError, match=match) as err:
            tp.create_pruner("v2drop", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(tp.OptionError, match="at least 4 layers"):
        tp.create_pruner("v2drop").llm_schedule(3)
    with pytest.raises(ValueError, match="previous_tokens"):
        tp.create_pruner("v2drop")(PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(2, 2)))


def test_layers_scale_with_the_depth():
    assert v2.scale_layers((3, 17, 22), 32, 32) == (3, 17, 22)
    assert v2.scale_layers((3, 17, 22), 32, 28) == (3, 15, 19)  # 2.625, 14.875, 19.25
    assert v2.scale_layers((3, 17, 22), 32, 36) == (3, 19, 25)  # 3.375, 19.125, 24.75
    assert v2.scale_layers((3, 16, 22), 28, 32) == (3, 18, 25)  # 3.43, 18.29, 25.14
    assert v2.scale_layers((3, 17, 22), 32, 4) == (1, 2, 3)  # 0.375 -> 0 -> 1 (layer 0 has no previous layer)
    assert v2.scale_layers((3, 17, 22), 32, 5) == (1, 3, 4)  # 0.47, 2.66, 3.44 -> 0 -> 1, 3, 3 -> 4 (increasing)
    p = tp.create_pruner("v2drop")
    assert [st.layer for st in p.needs.schedule()] == [3, 17, 22] and all(st.previous_hidden for st in p.needs.schedule())
    assert [st.layer for st in p.llm_schedule(28)] == [3, 15, 19]
    assert [st.layer for st in tp.create_pruner("v2drop", layers="2,9,12").llm_schedule(28)] == [2, 9, 12]


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_contract(ratio):
    check_pruner_contract(tp.create_pruner("v2drop", ratio=ratio), synthetic_inputs())
    if ratio == 1.0:  # every token, at every stage
        for stage in range(3):
            out = tp.create_pruner("v2drop", ratio=1.0)(replace(synthetic_inputs(), stage=stage))
            assert out.indices.tolist() == [list(range(48))] * 3


# -- the official rule, transcribed and driven over a whole decoder --------------------------------------
class ToyLayer(torch.nn.Module):
    """A stand-in decoder layer with the official loop's interface: a token-wise update plus a causal mean
    over the tokens before (so a cut changes what later layers compute). ``layer_idx`` as HF's ``self_attn``."""

    def __init__(self, layer_idx: int, dim: int, g: torch.Generator):
        super().__init__()
        self.self_attn = SimpleNamespace(layer_idx=layer_idx)
        self.w = torch.randn(dim, dim, generator=g) / dim ** 0.5
        self.scale = torch.rand(dim, generator=g) * 2

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **_):
        causal = hidden_states.cumsum(1) / torch.arange(1, hidden_states.shape[1] + 1)[None, :, None]
        return (hidden_states + torch.tanh(hidden_states @ self.w) * self.scale + 0.1 * causal,)


def official_llava_v2drop(layers, inputs_embeds, position_ids, keep_ratios=(0.5, 0.5, 0)):
    """V2Drop.py `V2DropLlamaModel.forward` L107-185 (the inference branch), batch 1, no mask, no cache; verbatim
    but for the marked lines and ``self.`` attributes held as locals. Returns the position ids after each stage."""
    prev_hidden_states, image_token_amount_after_selection = None, 0  # changed: `self.` attributes (__init__) as locals
    hidden_states = inputs_embeds
    attention_mask = None  # changed: SDPA/flash path without padding
    stages = []  # changed: recorded for the test
    for decoder_layer in layers:
        current_hidden_states = hidden_states
        if current_hidden_states.size(1) > 576:
            image_token_amount = 576
        else:
            image_token_amount = 0
        if decoder_layer.self_attn.layer_idx == 0:
            image_token_amount_after_selection = image_token_amount
        target_layer_indices = {3,17,22}
        if decoder_layer.self_attn.layer_idx in target_layer_indices and current_hidden_states.size(1) > 1 and image_token_amount_after_selection > 0:
            device = hidden_states.device
            candidate_indices = torch.arange(35, image_token_amount_after_selection + 35, device=device)
            current_candidates = current_hidden_states[:, candidate_indices, :]
            prev_candidates = prev_hidden_states[:, candidate_indices, :]

            l2_diff_candidate = torch.norm(current_candidates - prev_candidates, p=2, dim=-1)[0]

            current_layer = decoder_layer.self_attn.layer_idx
            if current_layer == 3:
                keep_ratio = keep_ratios[0]  # changed: 0.5 in the file; the paper's settings edit it
            if current_layer == 17:
                keep_ratio = keep_ratios[1]  # changed: 0.5
            if current_layer == 22:
                keep_ratio = keep_ratios[2]  # changed: 0

            k = max(1, int(image_token_amount_after_selection * keep_ratio))
            topk_values, topk_indices = torch.topk(l2_diff_candidate, k=k, largest=True)
            selected_indices = candidate_indices[topk_indices]
            current_seq_length = current_hidden_states.size(1)
            keep_indexs = torch.cat((torch.arange(35, device=device), selected_indices, torch.arange(image_token_amount_after_selection + 35, current_seq_length, device=device)))
            keep_indexs = keep_indexs.sort().values
            current_hidden_states = current_hidden_states[:, keep_indexs, :]
            position_ids = position_ids[:, keep_indexs]

            image_token_amount_after_selection = selected_indices.shape[0]
            stages.append(position_ids.clone())  # changed: recorded
        prev_hidden_states = current_hidden_states
        hidden_states = current_hidden_states

        layer_outputs = decoder_layer(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        hidden_states = layer_outputs[0]
    return stages


def official_qwen2vl_v2drop(layers, inputs_embeds, position_ids, image_token_start_index, image_token_length):
    """modeling_qwen2_vl_self.py `DART.forward` L321-397, batch 1; verbatim but for the marked lines, the
    ``DART_config`` read (and its two prints) replaced by the arguments, and the mask and ``cache_position`` rebuild
    left out (the toy layers are causal by construction). Returns the M-RoPE ids after each stage."""
    prev_hidden_states, image_token_amount_after_selection = None, 0  # changed: `self.` attributes (__init__) as locals
    hidden_states = inputs_embeds
    stages = []  # changed: recorded for the test
    for i, decoder_layer in enumerate(layers):
        current_hidden_states = hidden_states
        if decoder_layer.self_attn.layer_idx == 0:
            image_token_amount_after_selection = image_token_length
        target_layer_indices = {3, 16, 22}
        if decoder_layer.self_attn.layer_idx in target_layer_indices and current_hidden_states.size(1) > 1 and image_token_amount_after_selection > 0:
            device = hidden_states.device
            candidate_indices = torch.arange(image_token_start_index, image_token_amount_after_selection + image_token_start_index,
                                             device=device)
            current_candidates = current_hidden_states[:, candidate_indices, :]
            prev_candidates = prev_hidden_states[:, candidate_indices, :]

            l2_diff_candidate = torch.norm(current_candidates - prev_candidates, p=2, dim=-1)[0]

            current_layer = decoder_layer.self_attn.layer_idx
            if current_layer == 3:
                keep_ratio = 0.25
            if current_layer == 16:
                keep_ratio = 0.05
            if current_layer == 22:
                keep_ratio = 0

            k = max(1, int(image_token_amount_after_selection * keep_ratio))
            topk_values, topk_indices = torch.topk(l2_diff_candidate, k=k, largest=True)
            retained_image_tokens_index = candidate_indices[topk_indices]
            current_seq_length = current_hidden_states.size(1)

            keep_indexs = torch.cat((torch.arange(image_token_start_index,device=device), retained_image_tokens_index, torch.arange(image_token_start_index+image_token_amount_after_selection,current_seq_length,device=device)))
            keep_indexs = keep_indexs.sort().values
            current_hidden_states = current_hidden_states[:, keep_indexs, :]
            position_ids = position_ids[:, :, keep_indexs]
            image_token_amount_after_selection = retained_image_tokens_index.shape[0]
            stages.append(position_ids.clone())  # changed: recorded
        prev_hidden_states = current_hidden_states
        hidden_states = current_hidden_states

        layer_outputs = decoder_layer(hidden_states, position_ids=position_ids)
        hidden_states = layer_outputs[0]
    return stages


def ours(pruner, layers, embeds, positions, image, grid):
    """The same decoder run with the pruner: at each of its stages it gets the image tokens' states entering the
    layer and the layer before, and the sequence is cut to its choice. ``image`` ``[L]`` bool; positions ``[..., 1, L]``."""
    at = {layer: s for s, layer in enumerate(pruner.layers_for(len(layers)))}
    h, prev, n0, stages = embeds, None, int(image.sum()), []
    for i, layer in enumerate(layers):
        if i in at:
            img = image.nonzero().flatten()
            red = pruner(PruningInputs(tokens=h[:, img], previous_tokens=prev[:, img], grid=grid if not stages else (1, len(img)),
                                       stage=at[i], layer=i, num_layers=len(layers), num_original=n0))
            keep = ~image
            keep[img[red.indices[0]]] = True
            h, image, positions = h[:, keep], image[keep], positions[..., keep]
            stages.append(positions.clone())
        prev = h
        h = layer(h, position_ids=positions)[0]
    return stages


def toy_decoder(depth: int, dim: int, seed: int) -> list[ToyLayer]:
    g = torch.Generator().manual_seed(seed)
    return [ToyLayer(i, dim, g) for i in range(depth)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("schedule", ["official", "paper-192", "paper-128", "paper-64"])
def test_llava_equals_official_rule_over_the_decoder(seed, schedule):
    dim, n_text = 16, 20
    layers = toy_decoder(32, dim, seed)
    g = torch.Generator().manual_seed(100 + seed)
    embeds = torch.randn(1, 35 + 576 + n_text, dim, generator=g)
    positions = torch.arange(embeds.shape[1])[None]
    image = torch.zeros(embeds.shape[1], dtype=torch.bool)
    image[35:35 + 576] = True
    if schedule == "official":
        p, ratios = tp.create_pruner("v2drop", schedule="official"), (0.5, 0.5, 0)
    else:
        tokens = int(schedule.split("-")[1])
        p, ratios = tp.create_pruner("v2drop", schedule="paper", ratio=tokens / 576), v2.PAPER[tokens]
    with torch.no_grad():
        ref = official_llava_v2drop(layers, embeds, positions, ratios)
        got = ours(p, layers, embeds, positions, image, (24, 24))
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert [r.shape[1] - 35 - n_text for r in ref] == p.stage_counts(576, 32)


@pytest.mark.parametrize("seed", range(3))
def test_qwen2vl_equals_official_rule_over_the_decoder(seed):
    dim, start, n_img, n_text = 16, 15, 600, 12
    layers = toy_decoder(28, dim, seed)
    g = torch.Generator().manual_seed(200 + seed)
    length = start + n_img + n_text
    embeds = torch.randn(1, length, dim, generator=g)
    positions = torch.randint(0, 50, (3, 1, length), generator=g)  # M-RoPE ids, only carried along
    image = torch.zeros(length, dtype=torch.bool)
    image[start:start + n_img] = True
    p = tp.create_pruner("v2drop", schedule="official", base="qwen2vl")
    with torch.no_grad():
        ref = official_qwen2vl_v2drop(layers, embeds, positions, start, n_img)
        got = ours(p, layers, embeds, positions, image, (20, 30))
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert [r.shape[-1] - start - n_text for r in ref] == [150, 7, 1] == p.stage_counts(n_img, 28)


def test_ratio_schedule_is_the_official_rule_with_edited_constants():
    """schedule="ratio" only changes the constants: the official loop with our shares keeps the same tokens."""
    dim, n_text = 16, 20
    layers = toy_decoder(32, dim, 7)
    embeds = torch.randn(1, 35 + 576 + n_text, dim, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(embeds.shape[1])[None]
    image = torch.zeros(embeds.shape[1], dtype=torch.bool)
    image[35:35 + 576] = True
    p = tp.create_pruner("v2drop", ratio=128 / 576)
    with torch.no_grad():
        ref = official_llava_v2drop(layers, embeds, positions, p.stage_shares(576, 32))
        got = ours(p, layers, embeds, positions, image, (24, 24))
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and len(got) == 3


# -- every family ----------------------------------------------------------------------------------------
def visual_mask(lvlm, batch) -> torch.Tensor:
    """``[B, L]`` bool: the prunable visual tokens (LLaVA-NeXT's newlines left out)."""
    visual = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for v in lvlm.encode_images(batch, PrunerNeeds()):
        if v.prunable:
            visual[v.sample, v.seq_index] = True
    return visual


@pytest.mark.parametrize("family", FAMILIES)
def test_pruner_receives_hugging_face_layer_inputs(family):
    """Stage 0 (layer 1 of 4): tokens / previous_tokens == what HF's layers 1 / 0 receive, and the kept tokens are
    the official top-k of their difference; later stages (layers 2, 3): previous_tokens == the tokens the stage
    before kept (layer l - 1 is that stage's layer)."""
    lvlm = lvlm_for(family)
    imgs, prompts = images(), PROMPTS
    batch = lvlm.prepare(imgs, prompts)
    ref = eager_forward(lvlm, batch)
    visual = visual_mask(lvlm, batch)
    p = tp.create_pruner("v2drop", ratio=0.4)
    calls = recording(p)
    lvlm.generate(imgs, prompts, pruner=p, max_new_tokens=1, sample_ids=["a", "b"])
    by_stage = {(inp.stage, sid): (inp, red, i) for inp, red in calls for i, sid in enumerate(inp.sample_ids)}
    assert sorted(by_stage) == [(s, sid) for s in range(3) for sid in "ab"]
    for b, sid in enumerate("ab"):
        pos = visual[b].nonzero().flatten()
        inp, red, i = by_stage[0, sid]
        assert inp.layer == 1 and inp.num_layers == 4
        assert (inp.tokens[i] - ref.layer_inputs[1][b, pos]).abs().max() <= 1e-5
        assert (inp.previous_tokens[i] - ref.layer_inputs[0][b, pos]).abs().max() <= 1e-5
        variation = torch.norm(ref.layer_inputs[1][b, pos] - ref.layer_inputs[0][b, pos], p=2, dim=-1)
        k = max(1, int(len(pos) * p.stage_shares(len(pos), 4)[0]))
        assert red.indices[i].tolist() == variation.topk(k).indices.sort().values.tolist()
        for s in (1, 2):
            before, kept, j = by_stage[s - 1, sid]
            now, _, i = by_stage[s, sid]
            torch.testing.assert_close(now.previous_tokens[i], before.tokens[j][kept.indices[j]], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_every_family(family):
    lvlm = lvlm_for(family)
    imgs = images()
    ref = lvlm.generate(imgs, PROMPTS, max_new_tokens=NEW_TOKENS)
    one = lvlm.generate(imgs, PROMPTS, pruner=tp.create_pruner("v2drop", ratio=1.0), max_new_tokens=NEW_TOKENS)
    assert torch.equal(one.token_ids, ref.token_ids)
    assert (one.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    p = tp.create_pruner("v2drop", ratio=0.4)
    batch = lvlm.prepare(imgs[:1], PROMPTS[:1])
    n_visual = int(visual_mask(lvlm, batch)[0].sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    counter = LayerInputCounter(lvlm.runner.layers)  # what each decoder layer receives, measured inside the model
    try:
        out = lvlm.generate(imgs[:1], PROMPTS[:1], pruner=p, max_new_tokens=1)
    finally:
        counter.close()
    counts = p.stage_counts(n_visual, 4)  # stages before layers 1, 2, 3 of 4
    assert [counter.lengths[i][0] - n_text for i in range(4)] == [n_visual] + counts
    assert out.stats[0].visual_per_layer == [n_visual] + counts and counts[-1] == 1
    # the layer average, short of 0.4 * N by at most the floors (a token per stage, each spanning one layer)
    assert 0 <= 0.4 * n_visual - layer_average(n_visual, 4, (1, 2, 3), counts) <= 1

    check_cached_and_batched(lvlm, imgs, PROMPTS, p, NEW_TOKENS)


def test_original_positions_are_kept():
    """position_policy "keep" is the default (the official index-selected position ids); "compact" differs."""
    lvlm = lvlm_for("llava")
    p = tp.create_pruner("v2drop", ratio=0.4)
    assert p.position_policy == "keep"
    default = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1)
    keep = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1, position_policy="keep")
    compact = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=1, position_policy="compact")
    assert torch.equal(default.first_logits, keep.first_logits)
    assert not torch.allclose(keep.first_logits, compact.first_logits)
