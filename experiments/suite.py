"""The suite of regimes: where a controller is scored on runs nobody tuned it on.

A :class:`Regime` is a named set of settings over a preset, chosen by measurement to stand for something a user
meets (little or more data, a narrower or wider model, a longer run, another learning rate, a model that
underfits). Each regime belongs to one split, fixed here: ``tune`` regimes are what controllers may be tuned on,
``test`` regimes are held out for scoring them. ``paper`` is a GPU-only test regime.

Each regime carries a **reference sweep** (:class:`Reference`): constant rates on a few seeds, their per-seed
``test_loss`` and val figures, stored as JSON in ``experiments/references/`` with the command that made it and a
digest of what decides a run's numbers (the settings, the data's sha256, ``gpt.trainer.NUMERICS_VERSION``, torch's
version and the threads per run). Scoring a controller reruns only that controller; a reference whose digest no
longer matches is refused with the command that rebuilds it.

A controller's **regret** on a regime and seed is its ``test_loss`` minus that of the regime's best constant, the
constant with the lowest mean *val* loss (``best_val_loss_full``) over the reference's seeds: test never chooses.
:func:`score` reports the mean regret over the chosen regimes × seeds with a 95 % t-interval, beside the paired
differences against constant 0.2 (nanoGPT's default), constant 0 and the oracle (the per-seed best constant on
test), Holm-adjusted over the controllers, with a verdict (better / worse / equivalent within ±0.01 / not shown).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dyndrop import UserError, json_safe, read_json, write_json
from gpt.config import TrainConfig, canonical_settings, make_config

from .comparison import Comparison
from .stats import CONFIDENCE, EQUIVALENCE_MARGIN, holm, mean_ci, paired_test, tost, verdict
from .trials import UNCOMPARED_SETTINGS, inputs_identity

REFERENCES = Path(__file__).resolve().parent / "references"
"""Where the reference sweeps live (one JSON per regime), in the repository."""
SPLITS = ("tune", "test")
GRID = (0.0, 0.1, 0.2, 0.3, 0.4)
"""The reference sweep's constant rates; extended by 0.1 steps while the best (by val) sits at the top."""
SEEDS = (1337, 1338, 1339)
THREADS = 1
"""torch threads per reference run: CPU results depend on it, so it is part of the digest."""
FIGURES = ("test_loss", "best_val_loss_full", "best_val_loss", "best_val_iter", "final_val_loss", "iterations")
"""What a reference keeps of each run's summary."""


@dataclass(frozen=True)
class Regime:
    """A named set of settings over a preset.

    :param name: what ``--regimes`` takes.
    :param split: ``tune`` (controllers may be tuned on it), ``test`` (held out) or ``smoke`` (the tests' tiny one).
    :param preset: the :mod:`gpt.config` preset the settings override.
    :param settings: :class:`~gpt.config.TrainConfig` overrides.
    :param about: what it stands for, in one line.
    :param gpu: runs only where a CUDA GPU is visible.
    """

    name: str
    split: str
    preset: str
    settings: dict[str, Any] = field(default_factory=dict)
    about: str = ""
    gpu: bool = False

    def config(self, seed: int = SEEDS[0], **changes: Any) -> TrainConfig:
        """The regime's run for ``seed``: no checkpoints, progress bar or wandb unless ``changes`` say so."""
        return make_config(self.preset, **{"checkpoint": False, "progress": False, "wandb": "disabled",
                                            **self.settings, "seed": seed, **changes})


def _cpu(name: str, split: str, about: str, **settings: Any) -> Regime:
    return Regime(name, split, "cpu", {"eval_iters": 16, "gen_tokens": 0, **settings}, about)


