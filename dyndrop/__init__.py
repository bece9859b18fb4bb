"""What every package of the project shares and no domain owns: the user-error type and JSON files.

The bottom layer: ``controllers``, ``gpt``, ``envs``, ``experiments``, ``bench`` and ``runs`` may import it;
it imports none of them.
"""
from .errors import UserError
from .files import json_safe, read_json, write_json

__all__ = ["UserError", "json_safe", "read_json", "write_json"]
