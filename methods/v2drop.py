"""V2Drop (CVPR'26, arXiv 2509.01552): drop the visual tokens the decoder changes least, in stages.

As the official code ``xuyang-liu16/V2Drop@219e03e``: LLaVA ``llava/model/language_model/V2Drop.py``
(``V2DropLlamaModel.forward`` L121-174) and Qwen2-VL ``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py``
(``DART.forward`` L336-384). Before each stage layer ``l``:

* **variation**: ``||h_in(l) - h_in(l-1)||_2`` per visual token, its hidden state entering layer ``l``
  minus the one that entered layer ``l - 1`` (after any cut there), i.e. the update layer ``l - 1`` wrote
  into it (official: ``torch.norm(current - prev, p=2, dim=-1)``, ``prev_hidden_states`` saved at every
  layer's input); no attention maps, so every layer keeps its fast kernel;
* **kept**: the ``max(1, int(n * r_s))`` tokens with the **largest** variation, ``n`` the visual tokens
  entering the stage and ``r_s`` its share; in raster order at their **original positions** (the
  official code index-selects hidden states, position ids and mask).

Official schedules (``schedule="official"``):

| ``base`` | file, model (depth) | layers | shares ``r_s`` | 576 tokens -> | layer average |
| --- | --- | --- | --- | --- | --- |
| ``"llava"`` | ``V2Drop.py``, LLaVA-1.5-7B (32) | 3, 17, 22 | 0.5, 0.5, 0 | 288, 144, 1 | 202.8 |
| ``"qwen2vl"`` | ``modeling_qwen2_vl_self.py``, Qwen2-VL-7B (28) | 3, 16, 22 | 0.25, 0.05, 0 | 144, 7, 1 | 130.3 |

The last stage keeps one visual token (``max(1, int(n * 0))``): V2Drop withdraws the image from layer 22
on. On a decoder of another depth ``L`` the base's layers are scaled to it, ``round(l * L / L_base)``
(half up), kept in ``1..L-1`` and strictly increasing (28 layers from ``"llava"``: 3, 15, 19; 4 layers:
1, 2, 3); ``layers=`` sets them directly (:meth:`V2DropPruner.llm_schedule`).

Options:

| option | official default | what it does |
| --- | --- | --- |
| ``ratio`` (0.5) | -- | with ``schedule="ratio"``: the layer-averaged share of visual tokens kept (below) |
| ``base`` (``"llava"``) | the file's | ``"llava"`` or ``"qwen2vl"``: whose layers, depth and shares |
| ``schedule`` (``"ratio"``) | ``"official"`` | ``"ratio"``: shares solved from ``ratio``; ``"official"``: the file's constants (``ratio`` unused, ``uses_ratio`` false); ``"paper"``: the paper's LLaVA-1.5 settings for 192 / 128 / 64 of 576 |
| ``layers`` (``None``) | the base's | the three stage layers, 0-based (the layer that first sees the cut); ``None``: the base's, scaled to the depth |
| ``precision`` (``"model"``) | ``"model"`` | ``"model"``: difference and norm in the hidden states' dtype, as the official ``torch.norm`` on fp16 / bf16 states (rounded norms can tie); ``"float32"``: both in float32 |

**Budget** (``schedule="ratio"``): ``ratio`` is the **layer-averaged** share, as for ``pdrop`` and
``sparsevlm``: the mean over the ``L`` layers of the visual tokens each sees, over ``N``. The base's shares
are bent by one exponent, ``r_s = r_s_official ** g`` (``g = 1``: the official shares; ``"llava"``'s 0.5,
0.5 become ``lam, lam``; ``"qwen2vl"``'s 0.25, 0.05 become ``lam, lam ** 2.16``), ``lam = r_1`` solved by
bisection so that the continuous average ``(l_1 N + sum_s (l_{s+1} - l_s) c_s) / L``, ``c_s = max(1,
c_{s-1} r_s)``, ``c_0 = N``, ``l_4 = L``, equals ``ratio * N``; the counts are then the official ``max(1,
int(n * r_s))``, at most a token below per stage. A 0 share still keeps one token, so a ratio outside
``[(l_1 N + L - l_1) / (L N), (l_3 N + L - l_3) / (L N)]`` (32 layers, 576 tokens: [0.095, 0.688]) is
refused in one line; ``ratio=1`` keeps every token at every stage. ``schedule="paper"``: the paper's
implementation details (quoted in the repository's issue #6) prune 50/70/100 %, 72/75/100 % and
95/95/100 % of the tokens entering layers 3/17/22 for 192, 128 and 64 tokens, shares of the tokens
entering each stage (counts 288/86/1, 161/40/1, 28/1/1: layer averages 193.8, 131.0, 66.7).

**Deliberate differences.** (1) Batched (official: batch 1, the norms' ``[0]``). (2) The visual tokens
are found, not hard-coded (LLaVA: 35 system tokens and 576 image tokens, so LLaVA-NeXT's high-res tokens
are never candidates there; Qwen2-VL: ``DART_config`` start and length from the evaluation wrapper).
(3) Ties in the variation go to the lower index (official ``torch.topk``: unspecified). (4) On Qwen3-VL
the hidden states entering a layer carry the DeepStack features added after the layer before, so a stage
right after a DeepStack layer (0-2) ranks by that layer's update plus those features: the official rule
on the states the layers receive.
"""
from __future__ import annotations

