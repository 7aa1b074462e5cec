"""LLaVA-Scissor (arXiv 2506.21862): semantic connected components, per frame and then across frames.

As the official code (``HumanMLLM/LLaVA-Scissor@b63354c``, ``llava/model/llava_arch_zip.py``:
``UnionFind``, ``approximate_components`` and the ``mm_use_zip`` block of
``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``), on the projector outputs (for
LLaVA-OneVision video: after the 2x2 frame pooling, as the official ``get_2dPool``), per clip:

1. **Spatial SCC**, each frame on its own: the graph ``A = cos(x_i, x_j) > tau`` over the frame's
   tokens; its connected components by ``approximate_components`` (below); each component becomes the
   mean of its members. The frames' component tokens are concatenated in frame order.
2. **Temporal SCC**: the same on all those tokens at once (graph across frames); each component
   becomes the mean of its member tokens (a mean of means).
3. **Merge back**: every original token of the clip is assigned to the component token it is most
   similar to (cosine, ``argmax``: ties to the first); component token ``c`` becomes
   ``(y_c + sum of its assigned tokens) / (1 + their number)``.

``approximate_components(A, eps)``: ``s = min(n, ceil(ln(n) / eps^2))`` nodes sampled without
replacement; every edge ``(i, j)`` of a sampled node ``i`` (its neighbours in ascending order, itself
included) goes into a union-find (union by rank, path halving), in sampling order; a component is
the set of nodes whose union-find parent is a sampled node's root; nodes neither sampled nor
adjacent to a sampled node are singletons; components are ordered by their representative, the
member of highest degree in ``A`` (self loop included; ties: the lowest index). With the default
``eps = 0.05``, ``s = n`` up to ``n = 3233`` tokens (a frame's 196 always; the temporal pass of a
clip up to that many spatial components): every node is "sampled" (a permutation) and the partition is
exact; above that (``s = 3498`` of 6272, say), edges between two unsampled nodes are not seen.

The count is adaptive: the number of temporal components of the clip. **The official method has no
budget knob** (its options are ``mm_zip_tau`` and ``mm_zip_epsilon``; its README: "adjust the
similarity threshold to control the token retention ratio", with no rule from a ratio to a
threshold), so ``ratio`` is accepted, validated and **ignored**:

==========  ====================================  ========  ============================================
option      official                              default   meaning here
==========  ====================================  ========  ============================================
``ratio``   (none)                                ``0.5``   ignored: the count is the clip's component
                                                            count (``Reduction.num_kept``; what the LLM
                                                            gets, also in ``SampleStats.visual_tokens_kept``)
``tau``     ``mm_zip_tau``                        ``0.9``   cosine threshold of an edge (README default;
                                                            the code falls back to 0.95 without config)
``epsilon`` ``mm_zip_epsilon``                    ``0.05``  sample size ``ceil(ln n / eps^2)``
``seed``    (NumPy's global state, unseeded)      ``0``     node sampling: ``numpy.random.RandomState``
                                                            seeded by ``stable_seed(seed, sample id)``
==========  ====================================  ========  ============================================

No-op setting: ``tau`` above 1 (e.g. ``1.1``) -- no edges, every token its own component, each
output ``(x + x) / 2 == x``. ``ratio=1.0`` is **not** a no-op (it is ignored like any ratio).
:meth:`ScissorPruner.num_kept` can only say the most that can be kept (``N``).

Sampling order: one ``RandomState`` per sample, drawn in the official order (frame 0, 1, ..., then the
temporal pass), so a sample gets the same tokens whatever its batch; the order also decides, through
the union-find, which members the official component extraction sees (below).

Views: a clip is all the prunable views of a sample (scope ``"clip"``, the only one; a video's frames,
Qwen's temporal patches of 2 frames; the images or crops of an image sample, which the official code
also compresses, crops as frames); each view is one "frame" of step 1. Positions: each output token
stands for (``indices``) its representative -- the representative of the spatial component that
represents its temporal component -- whose order is the official output order; the official LLaVA
code renumbers positions (``compact``); on M-RoPE models (Qwen) the representatives' original
positions are kept. ``token_weights`` give every output token as weights over the clip's tokens.

Kept as the official code (not a choice of ours): a component's members are the nodes whose
union-find **parent** is the root, not those whose *find* is: a member deeper in the tree (an
unsampled neighbour whose root was later linked under another root, or a node three links down after
the last path halving) is left out of its component's mean and of its representative's choice (it
still joins step 3). Deliberate differences: cosine similarities in fp32 (official: the model
dtype, bf16/fp16); zero-norm tokens get cosine 0 (official: NaN); batched over samples, each with its
own generator (official: batch 1, NumPy's global RNG).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from ..errors import OptionError
from ..pruner import PruningInputs, Reduction, TokenPruner, register_pruner, validate_float, validate_int, validate_ratio
from .random import stable_seed


class Sampler(Protocol):
    """What :func:`approximate_components` draws with: ``numpy.random.RandomState.choice``'s signature."""

    def choice(self, a: int, size: int, replace: bool) -> np.ndarray: ...


