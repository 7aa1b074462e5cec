"""G-Prune (AAAI'25, arXiv 2501.02268): keep the visual tokens that a similarity graph's information flow
rates highest.

As the official code ``jytmelon/G-Prune@762c637`` (LLaVA-NeXT only): ``LLaVA-NeXT/llava/model/llava_arch.py``
``prepare_inputs_labels_for_multimodal`` L239-290 (the rule) and L406 (``position_ids = keep_indices``), with
``llava/model/language_model/llava_llama.py`` ``forward`` L85-90 (decode positions). Per graph of ``n`` tokens
``x`` (projector outputs, the LLM's input embeddings of the image):

1. ``A = cos(x_i, x_j)`` (``F.normalize`` then ``x x^T``); ``A[A < similarity] = 0``; ``A /= temperature``;
   entries with ``|A| < 1e-6`` (the zeroed ones, and any cosine of exactly 0) set to ``-5000``; row softmax.
   A non-edge gets probability exactly 0; at ``temperature`` 0.03 the diagonal (33.3) dominates each row, so an
   edge of cosine ``c`` carries ``~exp((c - 1) / 0.03)`` (``c = 0.9``: 0.036).
2. ``deg_j = #(A_j > 0)``: the neighbours with cosine ``>= similarity``, self included (``sum(A > 0, dim=1)``).
3. ``A^iterations`` by ``torch.matrix_power``; ``score = (||x||_2 as a row vector) @ A^iterations / deg``:
   token ``j`` scores the norm mass that flows into it in ``iterations`` steps, over its degree.
4. keep the top ``k`` of the graph, **sorted** (raster order), no merging.

| option | official | default | what it does |
| --- | --- | --- | --- |
| ``ratio`` | ``keep_ratio = 0.5`` | ``0.5`` | per graph ``k = int(ratio * n)`` (see ``rounding``) |
| ``rounding`` | ``int(keep_ratio * n)`` | ``"floor"`` | ``"floor"``: ``max(1, int(ratio * n))``; ``"round"`` |
| ``similarity`` | ``0.5`` | ``0.5`` | edge threshold on the cosine, in ``[-1, 1]`` |
| ``temperature`` | ``0.03`` | ``0.03`` | softmax temperature, ``> 0`` |
| ``iterations`` | ``iterate_num = 5`` | ``5`` | the power of ``A``; ``0``: score = norm / degree |
| ``graphs`` | base view + high-res view | ``"auto"`` | which tokens form one graph (below) |
| ``precision`` | the model's dtype (fp16) | ``"model"`` | ``"model"``: in the tokens' dtype; ``"float32"`` |

**Graphs.** The official LLaVA-NeXT code builds two graphs per image: the base view (576 tokens) and the
high-res view (the crops stitched and unpadded, without the row newlines, ``row_num * col_num`` tokens), each
keeping ``int(0.5 n)``; **every newline token is kept**. Those are exactly this framework's two LLaVA-NeXT
views (newlines are structural, never pruned), so ``graphs="auto"`` at the default scope ``frame`` (one graph
per view) is the official rule; LLaVA-1.5 has one view, one graph; LLaVA-OneVision's base + high-res views and
video frames get one graph each. At scope ``clip`` ``"auto"`` makes one graph of all the sample's views: the
UniPruneBench Qwen2.5-VL port's rule (``custom_qwenvl.py``: ``select_important_features`` on every image token
of the prompt concatenated; for one image it is the frame rule). ``graphs="first_rest"`` (scope ``clip``
implied) is the UniPruneBench InternVL3 port's rule (``methods/GPrune_PreLLM.py`` ``gprune_prune_pre_llm``,
``TianfanPeng/VLMUniPruneBench@f93768f``): the sample's first view alone, all the others as one graph -- on
InternVL the first **tile** (the thumbnail comes last), then the other tiles and the thumbnail (and every
further image); one view: one graph. On a one-image LLaVA-NeXT sample it is the official split again.

**Budget.** ``sum_g max(1, int(ratio * n_g))`` over the graphs: Python's float product floored, as the official
``int(keep_ratio * 576)`` (``0.29 * 100`` gives 28; ``0.111 * 576``: 63); ``num_kept(n)`` is the count of one
graph of ``n`` tokens (so ``quantised``). ``rounding="round"``: ``keep_count(ratio, n_g)`` (half up: 29, 64).
Official LLaVA-NeXT has no ``max(1, .)`` (``topk(0)`` keeps nothing of a graph with ``ratio * n < 1``); we keep
one, as UniPruneBench.
``ratio=1`` keeps every token (nothing is computed).

**Positions.** Original position ids (``keep``): the official code returns ``position_ids = keep_indices``
(system prompt, the kept image tokens and newlines, the text, at their unpruned positions) and decodes from
the last of them + 1; the UniPruneBench Qwen port gathers the original M-RoPE positions. (Its InternVL port
concatenates the kept embeddings and lets ``generate`` number them: contiguous, up to a uniform shift as we read
transformers 4.54; pass ``position_policy="compact"`` to reproduce that.)

**Precision.** The official model runs in fp16 (``builder.py`` ``torch_dtype=torch.float16``), and so does the
rule: the softmax probabilities are fp16, whose smallest subnormal is ``2^-24 ~ 6e-8``, so an edge whose
probability ``exp((cos - 1) / 0.03) / Z`` falls below ``3e-8`` underflows to 0 and leaves the degree (in a row
with ``Z ~ 20``, i.e. about 20 near-duplicates, every edge of cosine below 0.57; never in a row with ``Z ~ 1``).
``precision="model"`` reproduces that on fp16 models; ``"float32"`` counts every edge. UniPruneBench's dtype
is VLMEvalKit's, outside the port (bf16 for Qwen2.5-VL / InternVL3 as far as we know, not verified): no
underflow there at these magnitudes, but 8-bit mantissas round cosines near the threshold.

**Deliberate differences.** (1) Batched (official: batch 1, one image; the graphs' sizes come from the
views, not the hard-coded 576 / 46 system tokens). (2) Ties in the score go to the lower index
(``torch.topk``: unspecified). (3) At least one token per graph (above).
"""
from __future__ import annotations

