"""FrameFusion (ICCV'25, arXiv 2501.01986): same-patch tokens of consecutive frames merged inside the LLM, layer
after layer while the merged share pays, then one FastV-style cut to meet a compute budget.

As the official code ``thu-nics/FrameFusion@fbec1d2`` (``framefusion/main.py``: ``FrameFusion.forward``,
``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``, ``find_contigious_latter_index``,
``_compute_pruning_ratio``; called from ``framefusion/models/qwen2/modeling_qwen2.py``
``Qwen2DecoderLayer_merge_then_prune_by_cost_forward``: once on layer 0's input, then in every decoder layer right
after ``hidden_states = residual + attn_output``, before the MLP), on one sample of ``n`` visual tokens whose
*patch* is their place in their frame's grid (``patch_type = list(range(patch_num)) * n_frames``):

1. **Merge step** (while merging is not finished). ``p = _compute_pruning_ratio(sparsity_list, cost)`` (below) is
   the share the step may merge at most. Tokens are ordered by patch, then by sequence order (frame by frame);
   each token's cosine similarity with the *previous token of its patch still in the sequence* (an earlier
   frame's) is computed on the current hidden states (``-2`` for a patch's first token). The ``m`` tokens with
   similarity ``>= S`` are merged: ``m / n < p`` -- the share is appended to ``sparsity_list`` and merging stops
   when it is ``< ratio_lower_bound``; else only the ``int(p n)`` most similar are merged and merging *and*
   pruning stop. A run of consecutive merged tokens (in patch order) goes into the token right before the run
   (the earliest frame's), all of them **averaged with equal weights** (``(target + members) / (m + 1)``, a
   token already merged before counting as one), in place: the target keeps its slot and position id.
2. **Cut** (in the layer after merging stopped, unless the budget branch above stopped it): the current layer's
   attention of the last query (head mean) over the visual tokens keeps the top ``round(n (1 - p))`` (Python's
   ``round``); the rest leave the hidden states (the layer's KV cache, already written, keeps them).

``_compute_pruning_ratio``: ``s_i = prod_{j <= i} (1 - sparsity_j)``, ``remain = L cost - sum_i s_i``, ``p = 1 -
remain / ((L - len) s)`` (``0`` if that is negative): the share to drop from now on so that the visual tokens'
share summed over the ``L`` layers (each merge step counted as one layer, the layer-0 input merge included, as the
official counts them) is ``L cost``.

Options (``framefusion:ratio=0.3``, ``framefusion:similarity=0.7``, ...):

=====================  ================================  ===========================================================
option                 official (``apply_framefusion``)  here
=====================  ================================  ===========================================================
``ratio``              ``cost=0.3``                      FrameFusion's ``cost``: the visual tokens' average share over
                                                         the decoder's layers; ``1.0`` is the unpruned model (the
                                                         official rule merges and cuts nothing there; here no stage
                                                         runs at all)
``similarity``         ``similarity_lower_bound=0.6``    ``S``: same-patch cosine from which a token is merged
``ratio_lower_bound``  ``ratio_lower_bound=0.1``         merging stops after a step that merged a smaller share
``cost_layers``        ``num_layers=28`` (hard-coded)    ``L`` of the cost model; default (``None``): the decoder's
                                                         own depth (28 is Qwen2-7B's, kept for every model there)
=====================  ================================  ===========================================================

**Budget.** The count is the data's: FrameFusion is ``adaptive`` (each sample through its own stages; runs report
the visual tokens each layer saw, ``SampleStats.visual_per_layer``), and a sweep places it at its measured FLOPs.

**Stages.** ``LLMStage(0)`` (layer 0's input), then ``LLMStage(l, "previous", "last", after_attention=True)`` for
``l = 1 .. L-1``: inside layer ``l - 1``, after its attention, with that attention's last row. The official's call
inside the last layer only changes that layer's MLP on visual tokens, which nothing reads: left out. What a stage
decided before is carried in ``PruningInputs.memory`` (the merge shares, each token's patch, the two flags).

**Positions.** Kept and merged tokens keep their own position ids (the official gathers ``cos`` / ``sin`` with the
kept mask): ``keep`` everywhere. Generated tokens continue after the prompt (the framework's default).

**Where it runs.** Video samples of every family: a frame is a view of the sample (Qwen: a temporal patch of 2
frames, whose ``patch_num = h w / merge^2`` the official Qwen2-VL code uses too; LLaVA-OneVision / NeXT-Video: a
pooled frame; InternVL: a frame's tile). A sample of one view (an image, a one-frame video), or of views of
different grids, is refused in one line (there is no consecutive frame; the official hooks videos only). A bare
:class:`~tokenprune.pruner.PruningInputs` without views is one frame (nothing merges).

**Deliberate differences.** (1) Similarities in float32 (official: the model dtype; merges here sum in float32
and return to the model dtype). (2) Ties of ``topk`` (the budget branch's similarities, the cut's attention) go
to the lower index (a stable sort). (3) ``L`` is the decoder's depth, not 28 (``cost_layers=28`` for the
constant). (4) The official ``ValueError("The cost is too small")`` (the budget already spent: ``remain < 0``)
is an :class:`OptionError` here, raised at the stage that would compute it. (5) The cut ranks the visual tokens;
the official ranks the contiguous span of that length from the first visual token, the same tokens when the
visual tokens are contiguous (LLaVA-Video's per-row newline tokens, which the official counts as patches, are no
visual tokens in the Hugging Face OneVision layout). (6) The official's call inside the last layer is left out
(above). (7) Batches: the official runs batch 1; here each sample has its own state and count.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError
from ..pruner import (
    LLMStage,
    PrunerNeeds,
    PruningInputs,
    Reduction,
    Stage,
    TokenPruner,
    register_pruner,
    validate_float,
    validate_int,
    validate_ratio,
)

OFFICIAL_LAYERS = 28  # _compute_pruning_ratio(num_layers=28): Qwen2-7B's decoder, hard-coded for every model
IGNORE = -2.0  # the official IGNORE_TOKEN similarity of a patch's first token (and across patches)


def pruning_ratio(sparsity: list[float], cost: float, n_layers: int) -> float:
    """Official ``_compute_pruning_ratio``: the share of the current visual tokens to drop from the next layer on
    so that the layers' average visual share is ``cost``, after merge steps that dropped ``sparsity`` shares."""
    s, total = 1.0, 0.0
    for share in sparsity:
        s *= 1 - share
        total += s
    remain = n_layers * cost - total
    if remain < 0:
        raise OptionError(f"framefusion: cost {cost} is too small for the merges already made over {n_layers} layers "
                          "(the official code raises 'The cost is too small'); use a larger ratio")
    left = n_layers - len(sparsity)
    if left <= 0:
        raise OptionError(f"framefusion merged at every one of its {n_layers} cost layers; set cost_layers to the "
                          "decoder's depth")
    if remain / (left * s) > 1:
        return 0
    return 1 - remain / (left * s)


