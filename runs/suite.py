"""Score dropout controllers on a suite of regimes, by their regret against each regime's best constant.

    python -m runs.suite --controllers pid constant:rate=0.2 --regimes test --out out/suite
    python -m runs.suite --controllers pid pbt:population=4 curriculum val_loss --regimes test --jobs 2
    python -m runs.suite --build-references --regimes all --jobs 2      # the constant sweeps, stored in the repo
    python -m runs.suite --merge a/suite.json b/suite.json --out both   # parts of one suite, scored as one

Each regime (``experiments.suite.REGIMES``: tune regimes to tune on, test regimes held out) is a comparison folder
``--out``/<regime>/; only the controllers asked for are trained, against the regime's stored reference sweep of
constant rates. Writes ``--out``/suite.json and suite.md (regret with its 95 % interval, Δ against constant 0.2,
constant 0 and the oracle, per-regime figures); ``python -m runs.report DIR`` draws regret per regime. Rerunning
the same command skips finished trials. ``--merge`` scores the union of suite.json files (one suite run in parts,
say on two machines) as one table, refusing parts scored against another reference sweep than today's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dyndrop import UserError
from dyndrop.folders import FolderLock
from runs.cli import Parser, interrupt_status, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.suite", description=__doc__.split("\n")[0])
    p.add_argument("--controllers", nargs="+", default=None,
                   help="controller specs, as in runs.compare (sweeps, the pbt row); --policy is ppo:policy=P")
    p.add_argument("--regimes", default=None, help="tune, test (the held-out regimes), all, or regime names "
                                                   "separated by commas; default test (with --merge: every "
                                                   "regime the files hold)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds; default the reference sweeps' (1337,1338,1339)")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once, each in a worker process")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial (the references use 1: "
                                                          "another number gives other numbers, and is refused)")
    p.add_argument("--wandb", default="disabled", help="online, offline, disabled or auto, for every trial")
    p.add_argument("--out", default="out/suite", help="the suite's folder: one comparison folder per regime")
    p.add_argument("--build-references", action="store_true",
                   help="run the constant-rate reference sweeps of --regimes and store them in experiments/references/")
    p.add_argument("--merge", nargs="+", default=None, metavar="SUITE_JSON",
                   help="score the union of these suite.json files as one suite (their regimes and controllers, "
                        "or only --regimes and --controllers) and write it to --out; trains nothing")
    return p.parse_args(argv)


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {text!r} is invalid: give distinct seeds >= 0")
    return seeds


def check(args: argparse.Namespace) -> tuple[list, list[str], list[int] | None]:
    """Every option checked, every controller built, before anything is written."""
    from controllers import parse_controllers
    from experiments.pbt import PBT, check_ray_tune, is_pbt, pbt_settings
    from experiments.suite import checked_references, select_regimes
    from experiments.trials import check_inputs

    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} is invalid: it must be at least 1")
    if args.wandb not in ("online", "offline", "disabled", "auto"):
        raise UserError(f"--wandb {args.wandb} is invalid: it must be one of online, offline, disabled, auto")
    regimes = select_regimes(args.regimes or "test")
    if not regimes:
        raise UserError(f"--regimes {args.regimes or 'test'} selects no regime on this machine")
    seeds = parse_seeds(args.seeds)
    if args.merge:
        if args.build_references or seeds:
            raise UserError("--merge scores stored results (every seed they hold); leave --build-references and "
                            "--seeds out")
        return regimes, [], seeds
    if args.build_references:
        if args.controllers:
            raise UserError("--build-references runs the constant grid; leave --controllers out")
        return regimes, [], seeds
    if not args.controllers:
        raise UserError("--controllers is required (or --build-references)")
    specs = parse_controllers(args.controllers, rows=(PBT,))
    for spec in filter(is_pbt, specs):
        pbt_settings(spec)
        check_ray_tune()
    for regime in regimes:
        check_inputs(regime.config(), [s for s in specs if not is_pbt(s)])
    checked_references(regimes, seeds, args.threads)
    return regimes, specs, seeds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    regimes, specs, seeds = check(args)
    from tqdm.auto import tqdm

    from experiments.suite import SEEDS, build_command, build_reference, markdown, merge, run_suite

    out = Path(args.out)
    if args.merge:
        from dyndrop import read_json, write_json

        result = merge({f: read_json(Path(f), "suite result") for f in args.merge}, args.threads, args.controllers,
                       [r.name for r in regimes] if args.regimes else None)
        with FolderLock(out, "suite"):
            write_json(out / "suite.json", result)
            (out / "suite.md").write_text(markdown(result))
        print(markdown(result))
        print(f"written: {out / 'suite.json'}, {out / 'suite.md'} (merged from {len(args.merge)} files)")
        return 0
    with FolderLock(out, "suite"):
        bar = tqdm(desc="trials", unit="trial", dynamic_ncols=True)
        on_done = lambda trial, summary: bar.update(1)  # noqa: E731
        try:
            if args.build_references:
                for regime in regimes:
                    ref = build_reference(regime, seeds or list(SEEDS), out, args.jobs,
                                          build_command([regime.name], seeds), on_done)
                    print(f"{regime.name}: best constant {ref.best_constant()} (by val); "
                          f"experiments/references/{regime.name}.json written")
                return 0
            result = run_suite(specs, regimes, seeds, out, args.jobs, args.threads, args.wandb, on_done)
        except KeyboardInterrupt as e:
            print("\ninterrupted; rerun the same command to continue (finished trials are kept)", file=sys.stderr)
            return interrupt_status(e)
        finally:
            bar.close()
    print(markdown(result))
    print(f"written: {out / 'suite.json'}, {out / 'suite.md'}; figure: python -m runs.report {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
