"""Write an HTML report with PNG figures for a comparison folder, viewable with no wandb account.

    python -m runs.report results/cpu          # -> results/cpu/report.html, results/cpu/figures/*.png

Works on a partly finished comparison too: the table counts the trials finished so far.
"""
from __future__ import annotations

import argparse
import sys

from controllers import UserError
from gpt.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runs.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a comparison folder written by python -m runs.compare")
    args = p.parse_args(argv)
    page = write_report(args.dir)
    print(f"wrote {page} and {page.parent / 'figures'}/*.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Run ``main``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