def patch_similarity(x: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity [n], order [n])`` of one sample's visual tokens ``x`` ``[n, D]`` with patch ids ``patch`` ``[n]``
    (official ``compute_similarity_and_token_index_by_patch``): ``order`` lists the tokens by patch, then sequence
    order; ``similarity[j]`` is the cosine of token ``order[j]`` with ``order[j - 1]`` if both share a patch, else
    ``-2`` (and ``-2`` at ``j = 0``). Cosine as the official, ``dot / (|a| |b|)`` with no epsilon, in float32."""
    order = torch.sort(patch, stable=True).indices
    xs = x[order].float()
    a, b = xs[:-1], xs[1:]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    ps = patch[order]
    cos = torch.where(ps[:-1] == ps[1:], cos, torch.full_like(cos, IGNORE))
    return torch.cat([cos.new_full((1,), IGNORE), cos]), order


def run_merge(chosen: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``merge_tokens_and_get_mask`` as weights: ``chosen`` ``[n]`` bool in patch order (the tokens
    merged into the previous one of their patch). Returns ``(kept [n] bool, into [n] long slot into the kept tokens
    or -1, weights [n])`` in sequence order: every run of chosen tokens and the token right before it share one
    slot (that token's), each with weight ``1 / (run + 1)``."""
    n = chosen.shape[0]
    dev = chosen.device
    pos = torch.arange(n, device=dev)
    # the run's target: the last unchosen place at or before each place (a run never starts a patch: its first
    # token's similarity is -2, below any valid threshold)
    target_sorted = torch.where(chosen, torch.full_like(pos, -1), pos).cummax(0).values
    target = order[target_sorted.clamp_min(0)]  # [n] sequence index of each place's target
    member = torch.zeros(n, dtype=torch.bool, device=dev)
    member[order[chosen]] = True
    runs = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, target[chosen], torch.ones_like(target[chosen]))
    kept = ~member
    slot_of = kept.long().cumsum(0) - 1  # [n] slot of each kept token (sequence order)
    into = torch.full((n,), -1, dtype=torch.long, device=dev)
    weights = torch.zeros(n, device=dev)
    src = order[chosen]
    into[src] = slot_of[target[chosen]]
    weights[src] = 1.0 / (runs[target[chosen]] + 1).float()
    is_target = runs > 0
    into[is_target] = slot_of[is_target]
    weights[is_target] = 1.0 / (runs[is_target] + 1).float()
    return kept, into, weights


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest ``scores`` ``[n]`` (ties: the lower index), ascending."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


