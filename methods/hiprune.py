"""HiPrune (arXiv 2508.00553): anchors, buffers and registers from the vision encoder's own attention.

As the official code (``Danielement321/HiPrune@6e83a12``: LLaVA ``LLaVA/llava/model/llava_arch.py``
``LlavaMetaForCausalLM.encode_images`` L140-184 with ``multimodal_encoder/clip_encoder.py``
``feature_select``; the Qwen2.5-VL port ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``: the vision tower's
``forward`` L518-582 and ``Qwen2_5_VLForConditionalGeneration.forward`` L1854-1893), per view, with
``N`` tokens on an ``h x w`` grid and a budget ``N' = keep_count(ratio, N)``:

1. **scores**: the attention each token *receives*, from the head-averaged map of a vision layer:
   ``attentions[l].mean(heads).mean(query rows)[:, prefix:]`` (every query row, the CLS row included;
   the CLS column dropped), so no CLS token is needed. The Qwen port sums over the query rows
   (``received="sum"``) and averages each token's 2x2 merged patches (``view(-1, 4).mean``), as we do
   for every merged family (Qwen, InternVL's pixel shuffle); where the adapter pools frames after the
   tower (LLaVA-OneVision / NeXT-Video video) its ``vision_received`` is taken as it is.
2. **anchors**: the top ``T = round(N' * alpha / 5)`` tokens by the score of the **object layer**
   (official ``HIPRUNE_OBJECT_LAYER`` 9, 1-based: ``attentions[8]``). Python's ``round`` as the
   official code: ``T`` = 4 / 3 / 1 at ``N'`` = 192 / 128 / 64, and 0 (no anchors) below ``N' = 26``.
3. **buffers**: each anchor's ``i - 1, i + 1, i - w, i + w`` (official: ``w`` = 24 hard-coded on
   LLaVA, the grid width on Qwen), clamped to ``[0, N - 1]``: **no row wrap** -- an anchor at a row's
   start takes the previous row's last token, one at its end the next row's first (official quirk,
   kept); duplicates count once (``torch.unique``), giving the set ``A``.
4. **registers**: the top ``N' - |A|`` tokens by the score of the **deep layer** (``attentions[-2]``,
   the layer LLaVA's projector reads; the Qwen port's last block) after subtracting 1 from ``A``'s
   entries (official ``deep_attention -= mask``), so they are the best tokens outside ``A``.
5. kept = ``A`` + registers, in raster order (official sort + boolean index mask).

With ``received="mean"`` every score is at most 1, so the subtraction puts ``A`` below every other token
and exactly ``N'`` tokens are kept. With ``received="sum"`` (the Qwen port) a token's score is a column
sum (1 on average, often far more), so ``A``'s penalised entries can still rank among the top, the deep
top-k then picks them again, and the view keeps fewer than ``N'`` (official: the duplicates collapse in
``select_mask[retain] = True``). We reproduce that: ``received="sum"`` is adaptive (each view counts
what it kept).

==================  ============================================  ==============  ======================================
option              official                                      default         what it does
==================  ============================================  ==============  ======================================
``ratio``           ``HIPRUNE_RETENTION`` 192/128/64 of 576       ``192 / 576``   ``N' = keep_count(ratio, N)`` per view
                    (LLaVA), ``HIPRUNE_QWEN_RETENTION`` .334 /
                    .223 / .112 (Qwen: ``round(N * r)``)
``alpha``           ``HIPRUNE_ALPHA`` 0.1                         ``0.1``         ``T = round(N' * alpha / 5)`` anchors
``object_layer``    ``HIPRUNE_OBJECT_LAYER`` 9 (LLaVA), 16        ``9``           1-based vision layer of the anchors
                    (Qwen ``bench_qwen.sh``)
``deep_layer``      ``mm_vision_select_layer`` -2 (LLaVA), the    ``-2``          vision layer of the registers
                    last block (Qwen: ``attn_list[-1]``)                          (Python-style index)
``received``        mean over query rows (LLaVA), sum (Qwen)      ``"mean"``      ``sum``: the Qwen port's column sums
==================  ============================================  ==============  ======================================

The official Qwen2.5-VL setting is ``hiprune:object_layer=16:deep_layer=-1:received=sum`` (blocks 15 and
31 of Qwen2.5-VL-7B, both full-attention blocks; our Qwen adapter scores a windowed block at the
full-attention block before it, where the port's FlashAttention class recomputes an unmasked softmax).

Stage: pre-LLM, per view (the rule needs the view's own grid and maps; ``scope="clip"`` is refused).
Positions: the official LLaVA code renumbers the kept tokens (``compact``); the Qwen port slices the
original M-RoPE positions (``keep``). Views: LLaVA-NeXT's official code prunes every 24x24 crop on its own
with ``int(N'/views)`` tokens and forces ``mm_patch_merge_type='spatial'`` (no unpadding, no newlines);
our NeXT views are the base view and the stitched, unpadded high-res view (whose map is the crops' maps
composed block-diagonally, see the NeXT adapter), each pruned by the same rule on its own grid with its
own ``N'`` -- a layout difference, documented, not the official NeXT token set.

Deliberate differences: scores in fp32 (official: the model dtype); ties go to the lower index
(``torch.topk`` leaves them unspecified); batched over views (official: a Python loop per image).
``ratio=1`` keeps the view. An ``alpha`` whose ``5 T`` anchors and buffers could exceed ``N'`` is refused
in one line (the official top-k fails there on a negative count).
"""
from __future__ import annotations

