"""What every command-line entry point shares: dataclass fields as options, the run config from them,
``--policy`` folded into the controller spec, and one line plus exit status 2 for a ``UserError``."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any, Callable, NoReturn

from dyndrop import UserError
from gpt.config import TrainConfig, make_config


class Parser(argparse.ArgumentParser):
    """``argparse`` with the project's error style: a bad or unknown option is one line naming it and pointing
    at ``--help``, exit status 2 (argparse's own prints the whole usage first)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so a run stops cleanly as on Ctrl-C (exit status 143)."""


_TERMINATED: list[bool] = []
"""Set once SIGTERM arrived in this command: code that turns any ``KeyboardInterrupt`` into a plain one (Ray's
``ray.wait`` and ``ray.get`` do) must not turn a SIGTERM's exit status into Ctrl-C's."""


def _raise_terminated(signum: int, frame: Any) -> None:
    _TERMINATED.append(True)
    raise Terminated()


def interrupt_status(e: KeyboardInterrupt) -> int:
    """The exit status of a stop: 143 for SIGTERM, 130 for Ctrl-C (128 + the signal's number)."""
    return 143 if isinstance(e, Terminated) or _TERMINATED else 130


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr (``error: ...``) and exit status 2.

    SIGTERM is turned into :class:`Terminated` (a ``KeyboardInterrupt``) for the command's life, so every
    command stops on it as on Ctrl-C. Any other exception is a bug and keeps its traceback.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _TERMINATED.clear()
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command that did not handle it itself
        print("\ninterrupted", file=sys.stderr)
        return interrupt_status(e)
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(message: str) -> str:
    """``message`` on one line: a library's multi-line text inside an error (Ray's, a zip reader's) is joined
    with ``; ``, so every error stays the one line the project promises."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` (None = torch's choice). Raises ``UserError`` below 1."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads {threads} is invalid: it must be at least 1")
    import torch

    torch.set_num_threads(threads)


def add_threads_arg(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    parser.add_argument("--threads", type=int, default=default,
                        help="torch CPU threads; on a shared 2-core machine use 1 per process"
                             + ("" if default else " (default: torch's choice)"))


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


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` settings given on the command line (options added by :func:`add_config_args`
    default to None, meaning: not given)."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "preset"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def config_from_args(args: argparse.Namespace, preset: str | None) -> TrainConfig:
    """The ``preset``'s config (None or ``auto``: see ``gpt.config.resolve_preset``) with every option given on
    the command line. Every setting is checked here, before anything is written."""
    return make_config(preset or "auto", **given_settings(args))


def add_policy_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default=None, metavar="PATH",
                        help="trained policy for the ppo controller: short for ppo:policy=PATH")
