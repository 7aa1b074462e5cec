"""HiRED (AAAI'25, arXiv 2408.10945): a token budget for high-resolution LLaVA-NeXT, shared by the views.

As the official code, a fork of Hugging Face transformers (``hasanar1f/HiRED@502d6dd``,
``transformers/src/transformers/models/llava_next/modeling_llava_next.py``: ``ViT_Attn_Hook`` L48-96,
``HiRED_sub_img_budgets`` L490-516, ``HiRED_token_selection`` L518-559, ``pack_HiRED_image_features``
L782-862, the call in ``LlavaNextForConditionalGeneration.forward`` L959-1015), per image of ``V`` views
(the base view and ``C = V - 1`` crops, ``n = s^2`` patches each), with the CLS row of the vision
attention, head-aggregated (official: summed over the 16 heads; ours: the mean, the same order):

1. ``total = int(V n rate)``; ``full = min(int(total alpha), n)``; ``sub = min(total - full, C n)``.
2. **base view**: its top ``full`` tokens by the CLS attention of the **deep layer** (official layer 22 of
   24, hard-coded; ours: ``deep_layer=-2``, the layer the projector reads).
3. **crop budgets** (``sub > 0``): the base view's top ``int(n (1 - alpha))`` tokens by the CLS attention of
   the **first layer** (official layer 0) become a 0/1 mask, counted per partition: official
   ``mask.reshape(nph, npw, -1).sum(-1)``, a **flat raster reshape**, so crop ``i`` counts the hits of the
   ``i``-th horizontal band of ``n / C`` tokens of the base view (2x2: base rows 0-5, 6-11, 12-17, 18-23), not
   the spatially matching quadrant (official quirk, kept: ``partition="band"``; ``partition="spatial"``
   counts the base region over the crop instead). ``budget_i = int(hits_i / sum(hits) * sub)`` (fp32,
   truncated), at most ``n``: the total can fall short.
4. **crops**: each keeps its top ``budget_i`` cells by its **own** deep-layer CLS attention, over **every**
   cell of the crop, padded ones included; then the crops are stitched and unpadded with the mask, so
   kept cells in the padding vanish (official ``pack_HiRED_image_features``): fewer tokens again.
5. order: [base tokens kept, raster order; crop tokens kept, the stitched unpadded grid's raster order].

LLaVA-1.5 (one view, ``transformers/src/transformers/models/llava/modeling_llava.py``
``HiRED_token_selection`` L340-353): the top ``min(n, int(n rate))`` tokens by the deep layer's CLS
attention (at least 1 here; official: an empty image below ``rate = 1/n``).

==============  =========================================  ============  =============================================
option          official                                   default       what it does
==============  =========================================  ============  =============================================
``ratio``       ``token_budget_rate`` 0.2 (all             ``0.2``       ``total = int(V n ratio)``: the share of the
                ``accuracy_benchmarks/*.sh``)                            ``V n`` encoded patches (padded cells count);
                                                                         a budget ``B`` is ``ratio = B / (V n)``
``alpha``       0.5                                        ``0.5``       the base view's share of ``total``
``deep_layer``  22 (hard-coded, ``vit_bottom_layer``)      ``-2``        the layer ranking the tokens
``top_layer``   0 (hard-coded, ``vit_top_layer``)          ``0``         the layer whose CLS hits set the budgets
``partition``   flat bands (``reshape(nph, npw, -1)``)     ``"band"``    ``spatial``: the base region over each crop
==============  =========================================  ============  =============================================

The count is adaptive (floors, the clamp, unpadding): each image reports what it kept. Positions are
renumbered (``compact``: Hugging Face's merge). Defined on LLaVA-NeXT (family ``llava_next``, images) and
LLaVA-1.5 (family ``llava``); every other tower has no CLS token (SigLIP, Qwen), tiles of merged patches
(InternVL) or video frames, where it is refused in one line.

Differences from the fork, deliberate or structural: our NeXT adapter keeps the row newlines in place (the
fork packs with ``image_newline=None``: none); the fork names the anyres grid's sides the other way round
(``num_patch_width, num_patch_height = get_anyres_image_grid_shape(...)``, which returns (rows, columns)),
so on non-square crop grids (1x2, 3x1) it stitches features and masks transposed before unpadding -- we
stitch as Hugging Face does (identical on 2x2 grids; the band budgets do not depend on it); scores in
fp32 and ties to the lower index (``topk`` leaves them unspecified); ``ratio=1`` keeps every view whole.
"""
from __future__ import annotations

