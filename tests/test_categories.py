"""Scores per question category (``by_category.csv``, report.md's "Per category"), worked out by hand on
synthetic result rows."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokenprune.benchmarks.categories import category_rows, category_section

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = SimpleNamespace(methods=["fopru_rank"], ratios=[0.25], bootstrap=200, seed=0)
MEAN_TASK = SimpleNamespace(headline="accuracy")


def _row(task, method, ratio, sid, category, score):
    return {"task": task, "method": method, "ratio": ratio, "sample_id": str(sid), "category": category,
            "scores": {"accuracy": score}}


#           sample:  0    1    2    3    4    5
CATS = ["order", "order", "order", "count", "count", "count"]
NONE = [1, 1, 0, 1, 1, 1]  # order 2/3, count 3/3
FOPRU = [1, 1, 1, 0, 0, 1]  # order 3/3, count 1/3


def _rows(task="t"):
    return ([_row(task, "none", 1.0, i, c, s) for i, (c, s) in enumerate(zip(CATS, NONE))]
            + [_row(task, "fopru_rank", 0.25, i, c, s) for i, (c, s) in enumerate(zip(CATS, FOPRU))])


def _never(*_):
    raise AssertionError("a per-sample headline needs no task aggregate")


def test_scores_per_category_by_hand():
    out = category_rows(CFG, {"t": MEAN_TASK}, _rows(), _never)
    got = {(r["method"], r["category"]): (r["n"], r["score"]) for r in out}
    assert got == {("none", "count"): (3, 1.0), ("none", "order"): (3, 2 / 3),
                   ("fopru_rank", "count"): (3, 1 / 3), ("fopru_rank", "order"): (3, 1.0)}
    for r in out:
        assert r["score_ci_low"] <= r["score"] <= r["score_ci_high"]
    fo_count = next(r for r in out if (r["method"], r["category"]) == ("fopru_rank", "count"))
    assert fo_count["score_ci_low"] == 0.0 and fo_count["score_ci_high"] == 1.0  # 3 samples: any mean is possible
    # sweep order: the reference first, then the methods; categories sorted
    assert [(r["method"], r["category"]) for r in out] == [("none", "count"), ("none", "order"),
                                                            ("fopru_rank", "count"), ("fopru_rank", "order")]


def test_a_task_aggregate_is_used_when_the_headline_is_not_per_sample():
    task = SimpleNamespace(headline="f1")  # rows carry "accuracy" only: the aggregate decides
    seen = []

    def aggregate(t, rows):
        seen.append(len(rows))
        return {"f1": sum(r["scores"]["accuracy"] for r in rows) / len(rows) / 2}

    out = category_rows(CFG, {"t": task}, _rows(), aggregate)
    assert {(r["method"], r["category"]): r["score"] for r in out}[("none", "order")] == pytest.approx(1 / 3)
    assert 3 in seen


def test_one_category_or_none_gives_nothing():
    rows = [dict(r, category="") for r in _rows()]
    assert category_rows(CFG, {"t": MEAN_TASK}, rows, _never) == []
    rows = [dict(r, category="order") for r in _rows()]
    assert category_rows(CFG, {"t": MEAN_TASK}, rows, _never) == []
    assert category_section([]) == []


def test_section_is_a_method_by_category_table():
    lines = category_section(category_rows(CFG, {"t": MEAN_TASK}, _rows(), _never))
    text = "\n".join(lines)
    assert "| method | ratio | count (n=3) | order (n=3) |" in text
    row = next(line for line in lines if line.startswith("| fopru_rank |"))
    assert row.startswith("| fopru_rank | 0.25 | 0.333 [") and "| 1.000 [1.00, 1.00] |" in row