import torch

from ..errors import OptionError
from ..pruner import (
    PruningInputs,
    Reduction,
    TokenPruner,
    keep_count,
    register_pruner,
    topk_indices,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

ROUNDINGS = ("floor", "round")
GRAPHS = ("auto", "first_rest")
PRECISIONS = ("model", "float32")
NON_EDGE = -5000.0  # official: ``A1[abs(A1) < 1e-6] = -5000`` before the softmax


def gprune_graph_scores(tokens: torch.Tensor, similarity: float = 0.5, temperature: float = 0.03,
                        iterations: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """G-Prune's scores of graphs ``tokens`` ``[B, n, D]`` (one graph per batch entry), in the tokens' dtype.

    Returns ``(scores [B, n], degrees [B, n] long)``: ``scores = (||x|| @ A^iterations) / deg``, ``A`` the
    thresholded, tempered, row-softmaxed cosine matrix, ``deg`` the positive entries of each row of ``A``.
    """
    f = torch.nn.functional.normalize(tokens, p=2, dim=-1)
    a = f @ f.transpose(1, 2)  # [B, n, n]
    a = a.masked_fill(a < similarity, 0)
    a = a / temperature
    a = a.masked_fill(a.abs() < 1e-6, NON_EDGE)  # the zeroed entries (and exact-zero cosines): no edge
    a = a.softmax(dim=-1)
    degree = (a > 0).sum(dim=-1)  # [B, n]: edges with a probability that did not underflow, self included
    a = torch.linalg.matrix_power(a, iterations)
    w = tokens.norm(dim=-1).to(a.dtype)[:, None, :]  # [B, 1, n]: the official row vector W
    return (w @ a)[:, 0] / degree, degree


@register_pruner("gprune")
class GPrunePruner(TokenPruner):
    """G-Prune: per graph of similar tokens, the top tokens by norm flow (A^5) over degree; original positions."""

    views = "per_view"  # one graph per view: LLaVA-NeXT's base and high-res views, as the official code
    position_policy = "keep"  # official ``position_ids = keep_indices``: the unpruned positions
    position_policy_mrope = "keep"  # the UniPruneBench Qwen port: ``position_ids[:, :, keep_idx]``

    def __init__(self, ratio: float = 0.5, rounding: str = "floor", similarity: float = 0.5,
                 temperature: float = 0.03, iterations: int = 5, graphs: str = "auto", precision: str = "model"):
        self.ratio = validate_ratio(ratio)
        self.rounding = validate_choice(rounding, "rounding", ROUNDINGS)
        self.similarity = validate_float(similarity, "similarity", -1.0, 1.0)
        self.temperature = validate_float(temperature, "temperature")
        if self.temperature <= 0:
            raise OptionError(f"temperature must be > 0 (it divides the cosines before the softmax), "
                              f"got {temperature!r}")
        self.iterations = validate_int(iterations, "iterations", 0)
        self.graphs = validate_choice(graphs, "graphs", GRAPHS)
        self.precision = validate_choice(precision, "precision", PRECISIONS)

    @property
    def quantised(self) -> bool:  # type: ignore[override]  (a class attribute elsewhere; here it follows rounding)
        """``rounding="floor"``: ``int(ratio * n)`` per graph, not ``keep_count``'s half-up rounding."""
        return self.rounding == "floor"

    @property
    def scope(self) -> str:
        """``frame`` by default (a graph per view); ``clip`` when asked for, or implied by
        ``graphs="first_rest"`` (which groups a sample's views)."""
        given = self.__dict__.get("_scope")
        if self.graphs == "first_rest":
            if given == "frame":
                raise OptionError("gprune graphs='first_rest' splits a sample's views into the first one and the rest, "
                                  "which needs scope='clip' (or no scope), not scope='frame'")
            return "clip"
        return given or "frame"

    def graph_count(self, n: int) -> int:
        """Tokens one graph of ``n`` keeps: ``max(1, int(ratio * n))`` (``floor``) or ``keep_count`` (``round``)."""
        if self.rounding == "round":
            return keep_count(self.ratio, n)
        return max(1, min(n, int(self.ratio * n)))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """The count of one graph of ``n_tokens`` (a view, or a clip at scope ``clip``); with
        ``graphs="first_rest"`` a clip keeps the sum over its two graphs instead."""
        return self.graph_count(n_tokens)

    def graph_sizes(self, inputs: PruningInputs) -> list[int]:
        """The token counts of the graphs ``inputs.tokens`` splits into, in order (host ints, no sync)."""
        n = inputs.num_tokens
        if inputs.view_grids is None or len(inputs.view_grids) < 2 or self.graphs == "auto":
            return [n]  # frame scope (one view), or a clip as one graph
        first = inputs.view_grids[0][0] * inputs.view_grids[0][1]
        return [first, n - first]

    def select(self, inputs: PruningInputs) -> Reduction:
        """Tokens ``[B, N, D]`` -> ``Reduction(indices [B, k], scores [B, N])``: each graph's top
        ``graph_count(n_g)`` by G-Prune's score, in raster order (the graphs' layout is shared by the batch)."""
        b, n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.ratio >= 1.0:  # every graph keeps all its tokens: the unpruned view
            return Reduction(indices=torch.arange(n, device=dev).expand(b, -1))
        tokens = inputs.tokens.float() if self.precision == "float32" else inputs.tokens
        kept, scores, start = [], [], 0
        for size in self.graph_sizes(inputs):  # at most two graphs: a loop over graphs, not tokens
            s, _ = gprune_graph_scores(tokens[:, start:start + size], self.similarity, self.temperature,
                                       self.iterations)
            kept.append(start + topk_indices(s, self.graph_count(size)))
            scores.append(s.float())
            start += size
        return Reduction(indices=torch.cat(kept, dim=1), scores=torch.cat(scores, dim=1))
