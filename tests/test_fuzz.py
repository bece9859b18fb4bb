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


# -- the surfaces of #22: the env's constructor, policy metadata, summaries and metrics files ------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 70), max_size=3), st.just(10**400))
"""Any JSON-ish value, for a field that should hold something else."""
ENV_ARGS = {  # values the env takes
    "episode": st.just("tiny"), "preset": st.just("tiny"), "interval": st.integers(1, 6),
    "p_min": st.floats(0, 0.3), "p_max": st.floats(0.3, 0.9), "per_layer": st.booleans(),
    "reward": st.sampled_from(["best_val", "val", "final"]), "reward_scale": st.floats(0.1, 50),
    "terminal_weight": st.floats(0, 5), "divergence_penalty": st.floats(0, 5), "split": st.sampled_from(["train", "eval"]),
    "train_seeds": st.lists(st.integers(0, 99), min_size=1, max_size=3),
    "eval_seeds": st.lists(st.integers(100, 199), min_size=1, max_size=3), "torch_threads": st.sampled_from([None, 0, 1]),
    "config": st.dictionaries(st.sampled_from(["eval_iters", "n_layer", "learning_rate", "max_iters", "grad_clip"]),
                              st.integers(1, 3), max_size=2),
}
EDGES = st.one_of(JUNK, st.sampled_from([0, -1, 0.5, 1.0, 2**63, "tiny", "overfit", "", [], {}, {"seed": 1},
                                          {"eval_interval": 2}, {"max_iters": 0}, {"warp": 1}, {"preset": "x"}]))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"max_iters": st.integers(1, 12)}, optional=ENV_ARGS),
       st.dictionaries(st.sampled_from(["max_iters", *ENV_ARGS, "data"]), EDGES, max_size=2))
