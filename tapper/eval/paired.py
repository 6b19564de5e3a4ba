"""Paired comparisons of two models scored on the same queries: the mean difference and a bootstrap interval.

A handful of queries can move a small evaluation by points, so a gap between two variants says little until
it is set against how much it moves when the queries are resampled. Both models answered the same queries,
so the queries are resampled in pairs (the difference per query), which removes what the queries have in
common (easy and hard ones) from the spread.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], n_boot: int = 2000, seed: int = 0) -> dict:
    """mean(a - b) over the queries both score, a 95 % percentile-bootstrap interval for it, and how many
    queries each side wins. `a` and `b` are per-query scores (tapper.eval.metrics.per_query_scores)."""
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError("paired_difference: no query is scored by both sides")
    diffs = np.array([a[i] - b[i] for i in ids], dtype=np.float64)
    n = len(diffs)
    means = diffs[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {
        "mean": float(diffs.mean()),
        "ci95": [float(lo), float(hi)],
        "queries": n,
        "a_higher": int((diffs > 0).sum()),
        "b_higher": int((diffs < 0).sum()),
    }


def describe(stats: dict, digits: int = 3) -> str:
    """'+0.031 [-0.012, +0.075] over 320 queries' for logs and tables."""
    lo, hi = stats["ci95"]
    return f"{stats['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] over {stats['queries']} queries"
