"""Qwen3-VL's DeepStack under pruning, against Hugging Face's own text model.

DeepStack adds features of several ViT layers to the visual tokens' hidden states after decoder
layers 0, 1, 2 (``Qwen3VLTextModel._deepstack_process``). After pruning, every level must follow
the kept tokens: pre-LLM pruning slices (or merges) all levels, an in-LLM stage before the last
DeepStack layer slices the levels still to come. Each reference below is Hugging Face's
``Qwen3VLTextModel.forward`` given the pruned sequence, its positions (``get_rope_index`` of the
full prompt, kept columns) and DeepStack features sliced by the same kept indices, built from
Hugging Face's own vision outputs (``get_image_features``), not from tokenprune's pipeline. A
mutation that skips the slicing must move our logits away from the reference.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokenprune as tp
from tokenprune.adapters import wrap
from tokenprune.adapters.decoder import _Sequence
from tokenprune.zoo.tiny_qwen3_vl import tiny_qwen3_vl

from test_adapters import PROMPTS, images

TOL = 1e-4
MUTATION_MIN = 1e-3  # a skipped slice must move the logits by far more than the tolerance


@functools.lru_cache(maxsize=None)
def lvlm():
    return wrap(*tiny_qwen3_vl())


def recording(pruner):
    """``pruner`` remembering each Reduction it returns."""
    calls = []
    select = pruner.select

    def wrapped(inputs):
        red = select(inputs)
        calls.append(red)
        return red

    pruner.select = wrapped
    return calls


def ours(model, i: int, pruner) -> torch.Tensor:
    return model.generate(images()[i:i + 1], PROMPTS[i:i + 1], pruner=pruner, max_new_tokens=1).first_logits[0]


@torch.no_grad()
def hf_reference_parts(model, i: int):
    """Hugging Face's own pieces for sample ``i`` alone: ids, image positions, visual tokens, DeepStack
    levels, full-prompt M-RoPE positions and input embeddings with the image placed."""
    hf = model.model
    batch = model.prepare(images()[i:i + 1], PROMPTS[i:i + 1])
    ids = batch["input_ids"][0]
    image_pos = (ids == hf.config.image_token_id).nonzero().flatten()
    vis = hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    tokens = vis.pooler_output[0]  # [N, D]
    levels = [feat[0] for feat in vis.deepstack_features]  # each [N, D]
    positions, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                           image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    embeds = hf.model.language_model.embed_tokens(ids).clone()
    embeds[image_pos] = tokens
    grid = tuple((batch["image_grid_thw"][0, 1:] // 2).tolist())
    return ids, image_pos, tokens, levels, positions[:, 0], embeds, grid


@torch.no_grad()
def hf_text_forward(model, embeds, positions, deepstack, visual_mask, first_layer: int = 0) -> torch.Tensor:
    """Logits of the last position: ``Qwen3VLTextModel.forward`` over decoder layers ``first_layer..``
    (one sample), DeepStack level ``j`` added after the ``j``-th of them, an explicit attention mask
    (positions have gaps; without a mask ``create_causal_mask`` reads a gap as a new packed sequence)."""
    text = model.model.model.language_model
    layers = text.layers
    text.layers = nn.ModuleList(list(layers)[first_layer:])
    try:
        out = text(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                   position_ids=positions[:, None], visual_pos_masks=visual_mask[None],
                   deepstack_visual_embeds=deepstack, use_cache=False)
    finally:
        text.layers = layers
    return model.model.lm_head(out.last_hidden_state[:, -1]).float()[0]


def pre_llm_reference(model, i: int, red) -> torch.Tensor:
    """HF logits with the visual tokens of ``red`` (a selection, or pool's merge) in place."""
    ids, image_pos, tokens, levels, positions, embeds, grid = hf_reference_parts(model, i)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image_pos] = False
    idx = red.indices[0]
    keep[image_pos[idx]] = True
    if red.tokens is None:  # selection: the kept tokens and their features
        new_tokens, deep = tokens[idx], [lvl[idx] for lvl in levels]
    else:  # pool: adaptive average pooling of the token grid, each level pooled on its own
        def pool(x):
            return F.adaptive_avg_pool2d(x.T.reshape(1, -1, *grid), red.grid).flatten(2)[0].T

        new_tokens, deep = pool(tokens), [pool(lvl) for lvl in levels]
    embeds = embeds.clone()
    embeds[image_pos[idx]] = new_tokens
    visual = torch.zeros_like(keep)
    visual[image_pos[idx]] = True
    return hf_text_forward(model, embeds[keep], positions[:, keep], deep, visual[keep])


@torch.no_grad()
def in_llm_reference(model, i: int, red, k: int) -> torch.Tensor:
    """HF logits with an in-LLM cut before layer ``k``: HF's own full forward up to layer ``k``'s input
    (pre-hook: layer outputs with DeepStack levels ``< k`` added), then HF's text forward over layers
    ``k..`` on the kept tokens, DeepStack levels ``k..`` sliced by the same kept indices."""
    ids, image_pos, tokens, levels, positions, embeds, grid = hf_reference_parts(model, i)
    batch = model.prepare(images()[i:i + 1], PROMPTS[i:i + 1])
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("h", args[0] if args else kwargs["hidden_states"])

    handle = model.runner.layers[k].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(**batch)
    finally:
        handle.remove()
    h = captured["h"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image_pos] = False
    keep[image_pos[red.indices[0]]] = True
    visual = (ids == model.model.config.image_token_id) & keep
    deep = [lvl[red.indices[0]] for lvl in levels[k:]]
    return hf_text_forward(model, h[keep], positions[:, keep], deep, visual[keep], first_layer=k)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("i", [0, 1])