REGIMES: dict[str, Regime] = {r.name: r for r in (
    # the cpu recipe (4 x 128, block 64, batch 12, lr 1e-3) on 10,000 characters: overfits a third of the way in
    _cpu("small-data", "tune", "little data: 10k characters, 1200 steps", train_chars=10_000, max_iters=1200,
         eval_interval=60),
    _cpu("high-lr", "tune", "another learning rate (3e-3): 10k characters, 800 steps", train_chars=10_000,
         max_iters=800, eval_interval=40, learning_rate=3e-3, min_lr=3e-4),
    _cpu("wide", "tune", "a wider model (4 x 192) on 10k characters, 800 steps", n_embd=192, train_chars=10_000,
         max_iters=800, eval_interval=40),
    _cpu("underfit", "tune", "the whole training split, 600 steps: underfits, rate 0 is best", max_iters=600,
         eval_interval=30),
    _cpu("long", "test", "small-data trained twice as long (2400 steps): overfits early in the run",
         train_chars=10_000, max_iters=2400, eval_interval=120),
    _cpu("narrow", "test", "a narrower model (4 x 96) on 10k characters, 1200 steps", n_embd=96, train_chars=10_000,
         max_iters=1200, eval_interval=60),
    _cpu("more-data", "test", "more data: 40k characters, 1200 steps: still learning at the end, rate 0 is best",
         train_chars=40_000, max_iters=1200, eval_interval=60),
    # chosen by rate 0's val curve alone (seed 1337: its minimum at 840 of 1200), before any controller ran on it
    _cpu("late", "test", "20k characters, 1200 steps: overfits late in the run", train_chars=20_000,
         max_iters=1200, eval_interval=60),
    _cpu("underfit-narrow", "test", "4 x 96 on the whole training split, 800 steps: underfits", n_embd=96,
         max_iters=800, eval_interval=40),
    Regime("paper", "test", "paper", {"gen_tokens": 0},
           "nanoGPT's shakespeare_char GPT (6 x 384, 5000 steps): a GPU regime", gpu=True),
    Regime("tiny", "smoke", "tiny", {"max_iters": 60, "eval_interval": 10, "eval_iters": 2, "gen_tokens": 0},
           "the tests' regime: seconds per run"),
)}


