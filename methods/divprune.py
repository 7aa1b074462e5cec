"""DivPrune (CVPR'25, arXiv 2503.02175): keep a maximally diverse subset of the visual tokens.

As the official code (``vbdi/divprune``: ``LLaVA/llava/model/llava_arch.py``, ``DivPrune`` and
``pairwise_cosine_similarity``): on the projector outputs (the LLM's input embeddings of the image),
distance ``D = 1 - cosine similarity``. Step 0 picks the token whose nearest neighbour is farthest;
each further step picks the token whose minimum distance to the selected set is largest (greedy
max-min diversity). ``round(ratio * N)`` tokens (half up), returned in original order; no merging.

Views: global over the whole image block of a sample (the official LLaVA-NeXT handling; our block
leaves LLaVA-NeXT's row newlines in place, they are structure, not candidates). Positions: the
official LLaVA code renumbers them contiguously (``compact``); on M-RoPE models (Qwen) we keep the
original positions, as the official Qwen ports of these methods do.

Deliberate differences: batched (official: batch 1, configured by environment variables, with the
system-prompt length 35 hard-coded); tokens already selected are excluded explicitly (the official
loop relies on their distance to themselves being ~0, which float error can break); distances in fp32.
"""
from __future__ import annotations

import torch

from ..pruner import PruningInputs, Reduction, TokenPruner, register_pruner, validate_ratio


def cosine_distance(tokens: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every pair of tokens: ``[B, N, D]`` -> ``[B, N, N]`` (fp32)."""
    x = tokens.float()
    x = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - x @ x.transpose(1, 2)


def max_min_diverse(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of ``k`` items from a ``[B, N, N]`` distance matrix; ``[B, k]`` in order picked."""
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=1)  # [B, N]: distance to the nearest other token
    first = nearest.argmax(dim=-1)  # ties: the lowest index
    picked = [first]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dist.device).scatter(1, first[:, None], True)
    to_set = dist.gather(1, first[:, None, None].expand(-1, 1, n)).squeeze(1)  # [B, N]
    for _ in range(k - 1):
        j = to_set.masked_fill(chosen, float("-inf")).argmax(dim=-1)
        picked.append(j)
        chosen.scatter_(1, j[:, None], True)
        to_set = torch.minimum(to_set, dist.gather(1, j[:, None, None].expand(-1, 1, n)).squeeze(1))
    return torch.stack(picked, dim=1)


@register_pruner("divprune")
class DivPrunePruner(TokenPruner):
    """DivPrune: a maximally diverse subset of the projected visual tokens (greedy max-min cosine distance)."""

    views = "global"
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5):
        self.ratio = validate_ratio(ratio)

    def select(self, inputs: PruningInputs) -> Reduction:
        k = self.num_kept(inputs.num_tokens, inputs.grid)
        picked = max_min_diverse(cosine_distance(inputs.tokens), k)
        return Reduction(indices=picked.sort(dim=-1).values)
