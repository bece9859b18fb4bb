"""The table of a comparison: built from the trial folders, written as Markdown, CSV, JSON and to wandb.

:func:`aggregate` reads the finished trials and builds a :class:`Table`: per controller, the mean and 95 %
t-interval over seeds of every figure in :data:`METRICS`, and a paired t-test of its :data:`HEADLINE` figure, the
best weights' loss on the test split that nothing steered on, against the baseline (the constant rate with the
lowest mean *validation* loss, so the baseline is not picked on the figures it is compared by). The p-values are
Holm-adjusted over the table's rows, and a row is called equivalent to the baseline only where an equivalence test
(TOST, ±0.01 nats) shows it; otherwise an insignificant difference is "not shown". Iterations to a target come only
with ``--target``: per seed, and paired against the baseline. Every writer (these, and the HTML of
:mod:`experiments.report`) formats cells with :func:`format_cell`.
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
from .stats import CONFIDENCE, EQUIVALENCE_MARGIN, TEST, holm, mean_ci, paired_test, pick_baseline, tost, verdict
from .trials import TrialResult

HEADLINE = "test_loss"
"""What rows are compared by: the best weights (chosen on val) scored once on the whole test split."""
SELECT = "best_val_loss_full"
"""What the baseline is chosen by: the best weights' loss on the whole validation split."""

METRICS: dict[str, tuple[str, int]] = {
    HEADLINE: ("test loss", 4),
    SELECT: ("val loss (full split)", 4),
    "best_val_loss": ("best val (fixed batches)", 4),
    "final_train_loss": ("final train loss", 4),
    "total_train_time_s": ("train time (s)", 1),
    "compute_iters": ("compute (iters)", 0),
    "train_tokens_per_s": ("train tok/s", 0),
    "inference_tokens_per_s": ("infer tok/s", 0),
}
"""Per-trial figures in the table (mean and CI over seeds): column title and decimal places."""

TARGET_METRICS: dict[str, tuple[str, int]] = {"iters_to_target": ("iters to target", 0),
                                              "secs_to_target": ("s to target", 1)}
"""With ``--target``: iterations and seconds to the first evaluation at or below it."""

DELTA = ("delta_test_loss", 4)
"""The paired difference of the headline against the baseline: its key and decimal places."""


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
    trials = [trial_row(r, comparison) for r in results]
    baseline, rule = choose_baseline(comparison, trials)
    rows = controller_rows(comparison, trials, baseline)
    return Table(json_safe(table_meta(comparison, trials, baseline, rule)), [json_safe(r) for r in rows],
                 [json_safe(t) for t in trials])


def trial_row(r: TrialResult, comparison: Comparison) -> dict[str, Any]:
    """One trial's line of the table: its figures, compute, and with ``--target`` its iterations to it."""
    row = {"controller": r.trial.spec, "seed": r.trial.seed, "folder": os.path.relpath(r.folder, comparison.out),
           "diverged": r.diverged}
    if r.summary:
        row.update({k: r.summary.get(k) for k in METRICS if k in r.summary})
        # iterations trained for this row: a single run's, or summed over a PBT population
        row["compute_iters"] = r.summary.get("compute_iters", r.summary.get("iterations"))
        if comparison.target is not None:
            row["iters_to_target"], row["secs_to_target"] = r.to_target(comparison.target)
        row.update(concurrent_trials=r.summary.get("concurrent_trials"), device_name=r.summary.get("device_name"),
                   best_val_iter=r.summary.get("best_val_iter"))
    return row


def choose_baseline(comparison: Comparison, trials: list[dict[str, Any]]) -> tuple[str, str]:
    """The baseline row and the rule that chose it: ``--baseline``, else the constant rate with the lowest mean
    validation loss (:data:`SELECT`), else the first controller."""
    if comparison.baseline:
        return comparison.baseline, "given (--baseline)"
    by_spec = {s: [t[SELECT] for t in trials if t["controller"] == s and t.get(SELECT) is not None]
               for s in comparison.specs}
    best = pick_baseline(by_spec)
    if best is None:
        return comparison.specs[0], "first controller (no constant rate in the comparison)"
    return best, "the constant rate with the lowest mean val loss (full split); val, not test, chooses it"


def paired_against(trials: list[dict[str, Any]], spec: str, baseline: str, key: str) -> dict[str, Any]:
    """``key`` of ``spec``'s trials against the baseline's, paired by seed: the t-test and the TOST p-value."""
    base = {t["seed"]: t.get(key) for t in trials if t["controller"] == baseline and not t["diverged"]}
    mine = {t["seed"]: t.get(key) for t in trials if t["controller"] == spec and not t["diverged"]}
    test = paired_test(mine, base)
    pairs = [mine[s] - base[s] for s in mine.keys() & base.keys() if mine[s] is not None and base[s] is not None]
    return {**test, "p_equivalent": tost(pairs)}


