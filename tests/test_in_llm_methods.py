"""PyramidDrop, SparseVLM and DART: hand-computed selections, the official rules re-implemented
independently (from the official code, cited per test) on random inputs, and the in-LLM contract
on every model family (what pruners receive == Hugging Face's own hidden states / attention / keys).
"""
from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
from tokenprune.methods.pdrop import layer_average
from tokenprune.methods.sparsevlm import dpc_knn_weights
from tokenprune.pruner import LLMStage, PrunerNeeds, PruningInputs, Reduction, Stage, TokenPruner
from tokenprune.testing import recording  # noqa: F401  (test_method_v2drop imports it from here)

from test_adapters import FAMILIES, PROMPTS, images, lvlm_for  # one cache of tiny models for both files

# Tiny decoders have 4 layers: each method's schedule scaled down to fit.
SPECS = ["pdrop:layers=1,2,3", "sparsevlm:layers=0,1,2", "dart", "dart:budget=exact"]
NEW_TOKENS = 6


# -- hand-computed selections ------------------------------------------------------------------------
def test_pdrop_hand_computed_stages():
    p = tp.create_pruner("pdrop", lam=0.5, layers=(1, 2))
    attn = torch.tensor([[[0.05, 0.30, 0.10, 0.20, 0.02, 0.15, 0.08, 0.10]]])
    first = p(PruningInputs(tokens=torch.zeros(1, 8, 2), grid=(2, 4), llm_attention=attn, num_layers=4))
    assert first.indices.tolist() == [[1, 2, 3, 5]]  # int(8 * 0.5) = 4: .30, .20, .15, then .10 (2 beats 7 on the tie)
    second = p(PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(1, 4), llm_attention=torch.tensor([[[0.1, 0.4, 0.3, 0.2]]]),
                             stage=1, num_layers=4, num_original=8))
    assert second.indices.tolist() == [[1, 2]]  # int(8 * 0.25) = 2 of the original 8


def test_pdrop_ratio_is_the_layer_average_and_unreachable_ratios_say_so():
    p = tp.create_pruner("pdrop", ratio=0.5)
    counts = p.stage_counts(256, 30)  # the demo: 256 visual tokens, 30 decoder layers
    assert counts[0] > counts[1] > counts[2]
    assert abs(layer_average(256, 30, (8, 16, 24), counts) - 128) <= 3  # +- one token per stage
    lam = p.solve_lam(256, 30)
    assert counts == [int(256 * lam), int(256 * lam ** 2), int(256 * lam ** 3)]  # the official lam, lam^2, lam^3 shape
    assert tp.create_pruner("pdrop", lam=0.5).stage_counts(576, 32) == [288, 144, 72]  # official setting
    assert tp.create_pruner("pdrop", ratio=1.0).stage_counts(576, 32) == [576, 576, 576]
    low = tp.create_pruner("pdrop", ratio=0.1)
    assert low.min_ratio(256, 30) == pytest.approx((8 * 256 + 22) / (30 * 256))
    with pytest.raises(tp.OptionError, match=r"smallest reachable ratio is 0\.270.*layers=2,8,16"):
        low.stage_counts(256, 30)
    with pytest.raises(tp.OptionError, match="increasing"):
        tp.create_pruner("pdrop", layers="8,4")


def test_sparsevlm_official_counts_at_the_papers_settings():
    for tokens, counts in [(192, [300, 200, 110]), (128, [303, 110, 36]), (64, [66, 30, 17])]:
        assert tp.create_pruner("sparsevlm", ratio=tokens / 576).stage_counts(576) == counts
    assert tp.create_pruner("sparsevlm", ratio=1.0).stage_counts(576) == [576, 576, 576]
    assert tp.create_pruner("sparsevlm", ratio=1.0).stage_counts(7) == [7, 7, 7]


