"""HoliTom (``holitom``): the static-window dynamic programme, the density merge, a frame's attention / density
split and the in-LLM sequential merge by hand; the official pre-LLM stage (cokeshao/HoliTom@e9b2972
``holitom/llava_arch.py``: ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``merge_tokens_by_clustering``,
``cluster_dpc_knn``, with ``prepare_inputs_labels_for_multimodal``'s glue) and the in-LLM block
(``holitom/modeling_qwen2.py`` ``Qwen2Model_holitom.forward``) transcribed and compared on random inputs (same
tokens <= 1e-5, same kept indices), and the official LLM loop (layer K - 1's attention, the block at K,
``position_ids = keep_indexs``) on the tiny OneVision, Qwen2-VL and NeXT-Video decoders (same first logits and
per-layer counts); on every video family's tiny model: the official pre-LLM stage on the very
tokens and attention the adapter handed the pruner (same count and tokens), ratio 1.0 == unpruned, the tokens
entering each decoder layer by forward pre-hooks == text + the pre-LLM count up to layer K and round(N / 2)
from it, cached == uncached, a batch of two videos == each alone; an image sample refused in one line; the
framework's contract checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenprune as tp
import tokenprune.methods.holitom as ht  # registers "holitom" (methods/__init__.py does not import it yet)
from tokenprune.errors import OptionError
from tokenprune.pruner import LLMStage, PruningInputs, Reduction
from tokenprune.testing import check_pruner_contract, recording, synthetic_inputs

from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def unit(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], -1).float()


# -- hand-computed ---------------------------------------------------------------------------------------------

def test_layer_rule_and_options():
    assert [ht.scaled_layer(n) for n in (28, 4, 32, 36, 2, 0)] == [18, 3, 21, 23, 1, 18]
    p = tp.create_pruner("holitom")
    assert (p.ratio, p.keep_share, p.tau, p.beta, p.d, p.k, p.max_window, p.llm_ratio) == (0.1, 0.1, 0.8, 0.6, 0.0, 7,
                                                                                            1024, 0.5)
    assert p.llm_schedule(28) == (LLMStage(18, "previous", "last"),)
    assert tp.create_pruner("holitom", llm_ratio=0).llm_schedule(28) == ()  # HoliTom (w/o M)
    assert tp.create_pruner("holitom", ratio=1.0).llm_schedule(28) == ()
    assert tp.create_pruner("holitom", ratio=1.0, retain=1.0).llm_schedule(4) == (LLMStage(3, "previous", "last"),)
    for bad in [dict(tau=2), dict(beta=-1), dict(k=0), dict(retain=0), dict(llm_layer=0), dict(llm_ratio=1.5)]:
        with pytest.raises(OptionError) as err:
            tp.create_pruner("holitom", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="clip"):
        tp.create_pruner("holitom", scope="frame")


def test_static_windows_by_hand():
    # 4 frames, 3 positions; pairs (0,1): [.9, .9, .1], (1,2): [.9, .1, .1], (2,3): all .1; tau 0.8
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.1]])
    # saved[s, e] = static positions on pairs s..e-1 x (e - s): [0,1] 2, [0,2] 1 x 2 = 2, [1,2] 1, the rest 0.
    # dp: [0, 2, 2, 2] -- frame 2: [0,2] also saves 2 but is not strictly better than [0,1] + {2}
    windows, saved = ht.static_windows(sim, 0.8, 1024)
    assert windows == [(0, 1), (2, 2), (3, 3)] and saved == 2
    # windows of at most 1 frame: nothing static
    assert ht.static_windows(sim, 0.8, 1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0.0)
    # all static: one window of 4 frames saves 3 x 3 = 9
    assert ht.static_windows(torch.ones(3, 3), 0.8, 1024) == ([(0, 3)], 9.0)


def test_density_merge_by_hand():
    # 1-D points 0, 0.1, 0.25, 10, 10.5 (dist = |a - b|); 3 centres, k = 3: densities exp(-mean of the 3 smallest
    # d^2): p1 (0, .01, .0225) > p0 (0, .01, .0625) > p2 (0, .0225, .0625) > p3 > p4; distance to a denser token:
    # p1 the largest (10.5), p0 .1, p2 .15, p3 9.75, p4 .5; scores: p1 10.39, p2 .146, p0 .098, p3 ~1e-13, p4 ~0
    x = torch.tensor([[0.0], [0.1], [0.25], [10.0], [10.5]])
    centres, w = ht.density_merge(x, 3, 0.6, 7)
    assert centres.tolist() == [0, 1, 2]
    # p3 and p4 join p2 (the nearest): 0.6 p2 + 0.4 mean(p3, p4); p0 and p1 have no members: themselves
    torch.testing.assert_close(w, torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, .6, .2, .2]]))
    # 2 centres, k = 2: densities exp(-mean(0, nearest^2)): p0 = p1 (.005; the tie: the lower index is denser,
    # the official's 1e-6 noise decides at random), p2 (.01125), p3 = p4 (.125); scores: p0 10.5 x .995 = 10.45,
    # p3 9.75 x .882 = 8.6 (its nearest denser token is p2), p4 .44 (p3 counts as denser), p2 .148, p1 .0995
    centres, w = ht.density_merge(x, 2, 0.6, 7)
    assert centres.tolist() == [0, 3]
    torch.testing.assert_close(w, torch.tensor([[.6, .2, .2, 0, 0], [0, 0, 0, .6, .4]]))


def test_frame_split_by_hand():
    x = torch.tensor([[0.0], [0.1], [0.25], [10.0], [10.5], [20.0]])
    attn = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.25, 0.1])
    # r = 0.5: ceil(3) = 3 tokens; d = 0: the top 3 by attention (3, 4, 1), in order
    idx, w = ht.frame_tokens(x, attn, 0.5, 0.0, 0.6, 7)
    assert idx.tolist() == [1, 3, 4] and torch.equal(w, torch.eye(6)[[1, 3, 4]])
    # d = 0.4: round(3 * 0.6) = 2 by attention (3, 4), 1 density-merged from the rest 0, 1, 2, 5 (k = 1)
    idx, w = ht.frame_tokens(x, attn, 0.5, 0.4, 0.6, 7)
    assert idx.tolist()[:2] == [3, 4] and len(idx) == 3
    assert w[2].sum().item() == pytest.approx(1.0) and w[2, idx[2]] == pytest.approx(0.6)


def test_llm_merge_by_hand():
    # 5 tokens at 0, 90, 10, 80, 40 degrees; attention keeps 0 (0.5) and 1 (0.3); then, in order: 2 (10) -> 0,
    # 3 (80) -> 1, 4 (40) -> 0: h0 = ((h0 + h2) / 2 + h4) / 2, h1 = (h1 + h3) / 2
    x = unit([0, 90, 10, 80, 40])
    kept, into, w = ht.llm_merge(x, torch.tensor([0.5, 0.3, 0.05, 0.1, 0.05]), 2)
    assert kept.tolist() == [0, 1] and into.tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(w, torch.tensor([0.25, 0.5, 0.25, 0.5, 0.5]))
    out = Reduction(indices=kept[None], merge_into=into[None], merge_into_weights=w[None]).apply(x[None])[0]
    torch.testing.assert_close(out, torch.stack([((x[0] + x[2]) / 2 + x[4]) / 2, (x[1] + x[3]) / 2]))


def test_refusals_in_one_line():
    p = tp.create_pruner("holitom")
    inputs = PruningInputs(tokens=torch.randn(1, 8, 4), grid=(1, 8), view_grids=((2, 2),) * 2,
                           token_views=torch.tensor([[0] * 4 + [1] * 4]),
                           view_times=torch.tensor([[0.0, float("nan")]], dtype=torch.float64),
                           vision_attention=None)
    with pytest.raises(OptionError, match="image views") as err:
        p.select(inputs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1])
def test_contract(ratio):
    check_pruner_contract(tp.create_pruner("holitom", ratio=ratio), synthetic_inputs(grid=(6, 8)))


# -- the official code, transcribed --------------------------------------------------------------------------------
# holitom/llava_arch.py (batch of frames, one clip), near-verbatim; mm_newline_position "one_token" (OneVision
# video: no per-row newline), positions dropped (they only order the "grid" newlines); cluster_dpc_knn with the
# deterministic tie-break in place of its rand * 1e-6 (see there); topk ties as tokenprune (random inputs: none).

def off_cluster_dpc_knn(x, cluster_num, k=7):
    with torch.no_grad():
        batch_size, seq_len, embed_dim = x.shape
        dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim ** 0.5)
        dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
        # (the official adds torch.rand * 1e-6 here, so that equal densities -- every one when k = 1, i.e. one
        # centre; mutual nearest pairs when k = 2 -- are ordered at random; tokenprune's documented substitute, the
        # lower index counts as denser, is written into the mask instead, and score ties go to the lower index)
        idx = torch.arange(seq_len)
        mask = ((density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])[None])).type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
        dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        index_center = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :cluster_num]
        return index_center, dist_matrix


def off_select_static_windows(feature_sim, batch_size, tau, max_window_size):
    def get_pruned_static_count_vectorized(feature_sim, batch_size, tau):
        similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]), device=feature_sim.device)
        for start in range(batch_size - 1):
            cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
            similarity_matrix[start, start + 1:start + 1 + len(cum_similarity)] = cum_similarity
        window_lengths = torch.arange(batch_size).unsqueeze(0) - torch.arange(batch_size).unsqueeze(1)
        window_lengths = window_lengths.clamp(min=0)
        return (similarity_matrix.sum(dim=-1) * window_lengths).float()

    pruned_static_count = get_pruned_static_count_vectorized(feature_sim, batch_size, tau)
    dp = torch.zeros(batch_size)
    prev = torch.zeros(batch_size, dtype=torch.long)
    for i in range(batch_size):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected_frames = []
    i = batch_size - 1
    while i >= 0:
        selected_frames.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected_frames[::-1], dp[-1].item()


def off_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta):
    batch_size, seq_len, embed_dim = feat.shape
    all_indices = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long)
    for b in range(batch_size):
        non_target_mask = ~torch.isin(all_indices[b], target_indices[b])
        non_target_indices[b] = all_indices[b][non_target_mask]
    non_target_feat = torch.gather(feat, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist_matrix = torch.gather(dist_matrix, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(dist_matrix, dim=2, index=target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
    idx_cluster = torch.argmin(dist_matrix, dim=-1)
    cluster_tokens = []
    for b in range(batch_size):
        batch_tokens = []
        for i in range(cluster_num):
            mask = (idx_cluster[b] == i)
            if mask.any():
                cluster_features = non_target_feat[b][mask]
                cluster_means = cluster_features.mean(dim=0)  # (NO_BETA unset: "0", the Beta merge)
                batch_tokens.append(Beta * feat[b][target_indices[b][i]] + (1 - Beta) * cluster_means)
            else:
                batch_tokens.append(feat[b][target_indices[b][i]])
        cluster_tokens.append(torch.stack(batch_tokens))
    return torch.stack(cluster_tokens)


def off_merge_tokens_by_attention_density(feat, attn, retain_ratio, D, Beta, K):
    batch_size, seq_len, embed_dim = feat.shape
    dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
    contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
    if dominant_num > 0:
        all_indices = attn.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dominant_tokens = torch.empty((batch_size, 0, embed_dim))
    if contextual_num > 0:
        feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
        target_indices, dist_matrix = off_cluster_dpc_knn(feat_filtered, contextual_num, k=min(K, contextual_num))
        target_indices = torch.sort(target_indices, dim=-1)[0]
        contextual_tokens = off_merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix, contextual_num, Beta)
    else:
        contextual_tokens = torch.empty((batch_size, 0, embed_dim))
    return torch.stack([torch.cat([dominant_tokens[b], contextual_tokens[b]], dim=0) for b in range(batch_size)])


def off_merge_tokens_by_density(feat, retain_ratio, Beta, K):
    batch_size, seq_len, embed_dim = feat.shape
    cluster_num = round(seq_len * retain_ratio)
    if cluster_num > 0:
        target_indices, dist_matrix = off_cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num))
        target_indices = torch.sort(target_indices, dim=-1)[0]
        return off_merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta)
    return torch.empty((batch_size, 0, embed_dim))


def off_get_static_dynamic_features(image_feat, attn_weights, selected_frames, feature_sim, tau):
    batch_size, seq_len, embed_dim = image_feat.shape
    static_feat_list, dynamic_feat_list, dynamic_attn_list = [], [], []
    for start, end in selected_frames:
        if start == end:
            static_feat_list.append(torch.empty((0, embed_dim)))
            dynamic_feat_list.append(image_feat[start:end + 1])
            dynamic_attn_list.append(attn_weights[start:end + 1])
        else:
            mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
            static_feat_list.append(image_feat[start:end + 1, mask].mean(dim=0))
            dynamic_feat_list.append(image_feat[start:end + 1, ~mask])
            dynamic_attn_list.append(attn_weights[start:end + 1, ~mask])
    return static_feat_list, dynamic_feat_list, dynamic_attn_list


def off_holitom(static_feat, dynamic_feat, dynamic_attn, window_size, retain_ratio, D, Beta, K):
    if window_size == 1:
        return off_merge_tokens_by_attention_density(dynamic_feat, dynamic_attn, retain_ratio, D, Beta, K).flatten(0, 1)
    dynamic_feat = off_merge_tokens_by_attention_density(dynamic_feat, dynamic_attn, retain_ratio, D, Beta, K)
    static_feat = off_merge_tokens_by_density(static_feat.unsqueeze(0), retain_ratio, Beta, K)
    return torch.cat([static_feat.flatten(0, 1), dynamic_feat.flatten(0, 1)])


def official_pre_llm(pooled_image_feat, attn_weights, retain_ratio=0.1, tau=0.8, Beta=0.6, D=0.0, K=7,
                     max_window_size=1024):
    """``prepare_inputs_labels_for_multimodal``'s video branch after the 2-D pool: ``[T, n, D]``, ``[T, n]``."""
    batch_size, seq_len, embed_dim = pooled_image_feat.shape
    pooled_image_feat_normed = torch.nn.functional.normalize(pooled_image_feat, p=2, dim=-1)
    feature_sim = torch.nn.functional.cosine_similarity(pooled_image_feat_normed[:-1], pooled_image_feat_normed[1:], dim=-1)
    selected_frames, total_reduced = off_select_static_windows(feature_sim, batch_size, tau, max_window_size)
    total_tokens = batch_size * seq_len
    retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    static_feat, dynamic_feat, dynamic_attn = off_get_static_dynamic_features(
        pooled_image_feat, attn_weights, selected_frames, feature_sim, tau)
    segment_features = []
    for idx, (start, end) in enumerate(selected_frames):
        segment_features.append(off_holitom(static_feat[idx], dynamic_feat[idx], dynamic_attn[idx], end - start + 1,
                                            retain_ratio, D, Beta, K))
    return torch.cat(segment_features, dim=0)


