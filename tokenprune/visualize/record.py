"""What a pruner kept of each sample's visual tokens, recorded from the reductions it returns.

:func:`record_kept` wraps a pruner's ``select`` for the length of one ``generate`` call and keeps
the :class:`~tokenprune.pruner.Reduction` of every call (on the device, no host sync in the hot
path); :meth:`KeptRecorder.kept` then maps them back to each sample's original visual tokens,
view by view: pre-LLM per-view calls (sample ids ``"<id>/<view>"``), pre-LLM global calls, and
in-LLM stages, where stage ``s`` indexes the tokens stage ``s - 1`` kept (in their original order)
followed by the tokens it merged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

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
    """

    views: list[int]
    stages: list[np.ndarray]
    merged: np.ndarray
    scores: np.ndarray | None = None

    @property
    def value(self) -> np.ndarray:
        """``[N]`` float: 1 kept to the end, :data:`MERGED` merged, 0 dropped."""
        final = self.stages[-1] if self.stages else np.ones(sum(self.views), dtype=bool)
        return np.where(final, 1.0, np.where(self.merged, MERGED, 0.0))

    def per_view(self, values: np.ndarray) -> list[np.ndarray]:
        """``values`` ``[N]`` split into the views' ``[n_v]`` pieces."""
        return np.split(values, np.cumsum(self.views)[:-1])

    def to_json(self) -> dict[str, Any]:
        """Compact form for ``samples.jsonl``: bitmasks as hex strings (576 tokens: 144 characters)."""
        out: dict[str, Any] = {"views": self.views, "stages": [_hex(s) for s in self.stages]}
        if self.merged.any():
            out["merged"] = _hex(self.merged)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Kept":
        n = sum(data["views"])
        return cls(views=list(data["views"]), stages=[_unhex(s, n) for s in data["stages"]],
                   merged=_unhex(data["merged"], n) if data.get("merged") else np.zeros(n, dtype=bool))


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


@dataclass
class KeptRecorder:
    """The reductions a pruner returned during one generate call (see :func:`record_kept`)."""

    in_llm: bool
    calls: list[_Call] = field(default_factory=list)

    def kept(self, sample_id: str, views: list[int]) -> Kept:
        """What sample ``sample_id``, whose prunable views have ``views`` tokens each, kept."""
        n = sum(views)
        if self.in_llm:
            return self._in_llm(sample_id, views)
        kept, merged = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        scores = np.full(n, np.nan)
        offsets = np.concatenate([[0], np.cumsum(views)])
        found = False
        for call in self.calls:
            for row, sid in enumerate(call.sample_ids):
                if sid == sample_id:  # a global call: all views as one set
                    lo, size = 0, n
                elif sid.rpartition("/")[0] == sample_id:
                    v = int(sid.rpartition("/")[2])
                    lo, size = int(offsets[v]), views[v]
                else:
                    continue
                found = True
                k, m, s = _selection(call.reduction, row, size)
                kept[lo:lo + size], merged[lo:lo + size] = k, m
                if s is not None:
                    scores[lo:lo + size] = s
        if not found:
            raise KeyError(f"the pruner was not called for sample {sample_id!r}")
        return Kept(views=list(views), stages=[kept], merged=merged & ~kept,
                    scores=None if np.isnan(scores).all() else scores)

    def _in_llm(self, sample_id: str, views: list[int]) -> Kept:
        n = sum(views)
        current = np.arange(n)  # original index of each visual token entering the next stage
        stages, merged, scores = [], np.zeros(n, dtype=bool), None
        for call in sorted(self.calls, key=lambda c: c.stage):
            if sample_id not in call.sample_ids:
                continue
            row = call.sample_ids.index(sample_id)
            red = call.reduction
            size = call.num_tokens
            k, m, s = _selection(red, row, size)
            real = np.arange(size) < len(current)  # later stages: merged tokens follow the kept ones
            kept = np.zeros(n, dtype=bool)
            kept[current[np.nonzero(k & real)[0]]] = True
            merged[current[np.nonzero(m & real)[0]]] = True
            if scores is None and s is not None and call.stage == 0:
                scores = s[:n]
            stages.append(kept)
            current = np.nonzero(kept)[0]
        if not stages:
            raise KeyError(f"the pruner was not called for sample {sample_id!r}")
        return Kept(views=list(views), stages=stages, merged=merged & ~stages[-1], scores=scores)


def _selection(red: Reduction, row: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(kept [size] bool, merged [size] bool, scores [size] or None)`` of one row of a reduction."""
    kept, merged = np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)
    if red.feature_weights is not None:  # VisionZip: one-hot rows are kept tokens, the rest merges
        w = red.feature_weights[row].float().cpu().numpy()
        w = w[:, w.shape[1] - size:]  # the prefix (CLS) columns are no image region
        one_hot = (w > 0).sum(1) == 1
        kept[w[one_hot].argmax(1)] = True
        merged[(w[~one_hot] > 0).any(0)] = True
    else:
        kept[red.indices[row].cpu().numpy()] = True
        if red.tokens is not None:  # a merging pruner (pool): every token went into some new token
            merged[:] = True
    if red.merge_weights is not None:  # SparseVLM's recycled tokens
        merged |= (red.merge_weights[row] > 0).any(0).cpu().numpy()
    scores = None if red.scores is None else red.scores[row].float().cpu().numpy()[:size]
    return kept, merged & ~kept, scores


@contextlib.contextmanager
def record_kept(pruner: TokenPruner | None) -> Iterator[KeptRecorder | None]:
    """Record every reduction ``pruner`` returns inside the ``with`` block (``None`` for no pruner)."""
    if pruner is None:
        yield None
        return
    recorder = KeptRecorder(in_llm=pruner.stage is Stage.IN_LLM)
    select = pruner.select

    def recording(inputs):
        red = select(inputs)
        recorder.calls.append(_Call(list(inputs.sample_ids), inputs.stage, inputs.num_tokens, red))
        return red

    pruner.select = recording  # an instance attribute: shadows the class's method, nothing else changes
    try:
        yield recorder
    finally:
        del pruner.select


def view_sizes(views, sample: int) -> list[int]:
    """Token counts of sample ``sample``'s prunable views (``EncodedImages.views``)."""
    return [int(v.tokens.shape[0]) for v in views if v.sample == sample and v.prunable]


__all__ = ["Kept", "KeptRecorder", "MERGED", "record_kept", "view_sizes"]
