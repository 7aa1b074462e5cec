"""HoliTom (NeurIPS'25, arXiv 2505.21334): holistic token merging -- static windows found by dynamic programming,
static tokens averaged and density-merged, dynamic tokens kept by vision attention before the LLM; inside it, at
layer K, the tokens the last query attends to least merged into their most similar kept token.

As the official code ``cokeshao/HoliTom@e9b2972``:

* **Before the LLM** (``holitom/llava_arch.py``, ``LlavaMetaForCausalLM_holitom``: ``prepare_inputs_labels_for_
  multimodal``, ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``,
  ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``merge_tokens_by_clustering``,
  ``cluster_dpc_knn``), on a clip of ``T`` frames of ``n`` tokens (after the projector and the 2-D pool) and each
  token's vision attention received (the tower's last layer, mean over heads and query rows,
  ``siglip_encoder.py``; pooled as the tokens):

  1. ``sim[t, i] = cos(x[t, i], x[t + 1, i])`` (L2-normalised first). ``count[s, e]`` = the positions whose
     ``sim > tau`` on every pair of frames ``s .. e`` times ``e - s`` (the tokens a static window saves).
     Dynamic programming over frame partitions (``dp[i] = max(dp[i - 1], dp[j] + count[j + 1, i])``, windows of
     2 .. ``max_window`` frames; a strictly larger value wins, so ties keep the shorter / single frame) picks the
     windows saving the most tokens.
  2. The retain ratio is raised by what the static merge saves: ``r' = min(r / ((T n - saved) / (T n)), 1)``.
  3. Per window of ``w > 1`` frames: a position is *static* if ``sim > tau`` on all its ``w - 1`` pairs; the
     static tokens are averaged over the window's frames and **density-merged** into ``round(n_s r')`` tokens;
     per frame the ``n_d`` *dynamic* tokens keep ``ceil(n_d r')``: ``round(ceil(n_d r') (1 - d))`` by
     attention (``topk``) and the rest density-merged from the others (``d = 0``, the default: attention only).
     A one-frame window is all dynamic.
  4. Density merge: DPC-kNN centres (``dist = cdist / sqrt(D)``, ``density = exp(-mean of the k smallest
     dist^2)``, ``k = min(K, centres)``, ``score = density x distance to the nearest denser token``, the top
     scores), sorted; every other token joins its nearest centre; a centre with members becomes
     ``beta centre + (1 - beta) mean(members)``, one without stays.

* **Inside the LLM** (``holitom/modeling_qwen2.py``, ``Qwen2Model_holitom.forward``): at decoder layer ``K``
  (official ``HOLITOM_k=18`` of Qwen2-7B's 28), layer ``K - 1``'s attention of the last query (head mean) over
  the video keeps the top ``round(N (1 - r))`` (``HOLITOM_r=0.5``); every other video token, in sequence
  order, is averaged into its most cosine-similar kept token, ``h[t] = (h[t] + h[i]) / 2`` (sequentially: the
  last member weighs 1/2, the one before 1/4, ..., the kept token itself ``2^-m``; similarities on the hidden
  states before any merge); the merged tokens stay in place (``Reduction.merge_into``), keeping their positions
  (``position_ids = keep_indexs``); the rest leave the sequence. Layers ``0 .. K - 1`` cache everything.

Options (``holitom:ratio=0.15``, ``holitom:tau=0.65``, ...):

================  =========================================  =====================================================
option            official (env vars; ``scripts/*.sh``)       here
================  =========================================  =====================================================
``ratio``         --                                         ``retain`` unless it is given; ``1.0`` (with no
                                                             ``retain``) switches every stage off: the unpruned
                                                             model (the official ``RETAIN_RATIO=1`` still averages
                                                             static windows: ``holitom:retain=1``)
``retain``        ``RETAIN_RATIO`` 0.1 (scripts 0.10-0.20)    ``r`` above
``tau``           ``T`` 0.8 (scripts 0.65 / 0.80)             static threshold on adjacent-frame cosine
``beta``          ``BETA`` 0.6                               centre weight of a density merge
``d``             ``D`` 0                                    share of a frame's budget density-merged
``k``             ``K`` 7                                    DPC-kNN neighbours (``min(k, centres)``)
``max_window``    ``MAX_WINDOW_SIZE`` 1024                   longest static window
``llm_layer``     ``HOLITOM_k`` 18 of 28                     ``K``; default: ``round(18 L / 28)`` half up on a
                                                             decoder of ``L`` layers, in ``1 .. L - 1``
``llm_ratio``     ``HOLITOM_r`` 0.5                          share of the video merged away at ``K``; ``0``: no
                                                             in-LLM stage (the paper's "HoliTom (w/o M)")
``vision_layer``  the tower's last layer (``attentions[-1]``)  vision layer whose received attention ranks the
                                                             dynamic tokens; ``-1``: the layer OneVision's
                                                             projector reads (LLaVA-NeXT-Video reads ``-2``:
                                                             pass ``vision_layer=-2`` there)
================  =========================================  =====================================================

**Budget.** Before the LLM about ``r`` of the clip's tokens (``r'`` of what the static windows leave); from layer
``K`` on ``round(N (1 - llm_ratio))`` of those. The count is the data's (``adaptive``: one clip per call, runs
report the per-layer counts; a sweep places it at its measured FLOPs).

**Positions.** Each pre-LLM token stands for (``indices``) its representative -- a kept token itself, a dynamic
cluster its DPC centre, a static cluster its centre's position in the window's first frame -- and sits at that
token's place; the official builds per window ``[static tokens, frame 1's dynamic tokens (attention-kept in
order, then merged), frame 2's ...]`` and numbers them contiguously (LLaVA's 1-D positions): ``compact`` before
the LLM, ``keep`` at the in-LLM stage (``llm_position_policy``; the official keeps ``keep_indexs`` there),
``keep`` throughout on M-RoPE models. ``token_weights`` give every output token as weights over the clip.

**Where it runs.** Video clips (scope ``"clip"``, the only one; a Qwen "frame" is a temporal patch), every video
family (the official is LLaVA-OneVision / LLaVA-Video); an image sample is refused in one line. The vision
attention and the pooling follow :mod:`tokenprune.methods.fastvid` (its ``_clip``: the attention each token
receives in the tower's last layer, pooled as the tokens where the adapter pools frames).

**Deliberate differences.** (1) DPC-kNN's ``rand * 1e-6`` density noise is a deterministic tie-break (the lower
index counts as denser; :func:`tokenprune.methods.prunevid.dpc_knn`); ``topk`` ties go to the lower index.
(2) Order of the pre-LLM tokens as above (the framework places a merged token at its representative's slot).
(3) Scores, similarities and merges in float32 (official: the model dtype, the in-LLM average rounded at every
step). (4) The in-LLM stage ranks and merges the visual tokens; the official's span of ``image_tokens`` also
holds OneVision's one newline token after the video. (5) ``ratio = 1`` is the unpruned model (above).
(6) In-LLM ties of the similarity go to the kept token with more attention (the official ``max`` over its
``topk`` order; the same). (7) At least one video token is kept at layer ``K`` (the official ``topk(0)`` of a
one-token video leaves nothing to merge into and fails).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
from .fastvid import FastVIDPruner, descending
from .prunevid import dpc_knn

OFFICIAL_DEPTH = 28  # LLaVA-OneVision-7B's decoder (Qwen2-7B)
OFFICIAL_LAYER = 18  # HOLITOM_k of scripts/eval_ov-7b_holitom.sh


def scaled_layer(n_layers: int) -> int:
    """``K`` on a decoder of ``n_layers``: ``round(18 n_layers / 28)`` half up, in ``1 .. n_layers - 1`` (0: 18)."""
    if n_layers <= 0:
        return OFFICIAL_LAYER
    return max(1, min(math.floor(OFFICIAL_LAYER * n_layers / OFFICIAL_DEPTH + 0.5), n_layers - 1))


def static_windows(sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """Official ``select_static_windows``: ``sim`` ``[T - 1, n]`` adjacent-frame cosines -> the windows
    ``[(start, end), ...]`` (inclusive, covering ``0 .. T - 1``) and the tokens they save."""
    t = sim.shape[0] + 1
    above = (sim > tau).int()
    count = torch.zeros(t, t, dtype=torch.float64)
    for start in range(t - 1):  # frames, not tokens: positions static on every pair start .. e - 1
        count[start, start + 1:] = torch.cumprod(above[start:], dim=0).sum(-1).double().cpu()
    count = count * (torch.arange(t)[None] - torch.arange(t)[:, None]).clamp(min=0)
    saved = count.tolist()
    dp = [0.0] * t
    prev = [0] * t
    for i in range(t):
        best, best_j = (dp[i - 1] if i > 0 else 0.0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0.0) + saved[j + 1][i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], t - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def density_merge(x: torch.Tensor, count: int, beta: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``cluster_dpc_knn`` + ``merge_tokens_by_clustering`` on one group ``x`` ``[m, D]``: ``(centres
    [count] ascending, weights [count, m])`` -- each output ``beta x[c] + (1 - beta) mean(x[members])`` (``x[c]``
    without members); every non-centre token joins its nearest centre (ties: the lower one)."""
    m = x.shape[0]
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0, m)
    _, centres = dpc_knn(x, count, min(k, count))
    centres = centres.sort().values
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / (x.shape[1] ** 0.5)
    others = torch.ones(m, dtype=torch.bool, device=x.device)
    others[centres] = False
    label = dist[others][:, centres].argmin(dim=-1)  # [m - count]
    members = torch.zeros(count, m, device=x.device)
    members[label, others.nonzero().flatten()] = 1.0
    size = members.sum(-1, keepdim=True)
    weights = torch.where(size > 0, (1 - beta) * members / size.clamp_min(1), members)
    own = torch.where(size[:, 0] > 0, torch.full_like(size[:, 0], beta), torch.ones_like(size[:, 0]))
    weights[torch.arange(count, device=x.device), centres] = own
    return centres, weights


