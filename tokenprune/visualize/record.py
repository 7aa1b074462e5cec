"""What a pruner kept of each sample's visual tokens, recorded while it runs.

:func:`record_kept` wraps a pruner for the length of one ``generate`` call and keeps, on the
device (no host sync in the hot path), the :class:`~tokenprune.pruner.Reduction` of every
``select`` call, the per-view scores of every ``token_scores`` call, and, for pre-LLM pruners,
the sequence positions the adapter placed the kept tokens at (its ``prune_views`` output).
:meth:`KeptRecorder.kept` then maps them back to each sample's original visual tokens, view by
view (a view: an image, a crop, a tile, a video frame):

* pre-LLM, selecting pruners: by **sequence position** -- a kept token's position says which view
  (frame) it is in, whatever the scope. At scope ``"clip"`` the adapter hands all of a sample's kept
  tokens to its first view (``pre_llm._give_to_first``), and pruners ranked per view
  (``token_scores``, e.g. ``fopru_rank:scope=clip``) never call ``select`` at all;
* pre-LLM, merging pruners (VisionZip, pool): from the reductions, per-view calls (sample ids
  ``"<id>/<view>"``) and clip calls (``"<id>"``, indices into the sample's views concatenated);
* in-LLM stages: stage ``s`` indexes the tokens stage ``s - 1`` kept (in their original order)
  followed by the tokens it merged; the first stage's indices are the sample's visual tokens in
  sequence order, mapped back to views by their sequence positions when :func:`view_sizes` gave
  them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..pruner import Reduction, Stage, TokenPruner

MERGED = 0.5  # the brightness of a token merged into a kept one (VisionZip, pool, SparseVLM)


@dataclass
class Kept:
    """One sample's visual tokens after pruning, in original token order over its prunable views.

    Attributes:
        views: token count of each prunable view (their sum is ``N``).
        stages: per prune point (one for pre-LLM methods), ``[N]`` bool: kept through that stage.
        merged: ``[N]`` bool, tokens not kept but merged into a kept or new token.
        scores: ``[N]`` float, the method's score at its first prune point, if it has one.
        grids: each view's token grid ``(h, w)``, when known (video samples store it).
        frames: for a video sample, each view's first sampled frame (``View.frame``; Qwen: one view
            per temporal patch of 2 frames); ``None`` for image samples.
        times: for a video sample, each view's frame time in seconds (``View.time``, ``None`` if unknown).
    """

    views: list[int]
    stages: list[np.ndarray]
    merged: np.ndarray
    scores: np.ndarray | None = None
    grids: list[tuple[int, int]] | None = None
    frames: list[int | None] | None = None
    times: list[float | None] | None = None

    @property
    def value(self) -> np.ndarray:
        """``[N]`` float: 1 kept to the end, :data:`MERGED` merged, 0 dropped."""
        final = self.stages[-1] if self.stages else np.ones(sum(self.views), dtype=bool)
        return np.where(final, 1.0, np.where(self.merged, MERGED, 0.0))

    def per_view(self, values: np.ndarray) -> list[np.ndarray]:
        """``values`` ``[N]`` split into the views' ``[n_v]`` pieces."""
        return np.split(values, np.cumsum(self.views)[:-1])

    def per_frame(self, values: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """A video sample's ``values`` (default :attr:`value`) per frame: ``{first frame of the view: [n_v]}``
        (one entry per frame view; Qwen: per temporal patch). Empty for an image sample."""
        if not self.frames:
            return {}
        pieces = self.per_view(self.value if values is None else values)
        return {int(f): p for f, p in zip(self.frames, pieces) if f is not None}

    def to_json(self) -> dict[str, Any]:
        """Compact form for ``samples.jsonl``: bitmasks as hex strings (576 tokens: 144 characters).

        A video sample also stores, per view, its ``frames`` (first sampled frame), ``times`` (seconds)
        and ``grids``: the bitmasks are the frames' masks one after the other, so what was kept in each
        frame can be redrawn without the model."""
        out: dict[str, Any] = {"views": self.views, "stages": [_hex(s) for s in self.stages]}
        if self.merged.any():
            out["merged"] = _hex(self.merged)
        if self.frames is not None and any(f is not None for f in self.frames):
            out["frames"] = list(self.frames)
            out["times"] = [None if t is None else round(float(t), 4) for t in (self.times or [None] * len(self.views))]
            if self.grids is not None:
                out["grids"] = [list(g) for g in self.grids]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Kept":
        n = sum(data["views"])
        grids = data.get("grids")
        return cls(views=list(data["views"]), stages=[_unhex(s, n) for s in data["stages"]],
                   merged=_unhex(data["merged"], n) if data.get("merged") else np.zeros(n, dtype=bool),
                   grids=None if grids is None else [tuple(g) for g in grids],
                   frames=data.get("frames"), times=data.get("times"))


class ViewSizes(list):
    """Token counts of one sample's prunable views (a ``list[int]``, as :meth:`KeptRecorder.kept` takes),
    carrying where each view sits: ``seq`` (its tokens' sequence positions, ``[n_v]`` tensors), ``grids``,
    and for video views ``frames``, ``times``, ``clips`` (``View.frame`` / ``time`` / ``clip``); ``members``:
    for views an in-vision pruner cut inside the tower, each patch's output token (``View.vision_members``)."""

    def __init__(self, sizes: Sequence[int], seq: Sequence[Any] | None = None,
                 grids: Sequence[tuple[int, int]] | None = None, frames: Sequence[int | None] | None = None,
                 times: Sequence[float | None] | None = None, clips: Sequence[int | None] | None = None,
                 members: Sequence[Any] | None = None):
        super().__init__(int(n) for n in sizes)
        self.members = None if members is None else list(members)
        self.seq = None if seq is None else list(seq)
        self.grids = None if grids is None else [tuple(int(x) for x in g) for g in grids]
        self.frames = None if frames is None else list(frames)
        self.times = None if times is None else list(times)
        self.clips = None if clips is None else list(clips)


def _hex(mask: np.ndarray) -> str:
    return np.packbits(mask.astype(bool)).tobytes().hex()


def _unhex(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


@dataclass
class _Call:
    sample_ids: list[str]
    stage: int
    num_tokens: int
    reduction: Reduction
    layer: int = 0  # in-LLM: the decoder layer that first sees the cut; 0 before the LLM


@dataclass
class _Scored:
    """One ``token_scores`` call: per-view scores ``[B, n]`` of views ``"<id>/<view>"`` (scope-clip ranking)."""

    sample_ids: list[str]
    scores: torch.Tensor


@dataclass
class _Placed:
    """One ``prune_views`` call of the adapter: the batch's views, sample ids, and what each view placed."""

    views: list[Any]
    ids: list[str]
    out: list[tuple]

    def positions(self, sample_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(sequence positions of the sample's prunable tokens [N], in view order; positions of its kept
        tokens [k])``, or ``None`` if the sample is not in this call."""
        if sample_id not in self.ids:
            return None
        b = self.ids.index(sample_id)
        mine = [i for i, v in enumerate(self.views) if v.sample == b and v.prunable]
        if not mine:
            return None
        every = torch.cat([self.views[i].seq_index.reshape(-1) for i in mine]).cpu().numpy()
        kept = torch.cat([self.out[i][0].reshape(-1) for i in mine]).cpu().numpy()
        return every, kept


@dataclass
class KeptRecorder:
    """What a pruner did during one generate call (see :func:`record_kept`)."""

    in_llm: bool
    calls: list[_Call] = field(default_factory=list)
    scored: list[_Scored] = field(default_factory=list)
    placed: list[_Placed] = field(default_factory=list)

    def kept(self, sample_id: str, views: Sequence[int]) -> Kept:
        """What sample ``sample_id``, whose prunable views have ``views`` tokens each, kept.

        ``views``: :func:`view_sizes` (whose sequence positions map in-LLM indices back to views, and
        whose frames and grids the result carries), or plain token counts (views taken to be in
        sequence order, as adapters return them).

        Raises:
            KeyError: the pruner never ran on this sample.
        """
        sizes = [int(n) for n in views]
        members = getattr(views, "members", None)
        if members and all(m is not None for m in members):  # cut inside the tower: the views say it all
            out = _from_members(sizes, members)
        elif self.in_llm:
            out = self._in_llm(sample_id, sizes, _sequence_order(views))
        else:
            out = self._pre_llm(sample_id, sizes, _sequence_order(views))
        if isinstance(views, ViewSizes):
            out.grids, out.frames, out.times = views.grids, views.frames, views.times
        return out

    def _pre_llm(self, sample_id: str, views: list[int], order: np.ndarray | None = None) -> Kept:
        """Stage 0 (before the LLM) view by view; then, for a pruner that also cuts inside the LLM (HoliTom,
        PruneVid: their later ``select`` calls have ``layer > 0``), those cuts on the tokens stage 0 left, in
        sequence order (``order``: as :meth:`_in_llm`)."""
        n = sum(views)
        kept, merged = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        scores = np.full(n, np.nan)
        offsets = np.concatenate([[0], np.cumsum(views)]).astype(int)
        found = merging = False
        for call in self.calls:
            if call.layer > 0:  # an in-LLM stage of a hybrid pruner: below, on what stage 0 kept
                continue
            for row, sid in enumerate(call.sample_ids):
                span = _span(sid, sample_id, offsets, views)
                if span is None:
                    continue
                lo, size = span
                found = True
                red = call.reduction
                merging |= red.feature_weights is not None or red.tokens is not None
                k, m, s = _selection(red, row, size)
                kept[lo:lo + size], merged[lo:lo + size] = k, m
                if s is not None:
                    scores[lo:lo + size] = s
        for call in self.scored:  # scope-clip rankings: per-view scores, no select call
            for row, sid in enumerate(call.sample_ids):
                span = _span(sid, sample_id, offsets, views)
                if span is not None:
                    lo, size = span
                    scores[lo:lo + size] = call.scores[row].float().cpu().numpy()[:size]
        placed = next((p for p in (c.positions(sample_id) for c in self.placed) if p is not None), None)
        if placed is not None and not merging:  # selecting pruners: what the sequence holds, view by view
            every, at = placed
            if len(every) != n:
                raise ValueError(f"sample {sample_id!r}: {len(every)} visual tokens were placed, the views say {n}")
            kept = np.isin(every, at)
            found = True
        if not found:
            raise KeyError(f"the pruner was not called for sample {sample_id!r}")
        stages = [kept]
        later = sorted((c for c in self.calls if c.layer > 0 and sample_id in c.sample_ids),
                       key=lambda c: (c.layer, c.stage))
        if later:  # sequence order from here (what the LLM holds), back to view order at the end
            to_seq = (lambda a: a) if order is None else (lambda a: a[order])
            back = (lambda a: a) if order is None else (lambda a: _unsort(a, order))
            seq_stages, seq_merged, _ = _chain(later, sample_id, np.nonzero(to_seq(kept))[0], to_seq(merged))
            stages += [back(st) for st in seq_stages]
            merged = back(seq_merged)
        return Kept(views=list(views), stages=stages, merged=merged & ~stages[-1],
                    scores=None if np.isnan(scores).all() else scores)

    def _in_llm(self, sample_id: str, views: list[int], order: np.ndarray | None = None) -> Kept:
        """``order[j]``: the view-order index of the sample's ``j``-th visual token in sequence order
        (``None``: the same)."""
        n = sum(views)
        mine = sorted((c for c in self.calls if sample_id in c.sample_ids), key=lambda c: c.stage)
        stages, merged, scores = _chain(mine, sample_id, np.arange(n), np.zeros(n, dtype=bool))
        if not stages:
            raise KeyError(f"the pruner was not called for sample {sample_id!r}")
        if order is not None:  # sequence order -> view order
            stages = [_unsort(s, order) for s in stages]
            merged = _unsort(merged, order)
            scores = None if scores is None else _unsort(scores, order)
        return Kept(views=list(views), stages=stages, merged=merged & ~stages[-1], scores=scores)


def _chain(calls: Sequence[_Call], sample_id: str, current: np.ndarray,
           merged: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """In-LLM cuts in order, each on the tokens the previous one left: ``current`` holds the sequence-order
    indices of the tokens entering the first cut, ``merged`` ``[n]`` (updated in place) what was merged so far.
    Returns ``(kept mask [n] after each cut, merged, the first cut's scores if it is stage 0)``."""
    n = len(merged)
    stages, scores = [], None
    for call in calls:
        k, m, s = _selection(call.reduction, call.sample_ids.index(sample_id), call.num_tokens)
        real = np.arange(call.num_tokens) < len(current)  # later stages: merged tokens follow the kept ones
        kept = np.zeros(n, dtype=bool)
        kept[current[np.nonzero(k & real)[0]]] = True
        merged[current[np.nonzero(m & real)[0]]] = True
        if scores is None and s is not None and call.stage == 0:
            scores = s[:n]
        stages.append(kept)
        current = np.nonzero(kept)[0]
    return stages, merged, scores


def _from_members(sizes: list[int], members: Sequence[Any]) -> Kept:
    """What an in-vision pruner kept, from each patch's output token (``-1``: dropped): the patch each
    token takes its position from (the earliest it covers) is kept, the other patches of a merged token
    are merged."""
    kept, merged = [], []
    for n, m in zip(sizes, members):
        m = np.asarray(m.cpu() if hasattr(m, "cpu") else m).reshape(-1)[:n]
        first = np.zeros(n, dtype=bool)
        alive = np.nonzero(m >= 0)[0]
        _, at = np.unique(m[alive], return_index=True)  # first (lowest) patch of each token
        first[alive[at]] = True
        kept.append(first)
        merged.append((m >= 0) & ~first)
    return Kept(views=list(sizes), stages=[np.concatenate(kept)], merged=np.concatenate(merged))


def _span(sid: str, sample_id: str, offsets: np.ndarray, views: list[int]) -> tuple[int, int] | None:
    """``(first token, token count)`` a call row with id ``sid`` covers of sample ``sample_id``: all of it
    for a clip call (``"<id>"``), view ``v`` for a per-view call (``"<id>/<v>"``), else ``None``."""
    if sid == sample_id:
        return 0, int(offsets[-1])
    head, _, tail = sid.rpartition("/")
    if head == sample_id and tail.isdigit() and int(tail) < len(views):
        return int(offsets[int(tail)]), views[int(tail)]
    return None


def _sequence_order(views: Sequence[int]) -> np.ndarray | None:
    """For :class:`ViewSizes` with sequence positions: ``order[j]`` = the view-order index of the ``j``-th
    visual token in sequence order; ``None`` when unknown or already in sequence order."""
    seq = getattr(views, "seq", None)
    if not seq:
        return None
    every = np.concatenate([np.asarray(s.cpu() if hasattr(s, "cpu") else s).reshape(-1) for s in seq])
    order = np.argsort(every, kind="stable")
    return None if (order == np.arange(len(order))).all() else order


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``values`` indexed in sequence order -> view order (``out[order[j]] = values[j]``)."""
    out = np.empty_like(values)
    out[order] = values
    return out


def _selection(red: Reduction, row: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(kept [size] bool, merged [size] bool, scores [size] or None)`` of one row of a reduction."""
    kept, merged = np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)
    if red.feature_weights is not None:  # VisionZip: one-hot rows are kept tokens, the rest merges
        w = red.feature_weights[row].float().cpu().numpy()
        w = w[:, w.shape[1] - size:]  # the prefix (CLS) columns are no image region
        one_hot = (w > 0).sum(1) == 1
        kept[w[one_hot].argmax(1)] = True
        merged[(w[~one_hot] > 0).any(0)] = True
    elif red.token_weights is not None:  # new tokens with their sources: one-source rows keep a token
        w = red.token_weights[row].float().cpu().numpy()[:, :size] != 0  # [k, N]
        one = w.sum(1) == 1
        kept[w[one].argmax(1)] = True  # HoloV, FastVID's salient tokens: kept as they were
        kept[red.indices[row].cpu().numpy()[~one & w.any(1)]] = True  # a merged row's own position (pool's)
        merged[w[~one].any(0)] = True  # zero rows (HoloV's pads) hold no token
    else:
        kept[red.indices[row].cpu().numpy()] = True
        if red.tokens is not None:  # a merging pruner without weights: every token went into some new token
            merged[:] = True
    if red.merge_weights is not None:  # SparseVLM's recycled tokens
        merged |= (red.merge_weights[row] > 0).any(0).cpu().numpy()
    if red.merge_into is not None:  # in-place merges (FrameFusion, HoliTom): every token merged into a kept one
        merged |= (red.merge_into[row] >= 0).cpu().numpy()
    scores = None if red.scores is None else red.scores[row].float().cpu().numpy()[:size]
    return kept, merged & ~kept, scores


@contextlib.contextmanager
def record_kept(pruner: TokenPruner | None) -> Iterator[KeptRecorder | None]:
    """Record what ``pruner`` does inside the ``with`` block (``None`` for no pruner): every reduction its
    ``select`` returns, every ``token_scores`` call, and (pre-LLM) where the adapter placed the kept tokens.

    The pruner and the adapters are left exactly as they were afterwards.
    """
    if pruner is None:
        yield None
        return
    from ..adapters import pre_llm

    recorder = KeptRecorder(in_llm=pruner.stage is Stage.IN_LLM)
    if pruner.stage is Stage.IN_VISION:  # its cuts live in the encoded views (view_sizes' members)
        yield recorder
        return
    select, token_scores = pruner.select, pruner.token_scores

    def recording(inputs):
        red = select(inputs)
        recorder.calls.append(_Call(list(inputs.sample_ids), inputs.stage, inputs.num_tokens, red, inputs.layer))
        return red

    def recording_scores(inputs):
        out = token_scores(inputs)
        if out is not None:
            recorder.scored.append(_Scored(list(inputs.sample_ids), out))
        return out

    def placed(views, used, ids, out):  # the kept tokens' sequence positions, as the adapter placed them
        if used is pruner:  # the views and kept positions stay on the device until kept() asks
            recorder.placed.append(_Placed(list(views), [str(i) for i in ids], list(out)))

    pruner.select = recording  # instance attributes: shadow the class's methods, nothing else changes
    pruner.token_scores = recording_scores
    try:
        with pre_llm.observe(placed):
            yield recorder
    finally:
        del pruner.select
        del pruner.token_scores


def view_sizes(views, sample: int) -> ViewSizes:
    """Token counts of sample ``sample``'s prunable views (``EncodedImages.views``), with their sequence
    positions, grids, and (video) frames and times: :class:`ViewSizes`."""
    mine = [v for v in views if v.sample == sample and v.prunable]
    video = any(getattr(v, "frame", None) is not None for v in mine)
    cut = any(getattr(v, "vision_members", None) is not None for v in mine)
    return ViewSizes([int(v.seq_index.shape[0]) for v in mine], seq=[v.seq_index for v in mine],
                     grids=[tuple(v.grid) for v in mine],
                     members=[getattr(v, "vision_members", None) for v in mine] if cut else None,
                     frames=[getattr(v, "frame", None) for v in mine] if video else None,
                     times=[getattr(v, "time", None) for v in mine] if video else None,
                     clips=[getattr(v, "clip", None) for v in mine] if video else None)


__all__ = ["Kept", "KeptRecorder", "MERGED", "ViewSizes", "record_kept", "view_sizes"]
