"""Tests of the controller layer: schedules, the val-loss rule, the PID controller, and the registry."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controllers import CONTROLLERS, TrainingStats, check_rate, make_controller
from dyndrop import UserError
from controllers.pid import PIDController
from controllers.schedules import ValLossRule

ROOT = Path(__file__).resolve().parents[1]
MAX_ITERS = 1000


def stats(
    iteration: int = 0,
    *,
    val: float = 2.0,
    train: float | None = None,
    gap: float | None = None,
    eval_iter: int | None = None,
    max_iters: int = MAX_ITERS,
    best: float | None = None,
    best_iter: int | None = None,
) -> TrainingStats:
    """Stats at ``iteration`` with a fresh evaluation there (unless ``eval_iter`` says otherwise).

    Give ``gap`` to set ``eval_train_loss = val - gap``.
    """
    if train is None:
        train = val - (gap or 0.0)
    return TrainingStats(
        iteration=iteration,
        max_iters=max_iters,
        lr=1e-3,
        train_loss_smoothed=train,
        eval_train_loss=train,
        eval_val_loss=val,
        best_val_loss=val if best is None else best,
        best_val_iter=iteration if best_iter is None else best_iter,
        rates=(0.0,),
        eval_iter=iteration if eval_iter is None else eval_iter,
    )


def at(progress: float) -> TrainingStats:
    return stats(round(progress * MAX_ITERS))


def rate_of(ctrl, s: TrainingStats) -> float:
    rates = ctrl.update(s)
    assert len(set(rates)) == 1
    return rates[0]


# --- schedules -------------------------------------------------------------------------------------

SCHEDULES = {
    "constant:rate=0.15": lambda p: 0.15,
    "linear:start=0.3,end=0.1": lambda p: 0.3 + (0.1 - 0.3) * p,
    "exponential:start=0.3,end=0.01": lambda p: 0.3 * (0.01 / 0.3) ** p,
    "early:rate=0.1,cutoff=0.5": lambda p: 0.1 if p < 0.5 else 0.0,
    "late:rate=0.1,cutoff=0.5": lambda p: 0.0 if p < 0.5 else 0.1,
    "curriculum:rate=0.2,gamma=10": lambda p: 0.2 * (1 - math.exp(-10 * p)),
}


@pytest.mark.parametrize("spec", SCHEDULES)
@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0])
def test_schedule_values(spec, progress):
    ctrl = make_controller(spec)
    ctrl.reset(n_layers=3)
    rates = ctrl.update(at(progress))
    assert len(rates) == 3
    assert rates == pytest.approx((SCHEDULES[spec](progress),) * 3, abs=1e-12)


def test_schedule_defaults_endpoints():
    assert rate_of(make_controller("linear"), at(0.0)) == pytest.approx(0.3)
    assert rate_of(make_controller("linear"), at(1.0)) == pytest.approx(0.0)
    assert rate_of(make_controller("exponential"), at(1.0)) == pytest.approx(0.01)
    assert rate_of(make_controller("early"), at(0.1)) == pytest.approx(0.1)
    assert rate_of(make_controller("early"), at(0.2)) == 0.0
    assert rate_of(make_controller("late"), at(0.49)) == 0.0
    assert rate_of(make_controller("curriculum"), at(0.0)) == 0.0


@pytest.mark.parametrize(
    "spec",
    [
        "constant:rate=1.0",
        "constant:rate=-0.1",
        "constant:rate=nan",
        "linear:start=1.5",
        "exponential:end=0",
        "early:cutoff=1.5",
        "late:rate=1",
        "curriculum:gamma=0",
        "val_loss:start=0.6",
        "val_loss:min_rate=0.3,max_rate=0.2",
        "val_loss:patience=0",
        "pid:signal=loss",
        "pid:min_rate=0.4,max_rate=0.3",
        "pid:d_filter=0",
        "pid:kp=inf",
        "pid:bias=0.7",
    ],
)
def test_out_of_range_parameters_are_user_errors(spec):
    with pytest.raises(UserError, match="controller"):
        make_controller(spec)


# --- val_loss rule ---------------------------------------------------------------------------------


def test_val_loss_lowers_on_improvement_and_raises_on_stall():
    ctrl = ValLossRule(start=0.2, step=0.05, min_rate=0.1, max_rate=0.3)
    assert rate_of(ctrl, stats(0, val=3.0)) == pytest.approx(0.2)  # first eval: reference only
    assert rate_of(ctrl, stats(100, val=2.5)) == pytest.approx(0.15)  # improved
    assert rate_of(ctrl, stats(150, val=2.0, eval_iter=100)) == pytest.approx(0.15)  # stale eval: hold
    assert rate_of(ctrl, stats(200, val=2.0)) == pytest.approx(0.1)
    assert rate_of(ctrl, stats(300, val=1.5)) == pytest.approx(0.1)  # clamped at min_rate
    assert rate_of(ctrl, stats(400, val=1.6)) == pytest.approx(0.15)  # worse: raise
    assert rate_of(ctrl, stats(500, val=1.6)) == pytest.approx(0.2)  # equal is not an improvement
    assert rate_of(ctrl, stats(600, val=1.7)) == pytest.approx(0.25)
    assert rate_of(ctrl, stats(700, val=1.8)) == pytest.approx(0.3)
    assert rate_of(ctrl, stats(800, val=1.9)) == pytest.approx(0.3)  # clamped at max_rate


def test_val_loss_patience_and_tol():
    ctrl = ValLossRule(start=0.2, step=0.1, patience=2, tol=0.05)
    rate_of(ctrl, stats(0, val=2.0))
    assert rate_of(ctrl, stats(100, val=1.99)) == pytest.approx(0.2)  # below tol: first bad eval
    assert rate_of(ctrl, stats(200, val=1.98)) == pytest.approx(0.3)  # second bad eval: raise
    assert rate_of(ctrl, stats(300, val=1.97)) == pytest.approx(0.3)  # count restarted
    assert rate_of(ctrl, stats(400, val=1.5)) == pytest.approx(0.2)  # real improvement: lower


def test_val_loss_state_round_trip():
    vals = [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 2.3, 2.35]
    a = ValLossRule(step=0.03, patience=2)
    for k, v in enumerate(vals[:4]):
        a.update(stats(100 * k, val=v))
    b = ValLossRule(step=0.03, patience=2)
    b.load_state_dict(a.state_dict())
    for k, v in enumerate(vals[4:], start=4):
        assert a.update(stats(100 * k, val=v)) == b.update(stats(100 * k, val=v))


# --- PID -------------------------------------------------------------------------------------------


def run_pid(ctrl: PIDController, gaps, every: int = 10, start: int = 0) -> list[float]:
    """Feed one fresh evaluation every ``every`` iterations with the given gaps; return the outputs."""
    return [rate_of(ctrl, stats(start + every * k, gap=g)) for k, g in enumerate(gaps)]


def test_pid_before_first_eval_and_stale_evals_hold_output():
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.0, bias=0.1, kp=1.0, ki=1.0)
    assert ctrl.output == 0.1
    first = rate_of(ctrl, stats(0, gap=0.05))
    assert first == pytest.approx(0.1 + 0.05)  # no dt yet: no integral, no derivative
    assert rate_of(ctrl, stats(10, gap=0.3, eval_iter=0)) == first  # eval not fresh


def test_pid_proportional_only():
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.02, kp=2.0, ki=0.0, kd=0.0, bias=0.05)
    for k, g in enumerate([0.0, 0.04, 0.1, 0.07, 0.2]):
        expected = min(max(0.05 + 2.0 * (g - 0.02), 0.0), 0.5)
        assert rate_of(ctrl, stats(10 * k, gap=g)) == pytest.approx(expected)
        assert ctrl.internals()["p"] == pytest.approx(2.0 * (g - 0.02))


def test_pid_step_response_integrates_monotonically():
    kp, ki, every = 1.0, 2.0, 10
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.0, kp=kp, ki=ki, kd=0.0, max_rate=0.5)
    outputs = run_pid(ctrl, [0.1] * 20, every=every)
    dt = every / MAX_ITERS
    for k, out in enumerate(outputs):
        assert out == pytest.approx(kp * 0.1 + ki * 0.1 * dt * k)  # P plus the growing integral
    assert all(b > a for a, b in zip(outputs, outputs[1:]))


def test_pid_clamps_to_limits():
    ctrl = PIDController(signal="gap", start=0.0, kp=10.0, ki=0.0, min_rate=0.05, max_rate=0.3, bias=0.1)
    assert rate_of(ctrl, stats(0, gap=1.0)) == 0.3
    assert rate_of(ctrl, stats(10, gap=-1.0)) == 0.05


def test_pid_anti_windup_leaves_saturation_when_error_flips():
    # The P term alone stays below max_rate; the I term saturates the output and stays there a long time.
    kp, ki, every, max_rate = 1.0, 5.0, 10, 0.5
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.0, kp=kp, ki=ki, kd=0.0, max_rate=max_rate)
    n_high = 80
    outputs = run_pid(ctrl, [0.2] * n_high, every=every)
    assert outputs[-1] == pytest.approx(max_rate)
    assert ctrl.internals()["i"] == pytest.approx(max_rate - kp * 0.2)  # integrated only up to the limit

    # What a plain integrator would have accumulated over the same stretch.
    dt = every / MAX_ITERS
    windup_i = ki * 0.2 * dt * (n_high - 1)
    windup_out = min(kp * -0.05 + windup_i + ki * -0.05 * dt, max_rate)
    assert windup_out == max_rate  # would still be saturated after the error flips...

    flipped = rate_of(ctrl, stats(every * n_high, gap=-0.05))
    assert flipped < max_rate - 0.04  # ...while ours leaves saturation at once, by about kp * |e|


def test_pid_integral_frozen_while_saturated_low():
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.0, kp=1.0, ki=5.0, min_rate=0.0)
    run_pid(ctrl, [-0.2] * 50)
    assert ctrl.internals()["i"] == 0.0
    assert rate_of(ctrl, stats(500, gap=0.05)) == pytest.approx(0.05 + 5.0 * 0.05 * 0.01)


def test_pid_derivative_on_measurement_no_setpoint_kick():
    ctrl = PIDController(signal="gap", start=0.0, setpoint=0.0, kp=1.0, ki=0.0, kd=0.5, d_filter=1.0, bias=0.2)
    run_pid(ctrl, [0.1] * 5)
    ctrl.setpoint = -0.1  # error jumps from 0.1 to 0.2; the measurement does not move
    out = rate_of(ctrl, stats(50, gap=0.1))
    assert ctrl.internals()["d"] == 0.0
    assert out == pytest.approx(0.2 + 0.2)
    # The derivative does respond to the measurement: gap +0.01 over dt = 0.01 is a slope of 1.
    rate_of(ctrl, stats(60, gap=0.11))
    assert ctrl.internals()["d"] == pytest.approx(0.5 * 1.0)


def test_pid_derivative_filter_and_first_step():
    a = 0.25
    ctrl = PIDController(signal="gap", start=0.0, kp=0.0, ki=0.0, kd=1.0, d_filter=a, bias=0.1)
    rate_of(ctrl, stats(0, gap=0.5))
    assert ctrl.internals()["derivative"] == 0.0  # no previous measurement
    rate_of(ctrl, stats(10, gap=0.51))  # raw slope 1
    assert ctrl.internals()["derivative"] == pytest.approx(a)
    rate_of(ctrl, stats(20, gap=0.52))  # raw slope 1 again
    assert ctrl.internals()["derivative"] == pytest.approx(a + (1 - a) * a)


def test_pid_val_slope_signal():
    """The least-squares slope of the val loss over the last `window` evaluations, per unit of progress."""
    ctrl = PIDController(signal="val_slope", setpoint=0.0, kp=0.1, ki=0.0, window=2, start=0.0)
    rate_of(ctrl, stats(0, val=2.0))
    assert ctrl.internals()["measurement"] == 0.0  # first evaluation: no slope
    rate_of(ctrl, stats(100, val=1.9))
    assert ctrl.internals()["measurement"] == pytest.approx(-0.1 / 0.1)
    out = rate_of(ctrl, stats(300, val=2.0))
    assert ctrl.internals()["measurement"] == pytest.approx(0.1 / 0.2)  # window 2: the last two evaluations
    assert out == pytest.approx(0.1 * 0.5)
    three = PIDController(signal="val_slope", setpoint=0.0, kp=0.1, ki=0.0, window=3, start=0.0)
    for it, val in ((0, 2.0), (100, 1.9), (300, 2.0)):
        rate_of(three, stats(it, val=val))
    t, v = np.array([0.0, 0.1, 0.3]), np.array([2.0, 1.9, 2.0])
    assert three.internals()["measurement"] == pytest.approx(np.polyfit(t, v, 1)[0])


def test_pid_gap_slope_signal():
    ctrl = PIDController(signal="gap_slope", setpoint=0.0, kp=1.0, ki=0.0, window=3, start=0.0)
    for it, gap in ((0, 0.0), (100, 0.1), (200, 0.2), (300, 0.3)):
        rate_of(ctrl, stats(it, val=2.0 + gap, train=2.0))
    assert ctrl.internals()["measurement"] == pytest.approx(1.0)  # the gap grows 0.1 per 0.1 of the run


def test_pid_non_finite_measurement_holds():
    ctrl = PIDController(signal="gap", start=0.0)
    run_pid(ctrl, [0.1, 0.12])
    state = ctrl.state_dict()
    out = rate_of(ctrl, stats(20, val=math.nan))
    assert out == state["output"]


def test_pid_internals_are_floats():
    ctrl = PIDController(signal="gap", start=0.0, kd=0.1)
    run_pid(ctrl, [0.1, 0.2, 0.15])
    internals = ctrl.internals()
    assert {"p", "i", "d", "error", "measurement", "output"} <= set(internals)
    assert all(type(v) is float for v in internals.values())


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (int, float, bool, str)


@pytest.mark.parametrize("signal", ["gap", "val_slope"])
def test_pid_state_round_trip(signal):
    spec = f"pid:signal={signal},kp=1.5,ki=3,kd=0.05,d_filter=0.3,max_rate=0.4"
    vals = [2.0 - 0.01 * k + 0.003 * (k % 3) for k in range(40)]
    gaps = [0.002 * k + 0.01 * ((k * 7) % 5 - 2) for k in range(40)]
    inputs = [stats(25 * k, val=v, gap=g) for k, (v, g) in enumerate(zip(vals, gaps))]
    a = make_controller(spec)
    a.reset(n_layers=2)
    for s in inputs[:17]:
        a.update(s)
    state = a.state_dict()
    assert _plain(state)
    b = make_controller(spec)
    b.reset(n_layers=2)
    b.load_state_dict(state)
    for s in inputs[17:]:
        assert a.update(s) == b.update(s)
        assert a.internals() == b.internals()


def test_reset_clears_state():
    ctrl = PIDController(signal="gap", start=0.0, ki=5.0)
    first = run_pid(ctrl, [0.1] * 10)
    ctrl.reset(n_layers=4)
    assert run_pid(ctrl, [0.1] * 10) == first


# --- registry and rate checks ----------------------------------------------------------------------


def test_make_controller_parses_typed_values():
    ctrl = make_controller("pid:kp=0.5,setpoint=0.1")
    assert isinstance(ctrl, PIDController)
    assert (ctrl.kp, ctrl.setpoint) == (0.5, 0.1)
    assert make_controller("val_loss:patience=3").patience == 3
    assert make_controller(" constant ").rate == 0.2
    assert make_controller("pid", kd=0.3).kd == 0.3


@pytest.mark.parametrize("name", sorted(set(CONTROLLERS) - {"ppo"}))  # ppo needs a policy file
def test_repr_round_trips(name):
    ctrl = make_controller(name)
    assert make_controller(repr(ctrl)).params() == ctrl.params()


def test_make_controller_bad_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        make_controller("pid:kq=0.5")
    for key in ("signal", "setpoint", "kp", "ki", "kd", "bias", "min_rate", "max_rate", "d_filter"):
        assert key in str(e.value)
    with pytest.raises(UserError, match="key=value"):
        make_controller("pid:kp")


def test_make_controller_bad_value():
    with pytest.raises(UserError, match="kp='fast' is not a valid float"):
        make_controller("pid:kp=fast")
    with pytest.raises(UserError, match="not a valid int"):
        make_controller("val_loss:patience=1.5")


def test_make_controller_unknown_name():
    with pytest.raises(UserError, match="unknown controller 'pdi'.*pid"):
        make_controller("pdi:kp=1")


@pytest.mark.parametrize("bad", [1.0, -0.01, math.nan, math.inf])
def test_check_rate_rejects_out_of_range(bad):
    with pytest.raises(UserError):
        check_rate(bad, 2)
    with pytest.raises(UserError):
        check_rate([0.1, bad], 2)


def test_check_rate_per_layer():
    assert check_rate(0.1, 3) == (0.1, 0.1, 0.1)
    assert check_rate([0.0, 0.5], 2) == (0.0, 0.5)
    with pytest.raises(UserError, match="3 per-layer"):
        check_rate([0.1, 0.2, 0.3], 2)


def test_controller_output_is_checked():
    class Broken(PIDController):
        def _update(self, stats):
            return 1.2

    with pytest.raises(UserError):
        Broken().update(stats(0))


def test_controller_modules_do_not_import_torch():
    # Load the two modules without running the package __init__, which may later import torch-based
    # controllers (ppo); schedules and pid themselves must stay torch-free.
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('controllers'); pkg.__path__ = ['controllers']; sys.modules['controllers'] = pkg\n"
        "import controllers.schedules, controllers.pid\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_pid_holds_the_bias_before_start():
    ctrl = PIDController(signal="gap", setpoint=0.0, kp=1.0, ki=0.0, start=0.1)
    assert rate_of(ctrl, stats(50, gap=0.3)) == 0.0  # 5 % of the run: not measured
    assert ctrl.internals()["measurement"] == 0.0
    assert rate_of(ctrl, stats(100, gap=0.3)) == pytest.approx(0.3)


# --- PID v2: no scale, and its one-line explanation ---------------------------------------------------------


def curves(passes: float) -> tuple[float, float]:
    """A run's losses against passes over its training data: train keeps falling; val follows it at first, then
    stalls from about pass 5 and rises after pass 10, its minimum."""
    train = 1.0 + 3.2 * math.exp(-passes / 4.0)
    val = 2.0 + 2.2 * math.exp(-passes / 1.5) + 0.05 * max(0.0, passes - 10.0)
    return train, val


def first_raise(spec: str, max_iters: int, eval_interval: int, iters_per_pass: float) -> float:
    """Where (in passes over the data) the controller first leaves rate 0 on :func:`curves`."""
    ctrl = make_controller(spec)
    ctrl.reset(n_layers=2)
    best, best_iter = math.inf, 0
    for it in range(0, max_iters + 1, eval_interval):
        train, val = curves(it / iters_per_pass)
        best, best_iter = (val, it) if val < best else (best, best_iter)
        if ctrl.update(stats(it, val=val, train=train, max_iters=max_iters, best=best, best_iter=best_iter))[0] > 0:
            return it / iters_per_pass
    return math.inf


def test_pid_v2_triggers_at_the_same_pass_whatever_the_run_length_and_evaluation_interval():
    """The same model and data (the same losses per pass), trained 1x or 2x as long with the evaluation interval
    scaled: the default PID first raises the rate at the same pass, within one evaluation, and before val's
    minimum (pass 10 here). The first PID, whose clock is the fraction of the run, does not."""
    short = first_raise("pid", 2000, 100, iters_per_pass=100)   # 20 passes, an evaluation per pass
    long = first_raise("pid", 4000, 200, iters_per_pass=100)    # 40 passes, an evaluation every 2 passes
    assert abs(short - long) <= 2 and max(short, long) < 10, (short, long)
    old_short = first_raise("pid:signal=gap_slope", 2000, 100, iters_per_pass=100)
    old_long = first_raise("pid:signal=gap_slope", 4000, 200, iters_per_pass=100)
    assert abs(old_short - old_long) > 2, (old_short, old_long)


def test_pid_v2_transfer_measurement_and_clock():
    ctrl = make_controller("pid:kp=0,ki=0")
    ctrl.reset(n_layers=1)
    for it, (train, val) in enumerate([(3.0, 3.1), (2.7, 2.8), (2.4, 2.8)]):
        ctrl.update(stats(100 * it, val=val, train=train))
    # the window reaches back to where log train was 5 % higher: the last two points; val did not move
    assert ctrl.internals()["measurement"] == pytest.approx(1.0)
    assert ctrl.prev_t == pytest.approx(math.log(3.0 / 2.4))  # the clock: how far log train has fallen
    ctrl.update(stats(300, val=2.9, train=2.5))  # train rose: the clock stands still
    assert ctrl.prev_t == pytest.approx(math.log(3.0 / 2.4))


def test_every_run_explains_its_controller_in_one_line():
    from controllers.base import describe_schedule

    assert describe_schedule([(0, 0.0), (240, 0.1), (600, 0.2)], 1200) == \
        "rate 0 until 240, then 0.1-0.2; mean rate 0.13"  # (0.1 * 360 + 0.2 * 600) / 1200
    assert describe_schedule([(0, 0.2)], 100) == "rate 0.2 throughout"
    ctrl = make_controller("pid")
    ctrl.reset(n_layers=1)
    changes = []
    for it, (train, val) in enumerate([(3.0, 3.1), (2.7, 2.8), (2.4, 2.8), (2.1, 2.85)]):
        rate = ctrl.update(stats(100 * it, val=val, train=train))[0]
        if not changes or changes[-1][1] != rate:
            changes.append((100 * it, rate))
    line = ctrl.explain(changes, 400)
    assert line.startswith("PID (transfer) held 0 until iteration 200, when 100% of the training loss's improvement "
                           "failed to reach val (setpoint 80%); then ") and "\n" not in line, line
    quiet = make_controller("pid")
    quiet.reset(n_layers=1)
    quiet.update(stats(0, val=3.0, train=3.0))
    quiet.update(stats(100, val=2.5, train=2.5))
    assert quiet.explain([(0, 0.0)], 200).startswith("PID (transfer) held 0 all run: at most 0% of")
