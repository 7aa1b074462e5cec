"""FastVID (NeurIPS'25, arXiv 2503.11187): dynamic temporal segments, salient tokens, density-merged anchors.

As the official code ``LunarShen/FastVID@a40a109``, at the LLM input, on a whole video clip:

* **DySeg** (both ports): ``g_t`` = each frame's global feature, L2-normalised; ``s_t = cos(g_t, g_{t+1})``;
  a segment ends after frame ``t`` for the ``c - 1`` lowest ``s_t`` and for every ``s_t < tau``.
* **STPrune / DTM, variant ``onevision``** (default; the paper's parallel design,
  ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``, ``Qwen2Model.forward``,
  the "FastVID" block): every frame of ``n`` tokens keeps ``R = int(n * r)``: ``S = R - int(R * d)``
  *salient* tokens (top vision attention) and ``F = R - S`` context tokens. The non-salient tokens of a
  frame get a density-peak score (``dist`` = ``cdist / sqrt(D)``, ``density = exp(-mean of the 4 smallest
  dist^2)``, ``score = density x distance to the nearest denser token``, the densest token: the frame's
  largest distance). Anchor frames: every ``p``-th frame of a segment counted from its last one, each
  holding ``(F * L) // ceil(L / p)`` anchors (``L`` the segment's length), the others none. A
  single-frame segment's frame takes its ``F`` top-score tokens as anchors and merges its own
  non-salient tokens into them; an anchor frame of a longer segment takes its top-score tokens and
  merges the non-salient tokens of *every* frame of the segment into them (each anchor frame on its own,
  so a token can feed one anchor per anchor frame). Merge: each member joins its most cosine-similar
  anchor; ``anchor' = w * anchor + (1 - w) * mean(members)``, ``w = max(1 / (n + 1), beta)``, ``n`` = its
  members (the anchor itself is one: it is a non-salient token of the segment).
* **variant ``qwen2_5_vl``** (``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``,
  ``Qwen2_5_VLForConditionalGeneration.forward``, a frame = a temporal patch): budgets per segment,
  ``R * L`` tokens, ``max(int(R * L * d), 1)`` of them context. In a segment of several frames, frames
  whose ``s_t >= ignore`` with the next are dropped whole (only the last frame of each run of
  near-duplicates, a *valid* frame, keeps tokens); the salient budget is split evenly over valid
  frames (remainder to the earlier ones), the context budget over every ``p``-th valid frame from the
  last (remainder to the last), each capped at ``n // 2``. A frame's context tokens are its top-score
  non-salient tokens; the segment's other tokens (everything not salient and not this frame's anchors,
  dropped frames included) merge into them as above, with ``n`` not counting the anchor.

Scores: the official OneVision code takes the global feature and the saliency from SigLIP's attention
pooling head (pooled output; its probe query's attention over the patches, bilinearly pooled as the
tokens are); Hugging Face OneVision checkpoints have no pooling head. So, as the official Qwen2.5-VL
port does: global feature = the mean of the frame's tokens (``PruningInputs.view_features``);
saliency = the attention each token *receives* in vision layer ``vision_layer`` (default -1, the last:
the one the OneVision head reads, the block the Qwen port scores), head-averaged, averaged over the
frame's patch query rows and over each token's ``patch_merge`` patches -- the column mean of the view's
map (the official scores are a single global query's attention over the keys: the probe, or the Qwen
port's mean query against each 2x2 group's mean key). Where frames are pooled after the tower
(OneVision, NeXT-Video) and the adapter gives ``PruningInputs.vision_received`` (``[B, N]``, the clip's
frames concatenated), that is used instead: the raw patches' received attention over every raw query,
pooled as the tokens are -- as the official pools the probe's attention (``get_attn_2dPool``).

Budget (``ratio`` is FastVID's retention ratio ``r``, the share of each frame's tokens the rule keeps):

| tokenprune | FastVID | per frame of ``n`` tokens | clip |
| --- | --- | --- | --- |
| ``ratio`` | ``r`` (``fastvid_retention_ratio``) | ``R = max(1, int(n * r))`` | ``<= T * R`` (below) |
| ``c``, ``tau`` | ``fastvid_DySeg_c``, ``fastvid_DySeg_tau`` | | segments |
| ``d`` | ``fastvid_STPrune_d`` | ``S = R - int(R * d)`` salient | |
| ``p``, ``beta`` | ``fastvid_DTM_p``, ``fastvid_DTM_beta`` | anchor frame spacing, merge weight floor | |
| ``ignore`` | ``fastvid_DySeg_ignore`` (``qwen2_5_vl`` only) | | |

A clip of ``T`` frames keeps at most ``T * R``: ``onevision`` keeps ``T * S`` salient tokens plus, per
segment, ``F`` anchors (one frame) or ``ceil(L/p) * min((F*L) // ceil(L/p), n - S)`` (``L`` frames);
``qwen2_5_vl`` keeps ``R * L`` per segment less the caps, and nothing of near-duplicate frames. The
count depends on the clip's segments (``adaptive``: each clip goes through :meth:`FastVIDPruner.select`
on its own and reports what it kept): :meth:`num_kept` gives one frame's ``R``, the bound ``int(N * r)``
for a clip of ``N`` tokens.
Official defaults: OneVision ``r 0.10, c 8, tau 0.9, d 0.4, p 4, beta 0.6`` (the defaults here);
Qwen2.5-VL ``variant=qwen2_5_vl, ratio=0.27, tau=0.84, ignore=0.95``.
Positions: every kept or merged token takes its own (salient) or its anchor's original position.

Deliberate differences: (1) the official adds ``uniform(0, 1e-6)`` noise to the densities to break
ties; here a tie goes to the lower index (deterministic, batch == alone); top-k ties go to the lower
index too. (2) Fewer than ``c`` frames: every boundary is a cut (``min(c - 1, T - 1)`` lowest; the
official ``topk`` raises). (3) ``R >= 1`` (the official keeps no token of a frame when ``n * r < 1``).
(4) Anchor counts are capped at the frame's non-salient tokens and the density neighbours at their
number (the official ``topk`` raises beyond them, e.g. ``r`` near 1). (5) ``ratio=1`` returns the clip
unpruned (the official rule at ``r = 1`` still merges ``d`` of each frame: its no-op is ``r = 1, d = 0``
in the ``onevision`` variant). (6) Scores and merges in float32. (7) Called directly on a batch, the clips
must keep one count (a :class:`Reduction` is ``[B, k]``), else an :class:`OptionError` (the adapters
call an ``adaptive`` pruner one clip at a time). Defined on video clips only (scope ``clip``);
a sample with an image view is refused in one line; inputs without views (a bare
:class:`PruningInputs`) are one frame.
"""
from __future__ import annotations


