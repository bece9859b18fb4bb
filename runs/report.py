"""Write an HTML report with PNG figures for a comparison folder, viewable with no wandb account.

    python -m runs.report results/cpu          # -> results/cpu/report.html, results/cpu/figures/*.png

Works on a partly finished comparison too: the table counts the trials finished so far.
"""
from __future__ import annotations

import argparse
import sys

from experiments.report import write_report
from runs.cli import Parser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a comparison folder written by python -m runs.compare")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    page = write_report(args.dir)
    print(f"wrote {page} and {page.parent / 'figures'}/*.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
