"""Helpers for the tests of what a hostile or unlucky user gets (tests/test_preflight.py, test_identity.py,
test_run_files.py, test_fuzz.py): run a command in this process, check its one-line error, make a policy file
without training one. Not a test module."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

TINY = ["--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "0",
        "--threads", "1", "--no-progress", "--wandb", "disabled"]
"""A run of a few seconds (the issue's ``$T``)."""


def call(command: str, args: list[str], capsys) -> tuple[int, str]:
    """Run ``python -m runs.<command> ARGS`` in this process: its exit status and its stderr."""
    module = importlib.import_module(f"runs.{command}")
    try:
        code = module.cli(args)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *words: str) -> str:
    """Assert exit status 2 and a stderr of one ``error:`` line holding every one of ``words``; returns the line."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


def own_text(path: Path, n: int = 6000) -> Path:
    """A small UTF-8 text of ``n`` characters (an own ``--data`` file)."""
    path.write_text("".join("the quick brown fox jumps over the lazy dog. "[(i * 7) % 45] for i in range(n)))
    return path


def make_policy(path: Path, seed: int = 0, per_layer: bool = False, n_layer: int = 2) -> Path:
    """A policy file (weights and metadata) of an untrained network with seed ``seed``, for the ``tiny`` preset:
    what ``runs.train_policy`` writes, in a second instead of a training run."""
    import torch

    from controllers.features import FEATURE_VERSION, Featurizer
    from controllers.policy_file import _build_network, save_policy

    torch.manual_seed(seed)
    n_actions = n_layer if per_layer else 1
    network = _build_network({"obs_dim": Featurizer.dim, "n_actions": n_actions, "net_arch": [16],
                              "activation": "tanh", "log_std_init": -0.5})
    meta = {"feature_version": FEATURE_VERSION, "p_min": 0.0, "p_max": 0.5, "per_layer": per_layer,
            "n_layer": n_layer, "episode": "tiny", "preset": "tiny", "max_iters": 20, "interval": 10,
            "reward": "best_val", "config": {}, "train_seeds": [1000], "eval_seeds": [9000]}
    return save_policy(network, path, meta)


def rewrite_metadata(policy: Path, **changes) -> None:
    """Change entries of a policy's metadata file."""
    meta_path = policy.with_suffix(".json")
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **changes}))


@contextmanager
def read_only(*paths: Path, recursive: bool = True):
    """Make ``paths`` read-only for this process for the ``with`` block, for real: ``chmod a-w``, or, for root
    (whom permissions do not stop), the immutable attribute (``chattr +i``: no file created, renamed, removed or
    written). Skips the test where neither works (no chattr, no CAP_LINUX_IMMUTABLE, a filesystem without it)."""
    import pytest

    root = os.geteuid() == 0
    flag = ["-R"] if recursive else []
    if root:
        probe = subprocess.run(["chattr", "+i", str(paths[0])], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot make a folder read-only as root here (chattr: {probe.stderr.decode().strip()})")
        on, off = ["chattr", *flag, "+i"], ["chattr", *flag, "-i"]
    else:
        on, off = ["chmod", *flag, "a-w"], ["chmod", *flag, "u+w"]
    for p in paths:
        subprocess.run([*on, str(p)], check=True)
    try:
        yield
    finally:
        for p in paths:
            subprocess.run([*off, str(p)], check=True)