def approximate_components(adj: np.ndarray, epsilon: float, rng: Sampler) -> tuple[list[int], list[np.ndarray]]:
    """The official ``approximate_components`` on a boolean adjacency ``[n, n]`` (self loops included).

    Returns ``(representatives, members)``, both in the official component order (by representative):
    ``members[c]`` ascending node indices, ``representatives[c]`` its member of highest degree (the
    lowest index on ties). Draws once from ``rng`` (``rng.choice(n, size=s, replace=False)``), as the
    official code draws from NumPy's global state.
    """
    n = adj.shape[0]
    if n == 0:
        return [], []
    sample_size = min(n, int(np.ceil(np.log(n) / epsilon ** 2)))
    sampled = np.asarray(rng.choice(n, size=sample_size, replace=False), dtype=np.int64)
    unreached = np.ones(n, dtype=bool)
    unreached[sampled] = False
    rows, cols = np.nonzero(adj[sampled])  # row-major: sampling order, then ascending neighbours
    unreached[cols] = False

    # Union by rank with path halving, edge by edge in the official order: the tree shapes matter,
    # since members are read off the parent array below (plain lists: the official numpy scalars are slower).
    parent = list(range(n))
    rank = [0] * n

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(sampled[rows].tolist(), cols.tolist()):
        xr, yr = find(x), find(y)
        if xr == yr:
            continue
        if rank[xr] < rank[yr]:
            parent[xr] = yr
        else:
            parent[yr] = xr
            if rank[xr] == rank[yr]:
                rank[xr] += 1

    roots = {find(i) for i in sampled.tolist()}  # the official pass that also halves paths
    groups: dict[int, list[int]] = {r: [] for r in roots}
    for node, p in enumerate(parent):  # official: np.where(uf.parent == root)
        if p in groups:
            groups[p].append(node)
    members = [np.asarray(groups[r], dtype=np.int64) for r in sorted(roots)]
    members += [np.asarray([i], dtype=np.int64) for i in np.flatnonzero(unreached)]
    degrees = np.count_nonzero(adj, axis=1)
    reps = [int(m[np.argmax(degrees[m])]) for m in members]  # first maximum: the lowest index
    order = sorted(range(len(members)), key=reps.__getitem__)
    return [reps[c] for c in order], [members[c] for c in order]


def similarity_graph(tokens: torch.Tensor, tau: float) -> np.ndarray:
    """``cos(x_i, x_j) > tau`` for ``tokens [n, D]`` (fp32) as a NumPy ``[n, n]`` bool array."""
    x = tokens.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (x @ x.T > tau).cpu().numpy()


