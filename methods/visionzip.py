"""VisionZip (CVPR'25, arXiv 2412.04467): dominant tokens by CLS attention, contextual tokens merged.

As the official code (``dvlab-research/VisionZip``: ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py`` ``CLIPAttention_forward``,
``visionzip/main.py``), in the vision encoder's feature space (the layer the projector reads, -2):

* **dominant**: the CLS token's attention to the patches, summed over heads, at layer -2; the top
  ``dominant - 1`` patches plus the CLS token itself, in ascending index order, CLS first;
* **contextual**: the remaining patches in original order; metric = that layer's keys averaged over
  heads (``k_proj`` bias included), L2-normalised; targets = every ``max(1, R // C)``-th token, the
  first ``C``; every other token joins the target it is most similar to (cosine); a contextual token
  is ``target + mean(members)`` (a target without members is unchanged);
* output ``[dominant; contextual]`` through the projector (returned as ``feature_weights``).

Budget: ``k = round(ratio * N)`` tokens in all (ratio 1: the unpruned image, no CLS added), ``C = round(k * 10 / 64)`` contextual (the official
54 + 10 = 64, 108 + 20 = 128, 162 + 30 = 192 settings exactly). Positions: the official LLaVA code
renumbers them (``compact``); under ``keep`` each token takes its patch's position (CLS: the first
patch's, a contextual token: its target's).

Other encoders: without a CLS token the projector can take (Qwen2-VL / 2.5-VL, InternVL, whose
projector reads pixel-shuffled patches only; LLaVA-NeXT's stitched high-res view) all ``k - C``
dominant tokens are patches. Without CLS attention (Qwen) patches are ranked by the attention they
receive, summed over queries (the official Qwen ports); without vision keys (Qwen) the contextual
metric is the merger outputs themselves, where the Qwen ports merge. Per view on multi-view inputs.
"""
from __future__ import annotations

import torch

from ..pruner import PrunerNeeds, PruningInputs, Reduction, TokenPruner, register_pruner, validate_int, validate_ratio
from .fopru import fopru_scores


def contextual_weights(metric: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge over ``R`` remaining tokens: ``metric`` ``[B, R, d]`` (normalised).

    Returns ``([C] target positions among the R, [B, C, R] weights)``: row ``c`` is
    ``onehot(target_c) + mean over the tokens assigned to target c``.
    """
    b, r, _ = metric.shape
    step = max(1, r // n_targets)
    targets = torch.arange(0, r, step, device=metric.device)[:n_targets]
    is_target = torch.zeros(r, dtype=torch.bool, device=metric.device)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)  # [B, R - C, C]
    assign = torch.nn.functional.one_hot(similarity.argmax(dim=-1), len(targets)).transpose(1, 2).float()  # [B, C, R - C]
    counts = assign.sum(-1, keepdim=True).clamp_min(1)
    weights = metric.new_zeros(b, len(targets), r, dtype=torch.float32)
    weights[:, :, others] = assign / counts
    weights[:, torch.arange(len(targets), device=metric.device), targets] += 1.0
    return targets, weights


@register_pruner("visionzip")
class VisionZipPruner(TokenPruner):
    """VisionZip: dominant tokens by CLS attention (CLS kept), the rest merged into contextual tokens by key similarity."""

    quantised = False
    scopes = ("frame",)  # dominant + contextual tokens of one view's attention map
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, vision_layer: int = -2, contextual_share: float = 10 / 64):
        self.ratio = validate_ratio(ratio)
        self.vision_layer = validate_int(vision_layer, "vision_layer")
        self.contextual_share = validate_ratio(contextual_share, "contextual_share")

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(vision_attention_layer=self.vision_layer, vision_attention_rows="prefix",
                           vision_features=True, vision_keys=True)

    def split(self, k: int) -> tuple[int, int]:
        """``(dominant, contextual)`` counts of a ``k``-token budget (dominant includes a kept CLS)."""
        contextual = min(k - 1, int(k * self.contextual_share + 0.5)) if k > 1 else 0
        return k - contextual, contextual

    def select(self, inputs: PruningInputs) -> Reduction:
        if inputs.vision_features is None:
            raise ValueError("visionzip needs vision_features; the adapter did not provide them")
        b, n = inputs.tokens.shape[:2]
        dev = inputs.tokens.device
        if self.ratio >= 1.0:  # the unpruned image: no CLS token added, nothing merged
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1))
        k = self.num_kept(n, inputs.grid)
        dominant, contextual = self.split(k)
        prefix = inputs.vision_prefix_features.shape[1] if inputs.vision_prefix_features is not None else 0
        keep_cls = min(prefix, 1, dominant)
        scores = fopru_scores(inputs, "cls" if inputs.vision_prefix >= 1 else "column")  # [B, N]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        dom = order[:, : dominant - keep_cls].sort(dim=-1).values  # [B, d] dominant patches
        rest = order[:, dominant - keep_cls:].sort(dim=-1).values  # [B, R] in original order
        width = prefix + n
        rows = torch.arange(b, device=dev)[:, None]
        weights = torch.zeros(b, k, width, device=dev)
        positions = torch.zeros(b, k, dtype=torch.long, device=dev)
        if keep_cls:
            weights[:, 0, 0] = 1.0  # the CLS token, first (its position: the first patch's)
        weights[rows, keep_cls + torch.arange(dom.shape[1], device=dev), prefix + dom] = 1.0
        positions[:, keep_cls:dominant] = dom
        if contextual and rest.shape[1]:
            if inputs.vision_keys is not None:
                metric = inputs.vision_keys[:, inputs.vision_prefix:].float()
            else:
                metric = inputs.vision_features.float()
            metric = metric.gather(1, rest[..., None].expand(-1, -1, metric.shape[-1]))
            metric = metric / metric.norm(dim=-1, keepdim=True)
            targets, w = contextual_weights(metric, contextual)  # [C], [B, C, R]
            c = len(targets)
            weights[:, dominant:dominant + c].scatter_(2, (prefix + rest)[:, None, :].expand(-1, c, -1), w)
            positions[:, dominant:dominant + c] = rest[:, targets]
        used = dominant + (min(contextual, rest.shape[1]) if contextual else 0)
        return Reduction(indices=torch.arange(used, device=dev).expand(b, -1), feature_weights=weights[:, :used],
                         positions=positions[:, :used], scores=scores)