def official_in_llm(hidden_states, last_layer_attention_avg_last_tok, start, length, r):
    """``Qwen2Model_holitom.forward``'s block at layer ``HOLITOM_k`` (batch 1): kept indices, merged states."""
    hidden_states = hidden_states.clone()
    seq_length_with_past = hidden_states.shape[1]
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[start:start + length]
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(round(length * (1 - r))).indices + start
    all_indices = torch.arange(length)
    non_topk_mask = ~torch.isin(all_indices, top_attention_rank_index - start)
    non_topk_indices = all_indices[non_topk_mask] + start
    non_topk_states = hidden_states[:, non_topk_indices, :]
    topk_states = hidden_states[:, top_attention_rank_index, :]
    non_topk_norm = torch.norm(non_topk_states, dim=-1, keepdim=True)
    topk_norm = torch.norm(topk_states, dim=-1, keepdim=True)
    dot_product = torch.bmm(non_topk_states, topk_states.transpose(1, 2))
    sim_matrix = dot_product / (non_topk_norm * topk_norm.transpose(1, 2))
    sim_max, sim_max_index = torch.max(sim_matrix, dim=-1)
    for b in range(hidden_states.size(0)):
        for i in range(len(non_topk_indices)):
            non_topk_idx = non_topk_indices[i]
            most_similar_topk_idx = top_attention_rank_index[sim_max_index[b, i]]
            hidden_states[b, most_similar_topk_idx, :] = (hidden_states[b, most_similar_topk_idx, :] + hidden_states[b, non_topk_idx, :]) / 2
    keep_indexs = torch.cat((torch.arange(start), top_attention_rank_index, torch.arange(start + length, seq_length_with_past)))
    keep_indexs = keep_indexs.sort().values
    return keep_indexs, hidden_states[:, keep_indexs, :]