def controller_rows(comparison: Comparison, trials: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per controller: mean and CI of each figure, and the headline against the baseline with raw and
    Holm-adjusted p-values (over every row tested) and the verdict."""
    metrics = {**METRICS, **(TARGET_METRICS if comparison.target is not None else {})}
    rows, tests = [], {}
    for spec in comparison.specs:
        done = [t for t in trials if t["controller"] == spec and not t["diverged"]]
        row: dict[str, Any] = {"controller": spec, "baseline": spec == baseline, "n": len(done),
                               "diverged": sum(t["diverged"] for t in trials if t["controller"] == spec)}
        for key in metrics:
            mean, low, high = mean_ci([t.get(key) for t in done])
            row.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        if comparison.target is not None:
            row["reached_target"] = sum(t.get("iters_to_target") is not None and math.isfinite(t["iters_to_target"])
                                        for t in done)
            row["p_iters_to_target"] = paired_against(trials, spec, baseline, "iters_to_target")["p"]
        concurrent = sorted({t["concurrent_trials"] for t in done if t.get("concurrent_trials")})
        row["concurrent_trials"] = "/".join(map(str, concurrent)) or None
        if spec != baseline:
            tests[spec] = paired_against(trials, spec, baseline, HEADLINE)
        test = tests.get(spec, {"delta": math.nan, "delta_low": math.nan, "delta_high": math.nan, "p": math.nan,
                                "n": len(done), "p_equivalent": math.nan})
        row.update({DELTA[0]: test["delta"], f"{DELTA[0]}_low": test["delta_low"], f"{DELTA[0]}_high": test["delta_high"],
                    "p_value": test["p"], "p_equivalent": test["p_equivalent"], "pairs": test["n"]})
        rows.append(row)
    adjusted = holm({s: t["p"] for s, t in tests.items()})
    for row in rows:
        row["p_holm"] = adjusted.get(row["controller"], math.nan)
        row["verdict"] = "baseline" if row["baseline"] else verdict(row[DELTA[0]], row["p_holm"], row["p_equivalent"])
    return rows


def table_meta(comparison: Comparison, trials: list[dict[str, Any]], baseline: str, rule: str) -> dict[str, Any]:
    """What was compared, how, and where: the table's header."""
    sweep_runs = sum(spec_name(s) == "constant" for s in comparison.specs)
    return {
        "name": comparison.name, "preset": comparison.cfg.preset, "seeds": comparison.seeds,
        "max_iters": comparison.cfg.max_iters, "eval_interval": comparison.cfg.eval_interval,
        "eval_iters": comparison.cfg.eval_iters, "baseline": baseline, "baseline_rule": rule,
        "target_val_loss": comparison.target, "confidence": CONFIDENCE, "headline": HEADLINE,
        "test": f"{TEST}, of the best weights' test loss against the baseline; Holm-adjusted over the rows",
        "equivalence": f"TOST, ±{EQUIVALENCE_MARGIN:g} nats",
        "concurrent_trials": sorted({t["concurrent_trials"] for t in trials if t.get("concurrent_trials")}),
        "device": sorted({t["device_name"] for t in trials if t.get("device_name")}),
        "trials_finished": sum(1 for t in trials if not t["diverged"]), "trials_planned": len(comparison.trials),
        # what choosing the rate by a sweep costs: every constant rate of the comparison, per seed
        "sweep_runs": sweep_runs, "sweep_compute_iters": sweep_runs * comparison.cfg.max_iters,
        "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


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


def table_metrics(table: Table) -> dict[str, tuple[str, int]]:
    """The figures a table shows: :data:`METRICS`, and :data:`TARGET_METRICS` when it has a target."""
    return {**METRICS, **(TARGET_METRICS if table.meta.get("target_val_loss") is not None else {})}


def header(table: Table) -> list[str]:
    target = ["reached"] if table.meta.get("target_val_loss") is not None else []
    return ["controller", "n", *(title for title, _ in table_metrics(table).values()), *target, "Δ test loss", "p",
            "p (Holm)", "verdict"]


def row_cells(table: Table, row: dict[str, Any], as_html: bool = False) -> list[str]:
    """One table row as text cells (HTML-escaped with ``as_html``), in :func:`header`'s order."""
    name = html.escape(row["controller"]) if as_html else row["controller"]
    bold = f"<b>{name}</b>" if as_html else f"**{name}**"
    target = [f"{row['reached_target']}/{row['n']}"] if table.meta.get("target_val_loss") is not None else []
    return [f"{bold} (baseline)" if row["baseline"] else name,
            f"{row['n']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else ""),
            *(format_cell(row, k, d, as_html) for k, (_, d) in table_metrics(table).items()), *target,
            "–" if row["baseline"] else format_cell(row, DELTA[0], DELTA[1], as_html),
            "–" if row["baseline"] else format_p(row["p_value"]),
            "–" if row["baseline"] else format_p(row["p_holm"]),
            "–" if row["baseline"] else row["verdict"]]


# --------------------------------------------------------------------------------------------------
# Writers


def markdown_table(table: Table) -> str:
    """The table as Markdown, with a header saying what was compared, where, and how."""
    m = table.meta
    target = "" if m["target_val_loss"] is None else (
        f" Iterations and seconds to the val loss {m['target_val_loss']:.3f} (--target) are means over the seeds "
        "that reached it (column *reached*).")
    lines = [
        f"**{m['name']}** — preset `{m['preset']}`, {m['max_iters']} iterations, seeds {m['seeds']}, "
        f"{m['trials_finished']}/{m['trials_planned']} trials finished; device {', '.join(m['device']) or '?'}; "
        f"trials run {', '.join(map(str, m['concurrent_trials'])) or '?'} at a time; {m['written']}.",
        "",
        f"Baseline (**bold**): `{m['baseline']}` — {m['baseline_rule']}. Evaluations every {m['eval_interval']} "
        f"iterations. Values: mean ± half-width of the {m['confidence']:.0%} t-interval over seeds. Δ: paired "
        f"difference of the test loss (the best weights, chosen on val, scored once on the test split) vs the "
        f"baseline (negative = better); p: {m['test']}. Verdict: better/worse where the Holm-adjusted p < 0.05, "
        f"equivalent where {m['equivalence']} shows it, else not shown.{target}",
        "",
    ]
    head = header(table)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(table, row)) + " |" for row in table.rows]
    if m.get("sweep_runs"):
        lines += ["", f"Compute is training iterations per seed; choosing the rate by this comparison's sweep of "
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
