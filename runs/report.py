"""Write an HTML report with PNG figures for a comparison, suite or policy folder, viewable with no wandb account.

    python -m runs.report results/cpu          # -> results/cpu/report.html, results/cpu/figures/*.png
    python -m runs.report out/suite            # a runs.suite folder: regret per regime (figures/regret.png)
    python -m runs.report policies/ppo         # a runs.train_policy folder: its learning curve
    python -m runs.report results/cpu --out /tmp/report     # a folder you cannot write into: the report goes here

Works on a partly finished comparison too: the table counts the trials finished so far.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dyndrop import UserError
from dyndrop.folders import check_output_file
from experiments.comparison import Comparison
from experiments.report import write_curve_report, write_report, write_suite_report
from runs.cli import Parser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a folder written by python -m runs.compare, runs.suite or runs.train_policy")
    p.add_argument("--out", default=None, help="the folder for report.html, figures/ and results.*; default DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder, dest = Path(args.dir), Path(args.out or args.dir)
    fix = "choose another folder" if args.out else "pass --out DIR to write the report elsewhere"
    kind = ("suite" if (folder / "suite.json").is_file() else
            "curve" if (folder / "learning_curve.json").is_file() else "comparison")
    if kind == "comparison":
        Comparison.load(folder)  # not a comparison folder: one line, before anything is written
    check_output_file(dest / "report.html", "--out" if args.out else "into", fix)  # before any work
    write = {"suite": write_suite_report, "curve": write_curve_report, "comparison": write_report}[kind]
    try:
        page = write(folder, dest)
    except OSError as e:  # a folder inside that cannot be written (figures/ read-only), a disk that filled up
        raise UserError(f"cannot write {e.filename or dest}: {e.strerror or e}; {fix}") from None
    print(f"wrote {page} and {page.parent / 'figures'}/*.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
