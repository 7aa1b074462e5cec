"""VisionZip per video frame, as HoliTom's baseline port runs it on LLaVA-OneVision.

VisionZip itself (``dvlab-research/VisionZip``) has **no official video code**. HoliTom's README says so
("the existing VisionZip open-source code does not support LLaVA-OneVision and LLaVA-Video") and publishes
its adapted per-frame baseline, which is what this module ports: ``cokeshao/HoliTom@e9b2972``,
``visionzip/llava_arch.py`` (``LlavaMetaForCausalLM_visionzip.prepare_inputs_labels_for_multimodal``,
its inner ``visionzip``), ``LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py``
(``SigLipAttention.forward``, ``SigLipVisionTower.forward`` with ``WRAPPER=visionzip``),
``visionzip/utils.py`` (``apply_info``: keys kept at the tower's last layer) and
``scripts/eval_ov-7b_visionzip.sh``. Per video frame, on the pooled grid the LLM sees (OneVision:
the projected 27x27 SigLIP tokens bilinearly pooled to 14x14 = 196):

* **score**: the last vision layer's attention averaged over heads and over *every* query row -- the
  attention each token receives (``attn_weights.mean(dim=1).mean(dim=1)``), pooled as the tokens are;
* **dominant**: the top ``D = int(S * 54/64)`` tokens by that score, in ascending index order;
* **contextual**: the other ``R = N - D`` tokens in original order; metric = the same layer's keys
  averaged over heads (``k_proj`` bias included), pooled as the tokens are, L2-normalised; targets =
  every ``max(1, R // C)``-th of them, the first ``C = S - D``; every other token joins the target it
  is most similar to (cosine, ties to the first target); a contextual token is ``target +
  mean(members)`` (a target without members is unchanged);
* output per frame ``[dominant; contextual]`` (OneVision's ``mm_newline_position="one_token"``
  branch: not re-sorted), then, after all frames, the video's one newline (never pruned).

What differs from tokenprune's image ``visionzip`` (whose :func:`~tokenprune.methods.visionzip.contextual_weights`
this module reuses for the contextual merge, the rule being the same):

* score: ``visionzip`` -- the CLS row of layer -2 (without a CLS: the column mean over patch rows);
  here -- the column mean over *every* query row of the last layer (-1, what OneVision's projector reads);
* counts of ``S``: ``visionzip`` -- ``C = round(S * 10/64)``, ``D = S - C`` (CLS included);
  here -- ``D = int(S * 54/64)``, ``C = S - D`` (S = 20: 17 / 3 there, 16 / 4 here);
* CLS: ``visionzip`` keeps it as a dominant token; here never (SigLIP has none, and a CLS is no LLM token);
* merge space: ``visionzip`` -- the features before the projector (``feature_weights``); here -- the
  pooled LLM tokens, after projector and pooling (``tokens`` + ``token_weights``), as the port merges.

**Budget** (``S`` = tokens kept per frame, out of the frame's ``N``; ``S = keep_count(ratio, N)``):

=====================================  ======================  =============================================
official setting (OneVision, N = 196)  ``ratio`` to pass       ``S``: ``D`` / ``C``
=====================================  ======================  =============================================
``SPATIAL_TOKENS=20`` (label "0.10")   ``0.10`` or ``20/196``  20: 16 / 4
``SPATIAL_TOKENS=30`` (label "0.15")   ``30/196`` (0.153)      30: 25 / 5  (``0.15`` gives 29: 24 / 5)
``SPATIAL_TOKENS=40`` (label "0.20")   ``40/196`` (0.204)      40: 33 / 7  (``0.20`` gives 39: 32 / 7)
``SPATIAL_TOKENS=50`` (label "0.25")   ``50/196`` (0.255)      50: 42 / 8  (``0.25`` gives 49: 41 / 8)
=====================================  ======================  =============================================

The official labels are nominal (``S = 200 * label``); ``ratio = S / N`` reproduces ``S`` exactly.
``dominant_share`` is the official ``DOMINANT_RATIO`` (default ``54/64``). The official code's default
``SPATIAL_TOKENS`` is 50; ``ratio`` defaults to 0.5 here, as for every tokenprune pruner.

**Positions**: the official LLaVA code renumbers them (``compact``); under ``keep`` (M-RoPE models) a
dominant token keeps its own position and a contextual token takes its target's.

**Deliberate differences** (also in the methods notes):

1. Score source: on OneVision and NeXT-Video frames (pooled after the tower) the adapter's
   ``vision_received`` is exactly the official ``P (A^T 1) / S^2`` (every raw query counted once).
   An adapter that hands only a pooled map ``A' = P A P^T`` would give ``A'``'s column mean,
   ``P (A^T c) / 196`` with ``c = P^T 1``: equal only when every query attends alike (tested).
2. Ties in the dominant top-``D`` go to the lower index (a stable sort; ``torch.topk``'s order among
   ties is unspecified); contextual merges in fp32 (the official: the model's dtype).
3. ``ratio`` 1 returns the frame unchanged (the official at ``S = N`` keeps every token but reorders them
   dominant-first).
4. Images: the official port compresses video frames only and passes images through; here every
   prunable view (an image, a crop, a tile) gets the same per-view rule, since a scope-``"frame"``
   pruner cannot tell a frame from an image (use ``visionzip`` for images' own rule).
5. Other families (the port is OneVision-only): towers with a CLS / prefix token (LLaVA-NeXT-Video's
   CLIP, InternVL) count its query row in the mean, as "every query" says, but the CLS is never a
   candidate; merged patches (Qwen 2x2, InternVL pixel shuffle) score a token by the mean of its
   patches' scores; without vision keys (Qwen) the contextual metric is the tokens themselves (the
   merger outputs). A Qwen "frame" is a temporal patch of 2 frames; Qwen3-VL's DeepStack features are
   merged with the same ``token_weights``. ``vision_layer=-1`` is the layer
   OneVision's projector reads; for LLaVA-NeXT-Video (it reads layer -2) pass ``vision_layer=-2`` to
   follow the rule.
6. The official ``mm_newline_position="grid"`` branch (LLaVA-Video: tokens re-sorted to raster order,
   a newline per row) is not ported: no Hugging Face family lays video out that way.
"""
from __future__ import annotations

