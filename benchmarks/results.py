"""The results files of a sweep: who writes which file, reading them all, merging them into one.

One process (no ``--shard``, no ``torchrun``) appends to ``samples.jsonl``. Every other writer has
a file of its own, so no two processes ever append to one file: ``torchrun`` rank R writes
``samples.rank<R>.jsonl``; ``--shard I/N`` writes ``samples.shard<I>-of-<N>.jsonl`` (and
``samples.shard<I>-of-<N>.rank<R>.jsonl`` under ``torchrun``). Skipped samples follow the same
naming (``skipped.json``, ``skipped.rank<R>.json``, ...).

Reading takes the union of every file, one row per (task, method, ratio, sample) (the first seen
wins), so a sweep resumes from whatever is on disk, whatever world size or shards wrote it. A
ratio-free method (``TokenPruner.uses_ratio`` false: its count is chosen per sample) runs once, and
its rows carry ``ratio`` ``null`` (an empty cell in the CSV files); :func:`ratio_key` reads both. A
merge writes that union to ``samples.jsonl`` (atomically, in a canonical order) and may remove the
per-rank files, whose writers are known to be done; shard files are never removed automatically
(another machine may still be writing one).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

SAMPLES = "samples.jsonl"
SKIPPED = "skipped.json"
_PART = re.compile(r"^samples\.(?P<suffix>(?:shard\d+-of-\d+)?(?:\.?rank\d+)?)\.jsonl$")


def part_suffix(rank: int, world: int, shard: tuple[int, int] | None) -> str:
    """The file-name suffix of one writer: ``""`` (one process), ``"rank1"``, ``"shard0-of-2"``, ..."""
    pieces = []
    if shard is not None and shard[1] > 1:
        pieces.append(f"shard{shard[0]}-of-{shard[1]}")
    if world > 1:
        pieces.append(f"rank{rank}")
    return ".".join(pieces)


def samples_path(out: Path, suffix: str) -> Path:
    return out / (f"samples.{suffix}.jsonl" if suffix else SAMPLES)


def skipped_path(out: Path, suffix: str) -> Path:
    return out / (f"skipped.{suffix}.json" if suffix else SKIPPED)


def part_files(out: Path) -> list[Path]:
    """Every per-writer samples file in ``out`` (not ``samples.jsonl`` itself), sorted by name."""
    return sorted(p for p in out.glob("samples.*.jsonl") if _PART.match(p.name))


def read_rows(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """Rows of one results file. A last line cut short by a crash is left out, and (``repair``, for
    the file's own writer only: another process may be appending to it) cut from the file."""
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a last line without its newline is unfinished, even if it parses
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partial line: everything after it is unreliable
            good_bytes += len(line)
    if repair and good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return rows


ADAPTIVE = "adaptive"  # how a ratio-free run's ratio reads in the tables (its rows: null / an empty cell)


def ratio_key(value: Any) -> float | None:
    """A row's ``ratio`` as a key: a float, or ``None`` for a ratio-free run (``null`` in
    ``samples.jsonl``, an empty cell in ``summary.csv`` / ``pareto.csv``, ``adaptive`` in the tables)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", ADAPTIVE)):
        return None
    return float(value)


def ratio_label(value: Any) -> str:
    """``0.25`` -> ``"0.25"``; a ratio-free run's ``None`` -> ``"adaptive"``."""
    ratio = ratio_key(value)
    return ADAPTIVE if ratio is None else f"{ratio:g}"


def row_key(row: dict[str, Any]) -> tuple:
    """What a row is a result of: ``(task, method, ratio, sample id)`` (ratio ``None``: a ratio-free run)."""
    return row["task"], row["method"], ratio_key(row["ratio"]), str(row["sample_id"])


def read_all(out: Path, own: Path | None = None, ratio_free: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The union of every results file in ``out``, one row per key (the first seen wins).

    ``own``: this process's file, repaired if a crash cut its last line; the others are only read.
    ``ratio_free``: method specs that run once, without a ratio; their rows written with a ratio
    (by a tokenprune that ran them once per ratio, every time alike) are read as that one run's.
    """
    ratio_free = set(ratio_free)
    rows, seen = [], set()
    for path in [out / SAMPLES, *part_files(out)]:
        for row in read_rows(path, repair=path == own):
            if row.get("method") in ratio_free and row.get("ratio") is not None:
                row = {**row, "ratio": None}
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def _natural(sample_id: str) -> tuple:
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


def canonical_order(rows: list[dict[str, Any]], tasks: list[str], runs: list[tuple[str, float | None]]) -> list[dict[str, Any]]:
    """Rows sorted by task (sweep order), run (sweep order), then sample id (numbers numerically)."""
    t_index = {t: i for i, t in enumerate(tasks)}
    r_index = {(m, ratio_key(r)): i for i, (m, r) in enumerate(runs)}
    return sorted(rows, key=lambda r: (t_index.get(r["task"], len(t_index)),
                                       r_index.get((r["method"], ratio_key(r["ratio"])), len(r_index)),
                                       _natural(str(r["sample_id"]))))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_skipped(out: Path) -> dict[str, list[dict[str, str]]]:
    """The union of every skipped-samples file: ``{task: [{"id", "reason"}]}``."""
    merged: dict[str, dict[str, str]] = {}
    for path in sorted(out.glob("skipped*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # one being replaced right now: its content reappears in the merge
        for task, items in data.items():
            for item in items:
                merged.setdefault(task, {}).setdefault(str(item["id"]), item["reason"])
    return {t: [{"id": i, "reason": why} for i, why in items.items()] for t, items in merged.items()}


def write_skipped(path: Path, skipped: dict[str, Iterable]) -> None:
    """Record one writer's skipped samples (``{task: [Skipped]}``), added to what the file holds."""
    old = json.loads(path.read_text()) if path.exists() else {}
    for task, items in skipped.items():
        known = {str(i["id"]) for i in old.get(task, [])}
        old.setdefault(task, []).extend({"id": s.id, "reason": s.reason} for s in items if str(s.id) not in known)
    write_atomic(path, json.dumps(old, indent=1))


def merge(out: Path, tasks: list[str], runs: list[tuple[str, float | None]], remove_ranks: bool) -> tuple[list[dict], list[Path]]:
    """Fold every results file into ``samples.jsonl`` and ``skipped.json``; returns (rows, files read).

    ``runs``: the sweep's ``(method, ratio)`` runs (ratio ``None``: a ratio-free method, run once).
    ``remove_ranks``: delete the per-rank files afterwards (their writers have finished). Shard
    files stay: another machine may still append to one; rows already merged are read once.
    """
    parts = part_files(out)
    rows = canonical_order(read_all(out, ratio_free={m for m, r in runs if r is None}), tasks, runs)
    if parts:  # a lone samples.jsonl is already everything: leave it as written
        write_atomic(out / SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
    done = {(r["task"], str(r["sample_id"])) for r in rows}
    skipped = {t: [s for s in items if (t, s["id"]) not in done] for t, items in read_skipped(out).items()}
    write_atomic(out / SKIPPED, json.dumps(skipped, indent=1))
    if remove_ranks:
        for path in [*parts, *out.glob("skipped.*.json")]:
            if ".rank" in path.name and "shard" not in path.name:
                path.unlink(missing_ok=True)
    return rows, parts