def test_any_env_arguments_build_an_env_that_steps_finitely_or_raise_one_user_error(chardata, kwargs, bad):
    """The env's constructor takes what the command line checks (#22 item 7: NaN and inf rewards; item 24: config
    overrides that raised TypeError): every argument is refused with a UserError, or the env steps with finite
    observations in its box and finite rewards. ``bad``: up to two arguments replaced by anything."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the env)
    from dyndrop import UserError

    kwargs = {**kwargs, **bad}
    if isinstance(kwargs.get("config"), dict):  # a small model whatever else the draw says
        kwargs["config"] = {"eval_iters": 1, "n_embd": 16, "n_head": 2, "batch_size": 4, **kwargs["config"]}
    try:
        env = gym.make("DynamicDropout-v0", **kwargs).unwrapped
    except UserError as e:
        assert "\n" not in str(e)
        return
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, reward, *_ = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and math.isfinite(reward), (kwargs, reward)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    from hostile import make_policy

    return make_policy(tmp_path_factory.mktemp("policy") / "policy")


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["format", "feature_version", "p_min", "p_max", "per_layer", "n_layer",
                                        "weights_sha256", "network", "network.obs_dim", "network.n_actions",
                                        "network.net_arch", "network.activation", "network.log_std_init"]),
                       st.one_of(JUNK, st.lists(st.sampled_from([16, 65536, 0, -1]), max_size=17),
                                 st.fixed_dictionaries({"pi": st.lists(st.integers(0, 70), max_size=2),
                                                        "vf": st.lists(st.integers(0, 70), max_size=2)})),
                       min_size=1, max_size=3),
       st.sampled_from(["change", "delete"]))
def test_any_policy_metadata_loads_a_policy_that_acts_or_is_one_user_error(policy_file, tmp_path, changes, how):
    """Whatever policy.json holds, loading reads no more than its weights file (no network bigger than it is
    built: #22 item 16) and either gives a controller whose rates are rates, or one UserError."""
    import shutil

    from controllers import TrainingStats, make_controller
    from dyndrop import UserError

    policy = tmp_path / f"p{abs(hash((str(changes), how)))}.safetensors"
    shutil.copy(policy_file, policy)
    meta = json.loads(policy_file.with_suffix(".json").read_text())
    for key, value in changes.items():
        where, _, sub = key.partition(".")
        target = meta["network"] if sub and isinstance(meta.get("network"), dict) else meta
        name = sub or where
        if how == "delete":
            target.pop(name, None)
        else:
            target[name] = value
    policy.with_suffix(".json").write_text(json.dumps(meta))
    try:
        controller = make_controller(f"ppo:policy={policy}")
        controller.reset(controller.n_actions if controller.n_actions > 1 else 2)
    except UserError as e:
        assert "\n" not in str(e)
        return
    stats = TrainingStats(iteration=10, max_iters=100, lr=1e-3, train_loss_smoothed=2.0, eval_train_loss=2.0,
                          eval_val_loss=2.1, best_val_loss=2.1, best_val_iter=10, rates=(0.1, 0.1), eval_iter=10)
    try:
        rates = controller.update(stats)
    except UserError as e:  # a network that overflows on this input
        assert "\n" not in str(e)
        return
    assert all(0 <= r < 1 for r in rates)


@pytest.fixture(scope="module")
def finished_comparison(tmp_path_factory):
    from runs.compare import cli

    out = tmp_path_factory.mktemp("fuzz") / "cmp"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli([*BASE, "--max-iters", "4", "--controllers", "constant:rate=0.1", "--seeds", "1,2", "--no-warm-up",
                    "--out", str(out)]) == 0
    return out


def rerun(out: Path, command: str) -> tuple[int, str]:
    """``runs.report`` or the comparison's rerun (every trial finished: it only reads and tabulates)."""
    import runs.compare
    import runs.report

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if command == "report":
            code = runs.report.cli([str(out)])
        else:
            code = runs.compare.cli([*BASE, "--max-iters", "4", "--controllers", "constant:rate=0.1", "--seeds", "1,2",
                                     "--no-warm-up", "--out", str(out)])
    return code, err.getvalue()


def one_line_or_fine(code: int, err: str) -> None:
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in err, err
    assert code == 0 or (code == 2 and len(errors) == 1 and errors[0].startswith("error:")), (code, err)


SUMMARY_KEYS = ["best_val_loss", "test_loss", "best_val_loss_full", "final_train_loss", "total_train_time_s",
                "train_tokens_per_s", "inference_tokens_per_s", "iterations", "compute_iters", "best_val_iter",
                "concurrent_trials", "device_name", "controller", "seed"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.one_of(JUNK, st.dictionaries(st.sampled_from(SUMMARY_KEYS), JUNK, max_size=6)),
       st.sampled_from(["replace", "merge"]))
def test_any_summary_is_read_or_one_line_naming_it(finished_comparison, tmp_path, summary, how):
    """#22 items 8 and 20: an empty summary counted as a seed, a string where a number belongs gave a TypeError.
    The comparison's rerun (which only reads and tabulates here) gives exit 0 or one line, never a traceback."""
    import shutil

    out = tmp_path / f"c{abs(hash((repr(summary), how)))}"
    shutil.copytree(finished_comparison, out)
    path = out / "trials" / "constant_rate0.1-s2" / "summary.json"
    if how == "merge" and isinstance(summary, dict):
        summary = {**json.loads(path.read_text()), **summary}
    path.write_text(json.dumps(summary))
    one_line_or_fine(*rerun(out, "compare"))


LINES = st.one_of(st.binary(max_size=30), st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
    st.sampled_from(["iter", "val/loss", "train/loss", "dropout/rate", "perf/wall_time_s", "pbt/member", "x"]),
    JUNK, max_size=4)))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, max_size=5), st.booleans())
def test_any_metrics_lines_are_read_as_records_or_skipped(lines, torn_ok):
    """#22 item 19: a stray byte in metrics.jsonl gave a UnicodeDecodeError traceback. Whatever lines a
    metrics.jsonl holds, the reader returns records whose figures are numbers (or null) and whose iter is a whole
    number, and the curves the report draws read from them."""
    import tempfile

    from experiments.trials import Trial, TrialResult
    from gpt.tracking import read_records

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        path.write_bytes(b'{"iter": 0, "val/loss": 4.0}\n' + b"\n".join(lines))
        with contextlib.redirect_stderr(io.StringIO()):
            records = read_records(path, drop_torn_last=torn_ok)
    assert records[0] == {"iter": 0, "val/loss": 4.0}
    for r in records:
        assert isinstance(r["iter"], int) and not isinstance(r["iter"], bool) and r["iter"] >= 0
    result = TrialResult(Trial("constant", 1), Path("."), {"best_val_loss": 1.0}, False, records)
    for key in ("val/loss", "dropout/rate", "train/loss"):
        result.curve(key)
    result.to_target(3.0)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(LINES, min_size=1, max_size=3))
def test_any_metrics_lines_give_a_report_or_one_line(finished_comparison, tmp_path, lines):
    """The same lines in a finished trial's metrics.jsonl, through the whole report (figures and all)."""
    import shutil

    out = tmp_path / f"c{abs(hash(tuple(lines)))}"
    shutil.copytree(finished_comparison, out)
    with open(out / "trials" / "constant_rate0.1-s1" / "metrics.jsonl", "ab") as f:
        f.write(b"\n".join(lines))
    one_line_or_fine(*rerun(out, "report"))
