"""VisPruner (ICCV'25, arXiv 2412.01818): important tokens by CLS attention, then diverse ones.

As the official code (``Theia-4869/VisPruner``: ``llava/model/llava_arch.py`` ``encode_images``,
``multimodal_encoder/clip_encoder.py`` ``feature_select``): of the ``T = round(ratio * N)`` tokens
kept, the first ``int(T * important_ratio)`` are the tokens the CLS token attends to most at vision
layer -2 (averaged over heads). The rest, in descending attention order, are thinned by similarity
of the vision features the projector reads (layer -2, L2-normalised): while more than ``T_div``
remain, split them into even / odd positions ``a`` / ``b``, score each ``a`` token by its largest
cosine similarity to any ``b`` token, and drop the ``min(8, R - T_div)`` highest-scoring ``a`` tokens;
the residual becomes ``[remaining a (by ascending score), b]``. Selected tokens go on in original
order (pruning happens on the projector outputs).

The official loop crashes when the residual count ``R`` is odd (``a`` has ``R // 2 + 1`` tokens, but
the gather is expanded to ``R // 2 - r`` columns): we keep the ``len(a) - r`` remaining ``a`` tokens,
which is what the loop means. Encoders without a CLS token (Qwen2-VL / 2.5-VL) rank by the
attention each patch receives (averaged over queries), as the official Qwen ports of CLS-based
methods do. Per view on multi-view inputs (LLaVA-NeXT crops); positions compact on LLaVA-style
models, original on Qwen.
"""
from __future__ import annotations

import torch

from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    register_pruner,
    validate_int,
    validate_ratio,
)
from .fopru import fopru_scores


def thin_by_similarity(features: torch.Tensor, residual: torch.Tensor, target: int, step: int = 8) -> torch.Tensor:
    """VisPruner's diverse-token loop: ``residual`` ``[B, R]`` indices into ``features`` ``[B, N, C]``
    (L2-normalised) thinned to ``target`` by repeatedly dropping the most redundant even-position tokens."""
    b = residual.shape[0]
    rows = torch.arange(b, device=residual.device)[:, None]
    while target > 0:
        r = min(step, residual.shape[1] - target)
        if r <= 0:
            break
        tokens = features[rows, residual]  # [B, R, C]
        a, bb = tokens[:, ::2], tokens[:, 1::2]
        scores = (a @ bb.transpose(-1, -2)).max(dim=-1).values  # [B, ceil(R/2)]
        distinct = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=-1)
    return residual


@register_pruner("vispruner")
class VisPrunerPruner(TokenPruner):
    """VisPruner: half the budget by CLS attention, the other half diverse tokens by feature similarity."""

    scopes = ("frame",)  # important tokens by one view's CLS attention, then diverse ones among them
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, important_ratio: float = 0.5, vision_layer: int = -2):
        self.ratio = validate_ratio(ratio)
        self.important_ratio = validate_ratio(important_ratio, "important_ratio")
        self.vision_layer = validate_int(vision_layer, "vision_layer")

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(vision_attention_layer=self.vision_layer, vision_attention_rows="prefix", vision_features=True)

    def select(self, inputs: PruningInputs) -> Reduction:
        if inputs.vision_features is None:
            raise ValueError("vispruner needs vision_features; the adapter did not provide them")
        k = self.num_kept(inputs.num_tokens, inputs.grid)
        n_important = int(k * self.important_ratio)
        scores = fopru_scores(inputs, "cls" if inputs.vision_prefix >= 1 else "column")  # [B, N]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        features = inputs.vision_features.float()
        features = features / features.norm(dim=-1, keepdim=True)
        residual = thin_by_similarity(features, order[:, n_important:], k - n_important)
        kept = torch.cat([order[:, :n_important], residual], dim=-1)
        return Reduction(indices=kept.sort(dim=-1).values, scores=scores)
