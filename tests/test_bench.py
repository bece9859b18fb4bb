"""The benchmark's CPU path: it runs, its JSON is complete and consistent. No timing asserts."""
import json
import math
import subprocess
import sys

import pytest
import torch

from controllers import TrainingStats
from gpt import make_config
from bench.speed import AlternatingRate, protocol_evaluations
from runs.bench import cli

TINY = ["--preset", "tiny", "--device", "cpu", "--iters", "6", "--ref-iters", "4", "--eval-passes", "2",
        "--ref-eval-passes", "1", "--untimed-iters", "2", "--rounds", "2", "--eval-iters", "2",
        "--gen-tokens", "12", "--gen-repeats", "1", "--eval-merge-sweep", "1,2"]
TIMED = ("ms_per_iter_median", "ms_per_iter_p10", "ms_per_iter_p90", "ms_per_iter_mean", "eval_pass_ms",
         "protocol_s", "train_tokens_per_s")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: quick even when other processes share the cores
        assert cli([*TINY, "--threads", "1", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text())


def test_json_has_every_field_as_a_finite_positive_number(result):
    for side in ("ours", "reference"):
        for key in (*TIMED, "warmup_s"):
            value = result[side][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (side, key, value)
    assert isinstance(result["ours"]["recompiles"], int) and result["ours"]["recompiles"] >= 0
    assert result["ours"]["timed_iters"] == 6 and result["reference"]["timed_iters"] == 4
    assert result["ours"]["timed_eval_passes"] == 2 and result["reference"]["timed_eval_passes"] == 1
    assert result["ours"]["ms_per_iter_p10"] <= result["ours"]["ms_per_iter_median"] <= result["ours"]["ms_per_iter_p90"]
    for key in ("preset", "device", "device_name", "torch", "dtype", "date_utc", "config", "settings", "protocol",
                "load_average_1min"):
        assert key in result, key
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["cpu_threads"] == 1
    assert result["ours"]["eval_merge"] == 4  # the default
    by_merge = result["ours"]["eval_pass_ms_by_merge"]
    assert set(by_merge) == {"1", "2"} and all(math.isfinite(v) and v > 0 for v in by_merge.values())
    assert result["protocol"] == {**result["protocol"], "max_iters": 300, "evaluations": 13, "projected": True}


def test_every_figure_comes_from_the_raw_times_on_both_sides(result):
    """The protocol time, the throughput and every ratio, recomputed here from each side's raw times: 300
    iterations and 13 evaluations (tiny: every 25 of 300 iterations, and the first), at the mean ms per
    iteration and the mean evaluation pass; 16 x 32 tokens per iteration."""
    def median(xs):
        xs, n = sorted(xs), len(xs)
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

    recomputed = {}
    for side in ("ours", "reference"):
        d = result[side]
        iters, evals = d["iter_ms"], d["eval_ms"]
        assert len(iters) == d["timed_iters"] and len(evals) == d["timed_eval_passes"] > 0
        mean_iter = sum(iters) / len(iters)
        recomputed[side] = {"ms_per_iter_mean": mean_iter, "ms_per_iter_median": median(iters),
                            "eval_pass_ms": median(evals),
                            "protocol_s": (300 * mean_iter + 13 * sum(evals) / len(evals)) / 1e3,
                            "train_tokens_per_s": 16 * 32 / (mean_iter / 1e3)}
        for key, value in recomputed[side].items():
            assert d[key] == pytest.approx(value), (side, key)
    for key in recomputed["ours"]:
        assert result["ratio"][key] == pytest.approx(recomputed["ours"][key] / recomputed["reference"][key]), key


def test_kv_cache_sampling_gives_identical_tokens(result):
    s = result["sampling"]
    assert s["identical"] is True and s["first_mismatch"] is None
    assert s["tokens"] == 12
    for key in ("kv_cache_tokens_per_s", "no_cache_tokens_per_s", "ratio"):
        assert math.isfinite(s[key]) and s[key] > 0
    assert s["ratio"] == pytest.approx(s["kv_cache_tokens_per_s"] / s["no_cache_tokens_per_s"])


def test_rate_zero_check_passes(result):
    assert result["rate0_draws_no_random"] is True
    assert result["profile"] is None  # not asked for


def test_alternating_controller_changes_the_rate_every_step_and_never_to_zero():
    c = AlternatingRate(low=0.1, high=0.3)
    c.reset(2)
    stats = TrainingStats(iteration=0, max_iters=10, lr=1e-3, train_loss_smoothed=math.nan,
                          eval_train_loss=math.nan, eval_val_loss=math.nan, best_val_loss=math.inf,
                          best_val_iter=0, rates=(0.0, 0.0))
    rates = [c.update(stats) for _ in range(4)]
    assert rates == [(0.1, 0.1), (0.3, 0.3), (0.1, 0.1), (0.3, 0.3)]


def test_protocol_counts_the_evaluations_a_run_makes():
    assert protocol_evaluations(make_config("paper")) == 21  # 5000 / 250 + 1, as issue 4 counts them
    assert protocol_evaluations(make_config("cpu")) == 21
    assert protocol_evaluations(make_config("tiny", max_iters=310)) == 14  # 0, 25, ..., 300, and 310


def test_bad_settings_are_one_line_errors(capsys):
    assert cli(["--preset", "tiny", "--iters", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: iters must be at least 1") and err.count("\n") == 1
    assert cli(["--preset", "nope"]) == 2
    assert cli(["--preset", "tiny", "--rates", "0,0.2"]) == 2  # a 0 <-> non-zero switch would recompile
    assert "both 0" in capsys.readouterr().err


def test_bench_and_train_commands_import_no_rl_or_tracking_packages():
    """The GPU check runs both commands where wandb, gymnasium and stable-baselines3 are not installed."""
    code = ("import sys, runs.bench, runs.train; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'wandb', 'gymnasium', 'stable_baselines3'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sampling_can_be_skipped_and_a_profile_added(tmp_path, capsys):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert cli([*TINY, "--threads", "1", "--no-sampling", "--profile-iters", "3", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(path.read_text())
    assert result["sampling"] is None
    prof = result["profile"]
    assert prof["iters"] == 3 and prof["wall_ms"] > 0 and prof["device_busy_share"] is None  # CPU: no device
    assert "aten::" in prof["table"] and "aten::" in capsys.readouterr().out


def test_a_failing_compiled_decode_step_is_reported_not_fatal(monkeypatch):
    from gpt import GPT, GPTConfig
    from bench.speed import measure_sampling

    def broken(self):
        def step(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return step

    monkeypatch.setattr(GPT, "compiled_decode_step", broken)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
    s = measure_sampling(model, torch.device("cpu"), n_tokens=8, seed=0, repeats=1, compile=True)
    assert s["compile_error"] == "RuntimeError: no compiler here"
    assert s["kv_cache_compiled"] is False and s["kv_cache_tokens_per_s"] == s["kv_cache_eager_tokens_per_s"]
    assert s["identical"] is True
