"""FoPru (Focal Pruning, arXiv 2411.14164): visual-token significance from the vision encoder.

The significance of a patch is read off one vision-encoder layer's self-attention (default: the
penultimate, whose output LLaVA feeds to the projector), averaged over heads, with the CLS/prefix
row and column removed so the map is ``P x P`` over patches. Two candidate scores:

* column mean -- the attention a patch *receives*, averaged over queries;
* row mean -- the attention a patch *gives* to the other patches.

``score_axis="auto"`` takes, per image, the one with the higher variance (the paper's rule; ties go
to the column mean). ``"cls"`` uses the CLS row instead (as FasterVLM / VisionZip do). Patch scores
are averaged over each merge group (Qwen2-VL 2x2, InternVL pixel shuffle) to score LLM tokens.
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
    keep_count,
    register_pruner,
    topk_indices,
    validate_choice,
    validate_int,
    validate_ratio,
)

SCORE_AXES = ("auto", "column", "row", "cls")
ROW_FILLS = ("none", "rank")


def fopru_scores(inputs: PruningInputs, score_axis: str = "auto") -> torch.Tensor:
    """Per-token significance ``[B, N]`` from ``inputs.vision_attention``.

    ``vision_attention`` is ``[B, T, T]`` (or ``[B, prefix, T]`` for ``"cls"``), ``T = prefix + P``.
    """
    attn = inputs.vision_attention
    if attn is None:
        raise ValueError("FoPru needs vision_attention; the adapter did not provide it")
    prefix = inputs.vision_prefix
    if score_axis == "cls":
        if prefix < 1:
            # a user choice the model cannot serve (SigLIP, Qwen2-VL: no CLS): one line, not a traceback
            raise OptionError("score_axis='cls' needs a vision encoder with a CLS token, and this model's has none; "
                              "use 'auto', 'column' or 'row'")
        patch_scores = attn[:, 0, prefix:]
    else:
        patches = attn[:, prefix:, prefix:]  # [B, P, P]: drop the CLS row and column
        column = patches.mean(dim=1)  # attention each patch receives, averaged over queries
        row = patches.mean(dim=2)  # attention each patch gives, averaged over keys
        if score_axis == "column":
            patch_scores = column
        elif score_axis == "row":
            patch_scores = row
        else:
            use_column = column.var(dim=-1) >= row.var(dim=-1)  # [B]: the variance rule, per image
            patch_scores = torch.where(use_column.unsqueeze(-1), column, row)
    b, n = inputs.tokens.shape[:2]
    if patch_scores.shape[-1] != n * inputs.patch_merge:
        raise ValueError(
            f"vision attention covers {patch_scores.shape[-1]} patches, expected "
            f"{n} tokens x patch_merge {inputs.patch_merge}"
        )
    # Patches are stored in merge order: the patch_merge consecutive patches of a group form one token.
    return patch_scores.reshape(b, n, inputs.patch_merge).mean(dim=-1).float()


class _FoPruBase(TokenPruner):
    def __init__(self, ratio: float = 0.5, vision_layer: int = -2, score_axis: str = "auto"):
        self.ratio = validate_ratio(ratio)
        self.vision_layer = validate_int(vision_layer, "vision_layer")
        self.score_axis = validate_choice(score_axis, "score_axis", SCORE_AXES)

    @property
    def needs(self) -> PrunerNeeds:
        rows = "prefix" if self.score_axis == "cls" else "all"
        return PrunerNeeds(vision_attention_layer=self.vision_layer, vision_attention_rows=rows)


@register_pruner("fopru_rank")
class FoPruRank(_FoPruBase):
    """FoPru, rank strategy: the globally top-k tokens by vision-encoder attention, in original order."""

    def token_scores(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` FoPru significance (scope ``"clip"`` ranks a whole clip's tokens by it)."""
        return fopru_scores(inputs, self.score_axis)

    def select(self, inputs: PruningInputs) -> Reduction:
        scores = self.token_scores(inputs)
        return Reduction(indices=topk_indices(scores, self.num_kept(inputs.num_tokens, inputs.grid)), scores=scores)


@register_pruner("fopru_row")
class FoPruRow(_FoPruBase):
    """FoPru, row strategy: whole rows of the patch grid with the highest summed significance.

    Keeps ``max(1, floor(ratio * h))`` whole rows, so the count is a multiple of the row width
    (``quantised``). With ``fill="rank"`` it keeps exactly ``keep_count(ratio, N)`` tokens: the
    ``k // w`` best rows whole, then the best ``k % w`` tokens of the next-best row.
    """

    quantised = True
    scopes = ("frame",)  # whole rows of one view's grid

    def __init__(
        self, ratio: float = 0.5, vision_layer: int = -2, score_axis: str = "auto", fill: str = "none"
    ):
        super().__init__(ratio=ratio, vision_layer=vision_layer, score_axis=score_axis)
        self.fill = validate_choice(fill, "fill", ROW_FILLS)

    def _rows_and_rest(self, n_tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
        h, w = grid
        if self.fill == "rank":
            k = keep_count(self.ratio, n_tokens)
            return k // w, k % w
        # A small epsilon so that e.g. 0.29 * 100 = 28.999999999999996 counts as 29 rows.
        return max(1, math.floor(self.ratio * h + 1e-9)), 0

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        rows, rest = self._rows_and_rest(n_tokens, grid)
        return rows * grid[1] + rest

    def select(self, inputs: PruningInputs) -> Reduction:
        h, w = inputs.grid
        scores = fopru_scores(inputs, self.score_axis).view(-1, h, w)
        n_rows, rest = self._rows_and_rest(inputs.num_tokens, inputs.grid)
        row_order = torch.sort(scores.sum(dim=-1), dim=-1, descending=True, stable=True).indices  # [B, h]
        rows = row_order[:, :n_rows].sort(dim=-1).values  # [B, n_rows], ascending
        cols = torch.arange(w, device=scores.device)
        indices = (rows.unsqueeze(-1) * w + cols).flatten(1)  # whole rows, raster order
        if rest == 0:
            return Reduction(indices=indices, grid=(n_rows, w), scores=scores.flatten(1))
        next_row = row_order[:, n_rows]  # [B]: the best row not kept whole
        row_scores = scores.gather(1, next_row.view(-1, 1, 1).expand(-1, 1, w)).squeeze(1)  # [B, w]
        partial = next_row.unsqueeze(-1) * w + topk_indices(row_scores, rest)
        return Reduction(indices=torch.cat([indices, partial], dim=1).sort(dim=-1).values, scores=scores.flatten(1))


@register_pruner("fastervlm")
class FasterVLM(FoPruRank):
    """FasterVLM: the top-k tokens by the CLS token's attention at vision layer -2, averaged over heads.

    A named preset of FoPru's ``cls`` axis (``Theia-4869/FasterVLM``: ``clip_encoder.py``
    ``feature_select``, ``attentions[-2][:, :, 0, 1:]`` averaged over heads, top-T in raster order).
    Encoders without a CLS token (Qwen2-VL / 2.5-VL) score each patch by the attention it receives,
    averaged over queries (FoPru's column mean), as the official Qwen ports of CLS-based methods do.
    """

    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, vision_layer: int = -2):
        super().__init__(ratio=ratio, vision_layer=vision_layer, score_axis="cls")

    def token_scores(self, inputs: PruningInputs) -> torch.Tensor:
        """``[B, N]`` CLS attention (column mean on CLS-less towers)."""
        return fopru_scores(inputs, "cls" if inputs.vision_prefix >= 1 else "column")