import torch

from ..errors import OptionError
from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    register_pruner,
    topk_indices,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

RECEIVED = ("mean", "sum")


def received_attention(attn: torch.Tensor, prefix: int, merge: int, n_tokens: int, how: str = "mean") -> torch.Tensor:
    """The attention each token receives: ``[B, T, T]`` head-averaged maps (``T = prefix + n_tokens * merge``)
    -> ``[B, n_tokens]`` fp32, the column mean (or sum) over every query row, prefix columns dropped, then
    the mean over each token's ``merge`` patches (the Qwen port's ``view(-1, 4).mean``)."""
    if attn.shape[-2] != attn.shape[-1]:
        raise ValueError(f"hiprune needs every query row of the vision attention, got shape {tuple(attn.shape)}")
    cols = attn.float().sum(dim=-2) if how == "sum" else attn.float().mean(dim=-2)  # [B, T]
    cols = cols[:, prefix:]
    if cols.shape[-1] != n_tokens * merge:
        raise ValueError(f"vision attention covers {cols.shape[-1]} patches, expected {n_tokens} tokens x "
                         f"patch_merge {merge}")
    return cols.unflatten(-1, (n_tokens, merge)).mean(dim=-1)


def anchor_count(n_keep: int, alpha: float) -> int:
    """``T = round(N' * alpha / 5)``, Python's (banker's) ``round`` on the official expression."""
    return round(n_keep * alpha / 5)


def anchor_set(object_scores: torch.Tensor, n_anchors: int, width: int) -> torch.Tensor:
    """``[B, N]`` bool: the top ``n_anchors`` tokens by ``object_scores`` ``[B, N]`` (ties: lower index) and
    their ``-1, +1, -width, +width`` neighbours in flat raster index, clamped to ``[0, N - 1]`` (no row
    wrap handling, as the official code)."""
    b, n = object_scores.shape
    mask = torch.zeros(b, n, dtype=torch.bool, device=object_scores.device)
    if n_anchors <= 0:
        return mask
    top = torch.sort(object_scores, dim=-1, descending=True, stable=True).indices[:, :n_anchors]  # [B, T]
    near = torch.cat([top, top - 1, top + 1, top - width, top + width], dim=1).clamp(0, n - 1)  # [B, 5T]
    return mask.scatter_(1, near, True)


