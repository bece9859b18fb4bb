"""Convert a stable-baselines3 ``.zip`` policy (saved by older versions) into the policy file format.

    python -m runs.convert_policy policies/ppo_tiny/policy.zip --trust   # -> policies/ppo_tiny/policy.safetensors

Loading a ``.zip`` unpickles the objects stored in it, and unpickling can run any code the file's author
wrote: convert only a file you trust (one you trained yourself). Without ``--trust`` nothing is read. The
result (weights as safetensors, metadata as JSON: see ``controllers/policy_file.py``) loads without
unpickling anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controllers import policy_file
from dyndrop import UserError, read_json
from runs.cli import Parser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m runs.convert_policy", description=__doc__.split("\n")[0])
    p.add_argument("zip", help="the stable-baselines3 .zip (its .json metadata beside it)")
    p.add_argument("--out", default=None, help="the new policy's path; default the .zip's with .safetensors")
    p.add_argument("--trust", action="store_true",
                   help="you trust the file: loading a .zip unpickles it, which can run code")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.zip)
    if source.suffix != ".zip" or not source.is_file():
        raise UserError(f"{source} is not a .zip file")
    meta = read_json(policy_file.metadata_path(source), "policy metadata")
    if not args.trust:
        raise UserError(f"converting {source} unpickles it, which can run any code in it; pass --trust only for "
                        "a file you trust (one you trained yourself)")
    print(f"warning: unpickling {source} (--trust given)", file=sys.stderr)
    from stable_baselines3 import PPO

    try:
        model = PPO.load(str(source), device="cpu")
    except Exception as e:  # a foreign or truncated zip raises several types
        raise UserError(f"{source} is not a loadable stable-baselines3 PPO model ({type(e).__name__}: {e})") from None
    out = Path(args.out) if args.out else source.with_suffix(policy_file.SUFFIX)
    meta = {k: v for k, v in meta.items() if k not in ("format", "network", "weights_sha256")}
    path = policy_file.save_policy(model.policy, out, {**meta, "converted_from": str(source)})
    policy_file.load_policy(path)  # the result reads back in the new format
    print(f"wrote {path} and {policy_file.metadata_path(path)}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