@register_pruner("framefusion")
class FrameFusionPruner(TokenPruner):
    """FrameFusion: same-patch tokens of consecutive frames merged inside the LLM layer after layer, then a FastV-style cut to a cost budget."""

    stage = Stage.IN_LLM
    quantised = True  # the counts are the data's
    adaptive = True  # one sample per call; num_kept is a bound
    position_policy = "keep"

    def __init__(self, ratio: float = 0.3, similarity: float = 0.6, ratio_lower_bound: float = 0.1,
                 cost_layers: int | None = None):
        self.ratio = validate_ratio(ratio)
        self.similarity = validate_float(similarity, "similarity", -1.0, 1.0)
        self.ratio_lower_bound = validate_float(ratio_lower_bound, "ratio_lower_bound", 0.0, 1.0)
        self.cost_layers = None if cost_layers is None else validate_int(cost_layers, "cost_layers", minimum=1)

    @property
    def off(self) -> bool:
        """``ratio = 1``: the official rule merges and cuts nothing (its first budget is 0); no stage runs."""
        return self.ratio >= 1.0

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        """Layer 0's input, then inside every layer but the last, after its attention (module docstring)."""
        if self.off:
            return ()
        return (LLMStage(layer=0),) + tuple(
            LLMStage(layer=layer, attention="previous", queries="last", after_attention=True)
            for layer in range(1, n_layers))

    @property
    def needs(self) -> PrunerNeeds:
        """The schedule at the official depth (the decoder asks :meth:`llm_schedule` with its own)."""
        return PrunerNeeds(llm_stages=self.llm_schedule(OFFICIAL_LAYERS))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """An upper bound: the counts are the data's (see the module docstring)."""
        return n_tokens

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        return [n_tokens]

    # -- one sample's state ------------------------------------------------------------------------------
    def _start(self, inputs: PruningInputs, row: int) -> dict[str, Any]:
        """The state before layer 0: each visual token's patch (its place in its frame's grid)."""
        n = inputs.num_tokens
        dev = inputs.tokens.device
        grids = inputs.view_grids
        if grids is None:  # a bare PruningInputs: one frame, nothing merges
            patch = torch.arange(n, device=dev)
        else:
            if len(grids) < 2:
                raise OptionError("framefusion merges the same patch of consecutive frames and this sample has one "
                                  "view (an image, or a one-frame video; Qwen: one temporal patch of 2 frames): run "
                                  "it on videos")
            if len(set(grids)) > 1:
                raise OptionError(f"framefusion merges the same patch of consecutive frames, and this sample's views "
                                  f"have different grids {sorted(set(grids))} (images, not a video's frames)")
            per = grids[0][0] * grids[0][1]
            patch = torch.arange(n, device=dev) % per
        return {"patch": patch, "sparsity": [], "merged": False, "pruned": False}

    def select(self, inputs: PruningInputs) -> Reduction:
        """One stage for every batch entry (the adapters give one sample per call: each has its own count)."""
        outs = [self._one(inputs, row) for row in range(inputs.batch_size)]
        if len({o.indices.shape[1] for o in outs}) > 1:
            raise OptionError(f"framefusion keeps an adaptive count per sample, and samples of one call got "
                              f"{[o.indices.shape[1] for o in outs]}: run them one per call (the adapters do)")
        cat = lambda name: None if getattr(outs[0], name) is None else torch.cat([getattr(o, name) for o in outs])
        return Reduction(indices=cat("indices"), merge_into=cat("merge_into"),
                         merge_into_weights=cat("merge_into_weights"), scores=cat("scores"))

    def _one(self, inputs: PruningInputs, row: int) -> Reduction:
        """Official ``FrameFusion.forward`` on batch entry ``row`` at this stage: cut, or merge, or nothing."""
        memory = inputs.memory[row] if inputs.memory is not None else {}
        if inputs.stage == 0 or "patch" not in memory:
            memory.clear()
            memory.update(self._start(inputs, row))
        x = inputs.tokens[row]
        n, dev = x.shape[0], x.device
        if memory["patch"].shape[0] != n:  # the decoder hands each stage what the previous one kept
            raise ValueError(f"framefusion's stage {inputs.stage} got {n} visual tokens, its previous stage kept "
                             f"{memory['patch'].shape[0]}")
        every = torch.arange(n, device=dev)[None]
        n_layers = self.cost_layers or inputs.num_layers or OFFICIAL_LAYERS
        if memory["merged"] and not memory["pruned"] and inputs.llm_attention is not None:
            # the cut: this layer's last-query attention (head mean) over the visual tokens
            memory["pruned"] = True
            share = pruning_ratio(memory["sparsity"], self.ratio, n_layers)
            scores = inputs.llm_attention[row, -1].float()
            kept = topk_stable(scores, round(n * (1 - share)))
            memory["patch"] = memory["patch"][kept]
            return Reduction(indices=kept[None], scores=scores[None])
        if memory["merged"]:
            return Reduction(indices=every)
        upper = pruning_ratio(memory["sparsity"], self.ratio, n_layers)
        sim, order = patch_similarity(x, memory["patch"])
        chosen = sim >= self.similarity
        share = int(chosen.sum()) / n
        if share < upper:
            memory["sparsity"].append(share)
            if share < self.ratio_lower_bound:
                memory["merged"] = True
        else:  # the budget is reached by merging alone: the int(p n) most similar, then nothing more
            top = torch.sort(sim, descending=True, stable=True).indices[:int(upper * n)]
            chosen = torch.zeros_like(chosen)
            chosen[top] = True
            memory["merged"] = memory["pruned"] = True
        kept, into, weights = run_merge(chosen, order)
        indices = kept.nonzero().flatten()
        memory["patch"] = memory["patch"][indices]
        scores = torch.empty(n, device=dev).scatter_(0, order, sim.clamp_min(-1.0))  # similarity to the earlier frame
        return Reduction(indices=indices[None], merge_into=into[None], merge_into_weights=weights[None],
                         scores=scores[None])
