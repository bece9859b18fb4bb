"""Write an HTML report with PNG figures for a comparison or suite folder, viewable with no wandb account.

    python -m runs.report results/cpu          # -> results/cpu/report.html, results/cpu/figures/*.png
    python -m runs.report out/suite            # a runs.suite folder: regret per regime (figures/regret.png)

Works on a partly finished comparison too: the table counts the trials finished so far.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.report import write_report, write_suite_report
from runs.cli import Parser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a comparison folder written by python -m runs.compare, or a suite folder written by "
                               "python -m runs.suite")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    page = write_suite_report(args.dir) if (Path(args.dir) / "suite.json").is_file() else write_report(args.dir)
    print(f"wrote {page} and {page.parent / 'figures'}/*.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