import functools
import math

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
    topk_indices,
    validate_choice,
    validate_layers,
    validate_ratio,
)
from .pdrop import layer_average

# base -> (official depth, official layers, official shares of the tokens entering each stage)
OFFICIAL = {
    "llava": (32, (3, 17, 22), (0.5, 0.5, 0.0)),  # V2Drop.py L129-144
    "qwen2vl": (28, (3, 16, 22), (0.25, 0.05, 0.0)),  # modeling_qwen2_vl_self.py L347-364
}
# The paper's LLaVA-1.5 settings: tokens of 576 (layer-averaged) -> shares kept at layers 3, 17, 22.
PAPER = {192: (0.5, 0.3, 0.0), 128: (0.28, 0.25, 0.0), 64: (0.05, 0.05, 0.0)}
BASES = tuple(OFFICIAL)
SCHEDULES = ("ratio", "official", "paper")
PRECISIONS = ("model", "float32")


def scale_layers(layers: tuple[int, ...], depth: int, n_layers: int) -> tuple[int, ...]:
    """``layers`` of a ``depth``-layer decoder moved to one of ``n_layers``: ``round(l * n_layers / depth)``
    (half up), then clamped into ``1..n_layers - 1`` and made strictly increasing (each at least one past
    the one before, each leaving room for the ones after)."""
    if n_layers == depth:
        return layers
    if n_layers < len(layers) + 1:
        raise OptionError(f"v2drop: a {n_layers}-layer decoder has no room for {len(layers)} stages "
                          f"(layers 1..{n_layers - 1}); it needs at least {len(layers) + 1} layers")
    out = [min(max(1, math.floor(layer * n_layers / depth + 0.5)), n_layers - 1) for layer in layers]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(len(out) - 1, -1, -1):
        out[i] = min(out[i], n_layers - len(out) + i)
    return tuple(out)


def _continuous_counts(n_tokens: int, shares: tuple[float, ...]) -> list[float]:
    """Visual tokens after each stage, unrounded: ``c_s = max(1, c_{s-1} * share_s)`` from ``c = N``."""
    counts, c = [], float(n_tokens)
    for share in shares:
        c = max(1.0, c * share)
        counts.append(c)
    return counts