import torch

from ..errors import OptionError
from ..pruner import (
    PrunerNeeds,
    PruningInputs,
    Reduction,
    TokenPruner,
    register_pruner,
    validate_choice,
    validate_float,
    validate_int,
    validate_ratio,
)

VARIANTS = ("onevision", "qwen2_5_vl")


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` ``[..., M]`` high to low; ties to the lower index (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def segment_sizes(features: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: ``features`` ``[T, D]`` (one global feature per frame) -> segment lengths summing to ``T``.

    A segment ends after frame ``t`` where ``cos(f_t, f_{t+1})`` is among the ``c - 1`` lowest (ties: the
    earlier boundary) or below ``tau``.
    """
    t = features.shape[0]
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True)
    sim = (f[:-1] * f[1:]).sum(-1)  # [T - 1]
    lowest = torch.sort(sim, stable=True).indices[: min(c - 1, t - 1)]
    cuts = sorted(set(lowest.tolist()) | set((sim < tau).nonzero().flatten().tolist()))
    bounds = [-1] + cuts + [t - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def density_scores(x: torch.Tensor) -> torch.Tensor:
    """Density-peak scores of each frame's tokens: ``x`` ``[F, M, D]`` -> ``[F, M]`` (float32).

    ``dist = cdist / sqrt(D)``; ``density = exp(-mean of the min(4, M) smallest dist^2)`` (self included);
    ``score = density * dist to the nearest denser token`` (the densest: the frame's largest dist).
    Equal densities: the lower index counts as denser (the official breaks ties with 1e-6 noise).
    """
    m, d = x.shape[1], x.shape[2]
    xf = x.float()
    dist = torch.cdist(xf, xf) / (d ** 0.5)  # [F, M, M]
    nearest = torch.topk(dist, k=min(4, m), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # [F, M]
    idx = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None]))  # [F, i, j]: j denser than i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    to_denser = torch.where(denser, dist, dist_max).min(dim=-1).values
    return to_denser * density


def merge(x: torch.Tensor, anchors: torch.Tensor, members: torch.Tensor, beta: float,
          unit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DTM: each member joins its most cosine-similar anchor (ties: the earlier anchor in ``anchors``);
    ``anchor' = w * anchor + (1 - w) * mean(members)``, ``w = max(1 / (n + 1), beta)``.

    Args:
        x: ``[N, D]`` float32, the clip's tokens.
        anchors: ``[K]`` indices into ``N``, in assignment priority order.
        members: ``[Mm]`` indices into ``N`` (may include the anchors themselves).
        beta: the floor of the anchor's weight.
        unit: ``x`` L2-normalised, if already computed.

    Returns:
        ``([K, D] merged tokens, [K, N] weights with tokens == weights @ x)``.
    """
    k, n = anchors.shape[0], x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True) if unit is None else unit
    assign = (unit[members] @ unit[anchors].T).argmax(dim=1)  # [Mm]
    counts = torch.bincount(assign, minlength=k).float()
    w = (1.0 / (counts + 1.0)).clamp(min=beta)[:, None]  # [K, 1]
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, assign, x[members])
    mean = sums / counts.clamp(min=1)[:, None]
    tokens = w * x[anchors] + (1 - w) * mean
    weights = torch.zeros(k, n, device=x.device)
    weights.index_put_((assign, members), ((1 - w[:, 0]) / counts.clamp(min=1))[assign], accumulate=True)
    weights[torch.arange(k, device=x.device), anchors] += w[:, 0]
    return tokens, weights


def anchor_counts(sizes: list[int], context: int, p: int) -> list[int]:
    """``onevision``: anchors per frame: in a segment of ``L`` frames, frames ``L-1, L-1-p, ...`` (from its
    start) hold ``(context * L) // ceil(L / p)`` each, the others none."""
    out: list[int] = []
    for length in sizes:
        anchor_frames = (length + p - 1) // p
        share = (context * length) // anchor_frames
        out += [share if (length - 1 - i) % p == 0 else 0 for i in range(length)]
    return out


def even_split(total: int, parts: int) -> list[int]:
    """``total`` over ``parts``: equal shares, the remainder one each to the first ones (official chunking)."""
    chunk, rem = divmod(total, parts)
    return [chunk + (1 if i < rem else 0) for i in range(parts)]


def qwen_frame_budgets(unit: torch.Tensor, retain: int, n: int, d: float, p: int, ignore: float
                       ) -> tuple[list[int], list[int]]:
    """``qwen2_5_vl``: (salient, context) counts of each frame of one segment; ``unit`` ``[L, D]`` its frames'
    normalised global features, ``retain`` = R per frame, ``n`` tokens per frame."""
    length = unit.shape[0]
    seg_context = max(int(retain * length * d), 1)
    seg_salient = retain * length - seg_context
    if length == 1:
        return [seg_salient], [seg_context]
    sim = (unit[:-1] * unit[1:]).sum(-1)
    cuts = (sim < ignore).nonzero().flatten().tolist()
    bounds = [-1] + cuts + [length - 1]
    runs = [b - a for a, b in zip(bounds, bounds[1:])]  # runs of near-duplicate frames; only the last of each counts
    valid = len(runs)
    frame_salient = even_split(seg_salient, valid)
    shares = even_split(seg_context, (valid + p - 1) // p)
    frame_context = [min(shares[i // p], n // 2) if i % p == 0 else 0 for i in range(valid)][::-1]
    salient: list[int] = []
    context: list[int] = []
    for run, sal, ctx in zip(runs, frame_salient, frame_context):
        salient += [0] * (run - 1)
        context += [0] * (run - 1)
        ctx = min(ctx, n // 2)
        context.append(ctx)
        salient.append(min(sal, n - ctx))
    return salient, context


@register_pruner("fastvid")
class FastVIDPruner(TokenPruner):
    """FastVID: temporal segments; per frame, salient tokens by vision attention plus merged density anchors."""

    quantised = True  # int(n * r) per frame, not keep_count
    adaptive = True  # the clip's count follows its segments: one clip per call, num_kept a bound
    views = "global"
    scopes = ("clip",)  # segments and anchors span frames
    clip_inputs = True
    position_policy = "keep"

    def __init__(self, ratio: float = 0.10, c: int = 8, tau: float = 0.9, d: float = 0.4, p: int = 4,
                 beta: float = 0.6, variant: str = "onevision", ignore: float = 0.95, vision_layer: int = -1):
        self.ratio = validate_ratio(ratio)
        self.c = validate_int(c, "c", minimum=1)
        self.tau = validate_float(tau, "tau", -1.0, 1.0)
        self.d = validate_float(d, "d", 0.0, 1.0)
        self.p = validate_int(p, "p", minimum=1)
        self.beta = validate_float(beta, "beta", 0.0, 1.0)
        self.variant = validate_choice(variant, "variant", VARIANTS)
        self.ignore = validate_float(ignore, "ignore", -1.0, 1.0)
        self.vision_layer = validate_int(vision_layer, "vision_layer")

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(vision_attention_layer=self.vision_layer)

    def retain(self, n: int) -> int:
        """``R``: tokens one frame of ``n`` keeps, ``max(1, int(n * r))`` (the official ``int``)."""
        return max(1, int(n * self.ratio))

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        """``max(1, int(n_tokens * r))``: one frame's count ``R``; for a clip of ``N`` tokens the most it keeps
        (``T * int(n * r) <= int(N * r)``; its count follows its segments, see :meth:`select`)."""
        return n_tokens if self.ratio >= 1.0 else self.retain(n_tokens)

    def saliency(self, attention: torch.Tensor, prefix: int, merge: int, n: int) -> torch.Tensor:
        """``[..., n]``: the attention each token receives, from ``attention`` ``[..., T, T]`` (``T = prefix + n *
        merge``): the column mean over the patch query rows, averaged over each token's ``merge`` patches."""
        column = attention[..., prefix:, prefix:].float().mean(dim=-2)
        if column.shape[-1] != n * merge:
            raise ValueError(f"vision attention covers {column.shape[-1]} patches, expected {n} tokens x "
                             f"patch_merge {merge}")
        return column.unflatten(-1, (n, merge)).mean(dim=-1)

    def _clip(self, inputs: PruningInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``([B, T, n, D] tokens, [B, T, n] saliency, [B, T, D] global features)`` of the inputs' clips."""
        if inputs.token_views is None:  # a bare PruningInputs: one view is one frame
            if inputs.vision_attention is None:
                raise ValueError("fastvid needs vision attention; the adapter did not provide it")
            x = inputs.tokens[:, None]
            attention = inputs.vision_attention[:, None]
            feats = inputs.tokens.mean(1, keepdim=True)
        else:
            if inputs.view_times is not None and bool(torch.isnan(inputs.view_times).any()):
                raise OptionError("fastvid segments a video's frames and this sample has image views (no frame "
                                  "times): run it on video samples, or use an image method for images")
            try:
                x = inputs.clip_tokens()
            except ValueError as exc:
                raise OptionError(f"fastvid needs frames of one grid: {exc}") from None
            if inputs.view_attention is None:
                raise ValueError("fastvid needs view_attention (each frame's vision attention); the adapter did "
                                 "not provide it")
            attention = inputs.view_attention
            feats = inputs.view_features if inputs.view_features is not None else x.mean(2)
        if inputs.vision_received is not None:  # frames pooled after the tower: every raw query counted once
            sal = inputs.vision_received.float().view(x.shape[:3])
        else:
            sal = self.saliency(attention, inputs.vision_prefix, inputs.patch_merge, x.shape[2])
        return x, sal, feats

    def select(self, inputs: PruningInputs) -> Reduction:
        b, big_n, dim = inputs.tokens.shape
        dev = inputs.tokens.device
        if self.ratio >= 1.0:  # the unpruned clip (the official r = 1 would still merge d of each frame)
            return Reduction(indices=torch.arange(big_n, device=dev).expand(b, -1))
        x, sal, feats = self._clip(inputs)
        rule = self._onevision if self.variant == "onevision" else self._qwen
        rows = [rule(x[i].float(), sal[i], feats[i]) for i in range(b)]
        counts = {len(r[0]) for r in rows}
        if len(counts) > 1:
            raise OptionError(f"fastvid kept {sorted(counts)} tokens in the clips of one batch (its count follows each "
                              "clip's segments) and a batch's reduction needs one count: run these clips one at a time")
        indices = torch.stack([r[0] for r in rows]).to(dev)
        tokens = torch.stack([r[1] for r in rows]).to(dev, inputs.tokens.dtype)
        weights = torch.stack([r[2] for r in rows]).to(dev)
        return Reduction(indices=indices, tokens=tokens, token_weights=weights, scores=sal.flatten(1).to(dev))

    @staticmethod
    def _assemble(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sorted kept indices [k], their tokens [k, D], weights [k, N])`` from the parts' own triples."""
        idx = torch.cat([p[0] for p in parts])
        order = idx.argsort()
        return idx[order], torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]

    def _salient(self, x: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept-as-is tokens at clip indices ``where``: (indices, tokens, one-hot weights)."""
        weights = torch.zeros(len(where), x.shape[0], device=x.device)
        weights[torch.arange(len(where), device=x.device), where] = 1.0
        return where, x[where], weights

    def _onevision(self, x: torch.Tensor, sal: torch.Tensor, feats: torch.Tensor):
        """The ``onevision`` rule on one clip: ``x`` ``[T, n, D]`` float32, ``sal`` ``[T, n]``, ``feats`` ``[T, D]``."""
        t, n, dim = x.shape
        flat = x.reshape(t * n, dim)
        unit = flat / flat.norm(dim=-1, keepdim=True)
        retain = self.retain(n)
        salient = retain - int(retain * self.d)
        context = retain - salient
        order = descending(sal)  # [T, n]
        base = (torch.arange(t, device=x.device) * n)[:, None]
        parts = [self._salient(flat, (order[:, :salient] + base).flatten())]
        if context > 0:
            rest = order[:, salient:].sort(dim=-1).values  # [T, M] the non-salient tokens, in index order
            m = rest.shape[1]
            score = density_scores(x.gather(1, rest[..., None].expand(-1, -1, dim)))  # [T, M]
            ranked = rest.gather(1, descending(score)) + base  # [T, M] clip indices, best score first
            rest = rest + base
            sizes = segment_sizes(feats, self.c, self.tau)
            counts = anchor_counts(sizes, context, self.p)
            for f in range(t):  # single-frame DTM: the frame's own non-salient tokens
                if counts[f] == context:
                    anchors = ranked[f, :context]
                    tokens, weights = merge(flat, anchors, rest[f], self.beta, unit)
                    parts.append((anchors, tokens, weights))
            start = 0
            for length in sizes:  # multi-frame DTM: every non-salient token of the segment
                frames = range(start, start + length)
                if length > 1:
                    members = rest[start:start + length].flatten()
                    for f in frames:
                        if counts[f] > context:
                            anchors = ranked[f, :min(counts[f], m)]
                            tokens, weights = merge(flat, anchors, members, self.beta, unit)
                            parts.append((anchors, tokens, weights))
                start += length
        return self._assemble(parts)

    def _qwen(self, x: torch.Tensor, sal: torch.Tensor, feats: torch.Tensor):
        """The ``qwen2_5_vl`` rule on one clip (shapes as :meth:`_onevision`)."""
        t, n, dim = x.shape
        flat = x.reshape(t * n, dim)
        unit_tokens = flat / flat.norm(dim=-1, keepdim=True)
        retain = self.retain(n)
        unit = feats.float() / feats.float().norm(dim=-1, keepdim=True)
        parts = []
        start = 0
        for length in segment_sizes(feats, self.c, self.tau):
            salient, context = qwen_frame_budgets(unit[start:start + length], retain, n, self.d, self.p, self.ignore)
            kept_salient, anchor_sets = [], []
            for i, (s, k) in enumerate(zip(salient, context)):
                f = start + i
                order = descending(sal[f])
                top = order[:s]
                kept_salient.append(top + f * n)
                if k > 0:
                    rest = order[s:].sort().values
                    score = density_scores(x[f, rest][None])[0]
                    anchor_sets.append(rest[descending(score)[:k]].sort().values + f * n)
            seg = torch.arange(start * n, (start + length) * n, device=x.device)
            kept_salient = torch.cat(kept_salient)
            parts.append(self._salient(flat, kept_salient))
            for anchors in anchor_sets:
                retained = torch.isin(seg, torch.cat([kept_salient, anchors]))
                tokens, weights = merge(flat, anchors, seg[~retained], self.beta, unit_tokens)
                parts.append((anchors, tokens, weights))
            start += length
        return self._assemble(parts)
