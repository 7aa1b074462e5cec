"""Statistics for results tables: bootstrap confidence intervals and paired tests (scipy)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(indices)`` over ``n`` samples (resampled with replacement).

    ``statistic`` receives an index array, so non-mean metrics (POPE's F1 over splits, MME's
    pair scores) are bootstrapped by recomputing the real aggregate on each resample.
    """
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        value = statistic(np.arange(1))
        return value, value
    res = sps.bootstrap(
        (np.arange(n),), lambda idx: statistic(np.asarray(idx, dtype=int)), vectorized=False,
        n_resamples=n_resamples, confidence_level=confidence, method="percentile", random_state=seed,
    )
    low, high = res.confidence_interval
    return float(low), float(high)


def paired_test(a: Sequence[float], b: Sequence[float]) -> tuple[str, float]:
    """Two-sided paired test of per-sample scores ``a`` vs ``b`` (same samples, same order).

    Binary scores: exact McNemar (``binomtest`` on the discordant pairs). Graded scores (VQA
    accuracy): Wilcoxon signed-rank. Returns ``(test name, p value)``; ``p = 1`` if no pair differs.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired scores must cover the same samples")
    binary = np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()
    if binary:
        only_a = int(((x == 1) & (y == 0)).sum())
        only_b = int(((x == 0) & (y == 1)).sum())
        if only_a + only_b == 0:
            return "mcnemar", 1.0
        return "mcnemar", float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    if np.allclose(x, y):
        return "wilcoxon", 1.0
    return "wilcoxon", float(sps.wilcoxon(x, y, zero_method="zsplit").pvalue)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(cost, score)`` points: ``True`` where no other point is as cheap and as good, one strictly."""
    flags = []
    for i, (c, s) in enumerate(points):
        dominated = any((c2 <= c and s2 >= s) and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags
