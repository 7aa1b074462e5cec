"""Spatial pooling baseline: 2-D average pooling of the visual-token grid to a smaller grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..pruner import PruningInputs, Reduction, TokenPruner, register_pruner, validate_ratio


def pooled_grid(ratio: float, grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid ``(h', w')``: each side scaled by ``sqrt(ratio)``, rounded half up, at least 1."""
    scale = math.sqrt(ratio)
    return tuple(max(1, min(side, math.floor(side * scale + 0.5))) for side in grid)  # type: ignore[return-value]


def _window_weights(size: int, out: int, device: torch.device) -> torch.Tensor:
    """``[out, size]``: row ``i`` averages adaptive-pooling window ``i`` along one axis."""
    i = torch.arange(out, device=device)[:, None]
    start, end = (i * size) // out, ((i + 1) * size + out - 1) // out
    cells = torch.arange(size, device=device)[None, :]
    inside = ((cells >= start) & (cells < end)).float()
    return inside / inside.sum(1, keepdim=True)


def _window_centres(size: int, out: int, device: torch.device) -> torch.Tensor:
    """Centre index (rounded down) of each adaptive-pooling window along one axis."""
    i = torch.arange(out, device=device)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out  # ceil, as adaptive_avg_pool2d does
    return (start + end - 1) // 2


@register_pruner("pool")
class PoolPruner(TokenPruner):
    """Pooling baseline: average-pools the token grid to (round(h*sqrt(r)), round(w*sqrt(r))) tokens.

    Merging, so ``quantised``: k = h' * w'. Windows are those of ``adaptive_avg_pool2d`` (equal,
    non-overlapping ones when the sides divide); each new token stands at its window's centre.
    """

    quantised = True
    scopes = ("frame",)  # spatial pooling of one view's grid

    def __init__(self, ratio: float = 0.5):
        self.ratio = validate_ratio(ratio)

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        oh, ow = pooled_grid(self.ratio, grid)
        return oh * ow

    def select(self, inputs: PruningInputs) -> Reduction:
        h, w = inputs.grid
        oh, ow = pooled_grid(self.ratio, inputs.grid)
        x = inputs.tokens.transpose(1, 2).reshape(inputs.batch_size, -1, h, w)  # [B, D, h, w]
        pooled = F.adaptive_avg_pool2d(x, (oh, ow)).flatten(2).transpose(1, 2)  # [B, oh*ow, D]
        device = inputs.tokens.device
        centres = (_window_centres(h, oh, device).unsqueeze(-1) * w + _window_centres(w, ow, device)).flatten()
        indices = centres.unsqueeze(0).expand(inputs.batch_size, -1)
        # The same averages as weights over the N tokens (window rows x window columns), so that
        # per-token side features (Qwen3-VL's DeepStack) are pooled exactly like the tokens.
        weights = torch.kron(_window_weights(h, oh, device), _window_weights(w, ow, device))  # [oh*ow, h*w]
        return Reduction(indices=indices, tokens=pooled, grid=(oh, ow),
                         token_weights=weights.unsqueeze(0).expand(inputs.batch_size, -1, -1))