def hiprune_mask(object_scores: torch.Tensor, deep_scores: torch.Tensor, n_keep: int, n_anchors: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official rule on ``[B, N]`` scores: ``([B, N] kept mask, [B, N] anchor + buffer mask)``.

    Registers are the top ``n_keep - |A|`` of ``deep_scores - A`` per row (``|A|`` differs per row; a rank
    comparison instead of a top-k per row); a register that is already in ``A`` (possible when scores exceed
    1, ``received="sum"``) adds nothing, as in the official index mask.
    """
    anchors = anchor_set(object_scores, n_anchors, width)
    adjusted = deep_scores.float() - anchors.float()  # official ``deep_attention -= available_index_mask``
    n_registers = n_keep - anchors.sum(dim=-1, keepdim=True)  # [B, 1]
    order = torch.sort(adjusted, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # each token's place in the order
    return anchors | (rank < n_registers), anchors


@register_pruner("hiprune")
class HiPrunePruner(TokenPruner):
    """HiPrune: anchors from a middle (object) layer's attention, their 4-neighbour buffers, and registers
    from the deep layer's attention; no CLS token needed."""

    scopes = ("frame",)  # the rule needs each view's grid (buffers) and its own maps
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 192 / 576, alpha: float = 0.1, object_layer: int = 9, deep_layer: int = -2,
                 received: str = "mean"):
        self.ratio = validate_ratio(ratio)
        self.alpha = validate_float(alpha, "alpha", 0.0, 1.0)
        self.object_layer = validate_int(object_layer, "object_layer", 1)
        self.deep_layer = validate_int(deep_layer, "deep_layer")
        self.received = validate_choice(received, "received", RECEIVED)

    @property
    def adaptive(self) -> bool:  # type: ignore[override]  (follows ``received``)
        """``received="sum"``: the deep top-k may pick anchors again, so a view keeps ``<= N'`` (official)."""
        return self.received == "sum"

    @property
    def needs(self) -> PrunerNeeds:
        # every query row of both maps: the scores are column means (attention received)
        return PrunerNeeds(vision_attention_layer=self.deep_layer, vision_attention_rows="all",
                           vision_attention_layer2=self.object_layer - 1)

    def _scores(self, inputs: PruningInputs, attn: torch.Tensor | None, received: torch.Tensor | None,
                which: str) -> torch.Tensor:
        """``[B, N]`` attention received at one layer (``which`` names it in errors)."""
        if received is not None:  # frames pooled after the tower: the adapter's per-token column means
            if self.received == "sum":
                raise OptionError("hiprune received='sum' needs the unpooled vision attention, and this model pools "
                                  "its video frames after the tower; use received='mean'")
            return received.float()
        if attn is None:
            raise ValueError(f"hiprune needs the {which} layer's vision attention; the adapter did not provide it")
        return received_attention(attn, inputs.vision_prefix, inputs.patch_merge, inputs.num_tokens, self.received)

    def select(self, inputs: PruningInputs) -> Reduction:
        b, n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        deep = self._scores(inputs, inputs.vision_attention, inputs.vision_received, "deep")
        if self.ratio >= 1.0:
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1), scores=deep)
        obj = self._scores(inputs, inputs.vision_attention2, inputs.vision_received2, "object")
        n_keep = self.num_kept(n, inputs.grid)
        n_anchors = anchor_count(n_keep, self.alpha)
        if 5 * n_anchors > n_keep:
            raise OptionError(f"hiprune alpha={self.alpha} gives {n_anchors} anchors, whose 5 x {n_anchors} anchors "
                              f"and buffers can exceed the {n_keep}-token budget (the official top-k fails there); "
                              "lower alpha or raise ratio")
        kept, _ = hiprune_mask(obj, deep, n_keep, n_anchors, inputs.grid[1])
        if self.adaptive:
            counts = kept.sum(-1).tolist()  # host sync: an adaptive count
            if len(set(counts)) > 1:
                raise OptionError(f"hiprune with received='sum' keeps an adaptive count per view, and views pruned "
                                  f"in one batch got different counts {counts}: run them one per batch")
            n_keep = counts[0]
        # the kept mask has n_keep entries per row: the stable sort lists them in raster order
        return Reduction(indices=topk_indices(kept.to(torch.uint8), n_keep), scores=deep)
