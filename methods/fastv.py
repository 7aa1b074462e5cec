"""FastV (arXiv 2403.06764): drop image tokens inside the LLM after decoder layer K.

At layer ``K-1`` (0-based), the attention each image token receives is averaged over heads, from
the last token (``query="last"``, what the official code does) or averaged over all query rows
(``query="mean"``, what the paper's text describes; causal zeros included). The top
``keep_count(ratio, N)`` image tokens and every text token go on to layers ``>= K`` with their
original position ids; the KV cache of those layers holds only the kept tokens. The one-stage case
of the in-LLM machinery (:class:`~tokenprune.pruner.LLMStage`).
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
    validate_choice,
    validate_int,
    validate_ratio,
)

QUERIES = ("last", "mean")


@register_pruner("fastv")
class FastVPruner(TokenPruner):
    """FastV: keeps the image tokens most attended at LLM layer K-1 and drops the rest from layer K on."""

    stage = Stage.IN_LLM

    def __init__(self, ratio: float = 0.5, k: int = 2, query: str = "last"):
        self.ratio = validate_ratio(ratio)
        self.k = validate_int(k, "k", minimum=1)
        self.query = validate_choice(query, "query", QUERIES)

    @property
    def needs(self) -> PrunerNeeds:
        rows = "last" if self.query == "last" else "all"
        return PrunerNeeds(llm_stages=(LLMStage(layer=self.k, attention="previous", queries=rows),))

    def select(self, inputs: PruningInputs) -> Reduction:
        attn = inputs.llm_attention  # [B, Q, N]
        if attn is None:
            raise ValueError("FastV needs llm_attention; the adapter did not provide it")
        mask = inputs.llm_query_mask
        if mask is None:
            mask = torch.ones(attn.shape[:2], dtype=torch.bool, device=attn.device)
        if self.query == "last":
            positions = torch.arange(attn.shape[1], device=attn.device)
            last = torch.where(mask, positions, -1).argmax(dim=-1)  # [B]: last real query row
            scores = attn.gather(1, last.view(-1, 1, 1).expand(-1, 1, attn.shape[-1])).squeeze(1)
        else:
            weights = mask.to(attn.dtype).unsqueeze(-1)
            scores = (attn * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
        return Reduction(indices=topk_indices(scores.float(), self.num_kept(inputs.num_tokens, inputs.grid)), scores=scores)
