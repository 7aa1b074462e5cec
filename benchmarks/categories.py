"""Scores per question category (a task's ``Sample.category``: shapes_video's question kinds, MVBench's
subtasks, POPE's splits): ``by_category.csv`` and report.md's "Per category" section.

Why: a method can hold its overall score while losing one kind of question entirely (a per-frame
pruner on ``count_flashes``); the overall CI hides it. Written only for tasks whose samples carry at
least two categories.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .results import ratio_key, ratio_label
from .stats import bootstrap_ci

COLUMNS = ["task", "method", "ratio", "category", "n", "score", "score_ci_low", "score_ci_high"]


def _statistic(task, rows: list[dict], aggregate: Callable):
    """``(score, statistic(indices))`` of the task's headline over ``rows``: the mean of the per-sample
    headline where every row has one (fast under the bootstrap), else ``aggregate(task, rows)``'s."""
    if rows and all(task.headline in r["scores"] for r in rows):
        values = np.array([float(r["scores"][task.headline]) for r in rows])
        return float(values.mean()), lambda idx: float(values[idx].mean())
    return (aggregate(task, rows).get(task.headline, math.nan),
            lambda idx: aggregate(task, [rows[i] for i in idx]).get(task.headline, math.nan))


def category_rows(cfg, tasks: dict, rows: list[dict], aggregate: Callable) -> list[dict[str, Any]]:
    """One row per (task, method, ratio, category) with the headline score and its 95% bootstrap CI, for
    the tasks whose samples have two or more distinct non-empty categories; in the sweep's run order,
    categories sorted. ``aggregate(task, rows) -> {metric: value}``: the task's aggregate over result
    rows (the report's), used where a headline is not a per-sample score (MME's pairs)."""
    from .sweep_config import method_runs

    runs = method_runs(cfg)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("category"):
            groups[(r["task"], r["method"], ratio_key(r["ratio"]), r["category"])].append(r)
    out = []
    for task_name, task in tasks.items():
        cats = sorted({k[3] for k in groups if k[0] == task_name})
        if len(cats) < 2:
            continue
        for method, ratio in runs:
            for cat in cats:
                g = sorted(groups.get((task_name, method, ratio, cat), []), key=lambda r: r["sample_id"])
                if not g:
                    continue
                score, stat = _statistic(task, g, aggregate)
                low, high = bootstrap_ci(len(g), stat, n_resamples=cfg.bootstrap, seed=cfg.seed)
                out.append({"task": task_name, "method": method, "ratio": ratio, "category": cat, "n": len(g),
                            "score": score, "score_ci_low": low, "score_ci_high": high})
    return out


def category_section(rows: list[dict[str, Any]]) -> list[str]:
    """report.md lines: per task, a method x category table of ``score [low, high]`` (n per category in
    the header); empty when no task has categories."""
    if not rows:
        return []
    lines = ["## Per category\n",
             "Per task, the headline score on each category of questions, with its 95% bootstrap CI "
             "(`by_category.csv`).\n"]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        cats = sorted({r["category"] for r in mine})
        n = {c: max(r["n"] for r in mine if r["category"] == c) for c in cats}
        lines.append(f"### {task}\n")
        lines.append("| method | ratio | " + " | ".join(f"{c} (n={n[c]})" for c in cats) + " |")
        lines.append("|---|---|" + "---|" * len(cats))
        cells: dict[tuple, dict[str, str]] = defaultdict(dict)
        for r in mine:
            cells[(r["method"], r["ratio"])][r["category"]] = (
                f"{r['score']:.3f} [{r['score_ci_low']:.2f}, {r['score_ci_high']:.2f}]")
        for (method, ratio), by_cat in cells.items():
            lines.append(f"| {method} | {ratio_label(ratio)} | " + " | ".join(by_cat.get(c, "") for c in cats) + " |")
        lines.append("")
    return lines
