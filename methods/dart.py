"""DART (arXiv 2502.11494): prune duplicated image tokens inside the LLM, by similarity to a few pivots.

As the official code (``ZichenWen1/DART``: ``llava/model/language_model/modeling_llama_self.py``,
``get_retained_image_token``; the same rule in LightCompress ``token_reduction/dart.py``): before
decoder layer ``k`` (default 2), with the post-rotary keys of layer ``k - 1`` and the hidden states
entering layer ``k`` passed through the decoder's final norm:

1. pivots: the ``pivots_image`` image tokens and the ``pivots_text`` text tokens after the image
   with the largest L1 norm of their keys (heads flattened);
2. for each pivot in turn, the remaining image tokens least similar to it (cosine of the normed
   hidden states) join the kept set and leave the pool, ``topk`` per pivot;
3. text pivots are then dropped: kept = the image pivots + ``(pivots_image + pivots_text) * topk``.

Budgets: ``budget="official"`` uses ``topk = floor(ratio * N / 8)``, i.e. ``4 + 8 * topk`` tokens
(68 / 132 / 196 for the 64 / 128 / 192-of-576 settings); ``budget="exact"`` keeps exactly
``round(ratio * N)``, the image pivots plus the rest spread over the pivots (the first ones take one
more). Order: the official loop iterates a Python ``set`` of pivot positions, whose order is that
of the hash table (``position mod table size``), not something the method defines; we take the
pivots in sequence order (image pivots, then text pivots, each ascending), which the official
order coincides with whenever positions do not wrap around the table. Original positions are kept.

Also different from the official code: batched; keys are not repeated over GQA groups (the L1 norm
of repeated keys is the group size times ours: the same ranking); fewer than ``pivots_text`` text
tokens after the image hand their quota to the remaining pivots, so every sample keeps the same
count; ratio 1 keeps every token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pruner import (
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    keep_count,
    register_pruner,
    validate_choice,
    validate_int,
    validate_ratio,
)

BUDGETS = ("official", "exact")


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` indices of the ``k`` largest ``scores`` (ties to the lower index), in ascending order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values


@register_pruner("dart")
class DARTPruner(TokenPruner):
    """DART: before layer k, keeps the image tokens least similar to key-norm pivots (duplicates removed)."""

    stage = Stage.IN_LLM
    quantised = True
    position_policy = "keep"

    def __init__(self, ratio: float = 0.5, k: int = 2, pivots_image: int = 4, pivots_text: int = 4,
                 budget: str = "official"):
        self.ratio = validate_ratio(ratio)
        self.k = validate_int(k, "k", minimum=1)
        self.pivots_image = validate_int(pivots_image, "pivots_image", minimum=1)
        self.pivots_text = validate_int(pivots_text, "pivots_text", minimum=0)
        self.budget = validate_choice(budget, "budget", BUDGETS)

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(llm_stages=(LLMStage(layer=self.k, keys=True),))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        if self.ratio >= 1.0:
            return n_tokens
        if self.budget == "exact":
            return keep_count(self.ratio, n_tokens)
        per_pivot = int(self.ratio * n_tokens / (self.pivots_image + self.pivots_text) + 1e-9)
        return max(1, min(n_tokens, self.pivots_image + (self.pivots_image + self.pivots_text) * per_pivot))

    def select(self, inputs: PruningInputs) -> Reduction:
        keys, text_keys, text_mask = inputs.llm_keys, inputs.text_keys, inputs.text_mask
        if keys is None:
            raise ValueError("dart needs llm_keys; the adapter did not provide them")
        b, n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        k = self.num_kept(n, inputs.grid)
        norm = inputs.final_norm or (lambda x: x)
        hidden = norm(inputs.tokens).float()  # [B, N, D]
        n_img = min(self.pivots_image, k)
        img_piv = top_positions(keys.float().abs().sum(-1), n_img)  # [B, p_i]
        pivots = hidden.gather(1, img_piv[..., None].expand(-1, -1, hidden.shape[-1]))
        valid = torch.ones(b, n_img, dtype=torch.bool, device=dev)
        if text_keys is not None and self.pivots_text and text_keys.shape[1]:
            tmask = text_mask if text_mask is not None else torch.ones(text_keys.shape[:2], dtype=torch.bool, device=dev)
            n_txt = min(self.pivots_text, text_keys.shape[1])
            txt_norm = text_keys.float().abs().sum(-1).masked_fill(~tmask, float("-inf"))
            txt_piv = top_positions(txt_norm, n_txt)
            text_hidden = norm(inputs.text_tokens).float()
            pivots = torch.cat([pivots, text_hidden.gather(1, txt_piv[..., None].expand(-1, -1, hidden.shape[-1]))], 1)
            valid = torch.cat([valid, tmask.gather(1, txt_piv)], 1)
        # Quotas: the budget beyond the image pivots, spread over the valid pivots in order.
        rest = k - n_img
        n_valid = valid.sum(1, keepdim=True)  # [B, 1]
        rank = valid.long().cumsum(1) - 1
        quota = torch.where(valid, rest // n_valid + (rank < rest % n_valid).long(), 0)  # [B, P]
        kept = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, img_piv, True)
        slots = torch.arange(n, device=dev)
        for j in range(pivots.shape[1]):  # at most pivots_image + pivots_text steps
            dissim = -F.cosine_similarity(pivots[:, j:j + 1], hidden, dim=-1)  # [B, N]
            order = torch.sort(dissim.masked_fill(kept, float("-inf")), dim=1, descending=True, stable=True).indices
            take = torch.zeros_like(kept).scatter(1, order, slots[None, :] < quota[:, j:j + 1])
            kept |= take
        return Reduction(indices=top_positions(kept.float(), k))