def select_regimes(text: str) -> list[Regime]:
    """``tune``, ``test``, ``all`` (tune and test) or comma-separated names. GPU regimes are left out of a split
    where no CUDA GPU is visible; naming one there is an error. Raises ``UserError`` in one line."""
    import torch

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names in (["tune"], ["test"], ["all"]):
        chosen = [r for r in REGIMES.values() if r.split in (SPLITS if names == ["all"] else names)]
        return [r for r in chosen if not r.gpu or torch.cuda.is_available()]
    unknown = [n for n in names if n not in REGIMES]
    if unknown or not names:
        raise UserError(f"--regimes {text!r} is invalid: give tune, test, all, or names from "
                        f"{', '.join(REGIMES)}")
    gpu = [n for n in names if REGIMES[n].gpu and not torch.cuda.is_available()]
    if gpu:
        raise UserError(f"regime {gpu[0]} needs a CUDA GPU, and none is visible")
    return [REGIMES[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------------------------------
# Reference sweeps


def run_digest(cfg: TrainConfig, threads: int = THREADS) -> dict[str, Any]:
    """What decides a run's numbers besides its seed and controller, and its sha256 (``digest``)."""
    import torch

    settings = {k: v for k, v in canonical_settings(dataclasses.asdict(cfg)).items()
                if k not in UNCOMPARED_SETTINGS and k != "seed"}
    identity = inputs_identity(cfg, "constant")  # the one definition of a run's inputs, as trials and resume use it
    parts = {"settings": settings, "data_sha256": identity["data_sha256"], "numerics": identity["numerics"],
             "torch": torch.__version__.split("+")[0], "threads": threads}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {**parts, "digest": digest}


@dataclass
class Reference:
    """A regime's reference sweep: ``runs[spec][seed]`` holds each run's :data:`FIGURES`."""

    regime: str
    runs: dict[str, dict[int, dict[str, float]]]
    identity: dict[str, Any]
    command: str = ""
    written: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted(set.intersection(*(set(r) for r in self.runs.values())))

    def best_constant(self) -> str:
        """The constant with the lowest mean val loss (full split) over the seeds: the regret's baseline."""
        return min(self.runs, key=lambda s: mean_of(self.runs[s], "best_val_loss_full"))

    def oracle(self, seed: int) -> float:
        """The lowest test loss of any constant on ``seed``: what a sweep scored on test would pick."""
        return min(r[seed]["test_loss"] for r in self.runs.values())

    def to_json(self) -> dict[str, Any]:
        return {"regime": self.regime, "command": self.command, "written": self.written, "identity": self.identity,
                "best_constant": self.best_constant(),
                "runs": {s: {str(seed): v for seed, v in r.items()} for s, r in self.runs.items()}}

    @classmethod
    def load(cls, regime: Regime) -> Reference:
        """The stored reference of ``regime``. Raises ``UserError`` if there is none, or it is not one."""
        path = REFERENCES / f"{regime.name}.json"
        if not path.is_file():
            raise UserError(f"regime {regime.name} has no reference sweep ({path}); build it: "
                            f"{build_command([regime.name])}")
        d = read_json(path, "reference sweep")
        try:
            runs = {s: {int(seed): v for seed, v in r.items()} for s, r in d["runs"].items()}
            return cls(d["regime"], runs, d["identity"], d.get("command", ""), d.get("written", ""))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"reference sweep {path} is corrupt ({type(e).__name__}); rebuild it: "
                            f"{build_command([regime.name])}") from None

    def check(self, regime: Regime, threads: int) -> None:
        """Refuse a reference that today's code, data or settings would not reproduce."""
        now = run_digest(regime.config(), threads)
        if now["digest"] == self.identity.get("digest"):
            return
        changed = [k for k in ("settings", "data_sha256", "numerics", "torch", "threads")
                   if now[k] != self.identity.get(k)]
        raise UserError(f"the reference sweep of {regime.name} is stale ({', '.join(changed)} changed: "
                        f"{'; '.join(f'{k} {self.identity.get(k)!r} -> {now[k]!r}' for k in changed if k != 'settings')}"
                        f"); rebuild it: {build_command([regime.name])}")


def mean_of(by_seed: dict[int, dict[str, float]], key: str) -> float:
    values = [v[key] for v in by_seed.values() if v.get(key) is not None]
    return sum(values) / len(values) if values else math.inf


def build_command(names: list[str], seeds: list[int] | None = None) -> str:
    """The command that (re)builds the reference sweeps of ``names`` (on ``seeds``; default :data:`SEEDS`)."""
    extra = f" --seeds {','.join(map(str, seeds))}" if seeds and list(seeds) != list(SEEDS) else ""
    return f"python -m runs.suite --build-references --regimes {','.join(names)}{extra}"


def grid_specs(rates: list[float]) -> list[str]:
    return [f"constant:rate={r:g}" for r in rates]


def build_reference(regime: Regime, seeds: list[int], out: Path, jobs: int, command: str,
                    on_done: Callable | None = None) -> Reference:
    """Run the constant grid on ``seeds`` (one thread per run) in ``out/<regime>``, extend it while the best constant
    by val sits at its top, and write the reference into :data:`REFERENCES`."""
    rates = list(GRID)
    while True:
        comparison = regime_comparison(regime, grid_specs(rates), seeds, out, jobs, THREADS)
        comparison.run(on_done)
        runs = collect(comparison)
        reference = Reference(regime.name, runs, run_digest(regime.config(), THREADS), command,
                              dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        if reference.best_constant() != grid_specs(rates)[-1] or rates[-1] >= 0.9:
            break
        rates.append(round(rates[-1] + 0.1, 1))
    REFERENCES.mkdir(exist_ok=True)
    write_json(REFERENCES / f"{regime.name}.json", reference.to_json())
    return reference


def regime_comparison(regime: Regime, specs: list[str], seeds: list[int], out: Path, jobs: int,
                      threads: int, wandb: str = "disabled") -> Comparison:
    """The comparison of ``specs`` on ``regime``, in ``out/<regime>``: its trial folders are the suite's."""
    return Comparison(cfg=regime.config(seeds[0], wandb=wandb), specs=specs, seeds=seeds, out=out / regime.name,
                      name=f"suite-{regime.name}", jobs=jobs, threads=threads)


def collect(comparison: Comparison) -> dict[str, dict[int, dict[str, float]]]:
    """Each finished trial's :data:`FIGURES` by spec and seed (a diverged trial: nan test loss)."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for r in comparison.results():
        figures = {k: r.summary.get(k) for k in FIGURES} if r.summary else {"test_loss": math.nan}
        runs.setdefault(r.trial.spec, {})[r.trial.seed] = figures
    return runs


# --------------------------------------------------------------------------------------------------
# Scoring controllers


def checked_references(regimes: list[Regime], seeds: list[int] | None, threads: int) -> dict[str, Reference]:
    """Every regime's reference, checked against today's code and data, and holding ``seeds``."""
    references = {r.name: Reference.load(r) for r in regimes}
    for regime in regimes:
        references[regime.name].check(regime, threads)
        missing = sorted(set(seeds or []) - set(references[regime.name].seeds))
        if missing:
            raise UserError(f"seeds {missing} are not in {regime.name}'s reference sweep (seeds "
                            f"{references[regime.name].seeds}); the regret needs its constants on the same seeds")
    return references


def run_suite(specs: list[str], regimes: list[Regime], seeds: list[int] | None, out: Path, jobs: int, threads: int,
              wandb: str = "disabled", on_done: Callable | None = None) -> dict[str, Any]:
    """Run ``specs`` on every regime (after checking every reference) and write ``out/suite.json``."""
    references = checked_references(regimes, seeds, threads)
    runs = {}
    for regime in regimes:
        ref_seeds = seeds or references[regime.name].seeds
        comparison = regime_comparison(regime, specs, ref_seeds, out, jobs, threads, wandb)
        comparison.run(on_done)
        runs[regime.name] = collect(comparison)
    result = score(specs, regimes, references, runs)
    write_json(out / "suite.json", result)
    (out / "suite.md").write_text(markdown(result))
    return result


def score(specs: list[str], regimes: list[Regime], references: dict[str, Reference],
          runs: dict[str, dict[str, dict[int, dict[str, float]]]]) -> dict[str, Any]:
    """The suite's figures (see the module docstring) from the references and the controllers' runs."""
    pairs = {spec: {} for spec in specs}  # spec -> (regime, seed) -> its test loss, and the comparators'
    for regime in regimes:
        ref, best = references[regime.name], references[regime.name].best_constant()
        for spec in specs:
            for seed, figures in runs[regime.name].get(spec, {}).items():
                pairs[spec][(regime.name, seed)] = {
                    "test_loss": figures["test_loss"], "best_constant": ref.runs[best][seed]["test_loss"],
                    "constant 0.2": ref.runs.get("constant:rate=0.2", {}).get(seed, {}).get("test_loss"),
                    "constant 0": ref.runs.get("constant:rate=0", {}).get(seed, {}).get("test_loss"),
                    "oracle": ref.oracle(seed)}
    rows = {spec: controller_summary(spec, pairs[spec]) for spec in specs}
    for against in ("best_constant", "constant 0.2", "constant 0", "oracle"):
        adjusted = holm({s: r["vs"][against]["p"] for s, r in rows.items()})
        for s, r in rows.items():
            v = r["vs"][against]
            v["p_holm"] = adjusted[s]
            v["verdict"] = verdict(v["delta"], v["p_holm"], v["p_equivalent"])
    per_regime = {r.name: regime_summary(r, references[r.name], runs[r.name], specs) for r in regimes}
    return json_safe({"regimes": [r.name for r in regimes], "controllers": specs, "confidence": CONFIDENCE,
                      "equivalence_margin": EQUIVALENCE_MARGIN, "rows": rows, "per_regime": per_regime,
                      "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})


def merge(parts: dict[str, dict[str, Any]], threads: int = THREADS, only: list[str] | None = None,
          regimes: list[str] | None = None) -> dict[str, Any]:
    """Score the union of several ``suite.json`` results (``{name: result}``: one suite run piecewise, on other
    machines or sessions) as one suite, against today's references; ``only`` keeps those controllers' rows and
    ``regimes`` those regimes (default: every one the parts hold).

    Each part's per-seed test losses are taken as stored. A part whose per-regime constants differ from today's
    reference (it was scored against a sweep since rebuilt), or a (regime, controller, seed) whose test loss differs
    between parts, is refused in one line: their union would not be one suite."""
    per_part = {}
    for name, part in parts.items():
        try:
            per_part[name] = {r: (g["constants"], g["controllers"]) for r, g in part["per_regime"].items()}
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{name} is not a suite.json (no per-regime results)") from None
    held = {r for per_regime in per_part.values() for r in per_regime}
    unknown = sorted(held - set(REGIMES))
    if unknown:
        raise UserError(f"regime {unknown[0]!r} of the merged files is not in this suite ({', '.join(REGIMES)})")
    chosen = [r for r in REGIMES.values() if r.name in held and (regimes is None or r.name in regimes)]
    if not chosen:
        raise UserError("nothing to merge: the files hold none of the regimes asked for")
    references = checked_references(chosen, None, threads)
    runs: dict[str, dict[str, dict[int, dict[str, float]]]] = {r.name: {} for r in chosen}
    specs: list[str] = []
    for name, per_regime in per_part.items():
        for regime, (constants, controllers) in per_regime.items():
            if regime not in runs:
                continue
            if constants != {s: mean_of(r, "test_loss") for s, r in references[regime].runs.items()}:
                raise UserError(f"{name} was scored against another reference sweep of {regime} than today's; "
                                "rerun its controllers with runs.suite instead of merging it")
            for spec, figures in controllers.items():
                if only is not None and spec not in only:
                    continue
                specs += [] if spec in specs else [spec]
                for seed, loss in figures["test_loss"].items():
                    have = runs[regime].setdefault(spec, {}).setdefault(int(seed), {"test_loss": loss})
                    if have["test_loss"] != loss:
                        raise UserError(f"{spec} on {regime}, seed {seed}: test loss {have['test_loss']} in one part, "
                                        f"{loss} in {name}; these are not parts of one suite")
    missing = [spec for spec in only or [] if spec not in specs]
    if missing:
        raise UserError(f"controller {missing[0]!r} is in none of the merged files' chosen regimes")
    result = score(specs, chosen, references, runs)
    return {**result, "merged_from": list(parts)}


def controller_summary(spec: str, pairs: dict[tuple[str, int], dict[str, float]]) -> dict[str, Any]:
    """One controller over the regimes × seeds: mean regret with its t-interval, and paired differences."""
    keys = sorted(pairs)
    regrets = [pairs[k]["test_loss"] - pairs[k]["best_constant"] for k in keys]
    mean, low, high = mean_ci(regrets)
    vs = {}
    for against in ("best_constant", "constant 0.2", "constant 0", "oracle"):
        mine = {i: pairs[k]["test_loss"] for i, k in enumerate(keys) if pairs[k].get(against) is not None}
        theirs = {i: pairs[k][against] for i, k in enumerate(keys) if pairs[k].get(against) is not None}
        test = paired_test(mine, theirs)
        vs[against] = {"delta": test["delta"], "delta_low": test["delta_low"], "delta_high": test["delta_high"],
                       "p": test["p"], "n": test["n"], "p_equivalent": tost([mine[i] - theirs[i] for i in mine])}
    return {"controller": spec, "n": len(regrets), "regret_mean": mean, "regret_ci": [low, high], "vs": vs,
            "test_loss": {f"{r}/{s}": pairs[(r, s)]["test_loss"] for r, s in keys}}


def regime_summary(regime: Regime, ref: Reference, runs: dict[str, dict[int, dict[str, float]]],
                   specs: list[str]) -> dict[str, Any]:
    """One regime: its settings, the reference's facts (best constant, its gain over 0, where rate 0's val minimum
    falls), and each controller's per-seed test loss and mean regret."""
    best = ref.best_constant()
    zero = ref.runs.get("constant:rate=0", {})
    max_iters = regime.config().max_iters
    out = {"split": regime.split, "about": regime.about, "settings": regime.settings, "best_constant": best,
           "best_constant_test": mean_of(ref.runs[best], "test_loss"),
           "gain_over_0": mean_of(zero, "test_loss") - mean_of(ref.runs[best], "test_loss") if zero else None,
           "rate0_min_at": mean_of(zero, "best_val_iter") / max_iters if zero else None,
           "constants": {s: mean_of(r, "test_loss") for s, r in ref.runs.items()}, "controllers": {}}
    for spec in specs:
        by_seed = runs.get(spec, {})
        regrets = {s: v["test_loss"] - ref.runs[best][s]["test_loss"] for s, v in by_seed.items()}
        same = {s: v["test_loss"] == ref.runs[spec][s]["test_loss"] for s, v in by_seed.items()
                if spec in ref.runs and s in ref.runs[spec]}
        out["controllers"][spec] = {"test_loss": {str(s): v["test_loss"] for s, v in by_seed.items()},
                                    "regret": {str(s): r for s, r in regrets.items()},
                                    "regret_mean": mean_ci(list(regrets.values()))[0],
                                    **({"reproduces_reference": all(same.values())} if same else {})}
    return out


# --------------------------------------------------------------------------------------------------
# Writing it down


def fmt(v: Any, digits: int = 4, sign: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def fmt_p(p: Any) -> str:
    return "–" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def markdown(result: dict[str, Any]) -> str:
    """The headline table (regret and the paired differences) and the per-regime table."""
    lines = [f"Regimes: {', '.join(result['regimes'])}; {result['written']}. Regret: test loss minus that of the "
             "regime's best constant (chosen by val), mean over regimes × seeds with its 95 % t-interval. Δ: paired "
             "test-loss differences; p Holm-adjusted over the controllers; verdict: better/worse (p < 0.05), "
             f"equivalent (TOST, ±{result['equivalence_margin']:g}), else not shown.", "",
             "| controller | n | regret [95 % CI] | verdict vs best constant | Δ vs constant 0.2 (p) | "
             "Δ vs constant 0 (p) | Δ vs oracle (p) |", "|---|---|---|---|---|---|---|"]
    for spec, r in result["rows"].items():
        vs = r["vs"]
        cells = [f"{fmt(vs[k]['delta'])} ({fmt_p(vs[k]['p_holm'])})" for k in ("constant 0.2", "constant 0", "oracle")]
        lines.append(f"| {spec} | {r['n']} | {fmt(r['regret_mean'])} [{fmt(r['regret_ci'][0])}, "
                     f"{fmt(r['regret_ci'][1])}] | {vs['best_constant']['verdict']} "
                     f"(p {fmt_p(vs['best_constant']['p_holm'])}) | " + " | ".join(cells) + " |")
    specs = result["controllers"]
    lines += ["", "| regime | split | best constant (by val) | its test loss | gain over 0 | rate 0's val min at | "
              + " | ".join(f"regret {s}" for s in specs) + " |", "|" + "---|" * (6 + len(specs))]
    for name, g in result["per_regime"].items():
        share = "–" if g["rate0_min_at"] is None else f"{g['rate0_min_at']:.0%} of the run"
        lines.append(f"| {name} | {g['split']} | {g['best_constant'].removeprefix('constant:rate=')} | "
                     f"{fmt(g['best_constant_test'], sign=False)} | {fmt(g['gain_over_0'])} | {share} | "
                     + " | ".join(fmt(g["controllers"][s]["regret_mean"]) for s in specs) + " |")
    return "\n".join(lines) + "\n"
