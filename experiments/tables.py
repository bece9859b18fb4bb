"""The table of a comparison: built from the trial folders, written as Markdown, CSV, JSON and to wandb.

:func:`aggregate` reads the finished trials and builds a :class:`Table`: per controller, the mean and 95 %
t-interval over seeds of every figure in :data:`METRICS`, iterations and seconds to a target validation
loss, and a paired t-test of its :data:`HEADLINE` figure against the baseline (the best constant rate by
it): the best weights' loss on the whole validation split, not the optimistic minimum of noisy estimates.
Every writer (these, and the HTML of :mod:`experiments.report`) formats cells with :func:`format_cell`.
"""
from __future__ import annotations

import csv
import datetime as dt
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controllers import spec_name
from dyndrop import UserError, json_safe, write_json

from .comparison import Comparison
from .stats import CONFIDENCE, TEST, default_target, mean_ci, paired_test, pick_baseline
from .trials import TrialResult

HEADLINE = "best_val_loss_full"
"""What rows are ranked and tested by: the best weights scored on the whole validation split."""

METRICS: dict[str, tuple[str, int]] = {
    HEADLINE: ("best val loss (full split)", 4),
    "best_val_loss": ("best val loss (fixed batches)", 4),
    "final_train_loss": ("final train loss", 4),
    "iters_to_target": ("iters to target", 0),
    "secs_to_target": ("s to target", 1),
    "total_train_time_s": ("train time (s)", 1),
    "compute_iters": ("compute (iters)", 0),
    "train_tokens_per_s": ("train tok/s", 0),
    "inference_tokens_per_s": ("infer tok/s", 0),
}
"""Per-trial figures in the table (mean and CI over seeds): column title and decimal places."""

DELTA = ("delta_best_val_loss_full", 4)
"""The paired difference against the baseline: its key and decimal places."""


