"""MustDrop: hand-computed stages, the official functions transcribed (liuting20/MustDrop@909afa5) and run
on random inputs against ours, and the three stages on a tiny LLaVA whose 12x12 grid the 3x3 windows divide.

The tiny LLaVA's decoder attention is sharpened (its query projections scaled) so that the dual-attention
filter's thresholds separate tokens at all: a randomly initialised model attends almost uniformly.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
import tokenprune.methods.mustdrop  # noqa: F401  (registers "mustdrop")
from tokenprune.adapters.vision_blocks import apply_reduction, run_tower
from tokenprune.errors import OptionError
from tokenprune.in_vision import VisionState
from tokenprune.methods.mustdrop import dual_attention_filter, setting_for_ratio, window_scores
from tokenprune.pruner import PruningInputs, Stage
from tokenprune.testing import recording
from tokenprune.zoo.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]
# Tiny-model options: filter after decoder layers 1, 2, 3 (cuts seen from 2, 3, 4) of 6; thresholds and a
# merge threshold inside the tiny model's ranges, so every stage cuts something.
TINY = dict(layers="1,2,3", global_thr=0.00625, individual_thr=0.01, merge_threshold=0.06)


# -- the official code, transcribed ----------------------------------------------------------------------
def _rearrange(x, pattern, **axes):
    """The three ``einops.rearrange`` patterns ``conditional_pooling`` uses (einops is no dependency here)."""
    if pattern == "b (h w) c -> b c h w":
        b, n, c = x.shape
        return x.reshape(b, axes["h"], n // axes["h"], c).permute(0, 3, 1, 2)
    if pattern == "b c (gh ps_h) (gw ps_w) -> b gh gw c ps_h ps_w":
        b, c, hh, ww = x.shape
        gh, gw = axes["gh"], axes["gw"]
        return x.reshape(b, c, gh, hh // gh, gw, ww // gw).permute(0, 2, 4, 1, 3, 5)
    if pattern == "b c h w-> b (c h w)":
        return x.reshape(x.shape[0], -1)
    raise NotImplementedError(pattern)


def official_conditional_pooling(feat, threshold, window_size):
    """local_merge.py ``conditional_pooling`` L30-133, verbatim but for ``_rearrange`` and
    ``torch.tensor(threshold).to(...)`` (the official ``.cuda(sims.device)``)."""
    import torch.nn.functional as F

    with torch.no_grad():
        ws_h, ws_w = int(window_size[0]), int(window_size[1])
        stride_h, stride_w = ws_h, ws_w
        num_token_window = stride_h * stride_w
        x_cls, feat = feat[:, :1, :], feat[:, 1:, :]
        B, N, D = feat.size()
        base_grid_H = int(math.sqrt(N))
        base_grid_W = base_grid_H
        assert base_grid_H * base_grid_W == N and base_grid_H % ws_h == 0 and base_grid_W % ws_w == 0
        feat = _rearrange(feat, "b (h w) c -> b c h w", h=base_grid_H)
        feat = _rearrange(feat, 'b c (gh ps_h) (gw ps_w) -> b gh gw c ps_h ps_w', gh=base_grid_H // ws_h, gw=base_grid_W // ws_w)
        b, gh, gw, c, ps_h, ps_w = feat.shape
        tensor_flattened = feat.reshape(b, gh, gw, c, -1)
        tensor_1 = tensor_flattened.unsqueeze(-1)
        tensor_2 = tensor_flattened.unsqueeze(-2)
        sims = F.cosine_similarity(tensor_1, tensor_2, dim=3)
        sims_mask = 1 - torch.eye(ps_h * ps_w).to(sims.device)
        sims = sims * sims_mask
        similarity_map = sims.sum(-1).sum(-1) / ((ps_h * ps_w) * (ps_h * ps_w - 1))
        similarity_map = _rearrange(similarity_map.unsqueeze(1), 'b c h w-> b (c h w)')
        n_B, n_H = similarity_map.shape
        node_mean = torch.tensor(threshold).to(sims.device)
        node_mean = node_mean.repeat(1, n_H)
        r = torch.ge(similarity_map, node_mean).sum(dim=1).min()
        _, sim_super_patch_idxs = similarity_map.topk(r, dim=-1)
        tensor = torch.arange(base_grid_H * base_grid_W).reshape(base_grid_H, base_grid_W).to(feat.device)
        tensor = tensor.unsqueeze(0).repeat(B, 1, 1)
        windowed_tensor = tensor.unfold(1, ws_h, stride_h).unfold(2, ws_w, stride_w)
        windowed_tensor = windowed_tensor.reshape(B, -1, num_token_window)
        gathered_tensor = torch.gather(windowed_tensor, 1, sim_super_patch_idxs.unsqueeze(-1).expand(-1, -1, num_token_window))
        mask = torch.ones((B, windowed_tensor.shape[1]), dtype=bool).to(feat.device)
        mask_values = torch.zeros_like(sim_super_patch_idxs, dtype=torch.bool).to(feat.device)
        mask.scatter_(1, sim_super_patch_idxs, mask_values)
        remaining_tensor = windowed_tensor[mask.unsqueeze(-1).expand(-1, -1, num_token_window)].reshape(B, -1, num_token_window)
        unm_idx = remaining_tensor.reshape(B, -1).sort(dim=-1).values.unsqueeze(-1)
        dim_index = (num_token_window) - 1
        src_idx = gathered_tensor[:, :, :dim_index].reshape(B, -1).unsqueeze(-1)
        dst_idx = gathered_tensor[:, :, dim_index].reshape(B, -1).unsqueeze(-1)
        merge_idx = torch.arange(src_idx.shape[1] // dim_index).repeat_interleave(dim_index).repeat(B, 1).unsqueeze(-1).to(feat.device)

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:
        x_cls, x_feat = x[:, :1, :], x[:, 1:, :]
        n, t1, c = x_feat.shape
        src = x_feat.gather(dim=-2, index=src_idx.expand(n, r * dim_index, c))
        dst = x_feat.gather(dim=-2, index=dst_idx.expand(n, r, c))
        unm = x_feat.gather(dim=-2, index=unm_idx.expand(n, t1 - (r * num_token_window), c))
        dst = dst.scatter_reduce(-2, merge_idx.expand(n, r * dim_index, c), src, reduce=mode)
        x = torch.cat([dst, unm], dim=1)
        x = torch.cat((x_cls, x), dim=1)
        return x

    return merge


def official_merge_wavg(merge, x, size=None):
    """local_merge.py ``merge_wavg`` L135-146, verbatim."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    x = x / size
    return x, size


