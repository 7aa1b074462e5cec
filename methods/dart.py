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
``round(ratio * N)``, the image pivots plus the rest spread over the pivots (the first ones visited take
one more). Original positions are kept.

Pivot order (step 2 is order-dependent: a token one pivot takes is gone for the next).
``pivot_order="official"`` (default) visits the pivots as the official loop does: ``for item in
list(indices_set)`` with ``indices_set = set(image_indices + query_indices)`` built from their
**absolute sequence positions** (``image_token_start_index + i`` for image token ``i``; the text pivots'
positions after the image), each list in ``topk`` order (largest key norm first). Ints hash to
themselves, so that order is CPython's hash-table order (position mod table size, with the table's
growth and probing), not sequence order. We build the same ``set`` of the same positions in the same
insertion order and iterate it, so the running interpreter reproduces it exactly. The positions are
``PruningInputs.seq_index`` / ``text_seq_index`` (each token's index in its unpadded prompt, what the
official batch-1 code indexes); without them (inputs built by hand), as if the image opened the
sequence: image token ``i`` at ``i``, the ``j``-th real text token at ``N + j``. This costs one host sync
per call: the ``B * (pivots_image + pivots_text)`` pivot positions come to the CPU. ``pivot_order=
"sequence"`` visits them in sequence order (image pivots, then text pivots, each ascending), no sync;
the two orders coincide only by chance once positions pass the set's table size (32 slots for 8 pivots).

Also different from the official code: batched; keys are not repeated over GQA groups (the L1 norm
of repeated keys is the group size times ours: the same ranking); fewer than ``pivots_text`` text
tokens after the image hand their quota to the remaining pivots, so every sample keeps the same
count; ratio 1 keeps every token; exact ties of similarity go to the lower position (the official
``topk`` over its ``list(valid_indices)`` leaves their order unspecified).
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
PIVOT_ORDERS = ("official", "sequence")


def top_ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` indices of the ``k`` largest ``scores``, largest first (ties to the lower index): ``topk`` order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` indices of the ``k`` largest ``scores`` (ties to the lower index), in ascending order."""
    return top_ranked(scores, k).sort(dim=-1).values


def official_walk(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The order the official loop visits its pivots in: ``list(set(image_indices + query_indices))``.

    Both lists hold absolute sequence positions in ``topk`` order (largest key norm first), as the
    official code builds them; the result is the running CPython's iteration order of that set.
    """
    return list(set(image_positions + text_positions))


@register_pruner("dart")
class DARTPruner(TokenPruner):
    """DART: before layer k, keeps the image tokens least similar to key-norm pivots (duplicates removed)."""

    stage = Stage.IN_LLM
    quantised = True
    position_policy = "keep"

    def __init__(self, ratio: float = 0.5, k: int = 2, pivots_image: int = 4, pivots_text: int = 4,
                 budget: str = "official", pivot_order: str = "official"):
        self.ratio = validate_ratio(ratio)
        self.k = validate_int(k, "k", minimum=1)
        self.pivots_image = validate_int(pivots_image, "pivots_image", minimum=1)
        self.pivots_text = validate_int(pivots_text, "pivots_text", minimum=0)
        self.budget = validate_choice(budget, "budget", BUDGETS)
        self.pivot_order = validate_choice(pivot_order, "pivot_order", PIVOT_ORDERS)

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
        # Pivot slots: official order keeps topk order (the set's insertion order), sequence order ascends.
        pick = top_ranked if self.pivot_order == "official" else top_positions
        img_piv = pick(keys.float().abs().sum(-1), n_img)  # [B, p_i]
        pivots = hidden.gather(1, img_piv[..., None].expand(-1, -1, hidden.shape[-1]))
        valid = torch.ones(b, n_img, dtype=torch.bool, device=dev)
        txt_piv, tmask = None, None
        if text_keys is not None and self.pivots_text and text_keys.shape[1]:
            tmask = text_mask if text_mask is not None else torch.ones(text_keys.shape[:2], dtype=torch.bool, device=dev)
            n_txt = min(self.pivots_text, text_keys.shape[1])
            txt_norm = text_keys.float().abs().sum(-1).masked_fill(~tmask, float("-inf"))
            txt_piv = pick(txt_norm, n_txt)
            text_hidden = norm(inputs.text_tokens).float()
            pivots = torch.cat([pivots, text_hidden.gather(1, txt_piv[..., None].expand(-1, -1, hidden.shape[-1]))], 1)
            valid = torch.cat([valid, tmask.gather(1, txt_piv)], 1)
        if self.pivot_order == "official":
            walk = self._official_walk(inputs, img_piv, txt_piv, tmask, valid)  # [B, P]
            pivots = pivots.gather(1, walk[..., None].expand(-1, -1, pivots.shape[-1]))
            valid = valid.gather(1, walk)
        # Quotas: the budget beyond the image pivots, spread over the valid pivots in visiting order.
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

    @staticmethod
    def _official_walk(inputs: PruningInputs, img_piv: torch.Tensor, txt_piv: torch.Tensor | None,
                       tmask: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """``[B, P]`` the pivot slots (image ones, then text ones) in the official loop's visiting order;
        invalid text slots (padding) last. One host sync: the pivots' absolute positions."""
        b, n = img_piv.shape[0], inputs.tokens.shape[1]
        dev = img_piv.device
        pos = inputs.seq_index
        if pos is None:  # built by hand: as if the image opened the sequence
            pos = torch.arange(n, device=dev).expand(b, -1)
        piv_pos = pos.to(dev).gather(1, img_piv)
        if txt_piv is not None:
            tpos = inputs.text_seq_index
            if tpos is None:
                tpos = (n + tmask.long().cumsum(1) - 1).masked_fill(~tmask, -1)
            piv_pos = torch.cat([piv_pos, tpos.to(dev).gather(1, txt_piv)], 1)
        n_i = img_piv.shape[1]
        walks = []
        for row, ok in zip(piv_pos.tolist(), valid.tolist()):
            slot = {p: j for j, (p, v) in enumerate(zip(row, ok)) if v}
            if len(slot) != sum(ok):
                raise ValueError(f"dart: pivots share a sequence position {row}; positions must be distinct")
            image = [p for p, v in zip(row[:n_i], ok[:n_i]) if v]
            text = [p for p, v in zip(row[n_i:], ok[n_i:]) if v]
            walks.append([slot[p] for p in official_walk(image, text)] + [j for j, v in enumerate(ok) if not v])
        return torch.tensor(walks, dtype=torch.long, device=dev)
