"""Property-based: whatever option values and controller specs a user types, ``runs.train`` ends with exit 0 and a
run that trained (every step logged, records and summary consistent, the weights moved), or with exit 2, one line
and no files; never a traceback."""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controllers import CONTROLLERS

BASE = ["--preset", "tiny", "--eval-iters", "1", "--eval-interval", "2", "--log-interval", "1", "--no-progress",
        "--wandb", "disabled", "--threads", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "4"]

BAD = st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e400", "abc", "", "1.5", "-0.0", "99999999999999999999999",
                       "0x10", "1_0", " 3", "NaN"])
SMALL_INT = st.integers(-3, 8).map(str)
FRACTION = st.floats(-0.5, 1.5, allow_nan=False).map(repr)
OPTIONS = {
    "--max-iters": st.one_of(SMALL_INT, BAD), "--block-size": st.one_of(st.integers(-1, 40).map(str), BAD),
    "--learning-rate": st.one_of(st.floats(-1e-2, 1e-2, allow_nan=False).map(repr), BAD),
    "--min-lr": st.one_of(st.floats(-1e-3, 1e-3, allow_nan=False).map(repr), BAD),
    "--beta1": st.one_of(FRACTION, BAD), "--beta2": st.one_of(FRACTION, BAD),
    "--grad-clip": st.one_of(st.floats(-2, 2, allow_nan=False).map(repr), BAD),
    "--weight-decay": st.one_of(FRACTION, BAD), "--warmup-iters": st.one_of(SMALL_INT, BAD),
    "--gen-tokens": st.one_of(SMALL_INT, st.just("100000000"), BAD), "--seed": st.one_of(st.integers(-5, 2**64).map(str), BAD),
    "--train-chars": st.one_of(st.integers(-5, 300).map(str), st.just("10000000"), BAD),
    "--eval-merge": st.one_of(SMALL_INT, BAD), "--control-interval": st.one_of(SMALL_INT, BAD),
    "--n-layer": st.one_of(st.integers(-1, 3).map(str), BAD), "--dtype": st.sampled_from(["float32", "float64", "x"]),
    "--attention-dropout": st.sampled_from(["manual", "fused", "both"]),
}
TEXT = st.text(alphabet="abcxyz019.-_=:,@/ ", max_size=12)


@st.composite
def controller_specs(draw) -> str:
    name = draw(st.one_of(st.sampled_from(sorted(CONTROLLERS)), TEXT))
    keys = st.one_of(st.sampled_from(["rate", "start", "end", "cutoff", "gamma", "kp", "ki", "kd", "setpoint",
                                      "signal", "min_rate", "max_rate", "bias", "step", "patience", "tol",
                                      "d_filter", "policy", "p_min"]), TEXT)
    values = st.one_of(FRACTION, BAD, TEXT, st.sampled_from(["gap", "val_slope", "true", "2"]))
    params = draw(st.lists(st.tuples(keys, values), max_size=3))
    return name + (":" + ",".join(f"{k}={v}" for k, v in params) if params else "")


def run_train(args: list[str]) -> tuple[int, str]:
    from runs.train import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli(args)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def check(args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        code, err = run_train([*BASE, *args, "--out", str(out)])
        lines = err.strip().splitlines()
        # 1 only for a run that diverged on valid settings (one line naming the checkpoint to resume from)
        assert code in (0, 2) or (code == 1 and len(lines) == 1 and lines[0].startswith("stopped: ")), (args, err)
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error:"), (args, err)
            assert not out.exists(), (args, sorted(p.name for p in out.iterdir()))
        if code == 0:
            assert_trained(out, args)


def assert_trained(out: Path, args: list[str]) -> None:
    """A run that exited 0 trained: every step logged, the summary agrees with the records, and (with a learning
    rate that can move float32 weights) the weights moved."""
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    max_iters = summary["iterations"]
    assert max_iters == int(args[args.index("--max-iters") + 1]), args
    steps = [r["iter"] for r in records if "train/loss" in r]
    assert steps == list(range(1, max_iters + 1)), (args, steps)  # --log-interval 1: one record per step
    evals = [r for r in records if "val/loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == max_iters, args
    assert summary["best_val_loss"] == pytest.approx(min(r["val/loss"] for r in evals)), args
    assert math.isfinite(summary["test_loss"]) and math.isfinite(summary["best_val_loss_full"]), args
    lr = float(args[args.index("--learning-rate") + 1]) if "--learning-rate" in args else 2e-3
    if max_iters and lr >= 1e-6:
        assert evals[-1]["train/eval_loss"] != evals[0]["train/eval_loss"], args


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: OPTIONS[k] for k in d})))
def test_any_option_values_give_exit_0_or_one_line_exit_2(options):
    args = [a for k, v in options.items() for a in (k, v)]
    if "--max-iters" not in options:
        args += ["--max-iters", "4"]
    check(args)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(controller_specs())
def test_any_controller_spec_gives_exit_0_or_one_line_exit_2(spec):
    check(["--controller", spec, "--max-iters", "4"])
