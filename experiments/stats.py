"""The statistics of a comparison and the suite: mean with a Student-t interval, the paired test, Holm's adjustment
over a table's rows, the equivalence test (TOST) and the verdict they give, and the baseline. Plain numpy/scipy;
every figure in the tables, the report, ``runs.eval_policy`` and ``runs.suite`` comes from here."""
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


EQUIVALENCE_MARGIN = 0.01
"""Nats: two rows whose mean paired difference is shown (TOST) to lie within ±this are called equivalent."""

ALPHA = 0.05


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (nan ones are left out and stay nan): the i-th smallest
    is multiplied by (m - i), running maxima kept, capped at 1. Controls the family-wise error rate at any level."""
    finite = sorted((p, k) for k, p in p_values.items() if p is not None and math.isfinite(p))
    m, running, adjusted = len(finite), 0.0, {k: math.nan for k in p_values}
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[k] = running
    return adjusted


def tost(diffs: Sequence[float], margin: float = EQUIVALENCE_MARGIN) -> float:
    """p-value of two one-sided t-tests that the mean of ``diffs`` lies within ``±margin`` (the larger of the two
    one-sided p-values; nan below 2 values). Small means: shown to be equivalent."""
    x = np.asarray([d for d in diffs if d is not None and math.isfinite(d)], dtype=float)
    if len(x) < 2:
        return math.nan
    sem = float(sps.sem(x))
    if sem == 0.0:
        return 0.0 if abs(float(x.mean())) < margin else 1.0
    df = len(x) - 1
    p_low = float(sps.t.sf((x.mean() + margin) / sem, df))   # H0: mean <= -margin
    p_high = float(sps.t.cdf((x.mean() - margin) / sem, df))  # H0: mean >= +margin
    return max(p_low, p_high)


def verdict(delta: float, p_adjusted: float, p_equivalent: float, alpha: float = ALPHA) -> str:
    """A row against its baseline, in words: ``better`` or ``worse`` (Holm-adjusted p below ``alpha``),
    ``equivalent`` (TOST p below ``alpha``), else ``not shown``; ``–`` without a test."""
    if delta is None or not math.isfinite(delta):
        return "–"
    if p_adjusted is not None and math.isfinite(p_adjusted) and p_adjusted < alpha:
        return "better" if delta < 0 else "worse"
    if p_equivalent is not None and math.isfinite(p_equivalent) and p_equivalent < alpha:
        return f"equivalent (±{EQUIVALENCE_MARGIN:g})"
    return "not shown"


def pick_baseline(per_spec: dict[str, list[float]]) -> str | None:
    """The ``constant`` spec with the lowest mean of its values (None if no constant has any). Give it *val*
    figures: a baseline picked on the figures it is then compared by would favour itself."""
    constants = {s: float(np.mean(v)) for s, v in per_spec.items() if spec_name(s) == "constant" and v}
    return min(constants, key=constants.get) if constants else None
