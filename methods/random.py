"""Random pruning: a uniform sample of k visual tokens, reproducible per sample."""
from __future__ import annotations

import hashlib
from typing import Hashable

import torch

from ..pruner import PruningInputs, Reduction, TokenPruner, register_pruner, validate_int, validate_ratio


def stable_seed(seed: int, sample_id: Hashable) -> int:
    """A 63-bit seed from ``(seed, sample_id)`` that is the same in every process.

    Python's ``hash`` of a str changes between processes, so it cannot seed a reproducible run.
    """
    digest = hashlib.blake2b(f"{seed}\x00{sample_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@register_pruner("random")
class RandomPruner(TokenPruner):
    """Random baseline: k tokens drawn uniformly, seeded per (seed, sample id), in original order."""

    def __init__(self, ratio: float = 0.5, seed: int = 0):
        self.ratio = validate_ratio(ratio)
        self.seed = validate_int(seed, "seed")

    def select(self, inputs: PruningInputs) -> Reduction:
        if inputs.sample_ids is None:
            raise ValueError("the random pruner needs PruningInputs.sample_ids to be reproducible per sample")
        n = inputs.num_tokens
        k = self.num_kept(n, inputs.grid)
        # One generator per sample (not per token): the draw for a sample cannot depend on its batch.
        rows = [
            torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(self.seed, sid)))[:k]
            for sid in inputs.sample_ids
        ]
        indices = torch.stack(rows).sort(dim=-1).values
        return Reduction(indices=indices.to(inputs.tokens.device))
