"""JSON files the project writes and reads back: non-finite floats as null, atomic writes, one-line errors."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nan, inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` (made :func:`json_safe`) to ``path`` atomically: a temp file beside it, flushed to
    disk, then renamed, so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(json_safe(value), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | Path, what: str = "file", kind: type = dict) -> Any:
    """Read a JSON file that should hold a ``kind`` (dict by default).

    :raises UserError: one line naming the file, if it is missing, unreadable, not JSON or not a ``kind``.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    except ValueError as e:
        detail = "it is empty" if not path.read_bytes().strip() else f"it is not valid JSON ({e})"
        raise UserError(f"{what} {path} is corrupt: {detail}; delete it or restore it") from None
    if not isinstance(value, kind):
        raise UserError(f"{what} {path} is corrupt: it holds a JSON {type(value).__name__}, "
                        f"not a {kind.__name__}; delete it or restore it")
    return value
