"""SparseVLM v1.5 (ICML'25, arXiv 2410.04417): text-guided, multi-stage pruning with token recycling.

As the official code (``Gumpest/SparseVLMs``, branch v1.5: ``modelling_sparse_llama.py``,
``score.py`` ``attn_postprocess_topk``, ``utils.py`` ``cluster_and_merge``):

* **Raters**, once, on the layer-0 embeddings: ``softmax_T(V T^T)`` averaged over the visual tokens
  gives each text token after the image a relevance; raters are those above the mean.
* **Stages** on the outputs of layers ``layers`` (0-indexed, default 2, 6, 15), i.e. before layers
  3, 7, 16: that layer's attention from the rater rows to the visual tokens, averaged over heads and
  raters, ranks them; the top count of the stage survives.
* **Recycling** (``recycle=True``): of the pruned tokens, the ``int(0.3 p) + 1`` best by the same
  score are clustered into ``int(m / 10) + 1`` centres by density-peak kNN clustering (DPC-kNN) of
  their hidden states; each cluster's mean becomes a new token right after the kept visual tokens,
  treated as visual at later stages.
* Positions are renumbered contiguously after each stage (the official convention).

Budget: the official counts per stage for the "192 / 128 / 64 of 576" settings are
``[300, 200, 110] / [303, 110, 36] / [66, 30, 17]``. ``ratio`` maps to ``ratio * 576`` equivalent
tokens; per-stage shares are interpolated linearly between these settings (and no pruning at 576,
proportionally below 64) and scaled to the image's ``N``, so ``ratio = 192/576`` on 576 tokens gives
exactly the official counts. The official tables are not exact layer averages; ``visual_tokens_avg``
in results reports the real one.

Deviations, all deliberate: batched (official: batch 1); GQA keys repeated (``repeat_kv``); at
ratio 1 nothing is pruned (official keeps at most ``n - 1`` per stage); DPC-kNN breaks density ties
by token index instead of adding ``1e-6`` uniform noise, so runs are reproducible; scores in fp32.
"""
from __future__ import annotations

import torch

from ..pruner import (
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    register_pruner,
    topk_indices,
    validate_layers,
    validate_ratio,
)

# Official per-stage counts for LLaVA-1.5 (576 visual tokens), by equivalent-token setting.
OFFICIAL_COUNTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
REFERENCE_TOKENS = 576


def stage_shares(ratio: float) -> list[float]:
    """Per-stage shares of the visual tokens kept, interpolated from the official tables."""
    anchors = [(0.0, (0.0, 0.0, 0.0))] + [(float(e), tuple(c / REFERENCE_TOKENS for c in v))
                                          for e, v in sorted(OFFICIAL_COUNTS.items())] + [(float(REFERENCE_TOKENS), (1.0, 1.0, 1.0))]
    e = ratio * REFERENCE_TOKENS
    for (e0, s0), (e1, s1) in zip(anchors, anchors[1:]):
        if e <= e1 + 1e-9:
            t = (e - e0) / (e1 - e0)
            return [a + t * (b - a) for a, b in zip(s0, s1)]
    return [1.0, 1.0, 1.0]


def dpc_knn_weights(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Density-peak kNN clustering of ``x`` ``[B, M, C]`` into ``n_clusters``; returns merge weights
    ``[B, n_clusters, M]`` (each row averages its cluster's members, ``1 / (count + 1e-6)`` as the
    official ``cluster_and_merge``), clusters in descending order of their centre's score."""
    b, m, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / c ** 0.5  # [B, M, M]
    nearest = torch.topk(dist, k=n_clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # [B, M]
    idx = torch.arange(m, device=x.device)
    # j is "denser" than i: higher density, ties to the lower index (the official code adds noise).
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None]))
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent_dist = torch.where(denser, dist, dist_max).min(dim=-1).values  # [B, M]
    score = parent_dist * density
    centres = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :n_clusters]  # [B, K]
    to_centre = dist.gather(1, centres[..., None].expand(-1, -1, m))  # [B, K, M]
    assign = to_centre.argmin(dim=1)  # [B, M]
    assign.scatter_(1, centres, torch.arange(n_clusters, device=x.device).expand(b, -1))
    member = torch.nn.functional.one_hot(assign, n_clusters).transpose(1, 2).float()  # [B, K, M]
    return member / (member.sum(-1, keepdim=True) + 1e-6)


