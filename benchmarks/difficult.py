"""The difficult subset (VTC-Bench's finding): the samples that need the image's detail.

Shrinking the image beats many pruning methods on ordinary benchmarks, because most questions need
little detail. A sample is *difficult* at ratio ``r`` when the unpruned model (``none``) answers it
right and ``downsample`` at ``r`` (the image shrunk to the same token budget) answers it wrong; each
method's accuracy on those samples at ``r`` says whether it keeps the detail that shrinking loses.

As VTC-Bench's ``tools/analyze_results.py`` (``Chenfei-Liao/VTC-Bench@55936d4``): ``analyze_dataset_groups``
builds group A (origin right and Downsample wrong, over the samples both have), ``analyze_method_performance``
counts a method's right answers on it, accuracy = right / group size; ``is_correct_by_dataset`` calls a graded
per-sample score right at ``>= 0.5`` (POPE, OCRBench, MME, MMStar). Here: the task's per-sample score (the
headline when it is per sample, else its first score, as the paired tests use) ``>= 0.5`` is right (1 for
0/1 scores; VQA accuracy ``min(#humans / 3, 1)``: 0.67 and 1), and ``difficult_score`` = right / subset size,
with a 95% percentile bootstrap CI over the subset's samples. One difference: VTC-Bench's "origin" is its
Downsample run at factor 1 (the image through the same JPEG round trip); here it is the sweep's unpruned
``none`` run (add ``downsample:factor=1`` as a method to see how much the round trip alone flips).

Matching: a run at ratio ``r`` is compared with ``downsample`` at ``r`` (the first ``downsample`` spec of
the sweep that ran at ``r``: ``downsample`` over the sweep's ratios, or pinned specs, ``downsample:ratio=0.1``; VTC-Bench pairs budget ``1 / f^2`` with factor ``f``, as ``downsample`` maps ``ratio``); a ratio-free
run (count chosen per sample) with ``downsample`` at the ratio nearest the share of visual tokens it kept on
average; a ratio no ``downsample`` run has (a pinned ``fopru_rank:ratio=0.3``) gets no figure. ``none`` gets
none (it is right on every difficult sample by construction).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from .results import ratio_key
from .stats import bootstrap_ci

DOWNSAMPLE = "downsample"
RIGHT = 0.5  # a per-sample score at or above this counts as right


def base_name(spec: str) -> str:
    """``downsample:mode=pool@keep`` -> ``downsample``."""
    return spec.split("@", 1)[0].split(":", 1)[0].strip()


def downsample_spec(methods: list[str]) -> str | None:
    """The sweep's first ``downsample`` spec, or ``None``."""
    return next((m for m in methods if base_name(m) == DOWNSAMPLE), None)


def _downsample_runs(methods: list[str], by_run: dict, task: str) -> dict[float, str]:
    """``{ratio: spec}``: for each ratio a ``downsample`` run has on ``task``, the first such spec of the sweep
    (``downsample`` over the sweep's ratios, or pinned ones: ``downsample:ratio=0.25,downsample:ratio=0.1``)."""
    out: dict[float, str] = {}
    for spec in (m for m in methods if base_name(m) == DOWNSAMPLE):
        for (t, m, r) in by_run:
            if t == task and m == spec and r is not None:
                out.setdefault(r, spec)
    return out


def _metric(task, rows: list[dict]) -> str:
    keys = list(rows[0]["scores"]) if rows else []
    return task.headline if task.headline in keys else (keys[0] if keys else task.headline)


def difficult_ids(none_rows: dict[str, dict], down_rows: dict[str, dict], metric: str) -> list[str]:
    """Sample ids the unpruned model answers right and ``downsample`` wrong (both ran on them), sorted."""
    return sorted(sid for sid, r in none_rows.items()
                  if sid in down_rows and r["scores"][metric] >= RIGHT and down_rows[sid]["scores"][metric] < RIGHT)


def _match(ratio: float | None, kept_share: float, down_ratios: list[float]) -> float | None:
    if not down_ratios:
        return None
    if ratio is not None:
        return ratio if any(math.isclose(ratio, d) for d in down_ratios) else None
    if math.isnan(kept_share):
        return None
    return min(down_ratios, key=lambda d: abs(d - kept_share))


def subset_score(rows: dict[str, dict], ids: list[str], metric: str, n_resamples: int, seed: int) -> dict[str, Any]:
    """Share of ``ids`` (those ``rows`` has) whose per-sample ``metric`` is right (``>= 0.5``), its bootstrap
    CI, the count right and the subset's size."""
    values = np.array([rows[i]["scores"][metric] >= RIGHT for i in ids if i in rows], dtype=float)
    if not len(values):
        return {"difficult_score": math.nan, "difficult_ci_low": math.nan, "difficult_ci_high": math.nan,
                "n_difficult": 0, "right": 0}
    low, high = bootstrap_ci(len(values), lambda idx: float(values[idx].mean()), n_resamples=n_resamples, seed=seed)
    return {"difficult_score": float(values.mean()), "difficult_ci_low": low, "difficult_ci_high": high,
            "n_difficult": int(len(values)), "right": int((values >= RIGHT).sum())}