def random_clip(seed: int, t: int = 8, n: int = 20, dim: int = 12):
    """Frames with a few still stretches: each frame copies the previous one at a random share of positions."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(n, dim, generator=g)]
    for _ in range(t - 1):
        still = torch.rand(n, generator=g) < (torch.rand(1, generator=g) * 0.9)
        frames.append(torch.where(still[:, None], frames[-1] + 0.05 * torch.randn(n, dim, generator=g),
                                  torch.randn(n, dim, generator=g)))
    return torch.stack(frames), torch.rand(t, n, generator=g)


def same_tokens(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    """The same tokens up to order (the official orders per window, tokenprune by representative): a bijection at
    <= 1e-5."""
    assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
    dist = torch.cdist(theirs.float(), mine.float())
    nearest = dist.argmin(-1)
    assert len(set(nearest.tolist())) == mine.shape[0], "not a one-to-one match"
    torch.testing.assert_close(mine[nearest].float(), theirs.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("retain,tau,d", [(0.1, 0.8, 0.0), (0.25, 0.65, 0.0), (0.3, 0.8, 0.4), (0.5, 0.9, 0.2)])
def test_pre_llm_equals_the_official_code_on_random_clips(seed, retain, tau, d):
    x, attn = random_clip(seed)
    idx, tokens, weights = ht.holitom_clip(x, attn, retain, tau, 0.6, d, 7, 1024)
    theirs = official_pre_llm(x, attn, retain, tau, 0.6, d, 7)
    same_tokens(tokens, theirs)
    torch.testing.assert_close(weights @ x.flatten(0, 1), tokens)
    assert bool((idx[1:] > idx[:-1]).all())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("r", [0.5, 0.25, 0.8])
def test_in_llm_equals_the_official_block_on_random_states(seed, r):
    g = torch.Generator().manual_seed(seed)
    pre, n, post, dim = 5, 30, 4, 16
    h = torch.randn(1, pre + n + post, dim, generator=g)
    attn = torch.rand(pre + n + post, generator=g)
    keep_theirs, out_theirs = official_in_llm(h, attn, pre, n, r)
    p = tp.create_pruner("holitom", llm_ratio=r)
    red = p.select(PruningInputs(tokens=h[:, pre:pre + n], grid=(1, n), layer=3, num_layers=4,
                                 llm_attention=attn[None, None, pre:pre + n]))
    assert (red.indices[0] + pre).tolist() == keep_theirs[pre:pre + red.num_kept].tolist()
    torch.testing.assert_close(red.apply(h[:, pre:pre + n]), out_theirs[:, pre:pre + red.num_kept], atol=1e-5, rtol=0)


# -- every video family ------------------------------------------------------------------------------------------

def static_video(frames: int, side: int = 48, seed: int = 0) -> tp.Video:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = np.repeat(base[None], frames, 0).copy()
    out[:, : side // 2] = rng.integers(0, 255, (frames, side // 2, side, 3), dtype=np.uint8)
    return tp.Video.from_frames(out, fps=2.0)


def clip_for(family: str, seed: int = 0) -> tp.Video:
    return static_video(12 if family.startswith("qwen") else 6, seed=seed)


def run(lvlm, clips, pruner, use_cache=True, ids=("a", "b"), prompts=PROMPTS):
    return lvlm.generate(list(clips), list(prompts[:len(clips)]), pruner=pruner, max_new_tokens=4, ignore_eos=True,
                         use_cache=use_cache, sample_ids=list(ids[:len(clips)]))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    clip = clip_for(family)
    n_layers = len(lvlm.runner.layers)
    ref = lvlm.generate([clip], PROMPTS[:1], max_new_tokens=4)
    full = lvlm.generate([clip], PROMPTS[:1], pruner=tp.create_pruner("holitom", ratio=1.0), max_new_tokens=4)
    assert torch.equal(full.token_ids, ref.token_ids) and torch.equal(full.first_logits, ref.first_logits)

    p = tp.create_pruner("holitom", ratio=0.3)
    calls = recording(p)
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = run(lvlm, [clip], p)
    finally:
        counter.close()
    # the official pre-LLM stage on the very tokens and attention the adapter handed the pruner
    inputs, red = calls[0]
    x, sal, _ = p._scores._clip(inputs)
    theirs = official_pre_llm(x[0].float(), sal[0], 0.3)
    same_tokens(red.tokens[0], theirs)
    kept = theirs.shape[0]
    k = ht.scaled_layer(n_layers)
    stats = out.stats[0]
    expected = [kept] * k + [round(kept * 0.5)] * (n_layers - k)
    assert stats.visual_per_layer == expected, (stats.visual_per_layer, expected)
    assert [counter.lengths[i][0] for i in range(n_layers)] == [stats.text_tokens + v for v in expected]
    assert len(calls) == 2 and calls[1][0].layer == k and calls[1][1].merge_into is not None

    clips = [clip, clip_for(family, seed=1)]
    cached = run(lvlm, clips, p)
    uncached = run(lvlm, clips, p, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(cached.first_logits, uncached.first_logits, atol=1e-5, rtol=0)
    for i in range(2):
        alone = run(lvlm, clips[i:i + 1], p, ids=("ab"[i],), prompts=PROMPTS[i:i + 1])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i])
        assert alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_an_image_sample_is_refused_in_one_line(family):
    with pytest.raises(OptionError, match="image") as err:
        lvlm_for(family).generate([images(1)[0]], PROMPTS[:1], pruner=tp.create_pruner("holitom"), max_new_tokens=1)
    assert "\n" not in str(err.value)


def official_llm_prefill(lvlm, clip, pruner) -> tuple[torch.Tensor, list[int]]:
    """``Qwen2Model_holitom.forward`` on the tiny model's own layers (batch 1), after the pre-LLM stage (tokenprune's,
    compared with the official above): layer ``K - 1``'s attention (``output_attentions``: the last row, head
    mean), the official block at ``K`` (the video contiguous), ``position_ids = keep_indexs`` (the positions the
    kept entries had); returns the first logits and the tokens each layer saw."""
    from tokenprune.adapters.attention import record_attention

    encoded = lvlm.encode([clip], PROMPTS[:1], lvlm.vision_needs(pruner))
    policy = lvlm._assembly_policy(pruner, lvlm._position_policy(None, pruner, [clip]))
    inputs = lvlm._assemble(encoded.batch, encoded.views, pruner, policy, ["0"], PROMPTS[:1])[0]
    runner = lvlm.runner
    k = ht.scaled_layer(len(runner.layers))
    image = (inputs.image_mask[0] & inputs.mask[0]).nonzero().flatten()
    start, length = int(image[0]), len(image)
    assert int(image[-1]) == start + length - 1, "the official block needs the video contiguous"
    h, positions = inputs.embeds, inputs.positions
    mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()[None, None]
    counts, attn = [], None
    for i, layer in enumerate(runner.layers):
        if i == k:
            keep, h = official_in_llm(h, attn, start, length, pruner.llm_ratio)
            positions = positions[..., keep]
            mask = mask[:, :, keep][:, :, :, keep]
        pe = runner.model.rotary_emb(h, positions)
        counts.append(h.shape[1])
        if i == k - 1:
            with record_attention(layer.self_attn, rows="last") as rec:
                h = layer(h, attention_mask=mask, position_embeddings=pe)
            attn = rec.maps[0][0, 0]  # [L]: the last query's attention, head mean
        else:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
    return runner.lm_head(runner.model.norm(h[:, -1])).float(), counts


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "llava_next_video"])
def test_the_official_llm_loop_on_tiny_models(family):
    lvlm = lvlm_for(family)
    clip = clip_for(family)
    p = tp.create_pruner("holitom", ratio=0.3)
    out = lvlm.generate([clip], PROMPTS[:1], pruner=p, max_new_tokens=1)
    logits, counts = official_llm_prefill(lvlm, clip, p)
    assert counts == out.stats[0].tokens_per_layer
    torch.testing.assert_close(out.first_logits, logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_teacher_forcing_equals_the_no_cache_reference(family, monkeypatch):
    """``runner.score`` (loglikelihood) teacher-forcing generate's greedy tokens through the cache after the in-LLM
    stages gives the no-cache reference's log-probabilities (which replays every stage, in-place merges included,
    per token); every token is greedy. A left-padded batch of two videos."""
    lvlm = lvlm_for(family)
    p = tp.create_pruner("holitom", ratio=0.3)
    clips = [clip_for(family), clip_for(family, seed=1)]
    recorded = []
    logits = lvlm.runner._logits
    monkeypatch.setattr(lvlm.runner, "_logits", lambda h, device: recorded.append(logits(h, device)) or recorded[-1])
    gen = lvlm.generate(clips, PROMPTS, pruner=p, max_new_tokens=4, ignore_eos=True, use_cache=False,
                        sample_ids=["a", "b"])
    monkeypatch.undo()
    reference = torch.stack(recorded, 1).log_softmax(-1).gather(2, gen.token_ids[..., None])[..., 0]
    encoded = lvlm.encode(clips, PROMPTS, lvlm.vision_needs(p))
    policy = lvlm._assembly_policy(p, lvlm._position_policy(None, p, clips))
    inputs = lvlm._assemble(encoded.batch, encoded.views, p, policy, ["a", "b"], PROMPTS)[0]
    assert bool(inputs.mask[:, 0].logical_not().any())  # left padding in the batch
    res = lvlm.runner.score(inputs, gen.token_ids, torch.ones_like(gen.token_ids, dtype=torch.bool),
                            pruner=lvlm._in_llm(p), position_policy=lvlm._stage_policy(None, p, clips))
    torch.testing.assert_close(res.logprobs, reference, atol=1e-4, rtol=0)
    assert bool(res.greedy.all())
    torch.testing.assert_close(res.first_logits, gen.first_logits, atol=1e-5, rtol=0)
