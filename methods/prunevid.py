"""PruneVid (ACL'25, arXiv 2412.16117): static tokens merged over time and clustered before the LLM, then a
text-to-video attention cut inside it that also trims the KV cache of the earlier layers.

As the official code ``Visual-AI/PruneVid@b12600c`` (PLLaVA, Llama-2-7B's 32 decoder layers):

* **Before the LLM** (``models/pllava/modeling_pllava.py``: ``merge_frames_dynamic``, ``cluster_dpc_knn``,
  ``refine_clusters``, ``segment_lengths``, ``spatial_merge_tokens``, ``compute_cluster_vectors``), on a clip of
  ``T`` frames of ``n`` tokens (after the projector):

  1. **Segments.** DPC-kNN (below) over the frames' mean tokens (``frames.mean(dim=2)``: here
     ``PruningInputs.view_features``) into ``int(T * segment_ratio)`` clusters, ``k = 7``; ``refine_clusters``
     keeps each cluster's longest run(s) of consecutive frames (a cluster whose runs are all single frames keeps
     none) and gives every other run to the longer of its two neighbouring runs (ties: the left one; no
     neighbour: cluster 0); the segments are the runs of equal labels.
  2. **Static / dynamic.** In a segment of ``W`` frames, position ``l`` is *static* when the mean cosine
     similarity of its ``W`` tokens over the ``W (W - 1)`` ordered pairs of distinct frames is ``> tau``
     (computed as the official ``(sum over all pairs - 1 per frame) / (W (W - 1))``); the static positions'
     tokens are averaged over the segment's frames, the dynamic ones stay per frame.
  3. **Clusters.** The segment's static tokens, and each frame's dynamic tokens, are a group; a group of more
     than ``cluster_min = 14`` tokens becomes ``int(m * cluster_ratio)`` DPC-kNN clusters (``k = 7``), each the
     plain mean of its members (``compute_cluster_vectors``).

  **DPC-kNN** (``cluster_dpc_knn``): ``dist = cdist(x, x) / sqrt(D)``; ``density = exp(-mean of the k smallest
  dist^2)`` (self included); ``delta`` = distance to the nearest denser token (the densest: the largest
  distance); the ``c`` highest ``delta * density`` are the centres (descending); every token joins its nearest
  centre (ties: the earlier centre), each centre itself.

* **Inside the LLM** (``models/pllava/llama.py`` ``LlamaModelVTP.forward`` and ``LlamaAttention.forward``,
  ``models/pllava/elastic_cache.py`` ``VTPWindowCache.process_attention`` / ``prompt_prefill``): at decoder layer
  ``layer`` (official 10), per head ``softmax(q k^T / sqrt(d))`` of that layer's queries and keys *before* the
  rotary embedding, over every key (no causal mask: ``attn_weights_wo_pos``); rows = the text after the video,
  columns = the video tokens; **max over heads, then max over the text rows**. Per segment the top
  ``int(s * alpha)`` of its ``s`` static tokens and per frame the top ``int(d * alpha)`` of its ``d`` dynamic
  tokens are kept (``topk``); the hidden states after that layer are cut to them with their positions
  (``position_ids[:, index_list]``; layers ``layer + 1 ..`` see the cut: ``LLMStage(layer + 1, "previous",
  "text")``) **and** so is the KV cache of layers ``0 .. layer`` (``key_cache[0..selected_layer]`` indexed by the
  same list): the :class:`~tokenprune.pruner.DecodePlan` ``cut_layers = range(0, layer + 1)``. Generated tokens
  continue from the uncut prompt length (``position_ids[0, 0] = original_number - 1``): ``positions="continue"``.

Options (``prunevid:ratio=0.3``, ``prunevid:tau=0.9:alpha=1``, ...):

=================  ==================================  ==========================================================
option             official (``scripts/eval.sh``)      here
=================  ==================================  ==========================================================
``ratio``          --                                  ``alpha`` (below) unless ``alpha`` is given; ``1.0``
                                                       (with no ``alpha``) switches every stage off: the
                                                       unpruned model (the official ``alpha = 1`` would still
                                                       merge before the LLM: ``prunevid:alpha=1``)
``alpha``          ``--alpha 0.4``                     share of each segment's static and each frame's
                                                       dynamic tokens kept at ``layer`` (``int(s * alpha)``)
``tau``            ``--tau 0.8``                       static threshold on the mean pairwise cosine
``segment_ratio``  ``--temporal_segment_ratio 0.25``   segments = ``max(1, int(T * segment_ratio))`` clusters
``cluster_ratio``  ``--cluster_ratio 0.5``             a group of ``m > cluster_min`` tokens becomes
                                                       ``max(1, int(m * cluster_ratio))`` clusters
``cluster_min``    ``14`` (hard-coded ``> 14``)         groups up to this size are not clustered
``k``              ``7`` (hard-coded)                  DPC-kNN neighbours (``min(k, m)`` for ``m`` tokens)
``layer``          ``--selected_layer 10`` of 32       the 0-based decoder layer whose attention scores;
                                                       default: the rule ``round(10 * L / 32)`` (half up) on a
                                                       decoder of ``L`` layers, at most ``L - 2`` (10 of 32,
                                                       9 of 28, 11 of 36, 1 of the tiny 4-layer models); an
                                                       integer is taken as given
``kv_cut``         always                              cut layers ``0 .. layer``'s KV cache after prefill
=================  ==================================  ==========================================================

**Budget.** ``ratio`` is PruneVid's ``alpha``, the share kept at the in-LLM cut. What reaches the layers after it
is about ``alpha`` x the pre-LLM count, and that count is the data's (static positions averaged over a segment,
groups halved): PruneVid is ``adaptive`` -- each clip goes through :meth:`PruneVidPruner.select` on its own,
:meth:`num_kept` is only the bound ``N``, and runs report the counts (``SampleStats.visual_per_layer``: layers
``0 .. layer`` see the pre-LLM count, the later ones the final one). The paper's "retained ratio" is that layer
average; a sweep places the method at its measured count and FLOPs.

**Positions.** Each merged token stands for (``indices``) its cluster's DPC centre -- a static cluster the centre's
position in the segment's *first* frame, a dynamic one the centre token itself --, sits at that token's place in
the sequence and takes its position id; the tokens are in the order of those representatives (frame by frame,
raster order inside a frame). The official PLLaVA code builds a new sequence, per segment ``[static clusters,
frame 1's dynamic clusters, frame 2's ...]``, numbered contiguously, and its layer-10 cut keeps those positions.
Here: ``compact`` before the LLM on 1-D RoPE models (``position_policy``), ``keep`` at the cut
(``llm_position_policy``, honoured once the framework reads it -- the change proposed with this method; until then
the cut renumbers too under ``compact``); ``keep`` throughout on M-RoPE models, where renumbering is undefined.
``token_weights`` give every output token as weights over the clip's tokens (Qwen3-VL's DeepStack features are
merged with them).

**Where it runs.** Video clips (scope ``"clip"``, the only one; a "frame" is a view: Qwen's temporal patch of 2
frames), on every video family; a sample with an image view, or a video of one view (one frame; Qwen: up to 2
frames), is refused in one line (the official code needs ``int(T * 0.25) >= 1``, 4 frames). A bare
:class:`~tokenprune.pruner.PruningInputs` without views is one frame.

**Deliberate differences.** (1) DPC-kNN's ``rand * 1e-6`` density noise is replaced by a deterministic tie-break:
of two equal densities the lower index counts as denser; centre ties (``topk``) and top-k ties go to the lower
index (a stable sort); so a sample gets the same tokens in any batch. (2) Fewer than ``1 / segment_ratio`` frames:
one segment (the official ``topk(k=0)`` fails); ``k`` neighbours capped at the group's size (the official
``topk`` fails); a group becomes at least one cluster. (3) A one-frame segment (a one-frame clip: refinement
leaves no other) has no pairs: nothing is static (the official divides by ``W (W - 1) = 0`` and lets float
rounding decide). (4) Order as above: the framework places a merged token at its representative's slot, so the
static tokens of a segment sit among its first frame's dynamic ones instead of before them. (5) Scores and merges
in float32 (official: the model dtype); GQA key heads repeated to their query heads (the official Llama-2 has
none). (6) The cut's scores: with the framework's ``LLMStage(heads="max", rotary=False)`` (the change proposed
with this method; :data:`OFFICIAL_SCORES` says whether it is there) exactly the official ones; without it, the
attention the framework records (post-rotary, under the causal mask, averaged over heads), max over the text
rows. (7) The pre-LLM stage tells the in-LLM stage which tokens form each segment's static group and each frame's
dynamic group through the pruner (the groups of the last pre-LLM call for that sample id,
:meth:`PruneVidPruner.groups_of`; the official passes ``static_sizes`` / ``dynamic_sizes`` / ``window_sizes``
down the forward): sample ids must be unique within a batch, as they already are for seeding. (8) ``ratio = 1``
is the unpruned model (above). ``tau > 1``: nothing static.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Hashable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..pruner import (
    DecodePlan,
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    register_pruner,
    validate_float,
    validate_int,
    validate_ratio,
)

OFFICIAL_DEPTH = 32  # PLLaVA-7B's decoder (Llama-2-7B / Vicuna-7B)
OFFICIAL_LAYER = 10  # --selected_layer of scripts/eval.sh (MVBench, VideoMME, EgoSchema)
_STAGE_FIELDS = {f.name for f in dataclasses.fields(LLMStage)}
# The framework can score as the official does (max over heads of un-rotated, unmasked attention).
OFFICIAL_SCORES = {"heads", "rotary"} <= _STAGE_FIELDS
_MEMO_SIZE = 4096  # sample ids whose pre-LLM groups are remembered for their in-LLM stage


def scaled_layer(n_layers: int) -> int:
    """The scoring layer on a decoder of ``n_layers``: ``round(10 * n_layers / 32)`` half up, in ``0 .. n_layers - 2``
    (``n_layers = 0``: the official 32-layer decoder, layer 10)."""
    if n_layers <= 0:
        return OFFICIAL_LAYER
    return max(0, min(math.floor(OFFICIAL_LAYER * n_layers / OFFICIAL_DEPTH + 0.5), n_layers - 2))


def dpc_knn(x: torch.Tensor, cluster_num: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of one group ``x`` ``[m, D]`` into ``cluster_num`` clusters (official ``cluster_dpc_knn``, batch 1).

    Returns ``(labels [m], centres [cluster_num])``: ``labels[i]`` the cluster of token ``i``, ``centres[c]`` the
    token at the centre of cluster ``c`` (clusters in descending ``delta * density``). Deterministic: an equal
    density counts the lower index as denser, equal scores rank the lower index first.
    """
    m, d = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / (d ** 0.5)  # [m, m], as the official batched cdist
    nearest = torch.topk(dist, k=min(k, m), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    idx = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))  # [i, j]: j denser than i
    to_denser = torch.where(denser, dist, dist.max()).min(dim=-1).values
    score = to_denser * density
    centres = torch.sort(score, descending=True, stable=True).indices[:cluster_num]
    labels = dist[centres].argmin(dim=0)  # [m]: the nearest centre (the first on ties)
    labels[centres] = torch.arange(centres.shape[0], device=x.device)
    return labels, centres