def test_sparsevlm_hand_computed_raters_selection_and_recycling():
    p = tp.create_pruner("sparsevlm", ratio=192 / 576)
    # Raters: each visual token's softmax over the text tokens, averaged: [.665, .090, .245] > 1/3 only for 0.
    v = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
    raters = p.choose_queries(PruningInputs(tokens=v, grid=(1, 2), text_tokens=t, text_mask=torch.ones(1, 3, dtype=torch.bool)))
    assert raters.tolist() == [[True, False, False]]
    # Stage 0 on 6 tokens keeps round(6 * 300 / 576) = 3; the third query row is not a rater.
    attn = torch.tensor([[[0.30, 0.10, 0.20, 0.05, 0.25, 0.10],
                          [0.10, 0.32, 0.12, 0.16, 0.04, 0.26],
                          [0.00, 0.00, 0.00, 1.00, 0.00, 0.00]]])
    tokens = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    red = p(PruningInputs(tokens=tokens, grid=(2, 3), llm_attention=attn, llm_query_mask=torch.tensor([[True, True, False]])))
    # rater mean [.20, .21, .16, .105, .145, .18]: keep 1, 0, 5; pruned 2, 3, 4 -> int(.3 * 3) + 1 = 1 recycled
    # token (2, the best pruned), one cluster of it alone.
    assert red.indices.tolist() == [[0, 1, 5]]
    assert red.merge_weights.shape == (1, 1, 6)
    torch.testing.assert_close(red.merge_weights[0, 0], torch.tensor([0, 0, 1 / (1 + 1e-6), 0, 0, 0]))
    no_recycle = tp.create_pruner("sparsevlm", ratio=192 / 576, recycle=False)
    assert no_recycle(PruningInputs(tokens=tokens, grid=(2, 3), llm_attention=attn,
                                    llm_query_mask=torch.tensor([[True, True, False]]))).merge_weights is None


def test_dpc_knn_hand_computed_clusters():
    x = torch.tensor([[[0.0], [0.1], [10.0], [10.1]]])
    # Equal densities: ties go to the lower index, so 0 and then 2 (parent distance 9.9) are the centres.
    w = dpc_knn_weights(x, 2)
    half = 1 / (2 + 1e-6)
    torch.testing.assert_close(w, torch.tensor([[[half, half, 0, 0], [0, 0, half, half]]]))


def test_dart_hand_computed_pivots_and_duplicates():
    hidden = torch.tensor([[[1, 0], [0.9, 0.1], [-1, 0], [0, 1], [0, -1], [0.7, 0.7], [-0.7, 0.7], [1, 0.05]]])
    keys = torch.tensor([[[5.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0]]])  # token 0 is the image pivot
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text_keys = torch.tensor([[[1.0], [3.0]]])  # text token 1, (0, 1), is the text pivot
    inputs = PruningInputs(tokens=hidden, grid=(2, 4), llm_keys=keys, text_tokens=text, text_keys=text_keys,
                           text_mask=torch.ones(1, 2, dtype=torch.bool))
    # official: floor(0.5 * 8 / 2) = 2 per pivot -> 1 + 2 * 2 = 5. Pivot 0 ~ (1, 0) takes the least similar
    # 2 (cos -1) and 6 (-.71); pivot (0, 1) then takes 4 (-1) and 7 (.05).
    p = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=1)
    assert p(inputs).indices.tolist() == [[0, 2, 4, 6, 7]]
    # exact: round(0.5 * 8) = 4 -> 3 beyond the pivot: 2 for the first pivot, 1 for the second.
    exact = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=1, budget="exact")
    assert exact(inputs).indices.tolist() == [[0, 2, 4, 6]]
    assert tp.create_pruner("dart", ratio=128 / 576).num_kept(576, (24, 24)) == 132
    assert tp.create_pruner("dart", ratio=192 / 576).num_kept(576, (24, 24)) == 196


# -- the official rules, re-implemented on random inputs ------------------------------------------------
def official_sparsevlm_raters(v_t: torch.Tensor, t_t: torch.Tensor) -> torch.Tensor:
    """Gumpest/SparseVLMs v1.5, modelling_sparse_llama.py, LlamaModel.forward (text raters), batch 1."""
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())[1]


def official_attn_postprocess_topk(attn_heads, t_token_idx, count):
    """score.py attn_postprocess_topk: mean over heads, rater rows, image columns, mean rows, topk."""
    rel = attn_heads.mean(1)[:, t_token_idx, :].mean(1)  # [1, N]
    _, indices = torch.topk(rel, min(count, rel.shape[1]), dim=1)  # official: min(count, N - 1)
    return indices[0].sort().values, rel