def scissor_clip(tokens: torch.Tensor, view_sizes: Sequence[int], tau: float, epsilon: float, rng: Sampler
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaVA-Scissor on one clip: ``tokens [N, D]``, the views' token counts in order (summing to ``N``).

    Returns ``(indices [K] ascending, tokens [K, D] fp32, weights [K, N] fp32)`` with
    ``tokens ~= weights @ tokens_in``; ``K`` = the clip's temporal components.
    """
    x = tokens.float()
    n, dev = x.shape[0], x.device
    # Step 1: spatial components per view. s1_of[i]: the spatial component token i is averaged into
    # (-1: left out by the official member extraction).
    s1_of = torch.full((n,), -1, dtype=torch.long)
    s1_rep: list[int] = []
    s1_size: list[int] = []
    offset = 0
    for size in view_sizes:
        reps, members = approximate_components(similarity_graph(x[offset:offset + size], tau), epsilon, rng)
        for rep, m in zip(reps, members):
            s1_of[torch.from_numpy(m) + offset] = len(s1_rep)
            s1_rep.append(rep + offset)
            s1_size.append(len(m))
        offset += size
    if offset != n:
        raise ValueError(f"views of {offset} tokens in all, got {n} tokens")
    s = len(s1_rep)
    in1 = (s1_of >= 0).nonzero().flatten()
    size1 = torch.tensor(s1_size, dtype=torch.float32, device=dev)
    z = torch.zeros(s, x.shape[1], device=dev).index_add_(0, s1_of[in1].to(dev), x[in1.to(dev)]) / size1[:, None]

    # Step 2: temporal components over the spatial component tokens.
    reps2, members2 = approximate_components(similarity_graph(z, tau), epsilon, rng)
    k = len(reps2)
    c2_of = torch.full((s,), -1, dtype=torch.long)
    for c, m in enumerate(members2):
        c2_of[torch.from_numpy(m)] = c
    size2 = torch.tensor([len(m) for m in members2], dtype=torch.float32, device=dev)
    in2 = (c2_of >= 0).nonzero().flatten()
    y = torch.zeros(k, x.shape[1], device=dev).index_add_(0, c2_of[in2].to(dev), z[in2.to(dev)]) / size2[:, None]
    indices = torch.tensor([s1_rep[r] for r in reps2], dtype=torch.long, device=dev)

    # Step 3: every original token joins the component token it is most similar to.
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    assign = (xn @ yn.T).argmax(dim=1)  # [N]
    counts = torch.bincount(assign, minlength=k).float() + 1
    out = (y + torch.zeros_like(y).index_add_(0, assign, x)) / counts[:, None]

    # The same as weights over the clip's tokens: y_c = mean over its spatial tokens of their means.
    weights = torch.zeros(k, n, device=dev)
    token = in1[c2_of[s1_of[in1]] >= 0]  # tokens inside a spatial token inside a temporal one
    comp1 = s1_of[token]
    comp2 = c2_of[comp1]
    weights[comp2.to(dev), token.to(dev)] = 1.0 / (size2[comp2.to(dev)] * size1[comp1.to(dev)])
    weights[assign, torch.arange(n, device=dev)] += 1.0
    weights /= counts[:, None]

    order = indices.argsort()  # already ascending (components come ordered by representative)
    return indices[order], out[order], weights[order]


@register_pruner("scissor")
class ScissorPruner(TokenPruner):
    """LLaVA-Scissor: connected components of the cosine graph per frame, then across frames, all merged back."""

    views = "global"
    scopes = ("clip",)  # frames, then across frames: the whole clip at once
    clip_inputs = True
    quantised = True  # the count is adaptive (num_kept: at most N)
    # The count depends on each clip's content, so one call cannot serve clips that keep different numbers:
    # read by tokenprune.adapters.pre_llm._prune_clips once it gives such pruners one clip per call (the
    # change proposed with this method); until then a batch of such clips is refused in select.
    adaptive = True
    position_policy = "compact"
    position_policy_mrope = "keep"

    @property
    def uses_ratio(self) -> bool:
        """``False``: the count is the clip's components, whatever the ratio (a sweep runs it once)."""
        return False

    def __init__(self, ratio: float = 0.5, tau: float = 0.9, epsilon: float = 0.05, seed: int = 0):
        self.ratio = validate_ratio(ratio)  # accepted for the common interface; the method has no budget
        self.tau = validate_float(tau, "tau")
        self.epsilon = validate_float(epsilon, "epsilon")
        if self.epsilon <= 0:
            raise OptionError(f"epsilon must be > 0 (the sample size is ceil(ln n / epsilon^2)), got {epsilon!r}")
        self.seed = validate_int(seed, "seed")

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """At most ``n_tokens``: the count is the clip's component count, known only from its tokens
        (``Reduction.num_kept`` of a call)."""
        return n_tokens

    def select(self, inputs: PruningInputs) -> Reduction:
        if inputs.sample_ids is None:
            raise ValueError("scissor needs PruningInputs.sample_ids: its node sampling is seeded per sample")
        b, n, _ = inputs.tokens.shape
        if inputs.token_views is not None:
            views = inputs.token_views.cpu()
        else:  # one view (an image, or any input without a clip layout)
            views = torch.zeros(b, n, dtype=torch.long)
        results = []
        for row, sid in enumerate(inputs.sample_ids):
            sizes = torch.unique_consecutive(views[row], return_counts=True)[1].tolist()
            rng = np.random.RandomState(stable_seed(self.seed, sid) % 2 ** 32)
            results.append(scissor_clip(inputs.tokens[row], sizes, self.tau, self.epsilon, rng))
        counts = [r[0].shape[0] for r in results]
        if len(set(counts)) > 1:
            raise OptionError(f"scissor keeps an adaptive count per clip, and clips of one layout pruned in one batch "
                              f"got different counts {counts}: run such clips one per batch (batch size 1)")
        return Reduction(indices=torch.stack([r[0] for r in results]),
                         tokens=torch.stack([r[1] for r in results]).to(inputs.tokens.dtype),
                         token_weights=torch.stack([r[2] for r in results]))