def refine_clusters(labels: Sequence[int]) -> list[int]:
    """Official ``refine_clusters`` on one sequence of frame labels: each cluster keeps its longest run(s) of
    consecutive frames (none if every run is one frame); every other run joins the longer of the runs right
    before and after it (ties and no right neighbour: the left one; no neighbour at all: cluster 0), scanning
    left to right over the labels as they are being refined."""
    n = len(labels)
    out = list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    for label in sorted(set(labels)):
        at = [i for i, v in enumerate(labels) if v == label]
        segs, start, prev = [], at[0], at[0]
        for i in at[1:]:
            if i == prev + 1:
                prev = i
            else:
                segs.append((start, prev))
                start = prev = i
        segs.append((start, prev))
        runs[label] = segs
    for segs in runs.values():
        longest = max(end - start + 1 for start, end in segs)
        for start, end in segs:
            if longest == 1 or end - start + 1 != longest:
                out[start:end + 1] = [-1] * (end - start + 1)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        start = i
        while i < n and out[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left = out[start - 1]
            j = start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = start - j - 1
        if end < n - 1:
            right = out[end + 1]
            j = end + 1
            while j < n and out[j] == right:
                j += 1
            right_len = j - end - 1
        if left_len > right_len:
            new = left
        elif right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        out[start:end + 1] = [0 if new is None else new] * (end - start + 1)
    return out


def run_lengths(labels: Sequence[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels (official ``segment_lengths``)."""
    out: list[int] = []
    for i, v in enumerate(labels):
        if i and v == labels[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out


def static_similarity(frames: torch.Tensor) -> torch.Tensor:
    """``[n]``: each position's mean cosine similarity over the ordered pairs of distinct frames of ``frames``
    ``[W, n, D]``, as the official computes it (``(sum over every pair - 1 per frame) / (W (W - 1))``);
    ``-inf`` for one frame (no pairs: nothing is static)."""
    w = frames.shape[0]
    if w < 2:
        return torch.full(frames.shape[1:2], float("-inf"), device=frames.device)
    unit = F.normalize(frames.float(), p=2, dim=-1)
    sims = torch.einsum("wlc,tlc->wtl", unit, unit)
    return (sims.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))


def temporal_segments(features: torch.Tensor, segment_ratio: float, k: int) -> list[int]:
    """Segment lengths (summing to ``T``) of a clip whose frames' mean tokens are ``features`` ``[T, D]``:
    DPC-kNN into ``max(1, int(T * segment_ratio))`` clusters, refined into runs."""
    t = features.shape[0]
    labels, _ = dpc_knn(features, min(t, max(1, int(t * segment_ratio))), k)
    return run_lengths(refine_clusters(labels.tolist()))


def cluster_group(x: torch.Tensor, cluster_ratio: float, cluster_min: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One group ``x`` ``[m, D]``: ``(centres [c], labels [m])`` -- each output token the plain mean of the tokens
    with its label, represented by its DPC centre; a group of at most ``cluster_min`` tokens stays as is."""
    m = x.shape[0]
    if m <= cluster_min:
        every = torch.arange(m, device=x.device)
        return every, every
    labels, centres = dpc_knn(x, max(1, int(m * cluster_ratio)), k)
    return centres, labels


class ClipResult(NamedTuple):
    """PruneVid's pre-LLM stage on one clip of ``T`` frames of ``n`` tokens (``N = T n``), ``K`` tokens out."""

    indices: torch.Tensor  # [K] ascending clip indices: each token's representative (its DPC centre)
    tokens: torch.Tensor  # [K, D] float32
    weights: torch.Tensor  # [K, N]: tokens == weights @ the clip's tokens (every clip token in exactly one row)
    groups: torch.Tensor  # [K] the in-LLM group: segment s's static tokens 2 s, frame f's dynamic tokens 2 f + 1
    static_sizes: list[int]  # the official static_sizes / dynamic_sizes / window_sizes, per segment
    dynamic_sizes: list[int]
    window_sizes: list[int]
    similarity: torch.Tensor  # [N] each token's position's mean pairwise cosine in its segment (the static score)


def prunevid_clip(x: torch.Tensor, features: torch.Tensor, tau: float, segment_ratio: float, cluster_ratio: float,
                  cluster_min: int, k: int) -> ClipResult:
    """PruneVid's pre-LLM stage on one clip ``x`` ``[T, n, D]`` whose frames' mean tokens are ``features`` ``[T, D]``
    (official ``merge_frames_dynamic``). Every clip token joins exactly one output token: a static one (its
    position's cluster in its segment, weight ``1 / (W m)`` for ``m`` positions over ``W`` frames) or a dynamic one
    (its frame's cluster, weight ``1 / m``)."""
    t, n, dim = x.shape
    dev = x.device
    flat = x.reshape(t * n, dim).float()
    slot = torch.empty(t, n, dtype=torch.long, device=dev)  # the output token each clip token joins
    weight = torch.empty(t, n, device=dev)
    reps, groups = [], []
    static_sizes, dynamic_sizes, windows = [], [], []
    similarity = torch.empty(t, n, device=dev)
    made, start = 0, 0
    for s, w in enumerate(temporal_segments(features, segment_ratio, k)):
        frames = x[start:start + w].float()
        sim = static_similarity(frames)
        similarity[start:start + w] = sim
        static = sim > tau
        pos_s, pos_d = static.nonzero().flatten(), (~static).nonzero().flatten()
        # static: the positions' tokens averaged over the segment's frames, then clustered
        centres, labels = cluster_group(frames[:, pos_s].mean(0), cluster_ratio, cluster_min, k)
        size = torch.bincount(labels, minlength=centres.shape[0]).float()
        slot[start:start + w, pos_s] = made + labels
        weight[start:start + w, pos_s] = 1.0 / (w * size[labels])
        reps.append(start * n + pos_s[centres])
        groups.append(torch.full_like(centres, 2 * s))
        static_sizes.append(centres.shape[0])
        made += centres.shape[0]
        # dynamic: each frame's own tokens at the other positions, clustered per frame
        dyn = 0
        for f in range(start, start + w):
            centres, labels = cluster_group(frames[f - start, pos_d], cluster_ratio, cluster_min, k)
            size = torch.bincount(labels, minlength=centres.shape[0]).float()
            slot[f, pos_d] = made + labels
            weight[f, pos_d] = 1.0 / size[labels]
            reps.append(f * n + pos_d[centres])
            groups.append(torch.full_like(centres, 2 * f + 1))
            dyn += centres.shape[0]
            made += centres.shape[0]
        dynamic_sizes.append(dyn)
        windows.append(w)
        start += w
    slot, weight = slot.flatten(), weight.flatten()
    idx = torch.cat(reps)
    order = idx.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(made, device=dev)  # output slot -> its place in representative order
    row = rank[slot]
    tokens = torch.zeros(made, dim, device=dev).index_add_(0, row, flat * weight[:, None])
    weights = torch.zeros(made, t * n, device=dev)
    weights[row, torch.arange(t * n, device=dev)] = weight
    return ClipResult(idx[order], tokens, weights, torch.cat(groups)[order], static_sizes, dynamic_sizes, windows,
                      similarity.flatten())


def layer_cut(scores: torch.Tensor, groups: torch.Tensor, alpha: float) -> torch.Tensor:
    """The in-LLM selection on one sample: ``scores`` ``[N]`` (attention max over heads, then over the text rows),
    ``groups`` ``[N]`` (each token's segment-static or frame-dynamic group); per group of ``s`` tokens the
    top ``int(s * alpha)`` by score (ties: the lower index). Returns the kept indices, ascending."""
    kept = []
    for g in torch.unique(groups).tolist():
        members = (groups == g).nonzero().flatten()
        count = int(members.shape[0] * alpha)
        order = torch.sort(scores[members].float(), descending=True, stable=True).indices
        kept.append(members[order[:count]])
    return torch.cat(kept).sort().values


@register_pruner("prunevid")
class PruneVidPruner(TokenPruner):
    """PruneVid: static tokens merged per segment and clustered, then a text-attention cut at LLM layer 10 that also trims the KV cache."""

    stage = Stage.PRE_LLM
    extra_stages = (Stage.IN_LLM, Stage.DECODE)
    quantised = True  # the counts are the data's
    adaptive = True  # one clip per call; num_kept is a bound
    views = "global"
    scopes = ("clip",)  # segments span frames
    clip_inputs = True
    position_policy = "compact"  # PLLaVA's new sequence, numbered contiguously
    position_policy_mrope = "keep"
    # The policy at the in-LLM cut where the framework distinguishes it (the official keeps positions there).
    llm_position_policy = "keep"

    def __init__(self, ratio: float = 0.4, alpha: float | None = None, tau: float = 0.8, segment_ratio: float = 0.25,
                 cluster_ratio: float = 0.5, cluster_min: int = 14, k: int = 7, layer: int | None = None,
                 kv_cut: bool = True):
        self.ratio = validate_ratio(ratio)
        self.alpha = None if alpha is None else validate_float(alpha, "alpha", 0.0, 1.0)
        self.tau = validate_float(tau, "tau")
        self.segment_ratio = validate_float(segment_ratio, "segment_ratio", 0.0, 1.0)
        self.cluster_ratio = validate_float(cluster_ratio, "cluster_ratio", 0.0, 1.0)
        self.cluster_min = validate_int(cluster_min, "cluster_min", minimum=0)
        self.k = validate_int(k, "k", minimum=1)
        self.layer = None if layer is None else validate_int(layer, "layer", minimum=0)
        if not isinstance(kv_cut, bool):
            raise OptionError(f"kv_cut must be true or false, got {kv_cut!r}")
        self.kv_cut = kv_cut
        self._groups: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    # -- what the options resolve to ----------------------------------------------------------------
    @property
    def keep_share(self) -> float:
        """PruneVid's ``alpha``: the given ``alpha``, else ``ratio``."""
        return self.ratio if self.alpha is None else self.alpha

    @property
    def off(self) -> bool:
        """``ratio = 1`` with no ``alpha`` given: every stage keeps everything (the unpruned model)."""
        return self.ratio >= 1.0 and self.alpha is None

    @property
    def uses_ratio(self) -> bool:
        """``False`` once ``alpha`` is given."""
        return self.alpha is None

    def layer_for(self, n_layers: int) -> int:
        """The 0-based decoder layer whose attention scores, on a decoder of ``n_layers`` (0: the official 32)."""
        return self.layer if self.layer is not None else scaled_layer(n_layers)

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        if self.off:
            return ()
        extra = dict(heads="max", rotary=False) if OFFICIAL_SCORES else {}
        return (LLMStage(layer=self.layer_for(n_layers) + 1, attention="previous", queries="text", **extra),)

    @property
    def needs(self) -> PrunerNeeds:
        """Tokens only before the LLM; the in-LLM stage at the official depth (the decoder asks
        :meth:`llm_schedule` with its own)."""
        return PrunerNeeds(llm_stages=self.llm_schedule(0))

    def decode_plan(self, n_layers: int) -> DecodePlan | None:
        """The KV cache of layers ``0 .. layer`` cut to the tokens that reach the last layer; positions continue."""
        if self.off or not self.kv_cut:
            return None
        return DecodePlan(cut_layers=tuple(range(self.layer_for(n_layers) + 1)), positions="continue")

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """An upper bound: the counts are the data's (see the module docstring)."""
        return n_tokens

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        return [n_tokens]

    # -- the stages ---------------------------------------------------------------------------------
    def select(self, inputs: PruningInputs) -> Reduction:
        """Before the LLM (``inputs.layer == 0``): the clip's segments, static merge and clusters; inside it: the cut."""
        if inputs.layer >= 1:
            return self._cut(inputs)
        return self._merge(inputs)

    def groups_of(self, sample_id: Hashable) -> torch.Tensor | None:
        """``[K]``: the in-LLM group of each token the last pre-LLM call kept for ``sample_id`` (``None``: none)."""
        return self._groups.get(sample_id)

    def _clip(self, inputs: PruningInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, T, n, D] tokens, [B, T, D] frame features)``."""
        if inputs.token_views is None:  # a bare PruningInputs: one frame
            return inputs.tokens[:, None], inputs.tokens.mean(1, keepdim=True)
        if inputs.view_times is not None and bool(torch.isnan(inputs.view_times).any()):
            raise OptionError("prunevid segments a video's frames and this sample has image views (no frame times): "
                              "run it on video samples, or use an image method for images")
        if inputs.view_grids is not None and len(inputs.view_grids) < 2:
            raise OptionError("prunevid segments a clip's frames, and this video has one (Qwen: one temporal patch of "
                              "2 frames; the official code needs 4): give it more frames")
        try:
            x = inputs.clip_tokens()
        except ValueError as exc:
            raise OptionError(f"prunevid needs frames of one grid: {exc}") from None
        return x, inputs.view_features if inputs.view_features is not None else x.mean(2)

    def _merge(self, inputs: PruningInputs) -> Reduction:
        b, big_n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.off:
            return Reduction(indices=torch.arange(big_n, device=dev).expand(b, -1))
        x, feats = self._clip(inputs)
        rows = [prunevid_clip(x[i], feats[i], self.tau, self.segment_ratio, self.cluster_ratio, self.cluster_min,
                              self.k) for i in range(b)]
        counts = {r.indices.shape[0] for r in rows}
        if len(counts) > 1:
            raise OptionError(f"prunevid kept {sorted(counts)} tokens in the clips of one batch (its count follows each "
                              "clip) and a batch's reduction needs one count: run these clips one at a time")
        if inputs.sample_ids is not None:
            for sid, r in zip(inputs.sample_ids, rows):
                self._groups[sid] = r.groups.cpu()
                self._groups.move_to_end(sid)
            while len(self._groups) > _MEMO_SIZE:
                self._groups.popitem(last=False)
        return Reduction(indices=torch.stack([r.indices for r in rows]).to(dev),
                         tokens=torch.stack([r.tokens for r in rows]).to(dev, inputs.tokens.dtype),
                         token_weights=torch.stack([r.weights for r in rows]).to(dev),
                         scores=torch.stack([r.similarity for r in rows]).clamp(min=-1.0).to(dev))  # finite: pictures

    def _cut(self, inputs: PruningInputs) -> Reduction:
        attn = inputs.llm_attention  # [B, Q, N]: max (or, without the proposed stage fields, mean) over heads
        if attn is None:
            raise ValueError("prunevid needs llm_attention at its cut layer; the adapter did not provide it")
        if inputs.sample_ids is None:
            raise ValueError("prunevid's in-LLM stage needs PruningInputs.sample_ids (to find its pre-LLM groups)")
        attn = attn.float()
        if inputs.llm_query_mask is not None:
            attn = attn.masked_fill(~inputs.llm_query_mask.to(attn.device)[..., None], float("-inf"))
        scores = attn.amax(dim=1)  # [B, N]: max over the text rows
        kept = []
        for row, sid in enumerate(inputs.sample_ids):
            groups = self._groups.get(sid)
            if groups is None or groups.shape[0] != inputs.num_tokens:
                raise OptionError(f"prunevid's cut at LLM layer {inputs.layer - 1} needs the segments its pre-LLM stage "
                                  f"found for sample {sid!r} ({inputs.num_tokens} tokens); run both stages through "
                                  "generate / loglikelihood, with sample ids unique within the batch")
            kept.append(layer_cut(scores[row], groups.to(scores.device), self.keep_share))
        if len({k.shape[0] for k in kept}) > 1:
            raise OptionError(f"prunevid keeps an adaptive count per sample, and samples cut in one call got "
                              f"{[k.shape[0] for k in kept]}: run them one per call (the adapters do)")
        return Reduction(indices=torch.stack(kept), scores=scores)
