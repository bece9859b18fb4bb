"""The statistics of a comparison: mean with a Student-t interval, the paired test, the baseline and the
target. Plain numpy/scipy; every figure in the tables, the report and ``runs.eval_policy`` comes from here."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

from controllers import spec_name

CONFIDENCE = 0.95
"""Level of every confidence interval."""

TEST = "paired t-test (scipy.stats.ttest_rel), paired by seed"


def mean_ci(values: Sequence[float | None], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean; nan bounds below 2 values.

    Non-finite values and None are ignored.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    sem = float(sps.sem(x))
    if sem == 0.0:
        return mean, mean, mean
    low, high = sps.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def paired_test(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Paired t-test of ``values - baseline`` over the seeds both have (keys are seeds).

    Returns ``n`` (pairs), ``delta`` (mean difference) with its CI (``delta_low``, ``delta_high``), and
    ``p`` (two-sided; nan with fewer than 2 pairs, or when every difference is 0).
    """
    seeds = sorted(s for s in values.keys() & baseline.keys()
                   if values[s] is not None and baseline[s] is not None
                   and math.isfinite(values[s]) and math.isfinite(baseline[s]))
    diffs = np.array([values[s] - baseline[s] for s in seeds], dtype=float)
    delta, low, high = mean_ci(diffs)
    p = math.nan
    if len(diffs) >= 2 and np.any(diffs != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-equal differences: t is infinite
            p = float(sps.ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return {"n": len(seeds), "delta": delta, "delta_low": low, "delta_high": high, "p": p}


def pick_baseline(per_spec: dict[str, list[float]]) -> str | None:
    """The ``constant`` spec with the lowest mean of its values (None if no constant has any)."""
    constants = {s: float(np.mean(v)) for s, v in per_spec.items() if spec_name(s) == "constant" and v}
    return min(constants, key=constants.get) if constants else None


def default_target(baseline_best: Sequence[float]) -> float:
    """The worst best-validation-loss among the baseline's seeds, rounded up to 0.001.

    Every baseline seed reaches it, so "iterations to target" asks: how soon does each controller get
    as good as the best constant rate got in all of its seeds?
    """
    finite = [v for v in baseline_best if v is not None and math.isfinite(v)]
    return math.ceil(max(finite) * 1000 - 1e-9) / 1000 if finite else math.nan
