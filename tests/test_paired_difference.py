"""The paired difference between two methods (report.md's "Paired tests" table): hand-computed, and a case
where the two methods' own CIs overlap while the paired interval excludes zero."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tokenprune.benchmarks.report import between_methods, paired_difference, paired_rows, paired_text
from tokenprune.benchmarks.stats import bootstrap_ci

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_difference_by_hand():
    a, b = np.array([1.0, 1, 1, 0]), np.array([0.0, 1, 0, 0])  # differences 1, 0, 1, 0
    diff, low, high = paired_difference(a, b, 500, 0)
    assert diff == 0.5 and 0.0 <= low <= 0.5 <= high <= 1.0
    same = paired_difference(a, a, 500, 0)
    assert same == (0.0, 0.0, 0.0)


def _consistent_edge(n=200, seed=0):
    """B right on 70% of samples; A right wherever B is, and on 20 more: A - B = +0.1 on every resample's
    scale, though each one's own CI is about +-0.06 wide."""
    rng = np.random.default_rng(seed)
    b = (rng.random(n) < 0.7).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:20]] = 1.0
    return a, b


def test_overlapping_cis_yet_a_paired_difference():
    a, b = _consistent_edge()
    ci_a = bootstrap_ci(len(a), lambda idx: float(a[idx].mean()), 1000, 0)
    ci_b = bootstrap_ci(len(b), lambda idx: float(b[idx].mean()), 1000, 0)
    assert ci_a[0] < ci_b[1]  # the two CIs overlap
    diff, low, high = paired_difference(a, b, 1000, 0)
    assert diff == pytest.approx(0.1) and low > 0  # the paired interval does not contain 0


def test_report_table_has_the_difference_column():
    a, b = _consistent_edge(40)
    rows = [{"task": "t", "method": m, "ratio": 0.25, "sample_id": str(i), "scores": {"accuracy": float(v)}}
            for m, scores in (("fopru_rank", a), ("fastv", b)) for i, v in enumerate(scores)]
    cfg = SimpleNamespace(methods=["fopru_rank", "fastv"], ratios=[0.25], bootstrap=200, seed=0)
    pairs = paired_rows(cfg, {"t": SimpleNamespace(headline="accuracy")}, rows)
    text = "\n".join(between_methods(pairs))
    diff = a.mean() - b.mean()
    assert "| method A | method B | A - B [95% CI] | n | test | p |" in text
    assert f"| fopru_rank | fastv | {diff:+.3f} [" in text and "| 40 | mcnemar |" in text
    # the table a sweep prints carries the same line when there are few pairs, a pointer when many
    (d,) = pairs
    printed = paired_text(pairs)
    assert f"t  r=0.25  fopru_rank - fastv  {diff:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]  mcnemar p=" in printed
    assert paired_text(pairs * 7) == "\n7 paired differences between methods at the same ratio: report.md"
    assert paired_text([]) == ""
