"""PruMerge / PruMerge+ (arXiv 2403.15388): CLS-attention outliers kept, the rest merged into them.

As the official code (``42Shawn/LLaVA-PruMerge@097c041``, ``llava/model/multimodal_encoder/clip_encoder.py``:
``outlier_dectection`` L34-47, ``token_prune_merge_advanced`` L85-171 (PruMerge),
``token_prune_merge_advanced_plus`` L174-281 (PruMerge+, what its ``forward`` L300 runs)), before the
projector, on the features it reads (LLaVA: ``hidden_states[-2]`` patches), per view:

1. **Attention**: the last vision layer's ``q_proj`` / ``k_proj`` outputs (bias included, before HF's
   scale; the official forward hooks on layer 23 of 24), **one head over the full width**
   ``C = H * d``: ``attn = softmax(q k^T * C^-0.5)`` over all ``prefix + N`` keys; the score of patch
   ``j`` is the CLS row's ``attn[0, prefix + j]`` (not renormalised over the patches).
2. **Count** (``outlier_dectection``): quartiles ``Q1``, ``Q3`` of the ``N`` scores, linearly
   interpolated as ``np.percentile`` (``torch.quantile``, bit-identical in fp32); outliers are the
   scores ``> Q3 + 1.5 (Q3 - Q1)``; ``ratio = count / N`` and ``k = int(N * ratio)`` in float64, as
   the official code (that is ``count`` for ``N = 576``, one less for some counts at other ``N``,
   e.g. ``N = 729``, count 23 -> 22). The top ``k`` patches, **in descending-attention order**.
3. **PruMerge+ only**: spatial samples ``arange(0, N - 1, int(int(1 / ratio) / 3))`` (official: the
   hard-coded ``575``), those already kept removed, appended in ascending order.
4. **Merge**, for each kept token ``i``: its 32 most similar tokens by cosine of the L2-normalised
   patch keys (prefix excluded), among **every other token, kept or not** (itself excluded; the
   official loop drops ``i``'s own slot), give ``x_i <- x_i + sum_j a_j x_j`` with ``a_j`` the score
   of ``j`` (**not** normalised: the official ``/ torch.sum(weights)`` is commented out).
5. **Extra token** appended: ``sum_{j not kept} a_j x_j``.

The LLM gets ``[kept tokens (attention-descending, then PruMerge+'s samples ascending); extra]`` in
that order (kept here: the official order). Returned as ``Reduction.feature_weights`` over
``[prefix features; patch features]`` (prefix columns zero: PruMerge drops CLS), so every token is
``projector(weights @ features)``: the merge happens in the projector's input space, as official.

======================  =========================  ============  =================================================
option                  official                   default       meaning here
======================  =========================  ============  =================================================
``ratio``               (none, adaptive)           ``0.5``       ``budget="adaptive"``: validated and **ignored**
                                                                 (the count is the view's outlier count);
                                                                 ``"fixed"``: ``keep_count(ratio, N)`` tokens
``budget``              ``if_adaptive=True``       adaptive      ``"adaptive"`` (official) or ``"fixed"`` (below)
``score``               CLS row (CLIP)             ``"auto"``    ``"cls"``, ``"column_mean"`` (EffiVLM's substitute
                                                                 on towers without CLS), ``"auto"``: ``"cls"`` when
                                                                 the tower has a prefix token, else column mean
``vision_layer``        ``layers[23]`` of 24       ``-1``        the layer whose q / k score and merge (the last)
======================  =========================  ============  =================================================

**Fixed budget** (``budget="fixed"``; not in the official repository: the EffiVLM-Bench port
``EffiVLM-Bench@ab3ee18`` ``kv_cache_compression/siglip_model.py`` L617-731, used by VTC-Bench):
the LLM gets exactly ``keep_count(ratio, N)`` tokens, the extra token included, so ``B =
keep_count(ratio, N) - 1`` are selected (EffiVLM selects ``max(int(b N), 1)`` and appends the extra
one: its budget ``b`` is our ``ratio = (int(b N) + 1) / N``). PruMerge+: the IQR top
``max(int(N * ratio_iqr), 1)`` capped at ``B`` (``B`` or fewer outliers: the top ``B``), filled with
``arange(0, N, max(1, int(N / B)))`` minus those chosen, truncated (EffiVLM's random fill when short
is unreachable: that arange holds at least ``B`` tokens). PruMerge: the top ``B`` by score (the
official ``if_adaptive=False`` branch of ``token_prune_merge_advanced``, ``k = int(N * ratio)``).
Then not ``adaptive``, ``uses_ratio``. ``B = 0`` (``keep_count = 1``) leaves the extra token alone.

**Column mean** (``score="column_mean"``, the default where ``vision_prefix == 0``: SigLIP, the
EffiVLM LLaVA-OneVision port): a **substitute** for CLS attention, ``softmax(q k^T * C^-0.5)`` over
all ``T`` rows, averaged over every query row (prefix rows included where forced on a CLS tower; fp32),
its patch columns. It needs every query row (``PruningInputs.vision_queries`` of ``T`` rows); the
CLS path reads the first row only, so it asks for the cheap ``"prefix"`` attention rows.

Guards where the official code crashes (documented rules, not the official behaviour):

* PruMerge+ with no outliers (``ratio = 0``: ``int(1 / 0)`` raises ``ZeroDivisionError``): the limit
  of the rule as the step grows, ``arange(0, N - 1, inf) = [0]``: token 0 is the only sample.
* PruMerge+ with ``int(step / 3) == 0`` (over a third of the scores outliers): step 1. Not reached
  in practice: the fence lets at most a quarter through (``step >= 4``).
* Fewer than 33 tokens (official ``topk(k=32)`` fails): ``min(32, N - 1)`` neighbours (EffiVLM's guard).
* Every token kept (the complement empty; the official extra token is then a zero vector): no extra
  token, so a view never gets more than ``N`` tokens.

Deliberate differences: attention, quartiles and merge weights in fp32 (official: the tower's dtype,
fp16; EffiVLM: fp32 attention); ties of the attention ranking go to the lower index (``torch.topk``'s
order on ties is unspecified); the 32 neighbours are found for all kept tokens at once (a matmul and
a ``topk``, not the official loop; exact cosine ties at the 32nd place may pick another of the tied
tokens); the count is per view (official: quartiles over the flattened batch, i.e. a count shared by
a batch, which only ever ran with one image; its list input skips pruning). Positions: the official
LLaVA code renumbers them (``compact``); under ``keep`` a kept token takes its patch's position and
the extra token that of the dropped patch with the highest score (its largest term). Towers whose
tokens merge patches (``patch_merge > 1``) score and merge with the adapter's per-token averaged keys.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    keep_count,
    register_pruner,
    validate_choice,
    validate_int,
    validate_ratio,
)

BUDGETS = ("adaptive", "fixed")
SCORES = ("auto", "cls", "column_mean")
NEIGHBOURS = 32  # official: topk(cos_sim_matrix, k=int(32))


def prumerge_scores(queries: torch.Tensor, keys: torch.Tensor, prefix: int, score: str) -> torch.Tensor:
    """PruMerge's per-patch scores from one layer's raw projections, single-head over the full width.

    Args:
        queries: ``[B, R, C]`` query projections (heads concatenated): ``R >= 1`` rows starting with
            the CLS row for ``"cls"``; all ``T`` rows for ``"column_mean"``.
        keys: ``[B, T, C]`` key projections, ``T = prefix + N``.
        prefix: leading non-patch tokens (CLS, registers).
        score: ``"cls"`` -- the CLS row of ``softmax(q k^T * C^-0.5)`` at the patch columns (official);
            ``"column_mean"`` -- that map averaged over all ``T`` query rows (EffiVLM's SigLIP substitute).

    Returns:
        ``[B, N]`` fp32 scores.
    """
    c = keys.shape[-1]
    q, k = queries.float(), keys.float()
    if score == "cls":
        attn = torch.softmax((q[:, :1] @ k.transpose(1, 2)) * c ** -0.5, dim=-1)  # [B, 1, T]: the CLS row only
        return attn[:, 0, prefix:]
    attn = torch.softmax((q @ k.transpose(1, 2)) * c ** -0.5, dim=-1)  # [B, T, T]
    return attn.mean(dim=1)[:, prefix:]


def outlier_count(scores: torch.Tensor) -> int:
    """``outlier_dectection``'s numerator: how many of ``scores`` ``[N]`` lie above ``Q3 + 1.5 IQR``.

    Quartiles linearly interpolated in fp32 (``np.percentile``'s default; bit-identical), the bound in fp32.
    """
    x = scores.float().flatten()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], device=x.device)).unbind()
    upper = q3 + 1.5 * (q3 - q1)
    return int((x > upper).sum())  # a host sync: the output length depends on it


def official_k(n: int, count: int) -> int:
    """``int(N * ratio)`` with ``ratio = count / N`` in float64, as the official code: ``count`` for
    ``N = 576``, but one less for some counts at other ``N`` (``N = 729``: counts 1, 2, 4, 8, 16, 23, ...)."""
    return int(n * (count / n))


def select_order(scores: torch.Tensor, plus: bool, budget: int | None) -> torch.Tensor:
    """The kept patches of one view, in the official output order.

    Args:
        scores: ``[N]`` fp32 scores.
        plus: PruMerge+ (spatial samples / EffiVLM's fill) or PruMerge.
        budget: ``None`` for the official adaptive count; else the ``B`` patches to select (fixed budget).

    Returns:
        ``[k]`` long: the top patches by descending score, then (PruMerge+) the samples, ascending.
    """
    n, dev = scores.shape[0], scores.device
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: the lower index
    count = outlier_count(scores)
    ratio = count / n
    if budget is None:
        idx = order[:official_k(n, count)]
        if not plus:
            return idx
        if count == 0:  # official: int(1 / 0) raises; the limit of arange(0, N - 1, step) as step grows
            samples = torch.zeros(1, dtype=torch.long, device=dev)
        else:
            step = max(1, int(int(1 / ratio) / 3))  # official int(step_length / 3); 0 (an official crash) is a guard
            samples = torch.arange(0, n - 1, step, device=dev)  # official: arange(0, 575, ...), N - 1 = 575
    else:
        if not plus:  # official if_adaptive=False: the top k by score
            return order[:budget]
        iqr = max(official_k(n, count), 1)  # EffiVLM: iqr_token = max(int(N * reduction_ratio), 1)
        if budget <= iqr:
            return order[:budget]
        idx = order[:iqr]
        samples = torch.arange(0, n, max(1, int(n / budget)), device=dev)  # EffiVLM: step max(1, int(N / B))
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    taken[idx] = True
    samples = samples[~taken[samples]]  # official: [x for x in arithmetic_sequence if x not in idx]
    if budget is not None:
        samples = samples[: budget - idx.shape[0]]
    return torch.cat([idx, samples])


def merge_weights(keys: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor,
                  neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge's merge of one view as weights over its ``N`` patches.

    Args:
        keys: ``[N, C]`` patch keys (prefix excluded).
        scores: ``[N]`` fp32 scores ``a``.
        idx: ``[k]`` kept patches, in output order.
        neighbours: how many most similar tokens each kept token absorbs (official 32; at most ``N - 1``).

    Returns:
        ``([k (+ 1), N] fp32 weights, [k (+ 1)] positions)``: row ``i`` is ``onehot(idx_i) + a``
        restricted to the ``neighbours`` other tokens whose normalised keys are closest to ``idx_i``'s;
        the last row (the extra token, when any patch was dropped) is ``a`` on the dropped patches,
        positioned at the dropped patch of highest score.
    """
    n, k, dev = keys.shape[0], idx.shape[0], keys.device
    rows = torch.arange(k, device=dev)
    weights = torch.zeros(k, n, device=dev)
    m = min(neighbours, n - 1)  # official topk(32) needs 33 tokens; EffiVLM: max(min(32, rest), 1)
    if k and m > 0:
        kn = F.normalize(keys.float(), p=2, dim=-1)
        sim = kn[idx] @ kn.T  # [k, N] cosine of every kept token with every token
        sim[rows, idx] = float("-inf")  # itself excluded (the official loop leaves out its own slot)
        near = sim.topk(m, dim=-1).indices  # [k, m]
        weights.scatter_(1, near, scores[near])  # unnormalised: official "#/ torch.sum(weights)"
    weights[rows, idx] += 1.0  # x_i itself
    positions = idx
    if k < n:  # the extra token sum_{j not kept} a_j x_j (idx is unique; an empty sum is left out)
        dropped = torch.ones(n, dtype=torch.bool, device=dev)
        dropped[idx] = False
        weights = torch.cat([weights, (scores * dropped)[None]])
        positions = torch.cat([idx, scores.masked_fill(~dropped, float("-inf")).argmax()[None]])
    return weights, positions


class _PruMergeBase(TokenPruner):
    """Shared PruMerge / PruMerge+ machinery; :attr:`plus` picks the variant."""

    plus: ClassVar[bool] = False
    scopes = ("frame",)  # one view's own attention and keys
    position_policy = "compact"
    position_policy_mrope = "keep"

    def __init__(self, ratio: float = 0.5, budget: str = "adaptive", score: str = "auto", vision_layer: int = -1):
        self.ratio = validate_ratio(ratio)  # budget="adaptive": accepted for the common interface, ignored
        self.budget = validate_choice(budget, "budget", BUDGETS)
        self.score = validate_choice(score, "score", SCORES)
        self.vision_layer = validate_int(vision_layer, "vision_layer")

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        """``True`` with the official adaptive count (each view is pruned in a call of its own)."""
        return self.budget == "adaptive"

    @property
    def quantised(self) -> bool:  # type: ignore[override]
        """The adaptive count is not ``keep_count(ratio, N)``; the fixed budget is exactly that."""
        return self.budget == "adaptive"

    @property
    def uses_ratio(self) -> bool:
        """``False`` for the adaptive count (a view's outliers, whatever the ratio); ``True`` for ``budget="fixed"``."""
        return self.budget == "fixed"

    @property
    def needs(self) -> PrunerNeeds:
        # The CLS path reads one query row: the cheap "prefix" rows. The column mean needs every row.
        rows = "all" if self.score == "column_mean" else "prefix"
        return PrunerNeeds(vision_attention_layer=self.vision_layer, vision_attention_rows=rows,
                           vision_features=True, vision_qk=True)

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """Fixed budget: ``keep_count(ratio, N)`` (the extra token included). Adaptive: at most ``N``
        (the count is the view's, known only from its attention: ``Reduction.num_kept``)."""
        return keep_count(self.ratio, n_tokens) if self.budget == "fixed" else n_tokens

    def resolved_score(self, prefix: int) -> str:
        """``"cls"`` or ``"column_mean"`` for a tower with ``prefix`` leading non-patch tokens."""
        if self.score == "auto":
            return "cls" if prefix >= 1 else "column_mean"
        if self.score == "cls" and prefix < 1:
            raise OptionError("score='cls' needs a vision tower with a CLS token, and this one has none; "
                              "use score='column_mean' (EffiVLM's substitute) or 'auto'")
        return self.score

    def select(self, inputs: PruningInputs) -> Reduction:
        """PruMerge(+) of every view of ``inputs`` (adaptive: views that keep different counts need a call each).

        Reads ``vision_queries`` ``[B, R, C]`` (the CLS row first; every row for the column mean),
        ``vision_keys_full`` ``[B, prefix + N, C]`` and ``vision_features`` ``[B, N, Dv]``. Returns ``K``
        tokens as ``feature_weights`` ``[B, K, prefix' + N]`` (``prefix'``: the prefix features the
        projector can take, their columns zero), ``indices`` the slots ``0..K-1``, ``positions`` ``[B, K]``
        the patch each token stands for (kept patch; the extra token: the dropped patch of highest score)
        and ``scores`` ``[B, N]`` (CLS attention or its column-mean substitute).
        """
        name = type(self).name
        if inputs.vision_keys_full is None or inputs.vision_queries is None:
            raise ValueError(f"{name} needs the vision layer's query/key projections (needs.vision_qk); "
                             "the adapter did not provide them")
        if inputs.vision_features is None:
            raise ValueError(f"{name} needs vision_features (what the projector reads); the adapter gave none")
        b, n = inputs.tokens.shape[:2]
        prefix = inputs.vision_prefix
        keys = inputs.vision_keys_full
        if keys.shape[1] != prefix + n:
            raise ValueError(f"vision_keys_full covers {keys.shape[1]} tokens, expected prefix {prefix} + {n}")
        score = self.resolved_score(prefix)
        if score == "column_mean" and inputs.vision_queries.shape[1] != keys.shape[1]:
            raise ValueError(f"{name} score='column_mean' needs every query row of the vision layer "
                             f"({keys.shape[1]}), the adapter gave {inputs.vision_queries.shape[1]}")
        scores = prumerge_scores(inputs.vision_queries, keys, prefix, score)  # [B, N] fp32
        budget = keep_count(self.ratio, n) - 1 if self.budget == "fixed" else None
        dev = inputs.tokens.device
        pf = 0 if inputs.vision_prefix_features is None else inputs.vision_prefix_features.shape[1]
        rows_w, rows_p = [], []
        for i in range(b):  # per view: the count is each view's own
            idx = select_order(scores[i], self.plus, budget)
            w, p = merge_weights(keys[i, prefix:], scores[i], idx)
            rows_w.append(w)
            rows_p.append(p)
        counts = [w.shape[0] for w in rows_w]
        if len(set(counts)) > 1:
            raise OptionError(f"{name} keeps an adaptive count per view, and views pruned in one call got "
                              f"different counts {counts}: prune one view per call")
        weights = torch.stack(rows_w)  # [B, K, N]
        k = counts[0]
        feature_weights = torch.cat([weights.new_zeros(b, k, pf), weights], dim=2)  # prefix (CLS) columns unused
        return Reduction(indices=torch.arange(k, device=dev).expand(b, -1), feature_weights=feature_weights,
                         positions=torch.stack(rows_p), scores=scores)


@register_pruner("prumerge")
class PruMergePruner(_PruMergeBase):
    """PruMerge: CLS-attention outliers (IQR, adaptive count) absorb their 32 key-nearest tokens; one more for the rest.

    The official ``token_prune_merge_advanced``; see the module docstring.
    """

    plus = False


@register_pruner("prumerge_plus")
class PruMergePlusPruner(_PruMergeBase):
    """PruMerge+: PruMerge's outliers plus uniform spatial samples at three times their rate, merged alike.

    The official ``token_prune_merge_advanced_plus`` (the repository's default); see the module docstring.
    """

    plus = True