@dataclass
class Table:
    """The results of a comparison. ``rows`` has one dict per controller, ``trials`` one per run."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    trials: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "trials": self.trials}


def aggregate(comparison: Comparison, results: list[TrialResult] | None = None) -> Table:
    """Build the table from the trials' folders (only finished trials count; missing ones lower ``n``)."""
    results = comparison.results() if results is None else results
    if not results:
        raise UserError(f"{comparison.out} has no finished trial yet; run python -m runs.compare first")
    if not any(r.summary for r in results):
        raise UserError(f"every finished trial in {comparison.out} diverged; see trials/*/diverged.json")
    by_spec: dict[str, list[TrialResult]] = {s: [] for s in comparison.specs}
    for r in results:
        by_spec[r.trial.spec].append(r)
    def values(rs: list[TrialResult], key: str) -> list[float]:
        return [r.summary[key] for r in rs if r.summary and r.summary.get(key) is not None]

    baseline = comparison.baseline or pick_baseline({s: values(rs, HEADLINE) for s, rs in by_spec.items()})
    baseline_rule = ("given (--baseline)" if comparison.baseline
                     else "best constant rate (lowest mean best val loss on the full split)")
    if baseline is None:
        baseline, baseline_rule = comparison.specs[0], "first controller (no constant rate in the comparison)"
    target, target_rule = comparison.target, "given (--target)"
    if target is None:
        target = default_target(values(by_spec.get(baseline, []), "best_val_loss"))
        target_rule = "worst best val loss among the baseline's seeds, rounded up"

    trials = []
    for r in results:
        row = {"controller": r.trial.spec, "seed": r.trial.seed, "folder": os.path.relpath(r.folder, comparison.out),
               "diverged": r.diverged}
        if r.summary:
            row.update({k: r.summary.get(k) for k in METRICS if k in r.summary})
            # iterations trained for this row: a single run's, or summed over a PBT population
            row["compute_iters"] = r.summary.get("compute_iters", r.summary.get("iterations"))
            row["iters_to_target"], row["secs_to_target"] = r.to_target(target) if math.isfinite(target) \
                else (math.nan, math.nan)
            row.update(concurrent_trials=r.summary.get("concurrent_trials"), device_name=r.summary.get("device_name"),
                       best_val_iter=r.summary.get("best_val_iter"))
        trials.append(row)

    base_best = {t["seed"]: t[HEADLINE] for t in trials if t["controller"] == baseline and t.get(HEADLINE) is not None}
    rows = []
    for spec in comparison.specs:
        done = [t for t in trials if t["controller"] == spec and not t["diverged"]]
        row: dict[str, Any] = {"controller": spec, "baseline": spec == baseline, "n": len(done),
                               "diverged": sum(t["diverged"] for t in trials if t["controller"] == spec)}
        for key in METRICS:
            mean, low, high = mean_ci([t.get(key) for t in done])
            row.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        row["reached_target"] = sum(t.get("iters_to_target") is not None and math.isfinite(t["iters_to_target"])
                                    for t in done)
        concurrent = sorted({t["concurrent_trials"] for t in done if t.get("concurrent_trials")})
        row["concurrent_trials"] = "/".join(map(str, concurrent)) or None
        if spec == baseline:
            test = {"delta": math.nan, "delta_low": math.nan, "delta_high": math.nan, "p": math.nan, "n": len(done)}
        else:
            test = paired_test({t["seed"]: t.get(HEADLINE) for t in done}, base_best)
        key = DELTA[0]
        row.update({key: test["delta"], f"{key}_low": test["delta_low"], f"{key}_high": test["delta_high"],
                    "p_value": test["p"], "pairs": test["n"]})
        rows.append(row)

    sweep_runs = sum(spec_name(s) == "constant" for s in comparison.specs)
    devices = sorted({t["device_name"] for t in trials if t.get("device_name")})
    concurrent_all = sorted({t["concurrent_trials"] for t in trials if t.get("concurrent_trials")})
    meta = {
        "name": comparison.name, "preset": comparison.cfg.preset, "seeds": comparison.seeds,
        "max_iters": comparison.cfg.max_iters, "eval_interval": comparison.cfg.eval_interval,
        "eval_iters": comparison.cfg.eval_iters, "baseline": baseline, "baseline_rule": baseline_rule,
        "target_val_loss": target, "target_rule": target_rule, "confidence": CONFIDENCE,
        "headline": HEADLINE, "test": f"{TEST}, of the best weights' full-split val loss against the baseline",
        "concurrent_trials": concurrent_all, "device": devices,
        "trials_finished": sum(1 for t in trials if not t["diverged"]), "trials_planned": len(comparison.trials),
        # what choosing the rate by a sweep costs: every constant rate of the comparison, per seed
        "sweep_runs": sweep_runs, "sweep_compute_iters": sweep_runs * comparison.cfg.max_iters,
        "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return Table(json_safe(meta), [json_safe(r) for r in rows], [json_safe(t) for t in trials])


# --------------------------------------------------------------------------------------------------
# Formatting: one set of rules for every writer


def format_number(v: Any, digits: int) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_cell(row: dict[str, Any], key: str, digits: int, as_html: bool = False) -> str:
    """A row's ``key``: ``mean ± half-width`` of its t-interval (symmetric), or in HTML
    ``mean [low, high]``; just the mean when there is no interval; ``–`` without a value."""
    mean, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if mean is None:
        return "–"
    if low is None or high is None:
        return format_number(mean, digits)
    if as_html:
        return f"{mean:.{digits}f} <small>[{low:.{digits}f}, {high:.{digits}f}]</small>"
    return f"{format_number(mean, digits)} ± {format_number((high - low) / 2, digits)}"


def header() -> list[str]:
    return ["controller", "n", *(title for title, _ in METRICS.values()), "reached", "Δ full-split val", "p"]


def row_cells(row: dict[str, Any], as_html: bool = False) -> list[str]:
    """One table row as text cells (HTML-escaped with ``as_html``), in :func:`header`'s order."""
    name = html.escape(row["controller"]) if as_html else row["controller"]
    bold = f"<b>{name}</b>" if as_html else f"**{name}**"
    return [f"{bold} (baseline)" if row["baseline"] else name,
            f"{row['n']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else ""),
            *(format_cell(row, k, d, as_html) for k, (_, d) in METRICS.items()),
            f"{row['reached_target']}/{row['n']}",
            "–" if row["baseline"] else format_cell(row, DELTA[0], DELTA[1], as_html),
            "–" if row["baseline"] else format_p(row["p_value"])]


# --------------------------------------------------------------------------------------------------
# Writers


def markdown_table(table: Table) -> str:
    """The table as Markdown, with a header saying what was compared, where, and how."""
    m = table.meta
    target = "–" if m["target_val_loss"] is None else f"{m['target_val_loss']:.3f}"
    lines = [
        f"**{m['name']}** — preset `{m['preset']}`, {m['max_iters']} iterations, seeds {m['seeds']}, "
        f"{m['trials_finished']}/{m['trials_planned']} trials finished; device {', '.join(m['device']) or '?'}; "
        f"trials run {', '.join(map(str, m['concurrent_trials'])) or '?'} at a time; {m['written']}.",
        "",
        f"Baseline (**bold**): `{m['baseline']}` — {m['baseline_rule']}. Target val loss {target} "
        f"({m['target_rule']}); evaluations every {m['eval_interval']} iterations. "
        f"Values: mean ± half-width of the {m['confidence']:.0%} t-interval over seeds. "
        f"Δ: paired difference of the best weights' loss on the whole validation split vs the baseline "
        f"(negative = better); p: {m['test']}.",
        "",
    ]
    head = header()
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in table.rows]
    lines += ["", "Iterations and seconds to target are means over the seeds that reached it (column *reached*)."]
    if m.get("sweep_runs"):
        lines += [f"Compute is training iterations per seed; choosing the rate by this comparison's sweep of "
                  f"{m['sweep_runs']} constant rates costs {m['sweep_compute_iters']} iterations per seed."]
    return "\n".join(lines) + "\n"


def write_tables(table: Table, out: str | Path) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` (one row per controller) and ``results.json`` into ``out``."""
    out = Path(out)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["md"].write_text(markdown_table(table))
    write_json(paths["json"], table.to_json())
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table.rows[0]))
        writer.writeheader()
        writer.writerows(table.rows)
    return paths


def log_table_to_wandb(comparison: Comparison, table: Table) -> None:
    """One extra run in the comparison's group holding the table (a ``wandb.Table``) and its figures,
    written beside the trials' runs under ``<out>/wandb/``.

    The per-trial runs' summaries hold their own figures; the target and the paired tests need every
    trial, so they live here.
    """
    from gpt.tracking import wandb_mode

    mode = wandb_mode(comparison.cfg.wandb)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=comparison.cfg.wandb_project, group=comparison.group, name=f"{comparison.name}-table",
                     job_type="comparison", config=table.meta, dir=str(comparison.out), mode=mode,
                     settings=wandb.Settings(silent=True))
    columns = list(table.rows[0])
    run.log({"comparison/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table.rows])})
    for row in table.rows:
        run.summary.update({f"{row['controller']}/{k}": v for k, v in row.items() if k != "controller"})
    run.finish()
