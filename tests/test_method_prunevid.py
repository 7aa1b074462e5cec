"""PruneVid (``prunevid``): hand-computed DPC-kNN, segment refinement, static/dynamic split, merges and the
in-LLM cut; the official code (Visual-AI/PruneVid@b12600c) transcribed below and compared on random clips
(segments, group sizes, merged features, kept indices of the layer-10 cut); and on every video family's tiny
model: ratio 1.0 == unpruned, the tokens entering each decoder layer (forward pre-hooks) == text + the
pre-LLM count up to the scoring layer and text + the cut's count after it, the KV cache of layers 0..layer
cut to the final set, cached == uncached, a batch of two videos == each alone; an image sample refused in one
line; the repository's contract checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
import tokenprune.methods.prunevid as pv  # registers "prunevid" (methods/__init__.py does not import it yet)
from tokenprune.errors import OptionError
from tokenprune.pruner import PrunerNeeds, PruningInputs, Stage
from tokenprune.testing import check_pruner_contract, synthetic_inputs

from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def clip_inputs(x: torch.Tensor, sid: str = "s0") -> PruningInputs:
    """What the adapter hands a clip_inputs pruner at scope clip, for one clip ``x`` ``[T, n, D]``."""
    t, n, _ = x.shape
    return PruningInputs(tokens=x.reshape(1, t * n, -1), grid=(1, t * n), view_grids=((1, n),) * t,
                         token_views=torch.arange(t).repeat_interleave(n)[None],
                         view_times=torch.arange(t, dtype=torch.float64)[None] / 2,
                         view_features=x.mean(1)[None], sample_ids=[sid])


def cut_inputs(attention: torch.Tensor, sid: str = "s0", layer: int = 11) -> PruningInputs:
    """What the decoder hands the in-LLM stage: ``attention`` ``[Q, N]`` (heads already reduced)."""
    q, n = attention.shape
    return PruningInputs(tokens=torch.zeros(1, n, 4), grid=(1, n), sample_ids=[sid], layer=layer, num_layers=32,
                         llm_attention=attention[None], llm_query_mask=torch.ones(1, q, dtype=torch.bool))


# -- hand-computed ---------------------------------------------------------------------------------------------
def test_dpc_knn_hand_computed():
    # Points on a line, k = 2 (itself and its nearest neighbour), dist = |a - b| / sqrt(1):
    #   x:        0      1      3      10       11.5     20
    #   density:  e^-.5  e^-.5  e^-2   e^-1.125 e^-1.125 e^-36.125   (mean of 0 and d_nn^2)
    # equal densities: the lower index is denser, so x0 is the densest (delta = the largest distance, 20);
    #   delta:    20     1      2      9        1.5      8.5
    #   score:    12.13  .607   .271   2.92     .487     ~0
    # two centres: x0, x3; three: x0, x3, x1 (x2 is then nearer to x1 (2) than to x0 (3)).
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.5], [20.0]])
    labels, centres = pv.dpc_knn(x, 2, k=2)
    assert centres.tolist() == [0, 3] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    labels, centres = pv.dpc_knn(x, 3, k=2)
    assert centres.tolist() == [0, 3, 1] and labels.tolist() == [0, 2, 2, 1, 1, 1]
    # k above the group's size: all of it (the official topk would fail)
    assert pv.dpc_knn(x[:2], 1, k=7)[0].tolist() == [0, 0]


@pytest.mark.parametrize("labels, refined, lengths", [
    # cluster 0's runs (0-1), (3-5): the shorter goes; cluster 1's (2), (7-8): (2) goes; cluster 2: one frame, goes.
    # run 0-2 has no left neighbour: the right one (0); run 6: left run of 6 frames beats the right of 2.
    ([0, 0, 1, 0, 0, 0, 2, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1], [7, 2]),
    ([1, 1, 0, 0, 2, 2], [1, 1, 0, 0, 2, 2], [2, 2, 2]),  # every run its cluster's longest
    ([0, 0, 1, 2, 2], [0, 0, 0, 2, 2], [3, 2]),  # equal neighbours: the left one
    ([0, 1, 2], [0, 0, 0], [3]),  # every run one frame: all reassigned, no neighbour: cluster 0
    ([2, 2, 1, 1, 2, 2], [2, 2, 1, 1, 2, 2], [2, 2, 2]),  # two longest runs of one cluster both stay
])
def test_refine_clusters_hand_computed(labels, refined, lengths):
    assert pv.refine_clusters(labels) == refined
    assert pv.run_lengths(refined) == lengths


def test_static_dynamic_split_and_merge_hand_computed():
    # Two frames (one segment: max(1, int(2 * 0.25)) = 1 cluster), three positions, D = 2:
    #   frame 0: p0 (1, 0)  p1 (1, 0)  p2 (0, 1)
    #   frame 1: p0 (2, 0)  p1 (0, 1)  p2 (0, 3)
    # mean pairwise cosine (W = 2: the one pair): p0 1, p1 0, p2 1 -> p0, p2 static (> 0.8), p1 dynamic.
    # static: p0 -> (1.5, 0), p2 -> (0, 2), each standing for its frame-0 token (clip indices 0 and 2);
    # dynamic: frame 0's p1 (index 1) and frame 1's p1 (index 4) as they are.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])
    out = pv.prunevid_clip(x, x.mean(1), tau=0.8, segment_ratio=0.25, cluster_ratio=0.5, cluster_min=14, k=7)
    assert out.indices.tolist() == [0, 1, 2, 4]
    assert out.tokens.tolist() == [[1.5, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]
    assert out.groups.tolist() == [0, 1, 0, 3]  # segment 0 static; frame 0 dynamic; static; frame 1 dynamic
    assert (out.static_sizes, out.dynamic_sizes, out.window_sizes) == ([2], [2], [2])
    torch.testing.assert_close(out.weights @ x.reshape(6, 2), out.tokens)
    # cluster_min = 1: the static pair becomes int(2 * 0.5) = 1 cluster; equal densities, equal scores: the
    # lower index is the centre (p0, clip index 0); the token is the mean of the means, (0.75, 1), i.e. 1/4 of
    # each of the four static tokens.
    out = pv.prunevid_clip(x, x.mean(1), tau=0.8, segment_ratio=0.25, cluster_ratio=0.5, cluster_min=1, k=7)
    assert out.indices.tolist() == [0, 1, 4] and out.tokens[0].tolist() == [0.75, 1.0]
    assert out.weights[0].tolist() == [0.25, 0, 0.25, 0.25, 0, 0.25]
    # one frame: no pairs, nothing static
    one = pv.prunevid_clip(x[:1], x[:1].mean(1), 0.8, 0.25, 0.5, 14, 7)
    assert one.indices.tolist() == [0, 1, 2] and one.static_sizes == [0]


def test_layer_cut_hand_computed():
    # groups: a segment's static tokens (0) x4, one frame's dynamic tokens (1) x3, another's (3) x3.
    # alpha 0.5 keeps int(4 * .5) = 2, int(3 * .5) = 1, 1: group 0 -> .9 (index 3), .7 (index 0); group 1 -> .7
    # (index 5); group 3 -> .6 and .6 tie: the lower index, 7. (Index 5's .7 equals index 0's but is another group.)
    scores = torch.tensor([0.7, 0.1, 0.2, 0.9, 0.3, 0.7, 0.1, 0.6, 0.6, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 3, 3, 3])
    assert pv.layer_cut(scores, groups, 0.5).tolist() == [0, 3, 5, 7]
    # alpha 0.4: int(1.6) = 1, int(1.2) = 1, int(1.2) = 1
    assert pv.layer_cut(scores, groups, 0.4).tolist() == [3, 5, 7]
    # alpha 0.3: int(1.2) = 1, int(0.9) = 0, 0: a small group can lose every token (as the official topk(k=0))
    assert pv.layer_cut(scores, groups, 0.3).tolist() == [3]


def test_scaled_layer_rule():
    # round(10 * L / 32), half up, at most L - 2: the official 10 of 32 wherever the decoder is
    assert [pv.scaled_layer(n) for n in (32, 28, 36, 24, 40, 80, 4, 2, 0)] == [10, 9, 11, 8, 13, 25, 1, 0, 10]


# -- options -------------------------------------------------------------------------------------------------
def test_options_and_ratio_mapping():
    p = tp.create_pruner("prunevid")
    assert (p.ratio, p.keep_share, p.tau, p.segment_ratio, p.cluster_ratio, p.cluster_min, p.k) == (
        0.4, 0.4, 0.8, 0.25, 0.5, 14, 7)
    assert p.acts_in(Stage.PRE_LLM) and p.acts_in(Stage.IN_LLM) and p.acts_in(Stage.DECODE)
    assert p.scope == "clip" and p.adaptive and p.uses_ratio
    assert [st.layer for st in p.llm_schedule(32)] == [11] and [st.layer for st in p.llm_schedule(4)] == [2]
    assert p.needs.schedule()[0].queries == "text" and p.needs.vision_attention_layer is None
    assert p.decode_plan(32).cut_layers == tuple(range(11)) and p.decode_plan(32).positions == "continue"
    assert tp.create_pruner("prunevid", layer=5).decode_plan(32).cut_layers == tuple(range(6))
    assert tp.create_pruner("prunevid", kv_cut=False).decode_plan(32) is None
    q = tp.create_pruner("prunevid", ratio=0.25)
    assert q.keep_share == 0.25
    a = tp.create_pruner("prunevid", ratio=1.0, alpha=1.0)  # LightCompress's stage one alone: the merge, no cut
    assert not a.off and not a.uses_ratio and a.llm_schedule(4)
    off = tp.create_pruner("prunevid", ratio=1.0)
    assert off.off and off.llm_schedule(4) == () and off.decode_plan(4) is None
    for bad in (dict(alpha=1.5), dict(tau="x"), dict(segment_ratio=2), dict(k=0), dict(layer=-1), dict(kv_cut="no")):
        with pytest.raises(OptionError) as err:
            tp.create_pruner("prunevid", **bad)
        assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="scope='clip'"):
        tp.create_pruner("prunevid", scope="frame")


# -- the official code, transcribed ----------------------------------------------------------------------------
def official_index_points(points, idx):
    """modeling_pllava.py ``index_points``, verbatim."""
    device = points.device
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).to(device).view(view_shape).repeat(repeat_shape)
    new_points = points[batch_indices, idx, :]
    return new_points


def official_cluster_dpc_knn(x, cluster_num, k=5, token_mask=None):
    """modeling_pllava.py ``cluster_dpc_knn``, verbatim but for the density noise: the official adds
    ``torch.rand(...) * 1e-6`` to break exact ties; random inputs have none, so it is left out here (ours breaks
    ties by index, see the module docstring)."""
    with torch.no_grad():
        B, N, C = x.shape
        dist_matrix = torch.cdist(x.float(), x.float()) / (C ** 0.5)
        dist_nearest, index_nearest = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
        mask = density[:, None, :] > density[:, :, None]
        mask = mask.type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
        dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
        dist_matrix = official_index_points(dist_matrix, index_down)
        idx_cluster = dist_matrix.argmin(dim=1)
        idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
        idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
        idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return idx_cluster, cluster_num


def official_segment_lengths(tensor):
    """modeling_pllava.py ``segment_lengths``, verbatim."""
    device = tensor.device
    B, N = tensor.shape
    segment_lengths_list = []
    max_segments = 0
    for i in range(B):
        seq = tensor[i]
        change_points = torch.where(seq[1:] != seq[:-1])[0] + 1
        boundaries = torch.cat([torch.tensor([0], device=device), change_points, torch.tensor([N], device=device)])
        lengths = boundaries[1:] - boundaries[:-1]
        segment_lengths_list.append(lengths)
        max_segments = max(max_segments, lengths.numel())
    result = torch.zeros((B, max_segments), dtype=torch.long, device=device)
    for i in range(B):
        lengths = segment_lengths_list[i]
        result[i, :lengths.numel()] = lengths
    return result


def official_refine_clusters(cluster_idx):
    """modeling_pllava.py ``refine_clusters``, verbatim (comments dropped)."""
    B, N = cluster_idx.shape
    refined_cluster_idx = cluster_idx.clone()
    for b in range(B):
        clusters = torch.unique(cluster_idx[b])
        segment_info = {}
        for cluster_label in clusters:
            indices = (cluster_idx[b] == cluster_label).nonzero(as_tuple=True)[0]
            if indices.numel() == 0:
                continue
            segments = []
            start = indices[0].item()
            prev = indices[0].item()
            for idx in indices[1:]:
                idx = idx.item()
                if idx == prev + 1:
                    prev = idx
                else:
                    segments.append((start, prev))
                    start = idx
                    prev = idx
            segments.append((start, prev))
            segment_info[cluster_label.item()] = segments
        for cluster_label, segments in segment_info.items():
            max_length = 0
            for (start, end) in segments:
                length = end - start + 1
                if length > max_length:
                    max_length = length
            if max_length == 1:
                for (start, end) in segments:
                    refined_cluster_idx[b, start:end + 1] = -1
                continue
            for (start, end) in segments:
                length = end - start + 1
                if length == max_length:
                    continue
                else:
                    refined_cluster_idx[b, start:end + 1] = -1
        idx = 0
        while idx < N:
            if refined_cluster_idx[b, idx] == -1:
                start = idx
                while idx < N and refined_cluster_idx[b, idx] == -1:
                    idx += 1
                end = idx - 1
                left_cluster_label = None
                left_length = 0
                if start > 0:
                    left_label = refined_cluster_idx[b, start - 1].item()
                    l_idx = start - 1
                    while l_idx >= 0 and refined_cluster_idx[b, l_idx] == left_label:
                        l_idx -= 1
                    left_length = start - l_idx - 1
                    left_cluster_label = left_label
                right_cluster_label = None
                right_length = 0
                if end < N - 1:
                    right_label = refined_cluster_idx[b, end + 1].item()
                    r_idx = end + 1
                    while r_idx < N and refined_cluster_idx[b, r_idx] == right_label:
                        r_idx += 1
                    right_length = r_idx - end - 1
                    right_cluster_label = right_label
                if left_length > right_length:
                    new_label = left_cluster_label
                elif right_length > left_length:
                    new_label = right_cluster_label
                else:
                    new_label = left_cluster_label if left_cluster_label is not None else right_cluster_label
                if new_label is None:
                    new_label = 0
                refined_cluster_idx[b, start:end + 1] = new_label
            else:
                idx += 1
    return refined_cluster_idx


def official_compute_cluster_vectors(image_key_vectors, cluster_key_idx, num_cluster):
    """``PllavaForConditionalGeneration.compute_cluster_vectors``, verbatim."""
    B, L, D = image_key_vectors.shape
    cluster_key_idx_onehot = F.one_hot(cluster_key_idx, num_classes=num_cluster).to(dtype=image_key_vectors.dtype)
    cluster_key_idx_onehot_t = cluster_key_idx_onehot.permute(0, 2, 1)
    cluster_sums = torch.bmm(cluster_key_idx_onehot_t, image_key_vectors)
    cluster_counts = cluster_key_idx_onehot.sum(dim=1)
    cluster_counts_nonzero = cluster_counts.clone()
    cluster_counts_nonzero[cluster_counts_nonzero == 0] = 1
    cluster_features = cluster_sums / cluster_counts_nonzero.unsqueeze(-1)
    zero_mask = (cluster_counts == 0).unsqueeze(-1)
    cluster_features = cluster_features.masked_fill(zero_mask, 0)
    return cluster_features


def official_spatial_merge_tokens(feature, num_cluster, k):
    """``PllavaForConditionalGeneration.spatial_merge_tokens``, verbatim."""
    cluster_idx, _ = official_cluster_dpc_knn(feature, cluster_num=num_cluster, k=k)
    return official_compute_cluster_vectors(feature, cluster_idx, num_cluster=num_cluster)


def official_merge_frames_dynamic(frames, num_frames, tokens_per_frame, threshold, temporal_segment_ratio,
                                  cluster_ratio, k=7):
    """``PllavaForConditionalGeneration.merge_frames_dynamic``, verbatim but for ``self.config`` (num_frames,
    pooling_shape[1] * pooling_shape[2], temporal_segment_ratio, cluster_ratio) passed in, and ``einsum`` from
    torch."""
    B, L, C = frames.shape
    assert L == num_frames * tokens_per_frame
    frames = frames.view(B, num_frames, tokens_per_frame, C)
    idx_clusters, _ = official_cluster_dpc_knn(frames.mean(dim=2), cluster_num=int(num_frames * temporal_segment_ratio), k=k)
    idx_clusters = official_refine_clusters(idx_clusters)
    window_list = official_segment_lengths(idx_clusters)
    L = tokens_per_frame
    static_features, dynamic_features, static_sizes, dynamic_sizes = [], [], [], []
    start_idx = 0
    for window_size in window_list[0]:
        current_frames = frames[:, start_idx:start_idx + window_size, :, :]
        frames_normed = F.normalize(current_frames, p=2, dim=-1)
        frames_sim = torch.einsum('b w l c, b t l c -> b w t l', frames_normed, frames_normed)
        frames_sim = (frames_sim.sum(dim=-2) - 1).sum(dim=-2) / (window_size * (window_size - 1))
        mask = frames_sim > threshold
        mask_expand = mask.view(B, 1, L, 1).expand(-1, window_size, -1, C)
        static_mask = mask_expand
        static_feat = torch.masked_select(current_frames, static_mask).view(B, window_size, -1, C).mean(dim=1)
        if static_feat.shape[1] > 14:
            static_feat = official_spatial_merge_tokens(static_feat, num_cluster=int(static_feat.shape[1] * cluster_ratio), k=7)
        static_features.append(static_feat)
        static_sizes.append(static_feat.shape[1])
        dynamic_mask = ~mask_expand
        dynamic_feat = torch.masked_select(current_frames, dynamic_mask).view(B, window_size, -1, C)
        dynamic_window_list = []
        for i in range(window_size):
            dynamic_feat_window = dynamic_feat[:, i, :, :]
            if dynamic_feat_window.shape[1] > 14:
                dynamic_feat_window = official_spatial_merge_tokens(
                    dynamic_feat_window, num_cluster=int(dynamic_feat_window.shape[1] * cluster_ratio), k=7)
            dynamic_window_list.append(dynamic_feat_window)
        dynamic_feat = torch.cat(dynamic_window_list, dim=1)
        dynamic_features.append(dynamic_feat)
        dynamic_sizes.append(dynamic_feat.shape[1])
        start_idx += window_size
    final_features = []
    for static_feature, dynamic_feature in zip(static_features, dynamic_features):
        final_features.append(static_feature)
        final_features.append(dynamic_feature)
    final_features = torch.cat(final_features, dim=1)
    window_sizes = window_list[0].tolist()
    return final_features, static_sizes, dynamic_sizes, window_sizes


def official_process_attention(text_to_image_attentions, static_sizes, dynamic_sizes, window_sizes, alpha):
    """elastic_cache.py ``VTPWindowCache.process_attention``, verbatim but for ``self.alpha``."""
    b, head_num, num_query, num_img = text_to_image_attentions.shape
    assert b == 1
    assert len(static_sizes) == len(dynamic_sizes) == len(window_sizes)
    text_to_image_attentions = text_to_image_attentions[0].max(dim=0)[0].max(dim=0)[0]
    start_idx, end_idx = 0, 0
    topk_indices_list = []
    for static_size, dynamic_size, window_size in zip(static_sizes, dynamic_sizes, window_sizes):
        end_idx = start_idx + static_size + dynamic_size
        window_attentions = text_to_image_attentions[start_idx:end_idx]
        static_attentions = window_attentions[:static_size]
        num_retain_static_tokens = int(static_size * alpha)
        _, static_topk_indices = torch.topk(static_attentions, k=num_retain_static_tokens, dim=-1)
        static_topk_indices = static_topk_indices + start_idx
        topk_indices_list.append(static_topk_indices)
        dynamic_attentions = window_attentions[static_size:].view(window_size, -1)
        num_retain_dynamic_tokens = int(dynamic_attentions.shape[-1] * alpha)
        _, dynamic_topk_indices = torch.topk(dynamic_attentions, k=num_retain_dynamic_tokens, dim=-1)
        dynamic_topk_indices = dynamic_topk_indices + start_idx + static_size
        dynamic_topk_indices_list = []
        for i in range(window_size):
            dynamic_topk_indices_list.append(dynamic_topk_indices[i] + dynamic_attentions.shape[-1] * i)
        dynamic_topk_indices = torch.cat(dynamic_topk_indices_list, dim=0)
        topk_indices_list.append(dynamic_topk_indices)
        start_idx = end_idx
    return torch.cat(topk_indices_list, dim=0)


def random_clip(seed: int, t: int = 16, n: int = 48, d: int = 16) -> torch.Tensor:
    """``[T, n, D]``: 3-4 scenes of random lengths (each a base per position plus a scene offset), positions
    quiet (noise 0.15: static in their scene, ~29 of them: clustered) or busy (noise 2: dynamic, ~19 per frame:
    clustered), so every path of the rule runs."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(t - 3, generator=g)[:2 + seed % 2].add(2).tolist())
    scene = torch.zeros(t, dtype=torch.long)
    for c in cuts:
        scene[c:] += 1
    scenes = int(scene.max()) + 1
    base = torch.randn(scenes, n, d, generator=g) + 2 * torch.randn(scenes, 1, d, generator=g)
    noise = torch.where(torch.rand(n, generator=g) < 0.6, 0.15, 2.0)
    return base[scene] + noise[None, :, None] * torch.randn(t, n, d, generator=g)


