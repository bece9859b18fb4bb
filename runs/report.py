"""Write an HTML report with PNG figures for a comparison or suite folder, viewable with no wandb account.

    python -m runs.report results/cpu          # -> results/cpu/report.html, results/cpu/figures/*.png
    python -m runs.report out/suite            # a runs.suite folder: regret per regime (figures/regret.png)
    python -m runs.report policies/ppo         # a runs.train_policy folder: its learning curve

Works on a partly finished comparison too: the table counts the trials finished so far.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.report import write_curve_report, write_report, write_suite_report
from runs.cli import Parser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a folder written by python -m runs.compare, runs.suite or runs.train_policy")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.dir)
    if (folder / "suite.json").is_file():
        page = write_suite_report(folder)
    elif (folder / "learning_curve.json").is_file():
        page = write_curve_report(folder)
    else:
        page = write_report(folder)
    print(f"wrote {page} and {page.parent / 'figures'}/*.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
