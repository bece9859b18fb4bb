"""What every command-line entry point shares: dataclass fields as options, the run config from them,
``--policy`` folded into the controller spec, and one line plus exit status 2 for a ``UserError``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from dyndrop import UserError
from gpt.config import TrainConfig, make_config


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr (``error: ...``) and exit status 2.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                       default_none: bool = False) -> None:
    """Add one ``--option`` per field of the dataclass ``cls``, with the field's help text. Each defaults
    to the field's default, or to ``None`` with ``default_none`` (meaning: not given)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if default_none else f.default
        kind = str(f.type)
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
        if "bool" in kind:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=conv, default=default, metavar=f.name.upper(), help=text)


def add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("preset",)) -> None:
    """Add one ``--option`` per ``TrainConfig`` field, defaulting to ``None`` (= the preset's value)."""
    add_dataclass_args(parser, TrainConfig, skip, default_none=True)


def config_from_args(args: argparse.Namespace, preset: str) -> TrainConfig:
    """The ``preset``'s config (``auto`` resolved) with every option given on the command line."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "preset"]
    return make_config(preset, **{n: getattr(args, n) for n in names if hasattr(args, n)})


def add_policy_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default=None, metavar="PATH",
                        help="trained policy for the ppo controller: short for ppo:policy=PATH")