def test_unpruned_deepstack_is_not_dropped(i):
    """Without its DeepStack levels the model's logits move: a loop that drops them would be caught."""
    model = lvlm()
    ids, image_pos, tokens, levels, positions, embeds, _ = hf_reference_parts(model, i)
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[image_pos] = True
    full = hf_text_forward(model, embeds, positions, levels, visual)
    assert max_diff(ours(model, i, None), full) <= TOL
    assert max_diff(hf_text_forward(model, embeds, positions, None, visual), full) > MUTATION_MIN


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("name", ["fopru_rank", "pool"])
def test_pre_llm_pruning_slices_every_level(i, name, monkeypatch):
    model = lvlm()
    p = tp.create_pruner(name, ratio=0.5)
    calls = recording(p)
    got = ours(model, i, p)
    red = calls[0]
    assert red.indices.shape[1] < len(hf_reference_parts(model, i)[1])  # really pruned
    ref = pre_llm_reference(model, i, red)
    diff = max_diff(got, ref)
    print(f"\n{name} sample {i}: |ours - HF| = {diff:.2e}")
    assert diff <= TOL

    # Mutations: the levels not sliced with the kept index (the first k tokens' features), or dropped.
    from tokenprune.adapters import pre_llm

    reduce = pre_llm.reduce_deepstack
    for label, mutate in [("unsliced", lambda deep, out: deep[:, :, : out.shape[2]]),
                          ("zeroed", lambda deep, out: torch.zeros_like(out))]:
        monkeypatch.setattr(pre_llm, "reduce_deepstack",
                            lambda red, deep, prefix=0, m=mutate: m(deep, reduce(red, deep, prefix)))
        mutated = max_diff(ours(model, i, tp.create_pruner(name, ratio=0.5)), ref)
        print(f"{name} sample {i}: mutation {label}: |ours - HF| = {mutated:.2e}")
        assert mutated > MUTATION_MIN
        monkeypatch.setattr(pre_llm, "reduce_deepstack", reduce)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("k", [1, 2])
def test_in_llm_pruning_slices_the_remaining_levels(i, k, monkeypatch):
    """FastV before layer ``k`` (DeepStack levels at layers 0, 1, 2): levels ``k..2`` must follow the cut."""
    model = lvlm()
    p = tp.create_pruner("fastv", ratio=0.5, k=k)
    calls = recording(p)
    got = ours(model, i, p)
    red = calls[0]
    ref = in_llm_reference(model, i, red, k)
    diff = max_diff(got, ref)
    print(f"\nfastv k={k} sample {i}: |ours - HF| = {diff:.2e}")
    assert diff <= TOL

    reorder = _Sequence.reorder
    n_visual = red.indices.shape[1]
    def unsliced(before: _Sequence, after: _Sequence) -> _Sequence:
        """The remaining levels cut by position (the last L' columns) instead of by the kept index."""
        return _replace(after, before.deepstack[:, :, -after.mask.shape[1]:])

    for label, mutate in [("unsliced", unsliced), ("dropped", lambda before, after: _replace(after, None))]:
        monkeypatch.setattr(_Sequence, "reorder", lambda self, keep, merge, m=mutate: m(self, reorder(self, keep, merge)))
        mutated = max_diff(ours(model, i, tp.create_pruner("fastv", ratio=0.5, k=k)), ref)
        print(f"fastv k={k} sample {i}: mutation {label}: |ours - HF| = {mutated:.2e}")
        assert mutated > MUTATION_MIN
        monkeypatch.setattr(_Sequence, "reorder", reorder)
    assert n_visual < len(hf_reference_parts(model, i)[1])


def _replace(seq: _Sequence, deepstack):
    from dataclasses import replace

    return replace(seq, deepstack=deepstack)


def test_in_llm_merges_apply_the_same_weights_to_every_level():
    """SparseVLM-style recycled tokens: a merged token's DeepStack features are the merge of its sources'."""
    g = torch.Generator().manual_seed(0)
    b, length, d, levels = 1, 6, 4, 3
    seq = _Sequence(h=torch.randn(b, length, d, generator=g), mask=torch.ones(b, length, dtype=torch.bool),
                    positions=torch.arange(length)[None], image_mask=torch.tensor([[False, True, True, True, True, False]]),
                    after_image=torch.tensor([[False] * 5 + [True]]), chosen=torch.zeros(b, length, dtype=torch.bool),
                    deepstack=torch.randn(levels, b, length, d, generator=g), deepstack_layers=(0, 1, 2))
    keep = torch.tensor([[True, True, False, False, True, True]])  # drops visual tokens 2 and 3
    merge = torch.zeros(b, 1, length)
    merge[0, 0, 2], merge[0, 0, 3] = 0.25, 0.75  # one recycled token from the dropped two
    out = seq.reorder(keep, merge)
    # order: text 0, visual 1, visual 4, the merged token (after the last kept visual token), text 5
    expected = torch.stack([seq.deepstack[:, 0, 0], seq.deepstack[:, 0, 1], seq.deepstack[:, 0, 4],
                            0.25 * seq.deepstack[:, 0, 2] + 0.75 * seq.deepstack[:, 0, 3], seq.deepstack[:, 0, 5]], 1)
    torch.testing.assert_close(out.deepstack[:, 0], expected)
    torch.testing.assert_close(out.h[0, 3], 0.25 * seq.h[0, 2] + 0.75 * seq.h[0, 3])
    assert out.deepstack_layers == (0, 1, 2)