import torch

from ..pruner import PrunerNeeds, PruningInputs, Reduction, TokenPruner, register_pruner, validate_int, validate_ratio
from .visionzip import contextual_weights


def received_attention(inputs: PruningInputs) -> torch.Tensor:
    """``[B, N]`` float32: the attention each token receives, averaged over every query row of the view's
    map (CLS / prefix rows included, as ``attn.mean(dim=1)`` over all queries does) and over the token's
    ``patch_merge`` patches; on frames pooled after the tower (OneVision, NeXT-Video) the adapter's
    ``vision_received``: that mean over the unpooled map's queries, pooled as the tokens are (the official
    ``P (A^T 1) / S^2``).

    ``inputs.vision_attention`` is ``[B, T, T]``, ``T = vision_prefix + N * patch_merge``.
    """
    if inputs.vision_received is not None:  # frames pooled after the tower: every raw query counted once
        return inputs.vision_received.float()
    attn = inputs.vision_attention
    if attn is None:
        raise ValueError("visionzip_video needs vision_attention; the adapter did not provide it")
    if attn.shape[1] != attn.shape[2]:
        raise ValueError("visionzip_video needs every query row of the vision attention, got shape "
                         f"{tuple(attn.shape)}")
    b, n = inputs.tokens.shape[:2]
    column = attn[:, :, inputs.vision_prefix:].float().mean(dim=1)  # [B, P]
    if column.shape[-1] != n * inputs.patch_merge:
        raise ValueError(f"vision attention covers {column.shape[-1]} patches, expected {n} tokens x patch_merge "
                         f"{inputs.patch_merge}")
    return column.reshape(b, n, inputs.patch_merge).mean(dim=-1)


@register_pruner("visionzip_video")
class VisionZipVideoPruner(TokenPruner):
    """VisionZip per frame (HoliTom's port): ``int(S*54/64)`` dominant tokens by received vision attention, the
    rest merged into ``S - int(S*54/64)`` contextual tokens by pooled-key similarity; ``S = keep_count(ratio, N)``."""

    quantised = False
    scopes = ("frame",)  # dominant + contextual tokens of one frame's own attention map and grid
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, vision_layer: int = -1, dominant_share: float = 54 / 64):
        self.ratio = validate_ratio(ratio)
        self.vision_layer = validate_int(vision_layer, "vision_layer")
        self.dominant_share = validate_ratio(dominant_share, "dominant_share")

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(vision_attention_layer=self.vision_layer, vision_attention_rows="all", vision_keys=True)

    def split(self, s: int) -> tuple[int, int]:
        """``(dominant, contextual)`` counts of ``s`` tokens per frame: ``D = int(s * dominant_share)``,
        ``C = s - D``."""
        dominant = int(s * self.dominant_share)
        return dominant, s - dominant

    def select(self, inputs: PruningInputs) -> Reduction:
        b, n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.ratio >= 1.0:  # the unpruned frame, in its own order
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1))
        s = self.num_kept(n, inputs.grid)
        dominant, contextual = self.split(s)
        scores = received_attention(inputs)  # [B, N]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        dom = order[:, :dominant].sort(dim=-1).values  # [B, D], ascending (masked_select keeps index order)
        rest = order[:, dominant:].sort(dim=-1).values  # [B, R], the contextual candidates in original order
        rows = torch.arange(b, device=dev)[:, None]
        weights = torch.zeros(b, s, n, device=dev)
        weights[rows, torch.arange(dominant, device=dev), dom] = 1.0
        positions = torch.zeros(b, s, dtype=torch.long, device=dev)
        positions[:, :dominant] = dom
        if contextual:
            # The official metric: the layer's head-averaged keys, pooled as the tokens are (OneVision's
            # adapter applies the same pooling); Qwen gives no keys, so its merger outputs (the tokens).
            metric = inputs.vision_keys[:, inputs.vision_prefix:] if inputs.vision_keys is not None else inputs.tokens
            metric = metric.float().gather(1, rest[..., None].expand(-1, -1, metric.shape[-1]))
            metric = metric / metric.norm(dim=-1, keepdim=True)
            targets, w = contextual_weights(metric, contextual)  # [C], [B, C, R]
            weights[:, dominant:].scatter_(2, rest[:, None, :].expand(-1, contextual, -1), w)
            positions[:, dominant:] = rest[:, targets]
        tokens = (weights @ inputs.tokens.float()).to(inputs.tokens.dtype)
        return Reduction(indices=torch.arange(s, device=dev).expand(b, -1), tokens=tokens, token_weights=weights,
                         positions=positions, scores=scores)