def official_cluster_and_merge(x, cluster_num):
    """utils.py cluster_and_merge (density-peak kNN), with the 1e-6 uniform noise left out."""
    b, n, c = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dm = torch.stack([dist_matrix[i, index_down[i]] for i in range(b)])
    idx_cluster = dm.argmin(dim=1)
    idx_batch = torch.arange(b)[:, None].expand(b, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = torch.arange(cluster_num)[None, :].expand(b, cluster_num).reshape(-1)
    idx = idx_cluster + torch.arange(b)[:, None] * cluster_num
    all_weight = torch.zeros(b * cluster_num, 1).index_add_(0, idx.reshape(-1), torch.ones(b * n, 1)) + 1e-6
    norm_weight = 1 / all_weight[idx]
    merged = torch.zeros(b * cluster_num, c).index_add_(0, idx.reshape(-1), (x * norm_weight).reshape(b * n, c))
    return merged.reshape(b, cluster_num, c)


@pytest.mark.parametrize("seed", range(5))
def test_sparsevlm_equals_official_rule_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, n_text, heads = 40, 16, 9, 4
    v0, t0 = torch.randn(1, n, d, generator=g), torch.randn(1, n_text, d, generator=g)
    attn_heads = torch.randn(1, heads, n_text, n, generator=g).softmax(-1)  # attention of the text rows
    hidden = torch.randn(1, n, d, generator=g)  # the stage layer's outputs at the visual tokens
    p = tp.create_pruner("sparsevlm", ratio=0.3)
    raters = p.choose_queries(PruningInputs(tokens=v0, grid=(1, n), text_tokens=t0, text_mask=torch.ones(1, n_text, dtype=torch.bool)))
    ref_raters = official_sparsevlm_raters(v0, t0)
    assert raters[0].nonzero().flatten().tolist() == ref_raters.tolist()
    red = p(PruningInputs(tokens=hidden, grid=(1, n), llm_attention=attn_heads.mean(1), llm_query_mask=raters))
    count = p.stage_counts(n)[0]
    ref_kept, rel = official_attn_postprocess_topk(attn_heads, ref_raters, count)
    assert red.indices[0].tolist() == ref_kept.tolist()
    # recycling, as modelling_sparse_llama.py: top int(0.3 p) + 1 pruned tokens by score, then clusters
    pruned = torch.tensor([i for i in range(n) if i not in set(ref_kept.tolist())])
    top = rel[0][pruned].topk(int(len(pruned) * 0.3) + 1)[1]
    merged = official_cluster_and_merge(hidden[:, pruned[top]], int(len(top) / 10) + 1)
    torch.testing.assert_close(red.apply(hidden)[:, count:], merged, rtol=0, atol=1e-6)


def official_dart(hidden_normed, keys, text_keys, text_hidden_normed, ratio, pivots=4):
    """ZichenWen1/DART modeling_llama_self.py / LightCompress dart.py get_retained_image_token, batch 1, on the
    image span followed by the text after it; the pivot set iterated in sorted order, i.e. ``pivot_order=
    "sequence"`` (the official ``list(set(...))`` order, the default, is tested in test_method_dart.py)."""
    n = keys.shape[1]
    topk = math.ceil((n * ratio) // (pivots + pivots))
    img = torch.norm(keys[0], p=1, dim=-1).topk(pivots).indices.tolist()
    txt = (torch.norm(text_keys[0], p=1, dim=-1).topk(pivots).indices + n).tolist()
    states = torch.cat([hidden_normed[0], text_hidden_normed[0]])
    indices_set = set(img + txt)
    valid = set(range(n)) - set(img)
    valid_list = sorted(valid)
    for item in sorted(indices_set):
        cos_sim = -F.cosine_similarity(states[item, :], states[valid_list, :], dim=-1)
        top = [valid_list[i] for i in cos_sim.topk(topk).indices]
        indices_set.update(top)
        valid.difference_update(top)
        valid_list = sorted(valid)
    indices_set.difference_update(txt)
    return sorted(indices_set)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.5, 128 / 576])
