"""What every command-line entry point shares."""
from __future__ import annotations

import sys
from typing import Callable

from controllers import UserError


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr (``error: ...``) and exit status 2.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