import math

import torch

from ..errors import OptionError
from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    register_pruner,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

PARTITIONS = ("band", "spatial")


def top_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """``[..., n]`` bool: the top ``k`` of ``scores`` along the last axis (``k`` an int or ``[...]`` per row;
    ties to the lower index)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # each token's place in the order
    k = torch.as_tensor(k, device=scores.device)
    return rank < (k[..., None] if k.dim() else k)


def budgets(top_base: torch.Tensor, n_crops: int, sub: int, alpha: float, partition: str = "band",
            crop_grid: tuple[int, int] | None = None, side: int | None = None) -> torch.Tensor:
    """``[C]`` long: each crop's budget from the base view's first-layer CLS attention ``top_base`` ``[n]``.

    The base's top ``int(n (1 - alpha))`` tokens are hits; ``band``: crop ``i`` counts the hits of the ``i``-th
    of ``C`` equal raster bands (official ``reshape(nph, npw, -1).sum(-1)``); ``spatial``: of the base region the
    crop covers (``crop_grid = (nph, npw)``, ``side`` the base grid's). ``int(hits / sum * sub)``, at most ``n``.
    """
    n = top_base.shape[-1]
    hits = top_mask(top_base, int(n * (1 - alpha)))
    if partition == "band":
        if n % n_crops:
            raise OptionError(f"hired's official band partition splits the base view's {n} tokens into {n_crops} "
                              "equal bands, which it cannot; use partition='spatial'")
        counts = hits.reshape(n_crops, -1).sum(-1)
    else:
        nph, npw = crop_grid
        rows = torch.arange(side, device=hits.device) * nph // side  # base row -> crop row
        cols = torch.arange(side, device=hits.device) * npw // side
        region = (rows[:, None] * npw + cols[None, :]).flatten()  # [n] the crop over each base token
        counts = torch.zeros(n_crops, dtype=torch.long, device=hits.device).index_add_(0, region, hits.long())
    ratio = counts.float() / counts.sum().float()  # official: float budget ratio, then .int()
    return (ratio * sub).int().clamp(max=n).long()


@register_pruner("hired")
class HiREDPruner(TokenPruner):
    """HiRED: the base view's first-layer CLS attention shares a LLaVA-NeXT image's budget among its crops;
    each view keeps its top tokens by its own deep-layer CLS attention."""

    views = "global"  # one call per sample: the base view sets the crops' budgets
    scopes = ("clip",)
    clip_inputs = True
    view_inputs = True  # each view's own maps (base + high-res views differ in shape)
    adaptive = True  # floors, the clamp and unpadding: each image reports its count
    quantised = True  # num_kept is only a bound, not keep_count(ratio, N)
    position_policy = "compact"

    def __init__(self, ratio: float = 0.2, alpha: float = 0.5, deep_layer: int = -2, top_layer: int = 0,
                 partition: str = "band"):
        self.ratio = validate_ratio(ratio)
        self.alpha = validate_float(alpha, "alpha", 0.0, 1.0)
        self.deep_layer = validate_int(deep_layer, "deep_layer")
        self.top_layer = validate_int(top_layer, "top_layer")
        self.partition = validate_choice(partition, "partition", PARTITIONS)

    @property
    def needs(self) -> PrunerNeeds:
        # CLS rows only; the first layer's map comes from one more tower pass (unused on LLaVA-1.5's lone views)
        return PrunerNeeds(vision_attention_layer=self.deep_layer, vision_attention_rows="prefix",
                           vision_attention_layer2=self.top_layer)

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """An upper bound only: the budget ``int(V n ratio)`` counts the encoded patches, a LLaVA-NeXT image's
        padded cells included, so it can exceed ``ratio`` times the ``n_tokens`` the LLM would see."""
        return n_tokens

    @staticmethod
    def _cls(attn: torch.Tensor | None, prefix: int, which: str) -> torch.Tensor:
        """``[..., n]`` the CLS row of ``[..., R, T]`` maps, prefix columns dropped."""
        if attn is None:
            raise ValueError(f"hired needs the {which} layer's vision attention; the adapter did not provide it")
        return attn[..., 0, prefix:].float()

    @staticmethod
    def _check(view: PruningInputs) -> None:
        if view.vision_prefix < 1:
            raise OptionError("hired scores with the CLS token's attention, and this model's vision tower has none; "
                              "it runs on LLaVA-1.5 and LLaVA-NeXT (family llava / llava_next) images")
        if view.patch_merge != 1:
            raise OptionError("hired is defined for LLaVA-1.5 and LLaVA-NeXT towers (one CLIP patch per token), not "
                              "merged patches (InternVL, Qwen)")

    def _one_view(self, view: PruningInputs) -> torch.Tensor:
        """LLaVA-1.5: ``[B, n]`` kept mask, the top ``min(n, int(n rate))`` by the deep layer's CLS row."""
        deep = self._cls(view.vision_attention, view.vision_prefix, "deep")
        n = deep.shape[-1]
        return top_mask(deep, max(1, min(n, int(n * self.ratio))))

    def _image(self, base: PruningInputs, high: PruningInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One LLaVA-NeXT image: ``([n] base mask, [h*w] high-res mask)`` over the base and the unpadded view."""
        deep_base = self._cls(base.vision_attention, base.vision_prefix, "deep")[0]  # [n]
        crops = self._cls(high.crop_attention, high.vision_prefix, "deep")[0]  # [C, n]: every cell of each crop
        n_crops, n = crops.shape
        v = n_crops + 1
        total = int(v * n * self.ratio)
        full = min(int(total * self.alpha), n)
        sub = min(total - full, n_crops * n)
        base_mask = top_mask(deep_base, full)
        crop_mask = torch.zeros(n_crops, n, dtype=torch.bool, device=crops.device)
        if sub > 0:
            top_base = self._cls(base.vision_attention2, base.vision_prefix, "first")[0]
            grid = None
            if self.partition == "spatial":
                layout = high.crop_layout[0].view(high.grid)
                npw = int(torch.unique(layout[0] // n).numel())  # the crops the first unpadded row crosses
                grid = (n_crops // npw, npw)
            crop_mask = top_mask(crops, budgets(top_base, n_crops, sub, self.alpha, self.partition, grid,
                                                math.isqrt(n)))
        # unpadding: a kept cell survives if it is one of the high-res view's (unpadded) tokens
        return base_mask, crop_mask.flatten()[high.crop_layout[0]]

    def select(self, inputs: PruningInputs) -> Reduction:
        b, n_all, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.ratio >= 1.0:
            return Reduction(indices=torch.arange(n_all, device=dev).expand(b, -1))
        if inputs.view_inputs is None:  # a bare call (one view per batch entry): the LLaVA-1.5 rule
            self._check(inputs)
            kept = self._one_view(inputs)
            return Reduction(indices=self._indices(kept))
        if inputs.view_times is not None and bool(torch.isfinite(inputs.view_times).any()):  # NaN: an image
            raise OptionError("hired is defined for images (LLaVA-NeXT's anyres views), not video frames")
        masks = []
        for entry in inputs.view_inputs:  # samples, then their views: never tokens
            parts, j = [], 0
            while j < len(entry):
                view = entry[j]
                self._check(view)
                if view.crop_attention is not None:
                    raise OptionError("hired found a LLaVA-NeXT high-res view without its base view")
                if j + 1 < len(entry) and entry[j + 1].crop_attention is not None:
                    parts.extend(self._image(view, entry[j + 1]))
                    j += 2
                else:
                    parts.append(self._one_view(view)[0])
                    j += 1
            masks.append(torch.cat(parts))
        kept = torch.stack(masks)  # [B, N] over the clip's concatenated views
        if kept.shape[1] != n_all:
            raise ValueError(f"hired's views cover {kept.shape[1]} tokens, the clip has {n_all}")
        return Reduction(indices=self._indices(kept))

    @staticmethod
    def _indices(kept: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` the kept tokens in ascending order; one count per call (adapters run one clip per call)."""
        counts = kept.sum(-1).tolist()  # host sync: an adaptive count
        if len(set(counts)) > 1:
            raise OptionError(f"hired keeps an adaptive count per image, and images pruned in one batch got different "
                              f"counts {counts}: run them one per batch")
        order = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices  # kept first, in index order
        return order[:, :max(counts[0], 1)]