def test_dart_equals_official_rule_on_random_inputs(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    n, d, n_text = 72, 16, 10
    hidden, text = torch.randn(1, n, d, generator=g), torch.randn(1, n_text, d, generator=g)
    keys, text_keys = torch.randn(1, n, 24, generator=g), torch.randn(1, n_text, 24, generator=g)
    norm = torch.nn.RMSNorm(d)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5, generator=g)
    red = tp.create_pruner("dart", ratio=ratio, pivot_order="sequence")(PruningInputs(
        tokens=hidden, grid=(8, 9), llm_keys=keys, text_tokens=text, text_keys=text_keys,
        text_mask=torch.ones(1, n_text, dtype=torch.bool), final_norm=norm))
    with torch.no_grad():
        ref = official_dart(norm(hidden), keys, text_keys, norm(text), ratio)
    assert red.indices[0].tolist() == ref
    assert len(ref) == 4 + 8 * int(n * ratio // 8)


def official_pdrop_rank(layer, features, cos, sin, image_start, n_image, keep):
    """Cooperx521/PyramidDrop modeling_llama_pdrop.py pdrop_rank_drop (inference branch), batch 1, plus
    repeat_kv (the official code omits it, and breaks on GQA models)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    hs = layer.input_layernorm(features)
    bsz, q_len, _ = hs.shape
    q = attn.q_proj(hs).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hs).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    w = torch.matmul(q[0][:, -1:], k[0].transpose(1, 2)) / math.sqrt(attn.head_dim)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).mean(0)[:, image_start:image_start + n_image].mean(0)
    return (w.topk(keep).indices).sort().values.tolist()


def test_pdrop_equals_official_rule_in_the_model():
    lvlm = lvlm_for("llava")  # GQA: 4 query heads, 2 key heads
    p = tp.create_pruner("pdrop", ratio=0.6, layers=(2, 3))
    calls = recording(p)
    imgs, prompts = images(1, seed=3), PROMPTS[1:]
    lvlm.generate(imgs, prompts, pruner=p, max_new_tokens=1)
    batch = lvlm.prepare(imgs, prompts)
    with torch.no_grad():
        hs = lvlm.model(**batch, output_hidden_states=True).hidden_states
        text = lvlm.runner.model
        ids = batch["input_ids"][0]
        image = (ids == lvlm.model.config.image_token_id).nonzero().flatten()
        positions = torch.arange(ids.shape[0])[None]
        cos, sin = text.rotary_emb(hs[2], positions)
        keep = p.stage_counts(len(image), 4)[0]
        ref = official_pdrop_rank(lvlm.runner.layers[2], hs[2], cos, sin, int(image[0]), len(image), keep)
    assert calls[0][1].indices[0].tolist() == ref


# -- the in-LLM contract on every family ---------------------------------------------------------------
class Probe(TokenPruner):
    """An in-LLM pruner that keeps everything and remembers what it was given."""

    stage = Stage.IN_LLM

    def __init__(self, ratio: float = 1.0, stage_spec: LLMStage = LLMStage(layer=2)):
        self.ratio = ratio
        self.stage_spec = stage_spec
        self.seen: list[PruningInputs] = []

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(llm_stages=(self.stage_spec,))

    def select(self, inputs):
        self.seen.append(inputs)
        return Reduction(indices=torch.arange(inputs.num_tokens).expand(inputs.batch_size, -1))


def eager_forward(lvlm, batch):
    """Hugging Face's own forward with eager attention: hidden states, attention probabilities, and
    ``layer_inputs[i]``, what decoder layer ``i`` received (pre-hooks): ``hidden_states[i]``, plus in
    Qwen3-VL the DeepStack features added after layer ``i - 1`` (``hidden_states`` are layer outputs)."""
    text = lvlm.runner.model
    old = text.config._attn_implementation
    text.config._attn_implementation = "eager"
    received: dict[int, torch.Tensor] = {}

    def hook(i, module, args, kwargs):
        received.setdefault(i, args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True)
               for i, layer in enumerate(lvlm.runner.layers)]
    try:
        with torch.no_grad():
            out = lvlm.model(**batch, output_hidden_states=True, output_attentions=True)
    finally:
        text.config._attn_implementation = old
        for h in handles:
            h.remove()
    out.layer_inputs = [received[i] for i in range(len(lvlm.runner.layers))]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_in_llm_pruner_receives_hugging_face_states(family):
    lvlm = lvlm_for(family)
    imgs, prompts = images(), PROMPTS
    batch = lvlm.prepare(imgs, prompts)
    ref = eager_forward(lvlm, batch)
    image = batch["input_ids"] == lvlm.model.config.image_token_id  # the image span (LLaVA-NeXT: newlines too)
    visual = torch.zeros_like(image)  # the visual tokens alone
    for v in lvlm.encode_images(batch, PrunerNeeds()):
        if v.prunable:
            visual[v.sample, v.seq_index] = True
    previous = Probe(stage_spec=LLMStage(layer=2, attention="previous", queries="text", keys=True))
    own = Probe(stage_spec=LLMStage(layer=2, attention="input", queries="last"))
    out = lvlm.generate(imgs, prompts, pruner=previous, max_new_tokens=1, sample_ids=["a", "b"])
    lvlm.generate(imgs, prompts, pruner=own, max_new_tokens=1, sample_ids=["a", "b"])
    seen = {sid: (inp, i) for inp in previous.seen for i, sid in enumerate(inp.sample_ids)}
    for b, sid in enumerate(["a", "b"]):
        inp, i = seen[sid]
        pos = visual[b].nonzero().flatten()
        last = image[b].nonzero().flatten()[-1]
        text_pos = batch["attention_mask"][b].bool().nonzero().flatten()
        text_pos = text_pos[text_pos > last]
        assert (inp.tokens[i] - ref.layer_inputs[2][b, pos]).abs().max() <= 1e-5
        assert (inp.text_tokens[i][inp.text_mask[i]] - ref.layer_inputs[2][b, text_pos]).abs().max() <= 1e-5
        att = ref.attentions[1][b].float().mean(0)  # layer 1, head-averaged [L, L]
        got = inp.llm_attention[i][inp.llm_query_mask[i]]
        assert (got - att[text_pos][:, pos]).abs().max() <= 1e-5
        views = [v for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable and v.sample == b]
        assert inp.view_grids == tuple(v.grid for v in views)
        assert inp.grid == (views[0].grid if len(views) == 1 else (1, len(pos)))
        assert inp.final_norm is lvlm.runner.model.norm
        # keys of layer 1, from its own input norm, k projection and rotary, on HF's hidden states
        layer = lvlm.runner.layers[1]
        positions = lvlm.position_ids({k: v[b:b + 1] for k, v in batch.items()})
        cos, sin = lvlm.runner.model.rotary_emb(ref.layer_inputs[1][b:b + 1], positions)
        with torch.no_grad():
            k = layer.self_attn.k_proj(layer.input_layernorm(ref.layer_inputs[1][b:b + 1]))
            k = k.view(1, k.shape[1], -1, layer.self_attn.head_dim)
            if getattr(layer.self_attn, "k_norm", None) is not None:  # Qwen3: per-head norm before rotary
                k = layer.self_attn.k_norm(k)
            k = k.transpose(1, 2)
            rotary = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
            _, k = rotary(k, k, cos, sin)
        k = k.transpose(1, 2).flatten(2)[0]
        assert (inp.llm_keys[i] - k[pos]).abs().max() <= 1e-5
        assert (inp.text_keys[i][inp.text_mask[i]] - k[text_pos]).abs().max() <= 1e-5
    seen_own = {sid: (inp, i) for inp in own.seen for i, sid in enumerate(inp.sample_ids)}
    for b, sid in enumerate(["a", "b"]):
        inp, i = seen_own[sid]
        pos = visual[b].nonzero().flatten()
        att = ref.attentions[2][b].float().mean(0)  # what layer 2 computes, before it runs
        assert (inp.llm_attention[i, 0] - att[-1, pos]).abs().max() <= 1e-5
    assert out.stats[0].visual_per_layer == [visual[0].sum().item()] * 4


def expected_visual_per_layer(spec: str, n_visual: int, n_layers: int = 4) -> list[int]:
    """What each decoder layer should see, from the schedule as documented (recycling included)."""
    p = tp.pruner_from_spec(spec, ratio=0.4)
    counts = [n_visual] * n_layers
    if p.name == "pdrop":
        for layer, c in zip(p.layers, p.stage_counts(n_visual, n_layers)):
            counts[layer:] = [c] * (n_layers - layer)
    elif p.name == "sparsevlm":
        n = n_visual
        for layer, c in zip(p.layers, p.stage_counts(n_visual)):
            kept = min(c, n)
            recycled = int(int(0.3 * (n - kept) + 1) / 10) + 1 if kept < n else 0
            n = kept + recycled
            counts[layer + 1:] = [n] * (n_layers - layer - 1)
    else:
        counts[p.k:] = [p.num_kept(n_visual, (1, n_visual))] * (n_layers - p.k)
    return counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_in_llm_methods_on_every_family(family, spec):
    lvlm = lvlm_for(family)
    imgs = images()
    ref = lvlm.generate(imgs, PROMPTS, max_new_tokens=NEW_TOKENS)
    one = lvlm.generate(imgs, PROMPTS, pruner=tp.pruner_from_spec(spec, ratio=1.0), max_new_tokens=NEW_TOKENS)
    assert torch.equal(one.token_ids, ref.token_ids)
    assert (one.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    p = tp.pruner_from_spec(spec, ratio=0.4)
    # per-layer counts, measured inside the model by pre-hooks on the decoder layers
    lengths: dict[int, int] = {}

    def count(i, module, args, kwargs):
        lengths.setdefault(i, (args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [layer.register_forward_pre_hook(functools.partial(count, i), with_kwargs=True)
             for i, layer in enumerate(lvlm.runner.layers)]
    try:
        lvlm.generate(imgs[:1], PROMPTS[:1], pruner=p, max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    batch = lvlm.prepare(imgs[:1], PROMPTS[:1])
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable]
    n_visual = sum(v.tokens.shape[0] for v in views)
    n_text = batch["input_ids"].shape[1] - n_visual
    expected = expected_visual_per_layer(spec, n_visual)
    assert [lengths[i] - n_text for i in range(4)] == expected
    assert expected[-1] < n_visual

    cached = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    uncached = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, ignore_eos=True, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)

    both = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=NEW_TOKENS, sample_ids=["a", "b"])
    for i, sid in enumerate(["a", "b"]):
        alone = lvlm.generate(imgs[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=NEW_TOKENS, sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], both.token_ids[i])
        assert alone.stats[0] == both.stats[i]
        torch.testing.assert_close(alone.first_logits[0], both.first_logits[i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_position_conventions(family):
    lvlm = lvlm_for(family)
    pdrop = tp.pruner_from_spec("pdrop:layers=1,2,3", ratio=0.4)
    assert pdrop.position_policy == "compact" and tp.create_pruner("dart").position_policy == "keep"
    default = lvlm.generate(images(1), PROMPTS[:1], pruner=pdrop, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    compact = lvlm.generate(images(1), PROMPTS[:1], pruner=pdrop, max_new_tokens=NEW_TOKENS, ignore_eos=True, position_policy="compact")
    keep = lvlm.generate(images(1), PROMPTS[:1], pruner=pdrop, max_new_tokens=NEW_TOKENS, ignore_eos=True, position_policy="keep")
    assert torch.equal(default.first_logits, compact.first_logits)
    assert not torch.allclose(keep.first_logits, compact.first_logits)  # positions really differ
    # cached decoding follows the renumbering (decode positions shift by what each stage dropped)
    ref = lvlm.generate(images(1), PROMPTS[:1], pruner=pdrop, max_new_tokens=NEW_TOKENS, ignore_eos=True, use_cache=False)
    assert torch.equal(default.token_ids, ref.token_ids)


def test_schedule_that_does_not_fit_the_decoder_is_one_clear_error():
    lvlm = lvlm_for("llava")
    with pytest.raises(tp.OptionError, match=r"this decoder has 4 layers"):
        lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("pdrop"), max_new_tokens=1)


def test_legacy_one_layer_needs_still_work():
    """A plugin written against ``llm_attention_layer`` gets the same one-stage schedule as before."""
    class Legacy(TokenPruner):
        stage = Stage.IN_LLM

        def __init__(self, ratio=0.5):
            self.ratio = ratio

        @property
        def needs(self):
            return PrunerNeeds(llm_attention_layer=1, llm_attention_queries="last")

        def select(self, inputs):
            return Reduction(indices=tp.topk_indices(inputs.llm_attention[:, -1], self.num_kept(inputs.num_tokens, inputs.grid)))

    lvlm = lvlm_for("llava")
    a = lvlm.generate(images(), PROMPTS, pruner=Legacy(0.25), max_new_tokens=NEW_TOKENS)
    b = lvlm.generate(images(), PROMPTS, pruner=tp.create_pruner("fastv", ratio=0.25, k=2), max_new_tokens=NEW_TOKENS)
    assert torch.equal(a.token_ids, b.token_ids) and a.stats == b.stats