def official_dual_attention_filter(attn, v_token_start, img_seq, global_thr=1.0, individual_thr=0.0):
    """modelling_sparse_llama.py ``LlamaDynamicvitModel.dual_attention_filter`` L336-354, verbatim (``self`` dropped)."""
    b, head, total_seq, _ = attn.shape
    attn = attn[0]
    text_seq = total_seq - img_seq - v_token_start
    attn = attn.narrow(1, v_token_start + img_seq, text_seq).narrow(2, v_token_start, img_seq)
    attn = attn.mean(dim=0)
    attn_sum = attn.sum(dim=0)
    candidate_mask = (attn_sum < attn_sum.sum(dim=0) * global_thr) & (attn.max(dim=0)[0] < individual_thr)
    all_indices = torch.arange(img_seq, device=attn.device)
    important_indices = all_indices[~candidate_mask]
    return important_indices, text_seq


def official_stage(attn, v_token_start, img_seq, key_set, global_thr, individual_thr):
    """``LlamaDynamicvitModel.forward`` L253-264: the filter, then the key set joined and re-indexed."""
    vis_indices, text_seq = official_dual_attention_filter(attn, v_token_start, img_seq, global_thr=global_thr,
                                                           individual_thr=individual_thr)
    vis_indices = torch.cat((vis_indices, key_set))
    vis_indices = torch.unique(vis_indices)
    key_set = torch.nonzero(torch.isin(vis_indices, key_set)).squeeze()
    return vis_indices, key_set, text_seq