@functools.lru_cache(maxsize=1024)
def solve_lam(ratio: float, n_tokens: int, n_layers: int, layers: tuple[int, ...], official: tuple[float, ...]) -> float:
    """The first-stage share ``lam`` whose bent shares ``official ** (log lam / log official[0])`` average
    ``ratio * n_tokens`` visual tokens over the ``n_layers`` layers (60 bisection steps; the average
    grows with ``lam``). The caller has checked that the ratio is reachable."""
    target = ratio * n_tokens
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        avg = layer_average(n_tokens, n_layers, layers, _continuous_counts(n_tokens, bent_shares(mid, official)))
        lo, hi = (mid, hi) if avg < target else (lo, mid)
    return (lo + hi) / 2


def bent_shares(lam: float, official: tuple[float, ...]) -> tuple[float, ...]:
    """``official ** g`` with ``g`` such that the first share is ``lam`` (a 0 share stays 0; ``lam = 1``: all 1)."""
    if lam >= 1.0:
        return tuple(1.0 if r > 0 else 0.0 for r in official)
    if lam <= 0.0:
        return tuple(0.0 for _ in official)
    g = math.log(lam) / math.log(official[0])
    return tuple(r ** g if r > 0 else 0.0 for r in official)


@register_pruner("v2drop")
class V2DropPruner(TokenPruner):
    """V2Drop: before layers 3/17/22, keeps the visual tokens whose hidden states the previous layer changed most."""

    stage = Stage.IN_LLM
    quantised = True
    position_policy = "keep"

    def __init__(self, ratio: float = 0.5, base: str = "llava", schedule: str = "ratio",
                 layers: tuple[int, ...] | str | None = None, precision: str = "model"):
        self.ratio = validate_ratio(ratio)
        self.base = validate_choice(base, "base", BASES)
        self.schedule = validate_choice(schedule, "schedule", SCHEDULES)
        self.layers = None if layers is None else validate_layers(layers, "layers", minimum=1)
        n_stages = len(OFFICIAL[self.base][1])
        if self.layers is not None and len(self.layers) != n_stages:
            raise OptionError(f"v2drop: layers must name {n_stages} stages (the official schedule's), e.g. 3,17,22; "
                              f"got {self.layers!r}")
        self.precision = validate_choice(precision, "precision", PRECISIONS)
        if self.schedule == "paper":
            if self.base != "llava":
                raise OptionError("v2drop: schedule='paper' is the paper's LLaVA-1.5 table; use base='llava' "
                                  "(or schedule='official' / 'ratio' with base='qwen2vl')")
            if self._paper_row() is None:
                raise OptionError(f"v2drop: schedule='paper' has settings for ratio 192/576, 128/576 or 64/576 only; "
                                  f"got {self.ratio:g} (use schedule='ratio' for any ratio)")

    # -- schedule ---------------------------------------------------------------------------------
    def _paper_row(self) -> tuple[float, ...] | None:
        return PAPER.get(math.floor(self.ratio * 576 + 0.5))

    def _depth(self, n_layers: int) -> int:
        """The decoder's depth; unknown (0, outside a model): the base's official depth (or past the last layer)."""
        if n_layers:
            return n_layers
        return max(OFFICIAL[self.base][0], (self.layers or (0,))[-1] + 1)

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """The 0-based stage layers on a decoder of ``n_layers`` (0: the base's official depth)."""
        if self.layers is not None:
            return self.layers
        depth, layers, _ = OFFICIAL[self.base]
        return scale_layers(layers, depth, self._depth(n_layers))

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        return tuple(LLMStage(layer=layer, previous_hidden=True) for layer in self.layers_for(n_layers))

    @property
    def needs(self) -> PrunerNeeds:
        """The schedule at the base's official depth; the decoder asks :meth:`llm_schedule` with its own."""
        return PrunerNeeds(llm_stages=self.llm_schedule(0))

    @property
    def uses_ratio(self) -> bool:
        """``schedule="official"`` ignores ``ratio``."""
        return self.schedule != "official"

    def _bounds(self, n_tokens: int, n_layers: int) -> tuple[float, float]:
        """The smallest and largest layer-averaged ratio below 1 that ``schedule="ratio"`` reaches."""
        depth, layers, official = self._depth(n_layers), self.layers_for(n_layers), OFFICIAL[self.base][2]
        low = layer_average(n_tokens, depth, layers, _continuous_counts(n_tokens, bent_shares(0.0, official)))
        high = layer_average(n_tokens, depth, layers, _continuous_counts(n_tokens, bent_shares(1.0, official)))
        return low / n_tokens, high / n_tokens

    def min_ratio(self, n_tokens: int, n_layers: int) -> float:
        if self.schedule != "ratio" or n_tokens <= 1:
            return 0.0
        return self._bounds(n_tokens, n_layers)[0]

    def stage_shares(self, n_tokens: int, n_layers: int) -> tuple[float, ...]:
        """Share of the visual tokens entering each stage that it keeps (``k = max(1, int(n * share))``),
        for ``n_tokens`` original visual tokens on a decoder of ``n_layers`` (0: the base's depth)."""
        official = OFFICIAL[self.base][2]
        if self.schedule == "official":
            return official
        if self.schedule == "paper":
            return self._paper_row()
        if self.ratio >= 1.0 or n_tokens <= 1:
            return tuple(1.0 for _ in official)  # nothing pruned, the final withdrawal included
        low, high = self._bounds(n_tokens, n_layers)
        layers, depth = self.layers_for(n_layers), self._depth(n_layers)
        where = f"layers={','.join(map(str, layers))} on this {depth}-layer decoder"
        if self.ratio < low:
            raise OptionError(
                f"v2drop: ratio {self.ratio:g} cannot be reached with {where}: layers 0-{layers[0] - 1} always see all "
                f"{n_tokens} visual tokens, so the smallest reachable ratio is {low:.3f}; use a larger ratio or earlier "
                f"stages, e.g. v2drop:layers=2,8,16")
        if self.ratio > high:
            raise OptionError(
                f"v2drop: ratio {self.ratio:g} cannot be reached with {where}: from layer {layers[-1]} on one visual "
                f"token is left (the official last stage), so the largest reachable ratio below 1 is {high:.3f}; use a "
                f"smaller ratio, ratio 1 (no pruning) or a later last stage (layers=)")
        return bent_shares(solve_lam(self.ratio, n_tokens, depth, layers, official), official)

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        """Visual tokens kept after each stage, the official ``max(1, int(n * share))`` chained."""
        counts, n = [], n_tokens
        for share in self.stage_shares(n_tokens, n_layers):
            n = max(1, min(n, int(n * share)))
            counts.append(n)
        return counts

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        return self.stage_counts(n_tokens, 0)[0]

    # -- selection --------------------------------------------------------------------------------
    def select(self, inputs: PruningInputs) -> Reduction:
        """Keep the ``max(1, int(n * share))`` visual tokens of largest variation ``||tokens - previous_tokens||_2``.

        ``inputs.tokens`` ``[B, n, D]`` entered layer ``inputs.layer``; ``inputs.previous_tokens`` ``[B, n, D]``
        entered layer ``inputs.layer - 1``. Returns the kept indices ``[B, k]`` (ascending) and the variation
        ``[B, n]`` as scores.
        """
        prev = inputs.previous_tokens
        if prev is None:
            raise ValueError("v2drop needs previous_tokens (the hidden states entering layer l - 1, asked with "
                             "LLMStage(previous_hidden=True)); the adapter did not provide them")
        cur = inputs.tokens
        if self.precision == "float32":
            diff = cur.float() - prev.float()
        else:  # official: the subtraction and the norm in the model's dtype
            diff = cur - prev.to(cur.dtype)
        variation = torch.linalg.vector_norm(diff, ord=2, dim=-1)  # [B, n]
        n = inputs.num_tokens
        share = self.stage_shares(inputs.num_original, inputs.num_layers)[inputs.stage]
        k = max(1, min(n, int(n * share)))
        return Reduction(indices=topk_indices(variation.float(), k), scores=variation)