def frame_tokens(x: torch.Tensor, attn: torch.Tensor, retain: float, d: float, beta: float, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``merge_tokens_by_attention_density`` on one frame's dynamic tokens ``x`` ``[m, D]`` with attention
    ``attn`` ``[m]``: ``(representatives [c], weights [c, m])`` -- the top ``round(ceil(m r) (1 - d))`` by
    attention (in order), then the density-merged rest (centre order)."""
    m = x.shape[0]
    budget = math.ceil(m * retain)
    dominant = round(budget * (1 - d))
    contextual = budget - dominant
    top = descending(attn)[:dominant].sort().values
    weights = torch.zeros(dominant, m, device=x.device)
    weights[torch.arange(dominant, device=x.device), top] = 1.0
    if contextual <= 0:
        return top, weights
    rest = torch.ones(m, dtype=torch.bool, device=x.device)
    rest[top] = False
    rest = rest.nonzero().flatten()
    centres, w = density_merge(x[rest], contextual, beta, k)
    full = torch.zeros(contextual, m, device=x.device)
    full[:, rest] = w
    return torch.cat([top, rest[centres]]), torch.cat([weights, full])


def holitom_clip(x: torch.Tensor, attn: torch.Tensor, retain: float, tau: float, beta: float, d: float, k: int,
                 max_window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's pre-LLM stage on one clip ``x`` ``[T, n, D]`` with attention ``attn`` ``[T, n]``: ``(indices [K]
    ascending clip indices of the representatives, tokens [K, D] float32, weights [K, T n])``."""
    t, n, dim = x.shape
    dev = x.device
    flat = x.reshape(t * n, dim).float()
    unit = F.normalize(x.float(), p=2, dim=-1)
    sim = F.cosine_similarity(unit[:-1], unit[1:], dim=-1)  # [T - 1, n]
    windows, saved = static_windows(sim, tau, max_window)
    total = t * n
    r = min(retain / ((total - saved) / total), 1)
    reps, rows = [], []
    for start, end in windows:
        w = end - start + 1
        static = (torch.all(sim[start:end] > tau, dim=0) if w > 1
                  else torch.zeros(n, dtype=torch.bool, device=dev))
        pos_s, pos_d = static.nonzero().flatten(), (~static).nonzero().flatten()
        if w > 1:  # static positions averaged over the window, then density-merged
            centres, cw = density_merge(x[start:end + 1, pos_s].float().mean(0), round(len(pos_s) * r), beta, k)
            full = torch.zeros(len(centres), t, n, device=dev)
            full[:, start:end + 1, pos_s] = cw[:, None, :] / w
            reps.append(start * n + pos_s[centres])
            rows.append(full.flatten(1))
        for f in range(start, end + 1):
            idx, fw = frame_tokens(x[f, pos_d].float(), attn[f, pos_d].float(), r, d, beta, k)
            full = torch.zeros(len(idx), t, n, device=dev)
            full[:, f, pos_d] = fw
            reps.append(f * n + pos_d[idx])
            rows.append(full.flatten(1))
    idx = torch.cat(reps)
    weights = torch.cat(rows)
    order = idx.argsort()
    weights = weights[order]
    return idx[order], weights @ flat, weights


def llm_merge(x: torch.Tensor, attn: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's in-LLM stage on one sample: ``x`` ``[N, D]`` hidden states, ``attn`` ``[N]`` the last query's
    attention. Returns ``(kept [keep] ascending, into [N] slot into kept or -1, weights [N])``: the top ``keep`` by
    attention; every other token, in order, averaged into its most similar kept token (sequential halving)."""
    n = x.shape[0]
    dev = x.device
    top = descending(attn.float())[:keep]  # the official topk order (ties of the similarity: the first of it)
    kept = top.sort().values
    others = torch.ones(n, dtype=torch.bool, device=dev)
    others[top] = False
    other = others.nonzero().flatten()  # ascending: the official loop's order
    xf = x.float()
    a, b = xf[other], xf[top]
    sim = (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1)[None])
    target = top[sim.argmax(dim=-1)]  # [n_other] token index of each one's kept token
    slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    slot_of[kept] = torch.arange(keep, device=dev)
    into = torch.full((n,), -1, dtype=torch.long, device=dev)
    weights = torch.zeros(n, device=dev)
    if other.numel():
        # members of one kept token, in order: the last weighs 1/2, each earlier one half the next; the kept token
        # itself 2^-m. later[j] = members of the same target after member j.
        same = target[:, None] == target[None, :]
        later = (same & (other[None, :] > other[:, None])).sum(-1)
        into[other] = slot_of[target]
        weights[other] = torch.pow(2.0, -(later + 1).float())
        m = torch.zeros(n, device=dev).index_add_(0, target, torch.ones_like(target, dtype=torch.float32))
        hit = m > 0
        into[hit] = slot_of[hit]
        weights[hit] = torch.pow(2.0, -m[hit])
    return kept, into, weights


@register_pruner("holitom")
class HoliTomPruner(TokenPruner):
    """HoliTom: DP static windows averaged and density-merged, dynamic tokens by vision attention; at LLM layer K the least-attended video tokens merged into their most similar kept ones."""

    stage = Stage.PRE_LLM
    extra_stages = (Stage.IN_LLM,)
    quantised = True  # the counts are the data's
    adaptive = True  # one clip per call; num_kept is a bound
    views = "global"
    scopes = ("clip",)  # windows span frames
    clip_inputs = True
    position_policy = "compact"  # LLaVA's contiguous positions over the merged sequence
    position_policy_mrope = "keep"
    llm_position_policy = "keep"  # the official keeps keep_indexs at layer K

    def __init__(self, ratio: float = 0.1, retain: float | None = None, tau: float = 0.8, beta: float = 0.6,
                 d: float = 0.0, k: int = 7, max_window: int = 1024, llm_layer: int | None = None,
                 llm_ratio: float = 0.5, vision_layer: int = -1):
        self.ratio = validate_ratio(ratio)
        self.retain = None if retain is None else validate_ratio(retain, "retain")
        self.tau = validate_float(tau, "tau", -1.0, 1.0)
        self.beta = validate_float(beta, "beta", 0.0, 1.0)
        self.d = validate_float(d, "d", 0.0, 1.0)
        self.k = validate_int(k, "k", minimum=1)
        self.max_window = validate_int(max_window, "max_window", minimum=1)
        self.llm_layer = None if llm_layer is None else validate_int(llm_layer, "llm_layer", minimum=1)
        self.llm_ratio = validate_float(llm_ratio, "llm_ratio", 0.0, 1.0)
        self.vision_layer = validate_int(vision_layer, "vision_layer")
        self._scores = FastVIDPruner(vision_layer=self.vision_layer)  # its _clip: tokens, attention received, features

    @property
    def keep_share(self) -> float:
        """HoliTom's ``RETAIN_RATIO``: ``retain`` if given, else ``ratio``."""
        return self.ratio if self.retain is None else self.retain

    @property
    def off(self) -> bool:
        """``ratio = 1`` with no ``retain``: every stage keeps everything (the unpruned model)."""
        return self.ratio >= 1.0 and self.retain is None

    @property
    def uses_ratio(self) -> bool:
        return self.retain is None

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        if self.off or self.llm_ratio <= 0:
            return ()
        layer = self.llm_layer if self.llm_layer is not None else scaled_layer(n_layers)
        return (LLMStage(layer=layer, attention="previous", queries="last"),)

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(vision_attention_layer=self.vision_layer, llm_stages=self.llm_schedule(0))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """An upper bound: the counts are the data's (see the module docstring)."""
        return n_tokens

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        return [n_tokens]

    def select(self, inputs: PruningInputs) -> Reduction:
        """Before the LLM (``inputs.layer == 0``): windows, static and dynamic merges; inside it: the layer-K merge."""
        if inputs.layer >= 1:
            return self._in_llm(inputs)
        return self._pre_llm(inputs)

    def _pre_llm(self, inputs: PruningInputs) -> Reduction:
        b, big_n, _ = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.off:
            return Reduction(indices=torch.arange(big_n, device=dev).expand(b, -1))
        if inputs.token_views is not None:
            if inputs.view_times is not None and bool(torch.isnan(inputs.view_times).any()):
                raise OptionError("holitom merges a video's frames and this sample has image views (no frame times): "
                                  "run it on video samples, or use an image method for images")
            if inputs.view_grids is not None and len(set(inputs.view_grids)) > 1:
                raise OptionError(f"holitom needs frames of one grid, got {sorted(set(inputs.view_grids))}")
        x, sal, _ = self._scores._clip(inputs)  # [B, T, n, D], [B, T, n]
        rows = [holitom_clip(x[i], sal[i], self.keep_share, self.tau, self.beta, self.d, self.k, self.max_window)
                for i in range(b)]
        if len({r[0].shape[0] for r in rows}) > 1:
            raise OptionError(f"holitom kept {sorted({r[0].shape[0] for r in rows})} tokens in the clips of one batch "
                              "(its count follows each clip) and a batch's reduction needs one count: run these clips "
                              "one at a time")
        return Reduction(indices=torch.stack([r[0] for r in rows]).to(dev),
                         tokens=torch.stack([r[1] for r in rows]).to(dev, inputs.tokens.dtype),
                         token_weights=torch.stack([r[2] for r in rows]).to(dev),
                         scores=sal.flatten(1).to(dev))

    def _in_llm(self, inputs: PruningInputs) -> Reduction:
        attn = inputs.llm_attention
        if attn is None:
            raise ValueError("holitom needs llm_attention at its in-LLM layer; the adapter did not provide it")
        n = inputs.num_tokens
        keep = max(1, round(n * (1 - self.llm_ratio)))  # Python's round, as the official (at least one: see (7))
        outs = [llm_merge(inputs.tokens[i], attn[i, -1], keep) for i in range(inputs.batch_size)]
        return Reduction(indices=torch.stack([o[0] for o in outs]), merge_into=torch.stack([o[1] for o in outs]),
                         merge_into_weights=torch.stack([o[2] for o in outs]), scores=attn[:, -1].float())
