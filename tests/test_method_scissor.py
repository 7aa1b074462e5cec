"""LLaVA-Scissor (methods/scissor.py): hand-computed components and merges, the official code itself on
random clips, and every video family's tiny model (no-op setting == unpruned, the adaptive count entering
each decoder layer, cached == uncached, batch == alone).

The reference below is the official code, copied from ``HumanMLLM/LLaVA-Scissor@b63354c``
``llava/model/llava_arch_zip.py`` (Apache-2.0): ``UnionFind`` and ``approximate_components`` verbatim
(comments translated), and the ``mm_use_zip`` block of
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` with its counters and prints dropped, its
frames given as a list (the official code splits equal-sized frames; an image's views differ in size) and
the components' sort keys kept, which say which original token each output token stands for. It draws
from NumPy's global RNG, as the official code does; the tests seed that with the pruner's per-sample seed.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

import tokenprune as tp
import tokenprune.methods.scissor  # noqa: F401  registers "scissor" until methods/__init__.py imports it
from test_adapters import LayerInputCounter, images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for, video
from tokenprune.adapters.pre_llm import prune_views
from tokenprune.errors import OptionError
from tokenprune.methods.random import stable_seed
from tokenprune.methods.scissor import ScissorPruner, approximate_components, scissor_clip
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---------------------------------------------------------------- the official code (reference)
class UnionFind:
    def __init__(self, size):
        self.parent = np.arange(size, dtype=np.int64)
        self.rank = np.zeros(size, dtype=np.int32)

    def find(self, x):
        # iterative path compression
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]  # path compression
            x = self.parent[x]
        return x

    def batch_union(self, x_arr, y_arr):
        # batched merge
        for x, y in zip(x_arr, y_arr):
            x_root = self.find(x)
            y_root = self.find(y)
            if x_root == y_root:
                continue

            if self.rank[x_root] < self.rank[y_root]:
                self.parent[x_root] = y_root
            else:
                self.parent[y_root] = x_root
                if self.rank[x_root] == self.rank[y_root]:
                    self.rank[x_root] += 1


def official_approximate_components(adj_matrix, epsilon=0.05):
    n = adj_matrix.shape[0]
    all_nodes = np.ones(n)
    all_indices = np.arange(0, n)
    if n == 0:
        return []

    sample_size = min(n, int(np.ceil(np.log(n) / epsilon**2)))
    sampled_nodes = np.random.choice(n, size=sample_size, replace=False)
    all_nodes[sampled_nodes] = 0

    # sparse adjacency lists
    neighbor_dict = defaultdict(list)
    for i in sampled_nodes:
        neighbors = np.nonzero(adj_matrix[i])[0]
        valid_neighbors = np.intersect1d(neighbors, all_indices, assume_unique=True)
        neighbor_dict[i] = valid_neighbors
        all_nodes[neighbors] = 0

    remain_nodes = np.nonzero(all_nodes)[0]
    remain_nodes = [[element] for element in remain_nodes]
    # batched merge
    uf = UnionFind(n)
    all_x, all_y = [], []
    for i in sampled_nodes:
        for j in neighbor_dict[i]:
            all_x.append(i)
            all_y.append(j)
    uf.batch_union(np.array(all_x), np.array(all_y))

    sampled_roots = np.array([uf.find(i) for i in sampled_nodes])
    unique_roots, counts = np.unique(sampled_roots, return_counts=True)

    components = []
    for root in unique_roots:
        cluster = np.where(uf.parent == root)[0].tolist()
        if len(cluster) > 0:
            components.append(cluster)
    components.extend(remain_nodes)

    degrees = np.count_nonzero(adj_matrix, axis=1)  # degrees, computed once

    def get_sort_key(cluster):
        max_degree = -1
        min_node = float('inf')
        for node in cluster:
            current_degree = degrees[node]
            if (current_degree > max_degree) or \
               (current_degree == max_degree and node < min_node):
                max_degree = current_degree
                min_node = node
        return min_node

    components.sort(key=get_sort_key)

    return components


def official_sort_key(cluster, adj_matrix):
    """``get_sort_key`` of ``official_approximate_components`` (a closure there): the representative."""
    degrees = np.count_nonzero(adj_matrix, axis=1)
    max_degree, min_node = -1, float("inf")
    for node in cluster:
        if degrees[node] > max_degree or (degrees[node] == max_degree and node < min_node):
            max_degree, min_node = degrees[node], node
    return int(min_node)


def official_zip(frames: list[torch.Tensor], tau: float, epsilon: float):
    """The ``mm_use_zip`` block on one clip (``frames``: each frame's tokens ``[hw_f, D]``).

    Returns ``(representatives [K] as original token indices, compressed tokens [K, D], left_out)``;
    ``left_out`` counts the nodes the official member extraction missed (the quirk the port keeps).
    """
    image_feat = torch.cat(frames)
    left_out = 0
    all_fused_feature, keys1, offset = [], [], 0
    # Spatial Compression on each frame
    for image_feat_per_frame in frames:
        norm = torch.norm(image_feat_per_frame, p=2, dim=-1, keepdim=True)
        normalized = image_feat_per_frame / norm
        adj = (torch.matmul(normalized, normalized.t()) > tau).cpu().numpy()
        connected_components = official_approximate_components(adj, epsilon=epsilon)
        left_out += adj.shape[0] - sum(len(c) for c in connected_components)
        keys1 += [offset + official_sort_key(c, adj) for c in connected_components]
        fused_features = []
        for connected_component in connected_components:
            selected_features = image_feat_per_frame[connected_component]
            fused_features.append(torch.mean(selected_features, dim=0))
        all_fused_feature.append(torch.stack(fused_features))
        offset += image_feat_per_frame.shape[0]
    selected_tokens = torch.cat(all_fused_feature)

    # Temporal compression
    norm_select_tokens = torch.norm(selected_tokens, p=2, dim=1, keepdim=True)
    select_tokens_normalized = selected_tokens / norm_select_tokens
    similarity_matrix_select_tokens = torch.matmul(select_tokens_normalized, select_tokens_normalized.t())
    high = (similarity_matrix_select_tokens > tau).cpu().numpy()
    connected_component_select_tokens = official_approximate_components(high, epsilon=epsilon)
    left_out += high.shape[0] - sum(len(c) for c in connected_component_select_tokens)
    keys = [keys1[official_sort_key(c, high)] for c in connected_component_select_tokens]
    fused_features_select_tokens = []
    for connected_component in connected_component_select_tokens:
        selected_features = selected_tokens[connected_component]
        fused_features_select_tokens.append(torch.mean(selected_features, dim=0))
    selected_tokens = torch.stack(fused_features_select_tokens)
    num_tokens = len(selected_tokens)

    # Token Merge for all tokens
    remaining_values = image_feat
    norm_selected_tokens = torch.norm(selected_tokens, p=2, dim=1, keepdim=True)
    norm_remaining_values = torch.norm(remaining_values, p=2, dim=1, keepdim=True)
    selected_tokens_normalized = selected_tokens / norm_selected_tokens
    remaining_values_normalized = remaining_values / norm_remaining_values
    similarity_matrix = torch.matmul(remaining_values_normalized, selected_tokens_normalized.t())
    closest_indices = torch.argmax(similarity_matrix, dim=1)
    merged_tokens = torch.zeros_like(selected_tokens)
    merged_tokens.scatter_add_(dim=0, index=closest_indices.view(-1, 1).expand(-1, merged_tokens.shape[1]),
                               src=remaining_values)
    counts = torch.bincount(closest_indices, minlength=num_tokens).float() + 1
    selected_tokens += merged_tokens
    selected_tokens /= counts.unsqueeze(1)
    return keys, selected_tokens, left_out


def run_official(frames: list[torch.Tensor], sample_id: str, tau: float = 0.9, epsilon: float = 0.05, seed: int = 0):
    """``official_zip`` with NumPy's global RNG seeded as the pruner seeds its per-sample generator."""
    state = np.random.get_state()
    np.random.seed(stable_seed(seed, sample_id) % 2 ** 32)
    try:
        return official_zip([f.float() for f in frames], tau, epsilon)
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------- helpers
def clip_inputs(frames: list[torch.Tensor], ids: list[str] | None = None, batch: int = 1) -> PruningInputs:
    """A clip as the framework hands it over at scope clip: frames concatenated, ``token_views``."""
    tokens = torch.cat(frames)[None].expand(batch, -1, -1) if batch > 1 else torch.cat(frames)[None]
    views = torch.cat([torch.full((f.shape[0],), j) for j, f in enumerate(frames)])
    return PruningInputs(tokens=tokens, grid=(1, tokens.shape[1]), sample_ids=ids or [f"s{i}" for i in range(batch)],
                         token_views=views.expand(tokens.shape[0], -1),
                         view_grids=tuple((1, f.shape[0]) for f in frames))


def clustered_clip(frames: int, hw: int, dim: int, seed: int, centers: int = 5, noise: float = 0.45
                   ) -> list[torch.Tensor]:
    """Frames of tokens around a few shared directions: components within and across frames."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g)
    return [c[torch.randint(0, centers, (hw,), generator=g)] + noise * torch.randn(hw, dim, generator=g)
            for _ in range(frames)]


class FixedOrder:
    """A stand-in RNG whose ``choice`` returns a given sampling order."""

    def __init__(self, order):
        self.order = np.asarray(order)

    def choice(self, a, size, replace):
        assert not replace and size == len(self.order)
        return self.order


def adjacency(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    adj = np.eye(n, dtype=bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    return adj


# ---------------------------------------------------------------- hand-computed
def test_hand_computed_two_frames():
    # Frame 0: t0=(2,0), t1=(1,.1) (cos .995 > .9), t2=(0,1), t3=(0,3) (cos 1)
    #   -> {0,1} mean (1.5,.05), {2,3} mean (0,2).
    # Frame 1: t4=(1,0), t5=(0,-1), t6=(-1,0), t7=(-2,0) -> {4}, {5}, {6,7} mean (-1.5,0).
    # Across frames: (1.5,.05) ~ (1,0) (cos .9994) -> (1.25,.025); the rest alone: (0,2), (0,-1), (-1.5,0).
    # Representatives (highest degree, then lowest index): 0, 2, 5, 6.
    # Merge back: t0,t1,t4 -> c0; t2,t3 -> c1; t5 -> c2; t6,t7 -> c3.
    # c0 = ((1.25,.025) + (2,0) + (1,.1) + (1,0)) / 4 = (1.3125, .03125); c1 = ((0,2)+(0,1)+(0,3))/3 = (0,2);
    # c2 = ((0,-1)+(0,-1))/2 = (0,-1); c3 = ((-1.5,0)+(-1,0)+(-2,0))/3 = (-1.5,0).
    f0 = torch.tensor([[2.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 3.0]])
    f1 = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [-2.0, 0.0]])
    red = tp.create_pruner("scissor")(clip_inputs([f0, f1]))
    assert red.indices.tolist() == [[0, 2, 5, 6]]
    want = torch.tensor([[1.3125, 0.03125], [0.0, 2.0], [0.0, -1.0], [-1.5, 0.0]])
    torch.testing.assert_close(red.tokens[0], want, rtol=0, atol=1e-6)
    # c0's weights: (w_c0 + one-hots of t0, t1, t4) / 4, w_c0 = mean(mean(t0, t1), t4) = (.25, .25, .5).
    w = torch.zeros(4, 8)
    w[0, [0, 1, 4]] = torch.tensor([1.25, 1.25, 1.5]) / 4
    w[1, [2, 3]] = 1 / 3 + torch.tensor([0.5, 0.5]) / 3  # (mean(t2, t3) + t2 + t3) / 3
    w[2, 5] = 1.0
    w[3, [6, 7]] = 1 / 3 + torch.tensor([0.5, 0.5]) / 3
    torch.testing.assert_close(red.token_weights[0], w, rtol=0, atol=1e-6)
    assert red.num_kept == 4


def test_members_are_read_off_the_parent_array_as_the_official_code_does():
    # n=5, edges 0-1, 2-3, 4-1, 4-3; sample size ceil(ln 5 / .8^2) = ceil(2.51) = 3, order (0, 2, 4).
    # Unions: (0,1): 1 -> 0, rank0 = 1. (2,3): 3 -> 2, rank2 = 1. (4,1): 4 -> 0. (4,3): roots 0, 2 of equal
    # rank: 2 -> 0, so 3 -> 2 -> 0. Node 3 is unsampled and never found again: parent[3] == 2 != root 0, so
    # the component read off the parents is {0, 1, 2, 4}; node 3 is in no component.
    # Degrees (self loop included): 2, 3, 2, 3, 3 -> representative 1 (degree 3, lowest index).
    adj = adjacency(5, [(0, 1), (2, 3), (4, 1), (4, 3)])
    reps, members = approximate_components(adj, 0.8, FixedOrder([0, 2, 4]))
    assert reps == [1] and [m.tolist() for m in members] == [[0, 1, 2, 4]]
    np.random.seed(0)  # the official code agrees (its own draw replaced by the same order)
    real_choice = np.random.choice
    try:
        np.random.choice = lambda n, size, replace: np.array([0, 2, 4])
        assert official_approximate_components(adj, 0.8) == [[0, 1, 2, 4]]
    finally:
        np.random.choice = real_choice


def test_unsampled_pairs_are_not_seen():
    # n=4, edges 0-1 and 2-3; sample size ceil(ln 4 / 1.2^2) = ceil(.96) = 1: node 0. Node 1 is reached through
    # it; 2 and 3 are neither sampled nor reached: singletons, their edge unseen. Representatives 0, 2, 3.
    adj = adjacency(4, [(0, 1), (2, 3)])
    reps, members = approximate_components(adj, 1.2, FixedOrder([0]))
    assert reps == [0, 2, 3] and [m.tolist() for m in members] == [[0, 1], [2], [3]]


def test_no_op_setting_and_ratio_ignored():
    frames = clustered_clip(3, 16, 8, seed=1, noise=0.2)
    x = torch.cat(frames)
    noop = tp.create_pruner("scissor", tau=1.1)(clip_inputs(frames))  # no edge: every token alone, (x + x) / 2
    assert noop.indices.tolist() == [list(range(48))]
    assert torch.equal(noop.tokens[0], x)
    a = tp.create_pruner("scissor", ratio=1.0)(clip_inputs(frames))
    b = tp.create_pruner("scissor", ratio=0.1)(clip_inputs(frames))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)
    assert a.num_kept < 48  # ratio 1.0 is not a no-op: the rule runs whatever the ratio


# ---------------------------------------------------------------- against the official code
@pytest.mark.parametrize("epsilon", [0.05, 0.5])  # 0.5: ceil(ln 36 / .25) = 15 of 36 nodes sampled
@pytest.mark.parametrize("seed", range(6))
def test_matches_the_official_code_on_random_clips(seed, epsilon):
    frames = clustered_clip(4, 36, 16, seed=seed, noise=0.3 + 0.05 * seed)
    sid = f"clip-{seed}"
    keys, want, _ = run_official(frames, sid, 0.9, epsilon)
    red = ScissorPruner(epsilon=epsilon)(clip_inputs(frames, [sid]))
    assert red.indices[0].tolist() == keys
    assert (red.tokens[0] - want).abs().max().item() <= 1e-5
    torch.testing.assert_close(red.token_weights[0] @ torch.cat(frames), red.tokens[0], rtol=0, atol=1e-5)
    w = red.token_weights[0]
    assert bool((w >= 0).all()) and torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)


def test_the_random_clips_exercise_sampling_and_the_member_quirk():
    """The official comparisons above are only worth something if they hit the awkward path: with epsilon .5
    (unsampled nodes), nodes left out of their component by the parent-array read. (With every node sampled,
    epsilon .05 on 36 nodes, each node's own edges and the last pass halve its path: none are left out here.)"""
    left_out = {eps: sum(run_official(clustered_clip(4, 36, 16, seed=s, noise=0.3 + 0.05 * s), f"clip-{s}", 0.9, eps)[2]
                         for s in range(6)) for eps in (0.05, 0.5)}
    assert left_out == {0.05: 0, 0.5: 13}


def test_seeded_per_sample():
    frames = clustered_clip(4, 36, 16, seed=2, noise=0.4)
    p = ScissorPruner(epsilon=0.5)  # sampling: the draw matters
    runs = {sid: p(clip_inputs(frames, [sid])) for sid in ("a", "b", "c", "a")}
    assert torch.equal(p(clip_inputs(frames, ["a"])).tokens, runs["a"].tokens)
    assert len({tuple(r.indices[0].tolist()) + tuple(r.tokens[0].flatten().tolist()) for r in runs.values()}) > 1
    q = ScissorPruner(epsilon=0.5, seed=1)
    assert not torch.equal(q(clip_inputs(frames, ["a"])).tokens, runs["a"].tokens)


def test_batch_equals_alone_and_unequal_counts_are_refused_in_one_line():
    frames = clustered_clip(2, 25, 8, seed=4, noise=0.4)
    p = ScissorPruner()
    both = p(clip_inputs(frames, ["x", "x"], batch=2))  # same clip, same id: same count
    alone = p(clip_inputs(frames, ["x"]))
    assert torch.equal(both.indices[1], alone.indices[0]) and torch.equal(both.tokens[1], alone.tokens[0])
    other = clustered_clip(2, 25, 8, seed=5, centers=9, noise=0.2)
    mixed = PruningInputs(tokens=torch.stack([torch.cat(frames), torch.cat(other)]), grid=(1, 50),
                          sample_ids=["x", "y"],
                          token_views=torch.tensor([0] * 25 + [1] * 25).expand(2, -1), view_grids=((5, 5), (5, 5)))
    counts = [p(mixed.select(i)).num_kept for i in range(2)]
    assert counts[0] != counts[1]
    with pytest.raises(OptionError, match="adaptive count") as err:
        p(mixed)
    assert "\n" not in str(err.value)


def test_contract_inputs_have_no_edge_so_everything_is_kept():
    """tests/test_contract.py runs every pruner on synthetic inputs (random 16-d tokens, no clip): there no pair
    reaches cosine .9, so the count is N (== num_kept, the most it can be) and the tokens are unchanged."""
    for inputs in (synthetic_inputs(), synthetic_inputs(grid=(5, 7), patch_merge=4, seed=3)):
        x = inputs.tokens / inputs.tokens.norm(dim=-1, keepdim=True)
        cos = x @ x.transpose(1, 2) - 2 * torch.eye(inputs.num_tokens)
        assert cos.max() < 0.9
        p = tp.create_pruner("scissor", ratio=0.25)
        check_pruner_contract(p, inputs)
        torch.testing.assert_close(p(inputs).tokens, inputs.tokens, rtol=0, atol=0)


def test_options():
    with pytest.raises(OptionError, match="epsilon"):
        tp.create_pruner("scissor", epsilon=0)
    with pytest.raises(OptionError, match="tau"):
        tp.create_pruner("scissor", tau="high")
    with pytest.raises(OptionError, match="scope"):
        tp.create_pruner("scissor", scope="frame")
    p = tp.create_pruner("scissor")
    assert (p.tau, p.epsilon, p.seed, p.scope) == (0.9, 0.05, 0, "clip")
    assert p.default_position_policy(False) == "compact" and p.default_position_policy(True) == "keep"


def test_views_of_unequal_sizes_match_the_official_code_frame_by_frame():
    """An image's views (base + high-res) differ in size: each is one "frame" of the spatial step."""
    frames = clustered_clip(1, 9, 16, seed=7, noise=0.4) + clustered_clip(1, 30, 16, seed=7, noise=0.4)
    keys, want, _ = run_official(frames, "img")
    red = ScissorPruner()(clip_inputs(frames, ["img"]))
    assert red.indices[0].tolist() == keys
    assert (red.tokens[0] - want).abs().max().item() <= 1e-5
    idx, tokens, _ = scissor_clip(torch.cat(frames), [9, 30], 0.9, 0.05,
                                  np.random.RandomState(stable_seed(0, "img") % 2 ** 32))
    assert torch.equal(idx, red.indices[0]) and torch.equal(tokens, red.tokens[0])


# ---------------------------------------------------------------- tiny models, every video family
def static_video(frames: int = 4, side: int = 48) -> tp.Video:
    """The same picture in every frame: identical tokens across frames, merged by the temporal step."""
    frame = np.random.default_rng(3).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return tp.Video.from_frames(np.stack([frame] * frames), fps=2.0)


def expected(lvlm, visual, prompt: str, sid: str, tau: float):
    """The official code on the sample's own prunable views: ``(kept sequence positions, tokens, text length,
    visual tokens)``."""
    enc = lvlm.encode([visual], [prompt], ScissorPruner().needs)
    views = [v for v in enc.views if v.prunable]
    keys, tokens, _ = run_official([v.tokens for v in views], sid, tau)
    seq = torch.cat([v.seq_index for v in views])
    n_visual = seq.shape[0]
    return seq[keys], tokens, enc.batch["input_ids"].shape[1] - n_visual, n_visual


def check_kept(lvlm, visual, prompt: str, sid: str, tau: float) -> int:
    """What the pruner keeps (sequence slots, tokens) == the official code on the views' tokens; every decoder
    layer receives text + that many tokens (forward pre-hooks); the stats say so. Returns the count."""
    p = tp.create_pruner("scissor", tau=tau)
    seq_want, tokens_want, n_text, n_visual = expected(lvlm, visual, prompt, sid, tau)
    enc = lvlm.encode([visual], [prompt], p.needs)
    kept = [o for o, v in zip(prune_views(enc.views, p, [sid], lvlm.project_features), enc.views) if v.prunable]
    assert torch.equal(torch.cat([o[0] for o in kept]), seq_want)
    assert (torch.cat([o[1] for o in kept]) - tokens_want).abs().max().item() <= 1e-5
    k = seq_want.shape[0]
    assert 0 < k < n_visual
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        out = lvlm.generate([visual], [prompt], pruner=p, max_new_tokens=1, sample_ids=[sid])
    finally:
        counter.close()
    assert [counter.lengths[i][0] for i in range(len(lvlm.runner.layers))] == [n_text + k] * len(lvlm.runner.layers)
    assert out.stats[0].visual_tokens_kept == k and out.stats[0].visual_tokens_in == n_visual
    return k


# A threshold under which the tiny models' random-noise frames have edges inside frames (their cosines sit
# far below the real models'): the spatial step merges, not only the temporal one.
LOW_TAU = {"qwen2_vl": 0.2, "qwen2_5_vl": 0.2, "qwen3_vl": 0.1, "llava_onevision": 0.8, "llava_next_video": 0.5,
           "internvl": 0.4}


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_on_every_video_family(family):
    lvlm = lvlm_for(family)
    # Qwen batches videos of different lengths (different layouts: each clip its own pruner call, its own
    # count); the other families' processors batch videos of one shape only, which share a pruner call and so
    # must keep one count: the static clip again under another id (another seed, the same exact partition).
    second = video(6, seed=1) if family.startswith("qwen") else static_video()
    visuals = [static_video(), second, images(1)[0]]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    ids = ["v-static", "v-second", "img"]
    p = tp.create_pruner("scissor")

    # The no-op setting (tau > 1: no edge) == unpruned.
    ref = lvlm.generate(visuals, prompts, max_new_tokens=4)
    noop = lvlm.generate(visuals, prompts, pruner=tp.create_pruner("scissor", tau=1.1), max_new_tokens=4,
                         sample_ids=ids)
    assert torch.equal(noop.token_ids, ref.token_ids)
    assert (noop.first_logits - ref.first_logits).abs().max().item() <= 1e-5

    # The static clip at the default tau (its frames' identical tokens merged across frames), and a noise clip
    # at a low tau (merged inside frames too): both as the official code, the counts honest.
    n_static = check_kept(lvlm, visuals[0], prompts[0], ids[0], p.tau)
    n_noise = check_kept(lvlm, video(4, seed=2), prompts[1], "v-noise", LOW_TAU[family])
    assert n_static > 1 and n_noise > 1

    # Cached == uncached; the batch (clips of different layouts: each its own count) == each sample alone.
    cached = lvlm.generate(visuals, prompts, pruner=p, max_new_tokens=4, ignore_eos=True, sample_ids=ids)
    uncached = lvlm.generate(visuals, prompts, pruner=p, max_new_tokens=4, ignore_eos=True, use_cache=False,
                             sample_ids=ids)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    for i, sid in enumerate(ids):
        alone = lvlm.generate(visuals[i:i + 1], prompts[i:i + 1], pruner=p, max_new_tokens=4, ignore_eos=True,
                              sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], cached.token_ids[i])
        assert alone.stats[0] == cached.stats[i]
        torch.testing.assert_close(alone.first_logits[0], cached.first_logits[i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llava_onevision", "internvl", "qwen2_vl", "llava_next_video"])
def test_same_layout_clips_with_different_counts_batch_like_each_alone(family):
    """Clips of one layout that keep different counts: the framework prunes an adaptive method's clips one per
    call, so the batch equals each clip alone and cached equals uncached."""
    lvlm = lvlm_for(family)
    visuals = [static_video(), video(4, seed=1)]
    p = tp.create_pruner("scissor")
    both = lvlm.generate(visuals, PROMPTS, pruner=p, max_new_tokens=4, ignore_eos=True, sample_ids=["a", "b"])
    counts = [s.visual_tokens_kept for s in both.stats]
    assert counts[0] != counts[1]  # the case in point
    ref = lvlm.generate(visuals, PROMPTS, pruner=p, max_new_tokens=4, ignore_eos=True, sample_ids=["a", "b"],
                        use_cache=False)
    assert torch.equal(both.token_ids, ref.token_ids)
    for i, sid in enumerate(["a", "b"]):
        alone = lvlm.generate(visuals[i:i + 1], PROMPTS[i:i + 1], pruner=p, max_new_tokens=4, ignore_eos=True,
                              sample_ids=[sid])
        assert torch.equal(alone.token_ids[0], both.token_ids[i]) and alone.stats[0] == both.stats[i]
        torch.testing.assert_close(alone.first_logits[0], both.first_logits[i], rtol=0, atol=1e-4)
