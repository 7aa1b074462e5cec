"""PyramidDrop (CVPR'25, arXiv 2410.17247): drop image tokens in stages inside the LLM.

As the official code (``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``,
``pdrop_rank_drop``): after layer ``l`` of ``layers`` (1-indexed, so before 0-based layer ``l``), the
hidden states go through layer ``l``'s input norm and q/k projections with rotary at the current
positions; the attention of the last instruction token (the last prompt token) to the image tokens,
softmax in fp32 and averaged over heads, ranks them; the top ``int(N * lam ** s)`` of the original
``N`` survive stage ``s`` (1, 2, 3), in original order. Positions are renumbered contiguously after
each stage (the official convention); decoding shifts them to match.

Budget: ``ratio`` is the layer-averaged share of visual tokens (the papers' "equivalent tokens",
192 of 576 = 1/3): ``lam`` is solved so that the mean over decoder layers of the visual-token count
is ``ratio * N``, keeping the official ``lam, lam^2, lam^3`` structure (the authors' answer in the
repository's issues). ``lam=0.5`` sets the official schedule directly and then ``ratio`` is ignored.
Unlike the official code, GQA keys are repeated to their query heads (``repeat_kv``).
"""
from __future__ import annotations

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
    validate_layers,
    validate_ratio,
)


def layer_average(n_tokens: int, n_layers: int, layers: tuple[int, ...], counts: list[float]) -> float:
    """Mean over ``n_layers`` decoder layers of the visual tokens each sees: ``n_tokens`` before
    ``layers[0]``, ``counts[s]`` from ``layers[s]`` on."""
    bounds = list(layers) + [n_layers]
    total = layers[0] * n_tokens + sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(counts))
    return total / n_layers


@register_pruner("pdrop")
class PyramidDropPruner(TokenPruner):
    """PyramidDrop: stages after layers 8/16/24 keep lam, lam^2, lam^3 of the image tokens, ranked by the last instruction token's attention."""

    stage = Stage.IN_LLM
    quantised = True
    position_policy = "compact"

    def __init__(self, ratio: float = 0.5, layers: tuple[int, ...] | str = (8, 16, 24), lam: float | None = None):
        self.ratio = validate_ratio(ratio)
        self.layers = validate_layers(layers, "layers", minimum=1)
        self.lam = None if lam is None else validate_ratio(lam, "lam")

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(llm_stages=tuple(LLMStage(layer=layer, attention="input", queries="last") for layer in self.layers))

    def _depth(self, n_layers: int) -> int:
        # Outside a model (contract tests) assume the official LLaVA-1.5 depth.
        return n_layers or 32

    def min_ratio(self, n_tokens: int, n_layers: int) -> float:
        if self.lam is not None:
            return 0.0
        return layer_average(n_tokens, self._depth(n_layers), self.layers, [1.0] * len(self.layers)) / n_tokens

    def solve_lam(self, n_tokens: int, n_layers: int) -> float:
        """The ``lam`` whose schedule averages ``ratio * n_tokens`` visual tokens over the layers."""
        if self.lam is not None:
            return self.lam
        if self.ratio >= 1.0:
            return 1.0
        n_layers = self._depth(n_layers)
        smallest = self.min_ratio(n_tokens, n_layers)
        if self.ratio < smallest:
            first = self.layers[0]
            raise OptionError(
                f"pdrop: ratio {self.ratio:g} cannot be reached with layers={','.join(map(str, self.layers))} on this "
                f"{n_layers}-layer decoder: layers 0-{first - 1} always see all {n_tokens} visual tokens, so the smallest "
                f"reachable ratio is {smallest:.3f}; use a larger ratio or earlier stages, e.g. pdrop:layers=2,8,16")
        target = self.ratio * n_tokens
        lo, hi = 0.0, 1.0
        for _ in range(60):  # bisection: the layer average grows with lam
            mid = (lo + hi) / 2
            avg = layer_average(n_tokens, n_layers, self.layers, [n_tokens * mid ** (s + 1) for s in range(len(self.layers))])
            lo, hi = (mid, hi) if avg < target else (lo, mid)
        return (lo + hi) / 2

    def stage_counts(self, n_tokens: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage: ``int(N * lam ** s)`` (at least 1), as the official code."""
        lam = self.solve_lam(n_tokens, n_layers)
        return [max(1, min(n_tokens, int(n_tokens * lam ** (s + 1) + 1e-9))) for s in range(len(self.layers))]

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        return self.stage_counts(n_tokens, 0)[0]

    def select(self, inputs: PruningInputs) -> Reduction:
        attn = inputs.llm_attention  # [B, 1, N]: the last prompt token's row
        if attn is None:
            raise ValueError("pdrop needs llm_attention; the adapter did not provide it")
        k = self.stage_counts(inputs.num_original, inputs.num_layers)[inputs.stage]
        return Reduction(indices=topk_indices(attn[:, -1].float(), min(k, inputs.num_tokens)), scores=attn[:, -1])
