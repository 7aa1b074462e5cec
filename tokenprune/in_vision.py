"""What a pruner that acts inside the vision encoder sees and returns (``Stage.IN_VISION``).

Such a pruner (ToMe, FlowCut) shortens the vision tower's own sequence between its blocks, so every
later block, the projector and the LLM run on fewer tokens. The adapter runs the tower block by
block (:mod:`tokenprune.adapters.vision_blocks`): at each :class:`VisionHook` the pruner asked for
it calls :meth:`~tokenprune.pruner.TokenPruner.select` with a :class:`VisionState` and applies the
:class:`VisionReduction` it returns.

Shapes: ``B`` images (views) of one shape, ``T`` tokens of the current sequence (``prefix`` CLS /
register tokens first, then patch tokens), ``P = h * w`` patches of the original grid, ``D`` the
tower's width, ``H`` heads of ``d`` dims.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Literal, Sequence

import torch


@dataclass(frozen=True)
class VisionHook:
    """One point inside the vision tower where an in-vision pruner acts, and what it reads there.

    Attributes:
        block: 0-based block of the tower; negative counts from the tower's last block (``-1``: the
            last block, whatever the feature layer). A block past the one whose output the projector
            reads (LLaVA reads ``hidden_states[-2]``, so its last block) is run only for this hook: up
            to the hook's point (``"attention"``: its attention half alone), on the feature block's
            output, and its cost is counted; the pruner may not cut there, only mark tokens with
            :meth:`VisionReduction.mark` (MustDrop's key set from the last block's CLS attention).
        point: ``"attention"`` -- between the block's attention (residual added) and its MLP, as
            ToMe merges; ``"block"`` -- after the whole block (FlowCut).
        keys: the block's attention keys, averaged over heads (``VisionState.keys``).
        attention: rows of the block's head-averaged attention probabilities: ``"none"``,
            ``"prefix"`` (the CLS / register rows only) or ``"all"``.
        values: the block's per-head attention values (``VisionState.values``).
        queries: the block's per-head queries of the prefix rows (``VisionState.queries``).
    """

    block: int
    point: Literal["attention", "block"] = "block"
    keys: bool = False
    attention: Literal["none", "prefix", "all"] = "none"
    values: bool = False
    queries: bool = False


@dataclass
class VisionState:
    """Everything an in-vision pruner sees at one hook, for ``B`` images of one shape.

    Attributes:
        hidden: ``[B, T, D]`` the tower's sequence at the hook (prefix tokens first).
        prefix: how many CLS / register tokens lead it (``0`` for SigLIP); pruners never drop them.
        grid: ``(h, w)`` of the original patch grid (``P = h * w``).
        block: the hook's block; ``point`` its place in the block (see :class:`VisionHook`).
        n_blocks: the blocks the tower runs for the projector's features (through the feature layer).
        target: patch tokens (prefix excluded) that must reach the projector for the pruner's ratio,
            ``keep_count(ratio, P)``, for methods with an exact budget.
        sizes: ``[B, T]`` float, how many original patches each token stands for (``1`` before any
            merge; prefix tokens count 1).
        origin: ``[B, T]`` long, the original patch each token takes its position from (the earliest
            patch it covers; ``-1`` for prefix tokens).
        keys: ``[B, T, d]`` head-averaged keys of the hook's block attention (projection bias included).
        attention: ``[B, R, T]`` head-averaged attention probabilities of the block, ``R = prefix`` or ``T`` rows.
        values: ``[B, H, T, d]`` the block's attention values per head.
        queries: ``[B, H, prefix, d]`` the block's queries of the prefix rows, per head, before scaling.
        sample_ids: one stable id per image.
        memory: per-forward state the pruner carries from hook to hook of the same batch (an EMA of
            scores, a schedule fixed at the first hook); starts empty for every tower run.
        protected: ``[B, T]`` bool, the tokens marked so far with :meth:`VisionReduction.mark`
            (``None``: none yet).
    """

    hidden: torch.Tensor
    prefix: int
    grid: tuple[int, int]
    block: int
    point: str
    n_blocks: int
    target: int
    sizes: torch.Tensor
    origin: torch.Tensor
    keys: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    values: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    sample_ids: Sequence[Hashable] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    protected: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """``T``: the current sequence length, prefix included."""
        return self.hidden.shape[1]


@dataclass
class VisionReduction:
    """How an in-vision pruner shortens the tower's sequence: where each current token goes.

    Attributes:
        slots: ``[B, T]`` long, the new position (``0 .. length - 1``) of each current token, ``-1`` for
            a dropped token. Tokens sharing a slot are merged into their weighted average; a slot with
            one token keeps it as it is. The prefix tokens must keep slots ``0 .. prefix - 1``, and
            every slot below ``length`` must receive a token.
        length: the new sequence length (prefix included), the same for every image of the batch.
        weights: ``[B, T]`` float, each token's weight in its slot's average; ``None`` weighs by
            ``sizes`` (ToMe's size-weighted average).
        reset_sizes: the merged tokens count as size 1 from now on (a port that carries no sizes);
            the patches each token covers are still tracked for positions and pictures.
        scores: optional ``[B, T]`` score the pruner ranked by (for pictures; never used to prune).
        protect: optional ``[B, T]`` bool, current tokens to mark as protected: the mark travels with
            the token (a slot is marked if any token merged into it is) to the projector and into the
            LLM, where the same pruner's in-LLM stages receive it as ``PruningInputs.protected``
            (MustDrop's key set, which its LLM stages always keep). Prefix tokens are never marked.
    """

    slots: torch.Tensor
    length: int
    weights: torch.Tensor | None = None
    reset_sizes: bool = False
    scores: torch.Tensor | None = None
    protect: torch.Tensor | None = None

    @classmethod
    def mark(cls, protect: torch.Tensor, scores: torch.Tensor | None = None) -> "VisionReduction":
        """The reduction that cuts nothing and marks ``protect`` ``[B, T]`` bool (see ``protect``)."""
        b, t = protect.shape
        slots = torch.arange(t, device=protect.device).expand(b, -1).clone()
        return cls(slots=slots, length=t, scores=scores, protect=protect)

    @classmethod
    def keep(cls, indices: torch.Tensor, n_tokens: int, scores: torch.Tensor | None = None) -> "VisionReduction":
        """The reduction keeping tokens ``indices`` ``[B, k]`` (prefix included) of ``n_tokens``, in that
        order, dropping the rest."""
        b, k = indices.shape
        slots = torch.full((b, n_tokens), -1, dtype=torch.long, device=indices.device)
        slots.scatter_(1, indices, torch.arange(k, device=indices.device).expand(b, -1))
        return cls(slots=slots, length=k, scores=scores)