def add_difficult(cfg, tasks: dict, rows: list[dict], summary: list[dict[str, Any]]) -> None:
    """Fill the difficult-subset columns of every ``summary`` row in place (NaN / 0 where undefined)."""
    from .sweep_config import REFERENCE

    down = downsample_spec(list(cfg.methods))
    by_run: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_run[(r["task"], r["method"], ratio_key(r["ratio"]))][str(r["sample_id"])] = r
    for s in summary:
        s.update({"difficult_score": math.nan, "difficult_ci_low": math.nan, "difficult_ci_high": math.nan,
                  "n_difficult": 0})
        if down is None or s["method"] == REFERENCE or s["task"] not in tasks:
            continue
        task = s["task"]
        downs = _downsample_runs(list(cfg.methods), by_run, task)
        share = s["visual_tokens_kept"] / s["visual_tokens_in"] if s.get("visual_tokens_in") else math.nan
        at = _match(s["ratio"], share, sorted(downs))
        none_rows = by_run.get((task, REFERENCE, 1.0), {})
        if at is None or not none_rows:
            continue
        metric = _metric(tasks[task], list(none_rows.values()))
        ids = difficult_ids(none_rows, by_run[(task, downs[at], at)], metric)
        res = subset_score(by_run[(task, s["method"], ratio_key(s["ratio"]))], ids, metric, cfg.bootstrap, cfg.seed)
        res.pop("right")
        s.update(res)


def difficult_section(cfg, tasks: dict, summary: list[dict[str, Any]], rows: list[dict]) -> list[str]:
    """Markdown: per task, each method's accuracy on the difficult subset at each ratio, with CI and counts;
    one line when the sweep has no ``downsample`` run."""
    from .sweep_config import REFERENCE

    lines = ["## Difficult subset\n"]
    down = downsample_spec(list(cfg.methods))
    if down is None:
        return [*lines, "No `downsample` run in this sweep, so no difficult subset: add `downsample` to `--methods` "
                        "(the samples the unpruned model answers right and the shrunk image wrong).", ""]
    lines.append(f"Samples the unpruned model answers right and `{down}` at the matching ratio wrong (VTC-Bench); "
                 "per method and ratio: share answered right on them [95% bootstrap CI] (right / subset size). "
                 "Right: per-sample score >= 0.5 (VTC-Bench's group A accuracy). A ratio-free run is matched to "
                 "the ratio nearest its kept share.\n")
    by_run: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_run[(r["task"], r["method"], ratio_key(r["ratio"]))][str(r["sample_id"])] = r
    for task_name, task in tasks.items():
        mine = [s for s in summary if s["task"] == task_name and s["method"] != REFERENCE]
        ratios = sorted({s["ratio"] for s in mine if s["ratio"] is not None}, reverse=True)
        none_rows = by_run.get((task_name, REFERENCE, 1.0), {})
        downs = _downsample_runs(list(cfg.methods), by_run, task_name)
        if not none_rows or not downs:
            lines.append(f"**{task_name}**: no `none` or `{down}` rows, no subset.\n")
            continue
        metric = _metric(task, list(none_rows.values()))
        sizes = []
        for r in ratios:
            if r in downs:
                sizes.append(f"{r:g}: {len(difficult_ids(none_rows, by_run[(task_name, downs[r], r)], metric))} of "
                             f"{len(none_rows)}")
        lines.append(f"**{task_name}** (per-sample `{metric}`; difficult samples at ratio {', '.join(sizes)})\n")
        if not any(s.get("n_difficult") for s in mine):
            lines.append(f"No sample is difficult at any ratio: `{down}` answers right wherever the unpruned model "
                         "does, so this subset cannot separate the methods here (on a fixed-resolution model the shrunk "
                         "image is upsampled back to every token: only detail is lost).\n")
            continue
        has_free = any(s["ratio"] is None for s in mine)
        header = [*(f"{r:g}" for r in ratios), *(["adaptive"] if has_free else [])]
        lines += ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for method in dict.fromkeys(s["method"] for s in mine):
            cells = []
            for r in [*ratios, *([None] if has_free else [])]:
                s = next((x for x in mine if x["method"] == method and x["ratio"] == r), None)
                if s is None:
                    cells.append("")
                    continue
                share = s["visual_tokens_kept"] / s["visual_tokens_in"] if s.get("visual_tokens_in") else math.nan
                at = _match(r, share, sorted(downs))
                if at is None:
                    cells.append("no downsample run here")
                    continue
                if not s.get("n_difficult"):
                    cells.append("no difficult samples")
                    continue
                got = by_run[(task_name, method, r)]
                ids = difficult_ids(none_rows, by_run[(task_name, downs[at], at)], metric)
                right = sum(1 for i in ids if i in got and got[i]["scores"][metric] >= RIGHT)
                cells.append(f"{s['difficult_score']:.3f} [{s['difficult_ci_low']:.3f}, {s['difficult_ci_high']:.3f}] "
                             f"({right}/{s['n_difficult']})" + (f" vs {at:g}" if r is None else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