@pytest.mark.parametrize("seed", range(6))
def test_dpc_knn_and_refinement_equal_the_official(seed):
    g = torch.Generator().manual_seed(100 + seed)
    for m, c, k in [(16, 4, 7), (37, 18, 7), (9, 2, 3), (60, 30, 5)]:
        x = torch.randn(m, 8, generator=g)
        labels, _ = pv.dpc_knn(x, c, k)
        assert torch.equal(labels, official_cluster_dpc_knn(x[None], c, k)[0][0])
    for _ in range(50):
        labels = torch.randint(0, 4, (1, 16), generator=g)
        assert pv.refine_clusters(labels[0].tolist()) == official_refine_clusters(labels)[0].tolist()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.4, 0.25])
def test_both_stages_equal_the_official_on_random_clips(seed, alpha):
    x = random_clip(seed)
    t, n, d = x.shape
    ref, static_sizes, dynamic_sizes, windows = official_merge_frames_dynamic(
        x.reshape(1, t * n, d), t, n, threshold=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5)
    p = tp.create_pruner("prunevid", ratio=alpha)
    red = p(clip_inputs(x))
    out = pv.prunevid_clip(x, x.mean(1), 0.8, 0.25, 0.5, 14, 7)
    assert (out.static_sizes, out.dynamic_sizes, out.window_sizes) == (static_sizes, dynamic_sizes, windows)
    assert len(windows) > 1 and max(static_sizes) > 0 and min(dynamic_sizes) > 0  # segments, static and dynamic
    assert torch.equal(red.indices[0], out.indices)
    # the same merged tokens, in our order (by representative): match each official one to ours
    ref = ref[0]
    dist = torch.cdist(ref, red.tokens[0].float())
    perm = dist.argmin(1)  # official position -> ours
    assert sorted(perm.tolist()) == list(range(ref.shape[0]))
    assert (ref - red.tokens[0][perm]).abs().max().item() <= 1e-5
    torch.testing.assert_close(red.token_weights[0] @ x.reshape(t * n, d), red.tokens[0], rtol=0, atol=1e-5)
    # ... and the group of each: official segments are [static, frame dynamic x W] blocks
    expected = []
    for s, (st, dy, w) in enumerate(zip(static_sizes, dynamic_sizes, windows)):
        first = sum(windows[:s])
        expected += [("static", s)] * st + [("frame", f) for f in range(first, first + w) for _ in range(dy // w)]
    groups = p.groups_of("s0")
    ours = [("static", g // 2) if g % 2 == 0 else ("frame", g // 2) for g in groups[perm].tolist()]
    assert ours == expected
    # the layer-10 cut: official per-head text->video attention, in the official order
    g = torch.Generator().manual_seed(seed)
    attn = (4 * torch.randn(1, 4, 5, ref.shape[0], generator=g)).softmax(-1)
    kept_official = official_process_attention(attn, static_sizes, dynamic_sizes, windows, alpha)
    cut = p(cut_inputs(attn[0].amax(0)[:, perm.argsort()]))  # heads reduced as the framework does; our order
    assert cut.indices[0].tolist() == sorted(perm[kept_official].tolist())
    assert 0 < cut.num_kept < red.num_kept


def test_random_clips_batched_equal_each_alone_and_odd_inputs():
    p = tp.create_pruner("prunevid")
    x = random_clip(3)
    both = torch.stack([x, x])
    inp = clip_inputs(x)
    batched = p(PruningInputs(tokens=both.flatten(1, 2), grid=inp.grid, view_grids=inp.view_grids,
                              token_views=inp.token_views.expand(2, -1), view_times=inp.view_times.expand(2, -1),
                              view_features=both.mean(2), sample_ids=["a", "b"]))
    alone = p(clip_inputs(x, "c"))
    assert torch.equal(batched.indices[1], alone.indices[0]) and torch.equal(batched.tokens[0], alone.tokens[0])
    # fewer frames than 1 / segment_ratio: one segment; a bare input (no views): one frame, nothing static
    red = p(clip_inputs(x[:3]))
    assert red.num_kept < 3 * x.shape[1]
    bare = p(PruningInputs(tokens=x[0][None], grid=(6, 8), sample_ids=["bare"]))
    assert bare.num_kept == 24 and p.groups_of("bare").tolist() == [1] * 24  # 48 dynamic tokens -> 24 clusters
    # a clip of one frame: one line
    with pytest.raises(OptionError) as err:
        p(clip_inputs(x[:1]))
    assert "\n" not in str(err.value)
    # an image view (NaN time) is one line
    inp = clip_inputs(x[:4])
    inp.view_times[0, 1] = float("nan")
    with pytest.raises(OptionError) as err:
        p(inp)
    assert "\n" not in str(err.value)
    # the in-LLM stage without its pre-LLM groups is one line
    with pytest.raises(OptionError, match="pre-LLM") as err:
        p(cut_inputs(torch.rand(2, 7), sid="never-seen"))
    assert "\n" not in str(err.value)


# -- the repository's contract checks (tests/test_contract.py runs them on every registered pruner) ------------
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(ratio):
    check_pruner_contract(tp.create_pruner("prunevid", ratio=ratio), synthetic_inputs(grid=(6, 8)))


def test_contract_merged_patches_odd_grid_and_bad_ratios():
    check_pruner_contract(tp.create_pruner("prunevid", ratio=0.3), synthetic_inputs(grid=(5, 7), patch_merge=4, seed=3))
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), "abc", None, True):
        with pytest.raises(OptionError, match=r"\(0, 1\]"):
            tp.create_pruner("prunevid", ratio=bad)


# -- on every video family's tiny model ---------------------------------------------------------------------
def scene(frames: int = 16, side: int = 56, seed: int = 0) -> tp.Video:
    """A clip of two scenes (a random background each, switching half-way) with a random patch sliding across:
    background positions are static within a scene, the patch's are dynamic, the two scenes are segments."""
    rng = np.random.default_rng(seed)
    backgrounds = [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(2)]
    out = []
    for f in range(frames):
        img = backgrounds[f * 2 // frames].copy()
        s = side // 4
        x = (f * side // frames) % (side - s)
        img[: 2 * s, x:x + s] = rng.integers(0, 255, (2 * s, s, 3), dtype=np.uint8)
        out.append(img)
    return tp.Video.from_frames(np.stack(out), fps=2.0)


def _official_counts(lvlm, clip, p) -> tuple[int, int, int]:
    """``(text tokens, pre-LLM count, count after the cut)`` of one clip: the rule run on the model's own views
    (independently of the adapter's clip assembly), the cut's count from its group sizes."""
    batch = lvlm.prepare([clip], PROMPTS[:1])
    views = [v for v in lvlm.encode_images(batch, PrunerNeeds()) if v.prunable]
    x = torch.stack([v.tokens for v in views])
    out = pv.prunevid_clip(x, x.mean(1), p.tau, p.segment_ratio, p.cluster_ratio, p.cluster_min, p.k)
    final = sum(int(c * p.keep_share) for c in torch.bincount(out.groups).tolist() if c)
    return batch["input_ids"].shape[1] - x.shape[0] * x.shape[1], out.indices.shape[0], final


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    clips = [scene(16, 56, 0), scene(16, 56, 1)]
    steps = 4
    # ratio 1.0 (no alpha): the unpruned model
    ref = lvlm.generate(clips, PROMPTS, max_new_tokens=steps)
    off = lvlm.generate(clips, PROMPTS, pruner=tp.create_pruner("prunevid", ratio=1.0), max_new_tokens=steps)
    assert torch.equal(off.token_ids, ref.token_ids)
    assert (off.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    # the tokens entering each decoder layer: text + the pre-LLM count through the scoring layer, then the cut's
    p = tp.create_pruner("prunevid", ratio=0.5)
    n_text, pre, final = _official_counts(lvlm, clips[0], p)
    layer = p.layer_for(len(lvlm.runner.layers))
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate(clips[:1], PROMPTS[:1], pruner=p, max_new_tokens=1)
    finally:
        counter.close()
    expected = [n_text + (pre if i <= layer else final) for i in range(len(lvlm.runner.layers))]
    assert [counter.lengths[i][0] for i in range(len(lvlm.runner.layers))] == expected
    assert out.stats[0].visual_per_layer == [e - n_text for e in expected] and 0 < final < pre < out.stats[0].visual_tokens_in
    assert out.stats[0].visual_tokens_kept == final

    # cached (layers 0..layer cut after prefill) == the recomputing reference; a batch of two == each alone
    ids = ["v0", "v1"]
    cached = lvlm.generate(clips, PROMPTS, pruner=p, max_new_tokens=steps, ignore_eos=True, sample_ids=ids)
    uncached = lvlm.generate(clips, PROMPTS, pruner=p, max_new_tokens=steps, ignore_eos=True, use_cache=False,
                             sample_ids=ids)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    for i, sid in enumerate(ids):
        alone = lvlm.generate(clips[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=steps, ignore_eos=True,
                              sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i]) and alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=0, atol=1e-4)

    # an image sample, a video of one view (Qwen: 2 frames in one temporal patch): one line
    for visual in (images(1)[0], scene(2 if family.startswith("qwen") else 1, 56, 0)):
        with pytest.raises(OptionError) as err:
            lvlm.generate([visual], PROMPTS[:1], pruner=p, max_new_tokens=1)
        assert "\n" not in str(err.value)
    # three views: fewer than 1 / segment_ratio, one segment (the official int(3 * 0.25) = 0 clusters fails)
    short = lvlm.generate([scene(6 if family.startswith("qwen") else 3, 56, 0)], PROMPTS[:1], pruner=p,
                          max_new_tokens=1)
    assert short.stats[0].visual_per_layer[-1] < short.stats[0].visual_per_layer[0]


def _step_logits(lvlm, pruner, clips, use_cache=True, steps=4):
    logits = []
    hook = lvlm.runner.lm_head.register_forward_hook(lambda m, a, o: logits.append(o[:, -1].float()))
    try:
        lvlm.generate(clips, PROMPTS[:len(clips)], pruner=pruner, max_new_tokens=steps, ignore_eos=True,
                      use_cache=use_cache)
    finally:
        hook.remove()
    return torch.stack(logits, 1)


def test_the_kv_cache_of_layers_up_to_the_cut_holds_the_final_set():
    lvlm = lvlm_for("llava_onevision")
    clips = [scene(16, 56, 0), scene(16, 56, 1)]
    p, full = tp.create_pruner("prunevid", ratio=0.5), tp.create_pruner("prunevid", ratio=0.5, kv_cut=False)
    n_layers = len(lvlm.runner.layers)
    for pruner, cut in ((p, True), (full, False)):
        enc = lvlm.encode(clips, PROMPTS, lvlm.vision_needs(pruner))
        inputs = lvlm._assemble(enc.batch, enc.views, pruner, "compact", ["0", "1"])[0]
        result = lvlm.runner.generate(inputs, 2, pruner=pruner, ignore_eos=True)
        prefill = result.prefill_tokens  # [B, layers]: what each layer processed
        final = prefill[:, -1:]
        if cut:  # every layer's cache: text + the final set (official: key_cache[0..selected_layer][index_list])
            assert torch.equal(result.cache_tokens, final.expand(-1, n_layers))
        else:
            assert torch.equal(result.cache_tokens, prefill)
        assert bool((prefill[:, 0] > final[:, 0]).all())
    # the cut changes what decoding sees (the prefill is the same), and the reference applies it too
    a, b = _step_logits(lvlm, p, clips), _step_logits(lvlm, full, clips)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1:], b[:, 1:])
    torch.testing.assert_close(a, _step_logits(lvlm, p, clips, use_cache=False), rtol=0, atol=1e-4)


def test_clusters_in_the_model_and_loglikelihood_prefills_as_generate():
    """Groups above cluster_min (4 here) clustered inside a real forward; loglikelihood's prefill == generate's."""
    lvlm = lvlm_for("internvl")
    p = tp.create_pruner("prunevid", ratio=0.5, cluster_min=4)
    clips = [scene(16, 56, 0), scene(16, 56, 1)]
    n_text, pre, final = _official_counts(lvlm, clips[0], p)
    out = lvlm.generate(clips, PROMPTS, pruner=p, max_new_tokens=1)
    assert out.stats[0].visual_per_layer[0] == pre < _official_counts(lvlm, clips[0], tp.create_pruner("prunevid"))[1]
    ll = lvlm.loglikelihood(clips, PROMPTS, [" yes", " no no"], pruner=p)
    torch.testing.assert_close(ll.first_logits, out.first_logits, rtol=0, atol=1e-5)
    assert [s.visual_per_layer for s in ll.stats] == [s.visual_per_layer for s in out.stats]


@pytest.mark.skipif(not pv.OFFICIAL_SCORES, reason="needs LLMStage(heads=..., rotary=...), the framework change "
                    "proposed with prunevid; until then the cut scores with the recorded head-mean attention")
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen3_vl"])
def test_the_cut_scores_with_the_official_attention(family):
    """The scores the cut receives == the official ``attn_weights_wo_pos`` recomputed from what entered the scoring
    layer (input norm, q/k projections, no rotary, softmax over every key), max over heads, then over the text
    rows; and the kept set is the per-group top ``int(s * alpha)`` of them."""
    lvlm = lvlm_for(family)
    p = tp.create_pruner("prunevid", ratio=0.5)
    clip = scene(16, 56, 0)
    layers = lvlm.runner.layers
    layer = p.layer_for(len(layers))
    enc = lvlm.encode([clip], PROMPTS[:1], lvlm.vision_needs(p))
    policy = lvlm._position_policy(None, p, [clip])
    inputs = lvlm._assemble(enc.batch, enc.views, p, policy, ["0"])[0]
    entering, cut = [], []
    hook = layers[layer].register_forward_pre_hook(
        lambda m, a, k: entering.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    select = p.select
    p.select = lambda inp: cut.append((inp, select(inp))) or cut[-1][1]
    try:
        lvlm.runner.generate(inputs, 1, pruner=p, position_policy="keep")
    finally:
        hook.remove()
        del p.select
    (stage_inputs, red), = cut
    h = entering[0]  # [1, L, D] at prefill
    attn = layers[layer].self_attn
    x = layers[layer].input_layernorm(h)
    q = attn.q_proj(x).view(1, h.shape[1], -1, attn.head_dim)
    k = attn.k_proj(x).view(1, h.shape[1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head norms before the (here absent) rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv (the official Llama-2 has no GQA)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)  # [1, H, L, L], no mask
    span = (inputs.image_span if inputs.image_span is not None else inputs.image_mask)[0]
    visual = inputs.image_mask[0].nonzero().flatten()
    text = torch.arange(h.shape[1])[torch.arange(h.shape[1]) > int(span.nonzero().max())]
    official = probs[0].amax(0)[text][:, visual].amax(0)  # max over heads, then over the text rows
    got = stage_inputs.llm_attention[0].masked_fill(~stage_inputs.llm_query_mask[0][:, None], -1).amax(0)
    torch.testing.assert_close(got, official, rtol=0, atol=1e-5)
    assert red.indices[0].tolist() == pv.layer_cut(official, p.groups_of("0"), 0.5).tolist()


@pytest.mark.skipif("llm_position_policy" not in vars(tp.TokenPruner), reason="needs TokenPruner.llm_position_policy, "
                    "the framework change proposed with prunevid; until then the cut renumbers under compact")
def test_positions_compact_before_the_llm_and_kept_at_the_cut():
    """1-D RoPE: the merged sequence numbered contiguously (PLLaVA's new sequence), the layer-10 cut keeping those
    positions (``position_ids[:, index_list]``), decoding continuing from the uncut length."""
    lvlm = lvlm_for("llava_onevision")
    p = tp.create_pruner("prunevid", ratio=0.5)
    clip = scene(16, 56, 0)
    out = lvlm.generate([clip], PROMPTS[:1], pruner=p, max_new_tokens=4, ignore_eos=True)
    enc = lvlm.encode([clip], PROMPTS[:1], lvlm.vision_needs(p))
    inputs = lvlm._assemble(enc.batch, enc.views, p, "compact", ["0"])[0]
    assert inputs.positions[0].tolist() == list(range(inputs.positions.shape[1]))
    kept = lvlm.runner.generate(inputs, 4, pruner=p, ignore_eos=True, position_policy="keep")
    assert torch.equal(kept.tokens, out.token_ids)
    torch.testing.assert_close(kept.first_logits, out.first_logits, rtol=0, atol=1e-5)
    renumbered = lvlm.runner.generate(inputs, 4, pruner=p, ignore_eos=True, position_policy="compact")
    assert not torch.allclose(renumbered.first_logits, kept.first_logits)