@register_pruner("sparsevlm")
class SparseVLMPruner(TokenPruner):
    """SparseVLM v1.5: text raters' attention prunes at layers 2/6/15; pruned tokens recycled by DPC-kNN clustering."""

    stage = Stage.IN_LLM
    quantised = True
    position_policy = "compact"

    def __init__(self, ratio: float = 0.5, layers: tuple[int, ...] | str = (2, 6, 15), recycle: bool = True):
        self.ratio = validate_ratio(ratio)
        self.layers = validate_layers(layers, "layers", minimum=0)
        if len(self.layers) != 3:
            from ..errors import OptionError

            raise OptionError(f"sparsevlm has three stages (its official tables); give three layers, got {self.layers}")
        if not isinstance(recycle, bool):
            from ..errors import OptionError

            raise OptionError(f"recycle must be true or false, got {recycle!r}")
        self.recycle = recycle

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(llm_stages=tuple(LLMStage(layer=layer + 1, attention="previous", queries="chosen")
                                            for layer in self.layers))

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        """Visual tokens kept (before recycling) at each stage for an image of ``n_tokens`` (any depth)."""
        return [max(1, min(n_tokens, int(share * n_tokens + 0.5))) for share in stage_shares(self.ratio)]

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        return self.stage_counts(n_tokens)[0]

    def choose_queries(self, inputs: PruningInputs) -> torch.Tensor:
        """Raters: text tokens whose relevance ``mean_v softmax_T(v . t)`` is above the mean."""
        v, t, mask = inputs.tokens.float(), inputs.text_tokens.float(), inputs.text_mask
        logits = (v @ t.transpose(1, 2)).masked_fill(~mask[:, None, :], float("-inf"))  # [B, N, T]
        relevance = logits.softmax(dim=-1).mean(dim=1)  # [B, T]
        mean = (relevance * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
        return (relevance > mean) & mask

    def select(self, inputs: PruningInputs) -> Reduction:
        attn, raters = inputs.llm_attention, inputs.llm_query_mask  # [B, Q, N], [B, Q]
        if attn is None:
            raise ValueError("sparsevlm needs llm_attention; the adapter did not provide it")
        if raters is None:
            raters = torch.ones(attn.shape[:2], dtype=torch.bool, device=attn.device)
        w = raters.to(torch.float32)[..., None]
        score = (attn.float() * w).sum(1) / w.sum(1).clamp_min(1)  # [B, N]
        n = inputs.num_tokens
        k = min(self.stage_counts(inputs.num_original)[inputs.stage], n)
        kept = topk_indices(score, k)
        if not self.recycle or k == n:
            return Reduction(indices=kept, scores=score)
        dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, kept, False)
        pruned = torch.sort(dropped.to(torch.int8), dim=1, descending=True, stable=True).indices[:, : n - k]
        pruned = pruned.sort(dim=1).values  # [B, p] pruned tokens in original order
        m = int(0.3 * (n - k)) + 1
        order = torch.sort(score.gather(1, pruned), dim=1, descending=True, stable=True).indices[:, :m]
        recycled = pruned.gather(1, order)  # [B, m], best score first
        x = inputs.tokens.gather(1, recycled[..., None].expand(-1, -1, inputs.tokens.shape[-1]))
        weights = dpc_knn_weights(x, int(m / 10) + 1)  # [B, K, m]
        merge = weights.new_zeros(weights.shape[0], weights.shape[1], n)
        merge.scatter_(2, recycled[:, None, :].expand(-1, weights.shape[1], -1), weights)
        return Reduction(indices=kept, merge_weights=merge, scores=score)
