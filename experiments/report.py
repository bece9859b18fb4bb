"""A local report of a comparison: PNG figures and one HTML page, viewable with no wandb account.

:func:`write_report` rebuilds the table from the trial folders (:func:`experiments.tables.aggregate`), draws

- ``val_loss.png``: validation loss against iteration, per controller: mean over seeds, band = range
  over seeds (whole run, and a zoom on the second half where controllers differ);
- ``dropout_rate.png``: the dropout rate each controller chose (mean over seeds and layers, band = range);
- ``gap.png``: the generalization gap, val loss − train loss on the fixed evaluation batches;
- ``best_val.png``: the headline, the best weights' loss on the test split, per controller: mean with its 95 %
  t-interval, one dot per seed;

and writes ``report.html`` with the figures embedded (base64), so the one file can be mailed or opened
anywhere. Uses matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from .comparison import Comparison
from .tables import HEADLINE, Table, aggregate, header, row_cells, write_tables
from .trials import TrialResult

FIGURES = {
    "val_loss": "Validation loss (mean over seeds; band = range over seeds)",
    "dropout_rate": "Dropout rate chosen by each controller (mean over seeds and layers)",
    "gap": "Generalization gap: val loss − train loss on the fixed evaluation batches",
    "best_val": "Test loss of the best weights (chosen on val), per controller: mean and 95 % t-interval over "
                "seeds; dots = seeds",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seed_band(results: list[TrialResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(iters, mean, low, high)`` of ``key`` over the seeds, at the iterations every seed logged."""
    curves = [r.curve(key) for r in results]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return (np.zeros(0),) * 4
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    iters = np.asarray(common, dtype=float)
    stacked = np.stack([np.interp(iters, *c) if len(c[0]) > 1 else c[1][:1].repeat(len(iters)) for c in curves])
    # np.interp at logged points returns the logged value; a repeated iter (resumed run) keeps the last.
    return iters, stacked.mean(0), stacked.min(0), stacked.max(0)