def official_kv_trim(next_cache, final_indices, pruning_layers, n_layers):
    """``LlamaDynamicvitModel.forward`` L300-323 (the loop bound 32 is the decoder depth): per layer ``(K, V)``."""
    stage = 0
    next_decoder_cache_new = []
    for i in range(len(final_indices) - 1, 0, -1):
        final_indices[i - 1] = torch.index_select(final_indices[i - 1], 0, final_indices[i])
    for i in range(pruning_layers[0]):
        next_decoder_cache_new.append((next_cache[i][0], next_cache[i][1]),)
    for i in range(pruning_layers[0], pruning_layers[-1] + 1):
        next_decoder_cache_new.append((torch.index_select(next_cache[i][0], 2, final_indices[stage]),
                                       torch.index_select(next_cache[i][1], 2, final_indices[stage])))
        if i == pruning_layers[stage]:
            stage += 1
    for i in range(pruning_layers[-1] + 1, n_layers):
        next_decoder_cache_new.append((next_cache[i][0], next_cache[i][1]),)
    return next_decoder_cache_new


def _clip_attention_probs(layer, x):
    """``[B, H, T, T]`` softmax attention probabilities of a CLIP encoder layer on its input ``x``, by hand."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    b, t, _ = h.shape
    q = attn.q_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def official_custom_forward(tower, pixel_values, threshold, keep_rate=0.08):
    """clip_encoder.py ``CLIPVisionModelAcc.custom_forward`` L67-124 (inference branch); ``idx == 23`` is the
    last layer; its attention maps by hand (transformers 5's CLIP layers return none). Returns
    ``(hidden_states per layer, key set index)``."""
    vm = getattr(tower, "vision_model", tower)
    layers = vm.encoder.layers
    hidden_states = vm.pre_layrnorm(vm.embeddings(pixel_values))
    encoder_states = ()
    last = len(layers) - 1
    for idx, encoder_layer in enumerate(layers):
        encoder_states = encoder_states + (hidden_states,)
        layer_outputs = (encoder_layer(hidden_states, None),
                         _clip_attention_probs(encoder_layer, hidden_states) if idx == last else None)
        hidden_states = layer_outputs[0]
        if idx == last:
            B, N, C = hidden_states.shape
            attn = layer_outputs[1]
            left_tokens = math.ceil(keep_rate * (N - 1))
            cls_attn = attn[:, :, 0, 1:]
            cls_attn = cls_attn.mean(dim=1)
            _, index = torch.topk(cls_attn, left_tokens, dim=1, largest=True)
        if idx == 0:
            merge = official_conditional_pooling(hidden_states, threshold, (3, 3))
            hidden_states, size = official_merge_wavg(merge, hidden_states, None)
    encoder_states = encoder_states + (hidden_states,)
    return encoder_states, index


# -- helpers ------------------------------------------------------------------------------------------
def _state(hidden, grid, block=0, point="block", attention=None):
    b, t, _ = hidden.shape
    return VisionState(hidden=hidden, prefix=1, grid=grid, block=block, point=point, n_blocks=2, target=t - 1,
                       sizes=torch.ones(b, t), origin=(torch.arange(t) - 1).clamp_min(-1).expand(b, -1).clone(),
                       attention=attention)


def _apply(red, hidden):
    b, t, _ = hidden.shape
    members = (torch.arange(t - 1) + 1).expand(b, -1).clone()
    return apply_reduction(red, hidden, torch.ones(b, t), (torch.arange(t) - 1).clamp_min(-1).expand(b, -1).clone(), members)


@functools.lru_cache(maxsize=None)
def _llava():
    """Tiny LLaVA: CLIP tower of 3 blocks at 48 px / patch 4 (12x12 grid), 6-layer Llama, sharpened attention."""
    lvlm = tp.wrap(*tiny_llava(image_size=48, patch_size=4, text=dict(num_hidden_layers=6)))
    with torch.no_grad():
        for layer in lvlm.runner.layers:
            layer.self_attn.q_proj.weight.mul_(48)
    return lvlm


def _images(n=2):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (48, 48, 3), dtype=np.uint8)) for i in range(n)]


def _mustdrop(**kw):
    return tp.create_pruner("mustdrop", **{**TINY, **kw})


# -- hand-computed -------------------------------------------------------------------------------------
def test_window_scores_and_merge_by_hand():
    # 6x6 grid, four 3x3 windows: all alike (score 1); one odd out at 90 degrees (56/72); one at 45 degrees
    # ((56 + 16 cos45) / 72 = .935); five against four opposite (-8/72).
    grid = torch.zeros(6, 6, 2)
    grid[:3, :3] = torch.tensor([1.0, 0.0])
    grid[:3, 3:] = torch.tensor([0.0, 1.0])
    grid[0, 5] = torch.tensor([1.0, 0.0])
    grid[3:, :3] = torch.tensor([1.0, 1.0])
    grid[3, 0] = torch.tensor([1.0, 0.0])
    grid[3:, 3:] = torch.tensor([1.0, 0.0])
    grid[3, 4] = grid[3, 5] = grid[4, 3] = grid[5, 4] = torch.tensor([-1.0, 0.0])
    hidden = torch.cat([torch.tensor([[5.0, 5.0]]), grid.view(36, 2)])[None]
    scores = window_scores(hidden[:, 1:], (6, 6), 3)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 56 / 72, (56 + 16 * 0.5 ** 0.5) / 72, -8 / 72]]))
    red = tp.create_pruner("mustdrop").select(_state(hidden, (6, 6)))
    # r = 2 windows >= 0.8: window 0 (1.0), then window 2 (.935); then windows 1 and 3's patches, ascending
    unmerged = [3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23, 27, 28, 29, 33, 34, 35]
    expected = [0] + [0] * 36
    for p in range(36):
        row, col = divmod(p, 6)
        expected[1 + p] = 1 if (row < 3 and col < 3) else 2 if (row >= 3 and col < 3) else 3 + unmerged.index(p)
    assert red.slots.tolist() == [expected] and red.length == 21 == 1 + 36 - 8 * 2
    h, *_ = _apply(red, hidden)
    torch.testing.assert_close(h[0, :3], torch.tensor([[5.0, 5.0], [1.0, 0.0], [1.0, 8 / 9]]))
    torch.testing.assert_close(h[0, 3:], hidden[0, 1:][unmerged])


def test_dual_attention_filter_and_key_set_by_hand():
    # two text rows over four image tokens (the rest of each row went to other tokens)
    attn = torch.tensor([[[0.5, 0.002, 0.0005, 0.1], [0.3, 0.0004, 0.0003, 0.2]]])
    # g = [.8, .0024, .0008, .3], sum 1.1032; max = [.5, .002, .0005, .2]
    dropped, g = dual_attention_filter(attn, None, 0.001, 0.001)  # g < .0011032 and max < .001: token 2
    assert dropped.tolist() == [[False, False, True, False]]
    torch.testing.assert_close(g, torch.tensor([[0.8, 0.0024, 0.0008, 0.3]]))
    dropped, _ = dual_attention_filter(attn, None, 0.01, 0.001)  # g < .011032: 1 and 2, but 1's max is .002
    assert dropped.tolist() == [[False, False, True, False]]
    dropped, _ = dual_attention_filter(attn, None, 0.01, 0.003)
    assert dropped.tolist() == [[False, True, True, False]]
    # a padding query row counts nothing
    padded = torch.cat([attn, torch.full((1, 1, 4), 0.9)], 1)
    assert dual_attention_filter(padded, torch.tensor([[True, True, False]]), 0.01, 0.003)[0].tolist() == [[False, True, True, False]]
    p = tp.create_pruner("mustdrop", global_thr=0.01, individual_thr=0.003)
    inputs = PruningInputs(tokens=torch.zeros(1, 4, 2), grid=(1, 4), llm_attention=attn)
    assert p.select(inputs).indices.tolist() == [[0, 3]]
    inputs.protected = torch.tensor([[False, False, True, False]])  # the key set always survives
    assert p.select(inputs).indices.tolist() == [[0, 2, 3]]
    # key set: the last block's CLS row over 9 patch tokens; ceil(.08 * 9) = 1, ceil(.3 * 9) = 3
    cls = torch.tensor([[[0.1, 0.05, 0.2, 0.01, 0.3, 0.02, 0.04, 0.15, 0.03, 0.1]]])
    hidden = torch.zeros(1, 10, 2)
    red = tp.create_pruner("mustdrop").select(_state(hidden, (3, 3), block=2, point="attention", attention=cls))
    assert red.length == 10 and red.protect.nonzero()[:, 1].tolist() == [4]
    red = tp.create_pruner("mustdrop", key_rate=0.3).select(_state(hidden, (3, 3), block=2, point="attention", attention=cls))
    assert red.protect.nonzero()[:, 1].tolist() == [2, 4, 7]


def test_options_ratio_mapping_and_refusals():
    assert [setting_for_ratio(r) for r in (64 / 576, 95 / 576, 96 / 576, 128 / 576, 0.3, 192 / 576, 0.9, 1.0)] == \
        ["64", "64", "128", "128", "192", "192", "192", None]
    p = tp.create_pruner("mustdrop")
    assert p.thresholds() == (0.001, 0.001) and p.uses_ratio and p.adaptive and p.position_policy == "compact"
    assert p.acts_in(Stage.IN_VISION) and p.acts_in(Stage.IN_LLM) and p.acts_in(Stage.DECODE)
    assert tp.create_pruner("mustdrop", ratio=128 / 576).thresholds() == (0.0012, 0.001)
    assert tp.create_pruner("mustdrop", ratio=0.1).thresholds() == (0.011, 0.01)
    assert tp.create_pruner("mustdrop", setting=64).thresholds() == (0.011, 0.01)
    assert not tp.create_pruner("mustdrop", setting="vizwiz64").uses_ratio
    assert not tp.create_pruner("mustdrop", global_thr=0.1, individual_thr=0.2).uses_ratio
    assert tp.create_pruner("mustdrop", ratio=1.0).thresholds() == (0.0, 0.0)
    assert [st.layer for st in p.needs.schedule()] == [3, 7, 11, 15]  # each filter cuts from the next layer
    plan = p.decode_plan(32)
    assert plan.cut_layers == tuple(range(2, 15)) and plan.positions == "cache_length"
    assert tp.create_pruner("mustdrop", kv_trim=False).decode_plan(32).cut_layers == ()
    for bad in (dict(setting="100"), dict(window=1), dict(key_rate=2), dict(layers="6,2"), dict(kv_trim="yes"),
                dict(decode_positions="x"), dict(global_thr=-1)):
        with pytest.raises(OptionError) as err:
            tp.create_pruner("mustdrop", **bad)
        assert "\n" not in str(err.value)
    # a grid the 3x3 windows do not tile, a tower without CLS: one line each
    with pytest.raises(OptionError, match="divisible by 3"):
        p.select(_state(torch.zeros(1, 65, 2), (8, 8)))
    state = _state(torch.zeros(1, 36, 2), (6, 6))
    state.prefix = 0
    with pytest.raises(OptionError, match="CLS"):
        p.select(state)


# -- against the official functions on random inputs --------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 5, 3])  # r = 2, 1, 1, 1 (the fewest over the batch), and 0
def test_merge_equals_official_conditional_pooling(seed):
    g = torch.Generator().manual_seed(seed)
    b, side, d = 2, 9, 16
    members = tokenprune.methods.mustdrop.window_members((side, side), 3)
    base = torch.randn(b, members.shape[0], 1, d, generator=g)  # one direction per window, noise of varied size
    noise = torch.rand(b, members.shape[0], 1, 1, generator=g) * 2
    patches = torch.empty(b, side * side, d)
    patches[:, members] = base + noise * torch.randn(b, members.shape[0], 9, d, generator=g)
    hidden = torch.cat([torch.randn(b, 1, d, generator=g), patches], 1)
    merge = official_conditional_pooling(hidden, 0.8, (3, 3))
    ref, _ = official_merge_wavg(merge, hidden, None)
    closure = dict(zip(merge.__code__.co_freevars, (c.cell_contents for c in merge.__closure__)))
    r = int(closure["r"])
    red = tp.create_pruner("mustdrop").select(_state(hidden, (side, side)))
    if r == 0:
        assert red is None and seed == 3
        return
    h, _, _, m = _apply(red, hidden)
    assert h.shape == ref.shape and red.length == 1 + side * side - 8 * r
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-5)
    # identical indices: merged slot j holds the official j-th window (its last patch the official dst), then
    # the official unmerged patches in order
    for i in range(b):
        slots = red.slots[i, 1:]
        dst = [int(torch.nonzero(slots == 1 + j).max()) for j in range(r)]
        assert dst == closure["dst_idx"][i, :, 0].tolist()
        unm = [int(torch.nonzero(slots == 1 + r + j)[0]) for j in range(side * side - 9 * r)]
        assert unm == closure["unm_idx"][i, :, 0].tolist()
    assert r == int((window_scores(hidden[:, 1:], (side, side), 3) >= 0.8).sum(1).min())  # the fewest over the batch


@pytest.mark.parametrize("seed", range(4))
def test_filter_stages_equal_the_official_loop(seed):
    """Four stages of the filter with the key set joined and re-indexed, as the official forward does."""
    g = torch.Generator().manual_seed(seed)
    v_start, img_seq, n_text, heads = 5, 60, 7, 4
    key = torch.randperm(img_seq, generator=g)[:5]
    protected = torch.zeros(1, img_seq, dtype=torch.bool)
    protected[0, key] = True
    p = tp.create_pruner("mustdrop", global_thr=0.012, individual_thr=0.05)
    n = img_seq
    for stage in range(4):
        total = v_start + n + n_text
        attn = (3 * torch.randn(1, heads, total, total, generator=g)).softmax(-1)
        ref, key, text_seq = official_stage(attn, v_start, n, key, 0.012, 0.05)
        rows = attn[0, :, v_start + n:].mean(0)[None]  # what the decoder hands over: the text rows, head-averaged
        red = p.select(PruningInputs(tokens=torch.zeros(1, n, 2), grid=(1, n), llm_attention=rows[..., v_start:v_start + n],
                                     protected=protected, stage=stage))
        assert red.indices[0].tolist() == ref.tolist() and text_seq == n_text
        protected = protected[:, red.indices[0]]
        assert protected[0].nonzero().flatten().tolist() == key.flatten().tolist()
        n = red.num_kept
    assert n < img_seq


def test_stage_one_in_the_tower_equals_official_custom_forward():
    lvlm = _llava()
    tower = lvlm.model.model.vision_tower
    px = lvlm.prepare(_images(2), PROMPTS)["pixel_values"]
    p = _mustdrop()
    with torch.no_grad():
        states, index = official_custom_forward(tower, px, TINY["merge_threshold"])
        run = run_tower(tower, px, p, -2, 1)  # both images in one call: r is the fewest over the batch, as official
    torch.testing.assert_close(run.features, states[-2], rtol=0, atol=1e-5)
    assert run.features.shape[1] < 145
    for i in range(2):
        assert run.protected[i].nonzero().flatten().tolist() == sorted(index[i].tolist())
    # blocks 0, 1 whole; block 2 (past LLaVA's feature block) only its attention, for the key set
    t = run.features.shape[1]
    assert run.blocks == [(145, 145), (t, t), (t, 0)]


# -- the three stages in the model ---------------------------------------------------------------------
def test_blocks_and_layers_receive_the_schedule():
    lvlm = _llava()
    tower = lvlm.model.model.vision_tower
    seen: list[tuple[str, int]] = []
    hooks = []
    for i, layer in enumerate(tower.encoder.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.append((f"attn{i}", k["hidden_states"].shape[1])), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.append((f"mlp{i}", a[0].shape[1]))))
    llm: dict[int, int] = {}

    def count(i, module, args, kwargs):
        llm.setdefault(i, (args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks += [layer.register_forward_pre_hook(functools.partial(count, i), with_kwargs=True)
              for i, layer in enumerate(lvlm.runner.layers)]
    p = _mustdrop()
    calls = recording(p)
    try:
        out = lvlm.generate(_images(1), PROMPTS[:1], pruner=p, max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    merge, keys, *filters = [red for _, red in calls]
    t = merge.length  # 1 + 144 - 8r
    assert seen == [("attn0", 145), ("mlp0", 145), ("attn1", t), ("mlp1", t), ("attn2", t)]
    k = [t - 1] + [red.num_kept for red in filters]
    assert k[0] > k[1] > k[2] > k[3] > int(keys.protect.sum()) == math.ceil(0.08 * (t - 1))
    st = out.stats[0]
    visual = [k[0], k[0], k[1], k[2], k[3], k[3]]
    assert [llm[i] - st.text_tokens for i in range(6)] == visual == st.visual_per_layer
    assert st.visual_tokens_avg == sum(visual) / 6 and st.visual_tokens_kept == k[3]
    assert st.vision_blocks == [((145, 145), (t, t), (t, 0))] and st.visual_tokens_projected == t - 1
    # the key set reaches every filter stage, re-indexed with the tokens, and survives them
    for inputs, red in calls[2:]:
        kept = torch.zeros_like(inputs.protected).scatter(1, red.indices, True)
        assert int(inputs.protected.sum()) == int(keys.protect.sum()) and bool((kept | ~inputs.protected).all())


def test_kv_trim_equals_the_official_cache_composition():
    """The cut caches of layers 1..3 are the official ``index_select`` of the uncut ones by the composed indices."""
    lvlm = _llava()
    caches = {}

    def grab(name, original):
        def cut(cache, layouts, layer_of):
            original(cache, layouts, layer_of)
            caches[name] = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        return cut

    p, full = _mustdrop(), _mustdrop(kv_trim=False)
    calls = recording(p)
    original = type(lvlm.runner)._cut_cache
    try:
        lvlm.runner._cut_cache = grab("cut", original)
        out = lvlm.generate(_images(1), PROMPTS[:1], pruner=p, max_new_tokens=2)
        lvlm.runner._cut_cache = grab("full", original)
        lvlm.generate(_images(1), PROMPTS[:1], pruner=full, max_new_tokens=2)
    finally:
        del lvlm.runner._cut_cache
    st = out.stats[0]
    n_text = st.text_tokens
    batch = lvlm.prepare(_images(1), PROMPTS[:1])
    ids = batch["input_ids"][0]
    v_start = int((ids == lvlm.model.config.image_token_id).nonzero()[0])  # tokens before the image
    text_seq = n_text - v_start
    final_indices, n = [], st.visual_per_layer[0]
    for _, red in calls[2:]:
        vis = red.indices[0]
        final_indices.append(torch.cat([torch.arange(v_start), vis + v_start, torch.arange(v_start + n, v_start + n + text_seq)]))
        n = vis.shape[0]
    expected = official_kv_trim(caches["full"], final_indices, [1, 2, 3], 6)
    for i in range(6):
        assert torch.equal(caches["cut"][i][0], expected[i][0]) and torch.equal(caches["cut"][i][1], expected[i][1])
    assert caches["cut"][1][0].shape[2] == n_text + st.visual_per_layer[-1] < caches["cut"][0][0].shape[2]


def test_cached_decoding_with_the_kv_trim_equals_the_reference():
    lvlm = _llava()
    p = _mustdrop()

    def run(use_cache):
        logits = []
        hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, o: logits.append(o[:, -1].float()))
        try:
            out = lvlm.generate(_images(2), PROMPTS, pruner=p, max_new_tokens=5, ignore_eos=True, use_cache=use_cache)
        finally:
            hook.remove()
        return out, torch.stack(logits, 1)

    cached, a = run(True)
    uncached, b = run(False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # batch of 2 == each alone (every image through the tower alone, every sample through each stage alone)
    for i in range(2):
        alone = lvlm.generate(_images(2)[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=5, ignore_eos=True)
        assert torch.equal(alone.token_ids[0], cached.token_ids[i]) and alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=0, atol=1e-4)


def test_loglikelihood_prefills_as_generate_does():
    lvlm = _llava()
    p = _mustdrop()
    ll = lvlm.loglikelihood(_images(2), PROMPTS, [" yes", " no no"], pruner=p)
    out = lvlm.generate(_images(2), PROMPTS, pruner=p, max_new_tokens=1)
    torch.testing.assert_close(ll.first_logits, out.first_logits, rtol=0, atol=1e-5)
    assert [s.visual_per_layer for s in ll.stats] == [s.visual_per_layer for s in out.stats]


def test_ratio_one_is_the_unpruned_model():
    lvlm = _llava()
    ref = lvlm.generate(_images(2), PROMPTS, max_new_tokens=5)
    out = lvlm.generate(_images(2), PROMPTS, pruner=tp.create_pruner("mustdrop", ratio=1.0, layers="1,2,3"),
                        max_new_tokens=5)
    assert torch.equal(out.token_ids, ref.token_ids)
    torch.testing.assert_close(out.first_logits, ref.first_logits, rtol=0, atol=1e-5)
    assert out.stats[0].visual_per_layer == [144] * 6


@pytest.mark.parametrize("what", ["grid", "siglip", "family"])
def test_models_it_cannot_run_on_refuse_in_one_line(what):
    images = [Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))]
    if what == "grid":  # 8x8 patches: the 3x3 windows do not tile it
        lvlm, match = tp.wrap(*tiny_llava()), "divisible by 3"
    elif what == "siglip":
        model, proc = tiny_llava(image_size=48, patch_size=4, vision=dict(model_type="siglip_vision_model"))
        model.config.vision_feature_select_strategy = "full"
        proc.vision_feature_select_strategy, proc.num_additional_image_tokens = "full", 0
        lvlm, match = tp.wrap(model, proc), "CLS"
    else:
        lvlm, match = tp.load("tiny-qwen2-vl"), "inside its vision tower"
    with pytest.raises(OptionError, match=match) as err:
        lvlm.generate(images, PROMPTS[:1], pruner=_mustdrop(), max_new_tokens=1)
    assert "\n" not in str(err.value)


# -- the in-vision marks MustDrop relies on ----------------------------------------------------------------
class _MarkThenMerge(tp.TokenPruner):
    """Block 0, attention point: mark patch tokens 1 and 6; block 0, after the block: merge patch pairs
    (0+1, 2+3, ...). Block -1 (past the feature block): ``cut`` there if asked (refused)."""

    stage = Stage.IN_VISION

    def __init__(self, ratio: float = 0.5, cut_late: bool = False):
        self.ratio, self.cut_late = ratio, cut_late

    def vision_hooks(self, n_blocks):
        from tokenprune.in_vision import VisionHook

        return (VisionHook(0, "attention"), VisionHook(0, "block"), VisionHook(-1, "attention", attention="prefix"))

    def select(self, state):
        from tokenprune.in_vision import VisionReduction

        b, t = state.hidden.shape[:2]
        if state.block == 0 and state.point == "attention":
            protect = torch.zeros(b, t, dtype=torch.bool)
            protect[:, [0, 2, 7]] = True  # the CLS mark is dropped: prefix tokens are never marked
            return VisionReduction.mark(protect)
        if state.block == 0:
            slots = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(t - 1) // 2])
            return VisionReduction(slots=slots.expand(b, -1).clone(), length=1 + (t - 1) // 2)
        assert state.protected is not None and state.protected.shape == (b, t)
        if self.cut_late:
            return VisionReduction.keep(torch.arange(t - 1).expand(b, -1), t)
        return None


def test_marks_travel_through_merges_and_late_blocks_only_mark():
    tower = _llava().model.model.vision_tower
    px = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        run = run_tower(tower, px, _MarkThenMerge(), -2, 1)
    # patches 1 and 6 (tokens 2 and 7) were marked; after the pairwise merge they are tokens 0 and 3
    assert run.features.shape[1] == 73 and run.protected.shape == (2, 72)
    assert run.protected.nonzero()[:, 1].tolist() == [0, 3, 0, 3]
    assert run.blocks == [(145, 145), (73, 73), (73, 0)]  # block 2 only for its attention
    with pytest.raises(OptionError, match="may only mark") as err, torch.no_grad():
        run_tower(tower, px, _MarkThenMerge(cut_late=True), -2, 1)
    assert "\n" not in str(err.value)


def test_decode_flops_count_the_cut_caches():
    """After the KV cut, the filter layers (official 2..14; here 1..3 of 6, TINY) decode against the final set:
    the stats say what each cache held, and decode FLOPs are counted from it, below what prefill cached."""
    from tokenprune import cost

    lvlm = _llava()
    out = lvlm.generate(_images(1), PROMPTS[:1], pruner=_mustdrop(), max_new_tokens=4, ignore_eos=True)
    st = out.stats[0]
    final = st.tokens_per_layer[-1]
    assert st.cache_per_layer[0] == st.tokens_per_layer[0]  # the layer before the first filter keeps its cache
    assert st.cache_per_layer[1:] == [final] * (len(st.tokens_per_layer) - 1)
    assert st.tokens_per_layer[1] > final  # the later filters really cut
    dims = cost.TextDims.from_config(lvlm.model.config)
    c = cost.sample_cost(lvlm.model.config, lvlm.vision_spec(), st)
    assert c.decode == 2.0 * cost.decode_macs(dims, st.cache_per_layer, 4)
    assert c.decode < 2.0 * cost.decode_macs(dims, st.tokens_per_layer, 4)