def _colors(n: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _curve_figure(groups: dict[str, list[TrialResult]], key: str, ylabel: str, baseline: str,
                  step: bool = False, target: float | None = None, zoom: bool = False,
                  x_end: float | None = None):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(15 if zoom else 10, 4.8), squeeze=False)
    colors = _colors(len(groups))
    band_alpha = max(0.05, 0.25 / math.sqrt(len(groups) or 1))  # many overlapping bands turn to mud
    for ax_i, ax in enumerate(axes[0]):
        lows, highs = [], []
        for (spec, rs), color in zip(groups.items(), colors):
            iters, mean, low, high = seed_band(rs, key)
            if not len(iters):
                continue
            if step and x_end is not None and iters[-1] < x_end:  # the last rate holds to the end of the run
                iters, mean, low, high = (np.append(a, v) for a, v in
                                          ((iters, x_end), (mean, mean[-1]), (low, low[-1]), (high, high[-1])))
            if ax_i == 1:  # zoom: second half of the run
                keep = iters >= iters.max() / 2
                iters, mean, low, high = iters[keep], mean[keep], low[keep], high[keep]
                lows.append(low.min())
                highs.append(high.max())
            label = f"{spec} (baseline)" if spec == baseline else spec
            width = 2.4 if spec == baseline else 1.4
            kw = {"drawstyle": "steps-post"} if step else {}
            ax.plot(iters, mean, color=color, lw=width, label=label, **kw)
            if len(rs) > 1:
                ax.fill_between(iters, low, high, color=color, alpha=band_alpha, lw=0, step="post" if step else None)
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}" if ax_i == 0 else None)
        if ax_i == 1 and lows:
            pad = 0.05 * (max(highs) - min(lows) or 1.0)
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
            ax.set_title("second half of the run")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    # outside the plot, to the right: with ten controllers a legend inside hides the curves
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _best_val_figure(table: Table):
    plt = _pyplot()
    rows = table.rows
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    colors = _colors(len(rows))
    for i, (row, color) in enumerate(zip(rows, colors)):
        y = len(rows) - 1 - i
        seeds = [t[HEADLINE] for t in table.trials
                 if t["controller"] == row["controller"] and t.get(HEADLINE) is not None]
        ax.scatter(seeds, [y] * len(seeds), color=color, s=14, alpha=0.6, zorder=3)
        if row[HEADLINE] is None:
            continue
        low, high = row[f"{HEADLINE}_low"], row[f"{HEADLINE}_high"]
        xerr = None if low is None else [[row[HEADLINE] - low], [high - row[HEADLINE]]]
        ax.errorbar(row[HEADLINE], y, xerr=xerr, fmt="D" if row["baseline"] else "o", color=color,
                    capsize=4, ms=7, zorder=4)
    if any(r["baseline"] and r[HEADLINE] is not None for r in rows):
        base = next(r for r in rows if r["baseline"])
        ax.axvline(base[HEADLINE], color="grey", ls=":", lw=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['controller']} (baseline)" if r["baseline"] else r["controller"] for r in reversed(rows)])
    ax.set_xlabel("best weights' test loss (nats/char; lower is better)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def draw_figures(comparison: Comparison, table: Table, results: list[TrialResult], folder: Path) -> dict[str, Path]:
    """Write the PNGs into ``folder``; returns their paths by figure name."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    # diverged trials stop early: their curves would cut every band short, so only finished ones are drawn
    groups = {s: [r for r in results if r.trial.spec == s and r.summary and r.records] for s in comparison.specs}
    groups = {s: rs for s, rs in groups.items() if rs}
    baseline, target = table.meta["baseline"], table.meta["target_val_loss"]
    figures = {
        "val_loss": _curve_figure(groups, "val/loss", "validation loss (nats/char)", baseline, target=target, zoom=True),
        "dropout_rate": _curve_figure(groups, "dropout/rate", "dropout rate", baseline, step=True,
                                      x_end=comparison.cfg.max_iters),
        "gap": _curve_figure(groups, "val/gap", "val loss − train loss (nats/char)", baseline),
        "best_val": _best_val_figure(table),
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = folder / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def html_table(table: Table) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header(table)) + "</tr>"]
    for row in table.rows:
        cls = ' class="baseline"' if row["baseline"] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row_cells(table, row, as_html=True)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.baseline { background: #eef5ff; }
img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #555; }
"""


def write_report(out: str | Path, dest: str | Path | None = None) -> Path:
    """Rebuild the table of the comparison in ``out`` and write ``report.html``, ``figures/*.png`` and ``results.*``
    into ``dest`` (default ``out``)."""
    out = Path(out)
    dest = Path(dest) if dest is not None else out
    comparison = Comparison.load(out)
    results = comparison.results()
    table = aggregate(comparison, results)
    write_tables(table, dest)  # so results.* always match the page, also for a partly finished comparison
    paths = draw_figures(comparison, table, results, dest / "figures")
    m = table.meta
    target = "" if m["target_val_loss"] is None else (
        f" Iterations and seconds to the val loss {m['target_val_loss']:.3f} (--target) are means over the seeds "
        "that reached it.")
    parts = [
        "<!doctype html>", "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(m['name'])}: controller comparison</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(m['name'])}: controller comparison</h1>",
        f"<p class='meta'>Preset <code>{html.escape(m['preset'])}</code>, {m['max_iters']} iterations, "
        f"evaluation every {m['eval_interval']} iterations on {m['eval_iters']} fixed batches per split; seeds "
        f"{html.escape(str(m['seeds']))} ({m['trials_finished']}/{m['trials_planned']} trials finished); device "
        f"{html.escape(', '.join(m['device']) or '?')}; trials run {', '.join(map(str, m['concurrent_trials'])) or '?'} "
        f"at a time; table written {m['written']}.</p>",
        f"<p>Baseline: <code>{html.escape(m['baseline'])}</code> ({html.escape(m['baseline_rule'])}). "
        f"Cells: mean <small>[95 % t-interval over seeds]</small>. Δ: paired difference of the test loss against "
        f"the baseline (negative = better). p: {html.escape(m['test'])}. Verdict: better/worse where the "
        f"Holm-adjusted p &lt; 0.05, equivalent where {html.escape(m['equivalence'])} shows it, else not shown."
        f"{target}</p>",
        html_table(table),
    ]
    for name, caption in FIGURES.items():
        data = base64.b64encode(paths[name].read_bytes()).decode("ascii")
        parts += [f"<h2>{html.escape(caption)}</h2>",
                  f"<img alt='{name}' src='data:image/png;base64,{data}'>",
                  f"<p class='meta'>File: figures/{name}.png</p>"]
    parts.append("</body></html>")
    page = dest / "report.html"
    page.write_text("\n".join(parts) + "\n")
    return page


# --------------------------------------------------------------------------------------------------
# A suite folder (runs.suite): regret per regime


def regret_figure(result: dict[str, Any]):
    """Regret per regime and controller: one dot per seed, a bar at the mean; 0 = the regime's best constant."""
    plt = _pyplot()
    regimes, specs = result["regimes"], result["controllers"]
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(regimes) * max(1, len(specs)) ** 0.5), 4.8))
    width = 0.8 / max(len(specs), 1)
    for j, (spec, color) in enumerate(zip(specs, _colors(len(specs)))):
        for i, name in enumerate(regimes):
            mine = result["per_regime"][name]["controllers"][spec]
            per_seed = [v for v in mine["regret"].values() if v is not None]
            x = i - 0.4 + width * (j + 0.5)
            if mine["regret_mean"] is not None:
                ax.bar(x, mine["regret_mean"], width * 0.9, color=color, alpha=0.35, label=spec if i == 0 else None)
            ax.scatter([x] * len(per_seed), per_seed, color=color, s=12, zorder=3)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(regimes)))
    ax.set_xticklabels([f"{n}\n({result['per_regime'][n]['split']})" for n in regimes])
    ax.set_ylabel("regret: test loss − best constant's (nats/char)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def write_suite_report(out: str | Path, dest: str | Path | None = None) -> Path:
    """``figures/regret.png`` and ``report.html`` (the suite's tables and the figure) of the suite folder ``out``,
    written into ``dest`` (default ``out``)."""
    from dyndrop import read_json

    from .suite import markdown

    out = Path(out)
    dest = Path(dest) if dest is not None else out
    result = read_json(out / "suite.json", "suite result")
    (dest / "figures").mkdir(parents=True, exist_ok=True)
    path = dest / "figures" / "regret.png"
    fig = regret_figure(result)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    page = dest / "report.html"
    page.write_text("\n".join([
        "<!doctype html>", "<html><head><meta charset='utf-8'>",
        f"<title>suite: regret per regime</title><style>{_STYLE}</style></head><body>",
        "<h1>Regret per regime</h1>", f"<pre>{html.escape(markdown(result))}</pre>",
        f"<img alt='regret' src='data:image/png;base64,{data}'>", "<p class='meta'>File: figures/regret.png</p>",
        "</body></html>"]) + "\n")
    return page


# --------------------------------------------------------------------------------------------------
# A policy folder (runs.train_policy): the learning curve


def curve_change(out: str | Path) -> dict[str, float]:
    """The learning curve's first point (the untrained policy) against its last, paired over the held-out
    (micro-regime, seed) runs: their mean regrets, the difference and the paired t-test's p."""
    from dyndrop import read_json

    from .stats import paired_test

    points = read_json(Path(out) / "learning_curve.json", "learning curve")["points"]
    first, last = points[0]["per_pair"], points[-1]["per_pair"]
    keys = list(first)
    test = paired_test({i: last[k] for i, k in enumerate(keys)}, {i: first[k] for i, k in enumerate(keys)})
    return {"first": points[0]["regret"], "last": points[-1]["regret"], "delta": test["delta"], "p": test["p"],
            "n": test["n"], "first_steps": points[0]["env_steps"], "last_steps": points[-1]["env_steps"]}


def write_curve_report(out: str | Path, dest: str | Path | None = None) -> Path:
    """``learning_curve.png`` (held-out regret against env steps, ± one standard error) and ``report.html`` of the
    policy folder ``out``, written into ``dest`` (default ``out``)."""
    from dyndrop import read_json

    out = Path(out)
    dest = Path(dest) if dest is not None else out
    curve = read_json(out / "learning_curve.json", "learning curve")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [p["env_steps"] for p in curve["points"]]
    ax.errorbar(steps, [p["regret"] for p in curve["points"]], yerr=[p["regret_sem"] for p in curve["points"]],
                marker="o", capsize=3)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("env steps (decisions) trained")
    ax.set_ylabel("held-out regret: test loss − best constant's (nats/char)")
    ax.set_title(f"PPO on micro-regimes: {len(curve['regimes'])} held-out regimes × {curve['seeds']} seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = dest / "learning_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    c = curve_change(out)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    page = dest / "report.html"
    page.write_text("\n".join([
        "<!doctype html>", "<html><head><meta charset='utf-8'>",
        f"<title>learning curve</title><style>{_STYLE}</style></head><body>", "<h1>Learning curve</h1>",
        f"<p>Held-out regret {c['first']:+.4f} at {c['first_steps']} env steps, {c['last']:+.4f} at "
        f"{c['last_steps']} (paired difference {c['delta']:+.4f}, p {c['p']:.3g}, {c['n']} runs).</p>",
        f"<img alt='learning curve' src='data:image/png;base64,{data}'>", "</body></html>"]) + "\n")
    return page
