"""A PID controller that raises dropout as the model starts to overfit. Plain Python + numpy/scipy: no torch."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import (Controller, Rate, TrainingStats, describe_schedule, register, require_fraction,
                   require_rate_range)
from .features import SPAN, memorised, slope

SIGNALS = ("transfer", "gap_slope", "gap", "rel_gap", "above_best", "val_slope")
LEGACY = {"setpoint": 0.8, "kp": 0.2, "ki": 1.0, "kd": 0.0, "window": 5, "start": 0.1}
"""The defaults of the signals measured against the fraction of the run (the first PID, tuned on cpu-overfit)."""
DEFAULTS: dict[str, dict[str, Any]] = {
    "transfer": {"setpoint": 0.8, "kp": 0.3, "ki": 3.0, "kd": 0.0, "window": 0, "start": 0.0},
    **{name: LEGACY for name in SIGNALS if name != "transfer"},
}
"""Each signal's defaults for the parameters a spec leaves out (``pid:signal=gap_slope`` is the first PID)."""

@register
class PIDController(Controller):
    """Sets the dropout rate from the error between a measured overfitting signal and a setpoint.

    Each control step that brings a new evaluation (``stats.eval_iter`` advanced) runs one PID update;
    other steps return the previous output.

    **The default signal, ``transfer``, has no scale.** It asks how much of the training loss's improvement still
    reaches the validation loss: over the evaluations since the training loss (fixed batches, dropout off) was
    ``span`` (5 %) higher, it fits ``log val`` against ``log train`` by least squares; the slope is the share that
    transfers (1 while the model learns what generalizes, 0 when val stalls, below 0 when it worsens), and the
    measurement is ``1 - slope``, the share that is memorised. Time is the run's own progress in the same units:
    ``dt`` is the fall of ``log train`` since the previous evaluation (0 if it rose). Neither depends on the run's
    length, the evaluation interval, the data's size or the model's: a run twice as long, evaluated half as often,
    or a larger model, reaches the same measurement at the same training loss. Defaults: ``setpoint=0.8`` (the rate
    rises once more than 80 % of the training loss's improvement stops reaching val), ``kp=0.3``, ``ki=3`` (an
    error of 1 held while the training loss falls by a factor e adds 3 to the rate), nothing held back at the start
    (the first fitting transfers, so the measurement is low there). Tuned on the suite's tune regimes only
    (``experiments.suite``, docs/results.md).

    The other signals are measured against the fraction of the run, ``t = eval_iter / max_iters``, and keep the
    first PID's defaults (:data:`LEGACY`: ``pid:signal=gap_slope`` is that controller): ``gap_slope``, the
    least-squares slope of the gap (val - train on the evaluation batches) over the last ``window`` evaluations,
    in nats per run; ``gap`` (nats); ``rel_gap``: gap / val loss; ``above_best``: ``eval_val_loss -
    best_val_loss`` (nats); ``val_slope``: the slope of ``eval_val_loss`` over the last ``window`` evaluations.

    The loop, whatever the signal:

    - error ``e = measurement - setpoint``: the rate rises while the measurement is above the setpoint.
    - ``P = kp * e``.
    - ``I``: sum of ``ki * e * dt`` (0 at the first evaluation). Anti-windup by conditional integration
      (clamping): an increment that pushes the output towards a limit is applied only up to the point where the
      output reaches that limit, and not at all while the output is already saturated that way; increments back
      into range always apply. On top of that, the I term is clamped so that ``bias + I`` stays within
      ``[min_rate, max_rate]``. So however long the saturation, the output leaves it as soon as the error
      changes sign.
    - ``D = kd * filtered(d measurement / dt)``: derivative of the measurement, not of the error, so a
      change of setpoint gives no kick. A first-order low-pass filter
      ``y[n] = d_filter * x[n] + (1 - d_filter) * y[n - 1]`` (``scipy.signal.lfilter``, its state kept
      between calls) smooths the noisy finite difference. The derivative is 0 at the first evaluation.
    - output ``clamp(bias + P + I + D, min_rate, max_rate)``.

    Parameters left out take the signal's defaults (:data:`DEFAULTS`).

    :param signal: one of :data:`SIGNALS`.
    :param setpoint: target value of the signal (a share for ``transfer``; nats, or nats per run for the slopes).
    :param kp: proportional gain (rate per unit of error).
    :param ki: integral gain: rate per unit of error and unit of time (``transfer``: per unit fall of log train;
        the others: per whole run).
    :param kd: derivative gain: ``D = kd * d(measurement)/dt``.
    :param bias: output when P, I and D are all 0, and the rate before the first evaluation; in
        ``[min_rate, max_rate]``.
    :param min_rate: lowest output, in [0, 1).
    :param max_rate: highest output, in ``[min_rate, 1)``.
    :param d_filter: weight of the newest finite difference in the derivative's low-pass filter, in (0, 1];
        1 means no filtering.
    :param window: evaluations in the slope signals' least-squares fit, >= 2 (not used by ``transfer``, whose
        window is ``span``).
    :param start: fraction of the run, in [0, 1], before which the output stays ``bias`` and nothing is
        measured.
    :param span: ``transfer``'s window, in log units of the training loss, > 0.
    """

    name = "pid"

    def __init__(
        self,
        signal: str = "transfer",
        setpoint: float | None = None,
        kp: float | None = None,
        ki: float | None = None,
        kd: float | None = None,
        bias: float = 0.0,
        min_rate: float = 0.0,
        max_rate: float = 0.5,
        d_filter: float = 0.5,
        window: int | None = None,
        start: float | None = None,
        span: float = SPAN,
    ) -> None:
        super().__init__()
        if signal not in SIGNALS:
            raise ValueError(f"signal={signal!r} is not one of: {', '.join(SIGNALS)}")
        given = dict(setpoint=setpoint, kp=kp, ki=ki, kd=kd, window=window, start=start)
        values = {k: DEFAULTS[signal][k] if v is None else v for k, v in given.items()}
        setpoint, kp, ki, kd, window, start = (values[k] for k in ("setpoint", "kp", "ki", "kd", "window", "start"))
        for key, value in dict(setpoint=setpoint, kp=kp, ki=ki, kd=kd).items():
            if not math.isfinite(value):
                raise ValueError(f"{key}={value} must be a finite number")
        require_rate_range("min_rate", min_rate, "max_rate", max_rate)
        if not (min_rate <= bias <= max_rate):
            raise ValueError(f"bias={bias} is outside [min_rate, max_rate] = [{min_rate}, {max_rate}]")
        if not (0.0 < d_filter <= 1.0):
            raise ValueError(f"d_filter={d_filter} must be in (0, 1]")
        if signal != "transfer" and window < 2:
            raise ValueError(f"window={window} must be at least 2 evaluations")
        if not (0.0 < span < math.inf):
            raise ValueError(f"span={span} must be a finite number > 0")
        require_fraction("start", start)
        self.signal, self.setpoint = signal, float(setpoint)
        self.kp, self.ki, self.kd, self.bias = float(kp), float(ki), float(kd), bias
        self.min_rate, self.max_rate, self.d_filter, self.window, self.start = min_rate, max_rate, d_filter, window, start
        self.span = span
        self._reset()

    def _clamp(self, x: float) -> float:
        return min(max(x, self.min_rate), self.max_rate)

    def _reset(self) -> None:
        self.last_eval_iter = -1
        self.prev_t: float | None = None  # the clock at the previous evaluation
        # legacy signals: (progress, val, gap) of the last `window` evaluations; transfer: (log train, log val)
        self.recent: list[tuple[float, ...]] = []
        self.first_log_train: float | None = None
        self.raised_at: list[float] | None = None  # [iteration, measurement] when the output first left the bias
        self.peak = -math.inf  # the highest measurement so far
        self.prev_measurement: float | None = None
        self.i_term = 0.0
        self.d_state = [0.0]  # lfilter's zi: (1 - d_filter) * previous filtered derivative
        self.derivative = 0.0  # filtered d(measurement)/d(progress)
        self.p_term = self.d_term = self.error = self.measurement = 0.0
        self.output = self.bias

    def _clock(self, stats: TrainingStats) -> float:
        """Time at this evaluation: the fall of log train since the first (never going back) for ``transfer``; the
        fraction of the run for the others."""
        if self.signal != "transfer":
            return stats.eval_iter / max(stats.max_iters, 1)
        log_train = math.log(stats.eval_train_loss) if stats.eval_train_loss > 0 else math.nan
        if self.first_log_train is None and math.isfinite(log_train):
            self.first_log_train = log_train
        fallen = (self.first_log_train - log_train) if self.first_log_train is not None else math.nan
        return max(self.prev_t or 0.0, fallen) if math.isfinite(fallen) else (self.prev_t or 0.0)

    def _transfer(self, stats: TrainingStats) -> float:
        """:func:`~controllers.features.memorised` with this evaluation added (nan without positive losses)."""
        if not (stats.eval_train_loss > 0 and stats.eval_val_loss > 0):
            return math.nan
        point = (math.log(stats.eval_train_loss), math.log(stats.eval_val_loss))
        value, self.recent = memorised(self.recent + [point], self.span)
        return value

    def _measure(self, stats: TrainingStats, t: float) -> float:
        if self.signal == "transfer":
            return self._transfer(stats)
        if self.signal == "gap":
            return float(stats.gap)
        if self.signal == "rel_gap":
            return float(stats.gap / stats.eval_val_loss) if stats.eval_val_loss else 0.0  # a loss of 0: no gap
        if self.signal == "above_best":
            return float(stats.eval_val_loss - stats.best_val_loss)
        self.recent = (self.recent + [(t, float(stats.eval_val_loss), float(stats.gap))])[-self.window:]
        column = 1 if self.signal == "val_slope" else 2
        return slope([r[0] for r in self.recent], [r[column] for r in self.recent])

    def _update(self, stats: TrainingStats) -> Rate:
        if stats.eval_iter <= self.last_eval_iter:
            return self.output
        self.last_eval_iter = stats.eval_iter
        if stats.eval_iter / max(stats.max_iters, 1) < self.start:  # the first fitting: hold the bias, measure nothing
            return self.output
        t = self._clock(stats)
        measurement = self._measure(stats, t)
        if not math.isfinite(measurement):
            return self.output  # e.g. a diverged run: hold the rate rather than poison the state
        dt = 0.0 if self.prev_t is None else t - self.prev_t

        error = measurement - self.setpoint
        p = self.kp * error

        raw_derivative = 0.0
        if self.prev_measurement is not None and dt > 0.0:
            raw_derivative = (measurement - self.prev_measurement) / dt
        a = self.d_filter
        from scipy.signal import lfilter  # imported on first use: scipy.signal is slow to import

        y, zf = lfilter([a], [1.0, a - 1.0], np.array([raw_derivative]), zi=np.array(self.d_state))
        self.derivative = float(y[0])
        self.d_state = [float(zf[0])]
        d = self.kd * self.derivative

        # Conditional integration: integrate outwards only up to the point where the output reaches its
        # limit; once saturated, an increment that pushes further the same way is dropped.
        increment = self.ki * error * dt
        rest = self.bias + p + d
        if increment > 0.0:
            self.i_term = min(self.i_term + increment, max(self.i_term, self.max_rate - rest))
        elif increment < 0.0:
            self.i_term = max(self.i_term + increment, min(self.i_term, self.min_rate - rest))
        # Keep bias + I within the limits, so the I term alone never holds the output in saturation.
        self.i_term = min(max(self.i_term, self.min_rate - self.bias), self.max_rate - self.bias)

        self.output = self._clamp(self.bias + p + self.i_term + d)
        self.peak = max(self.peak, measurement)
        if self.raised_at is None and self.output > self.bias + 1e-9:
            self.raised_at = [float(stats.eval_iter), float(measurement)]
        self.p_term, self.d_term, self.error, self.measurement = p, d, error, measurement
        self.prev_t, self.prev_measurement = t, measurement
        return self.output

    def _words(self, measurement: float) -> str:
        """A measurement of the signal in words."""
        if self.signal == "transfer":
            return f"{measurement:.0%} of the training loss's improvement failed to reach val"
        units = {"gap_slope": "the gap grew {:.2f} nats per run", "val_slope": "val changed {:.2f} nats per run",
                 "gap": "the gap was {:.3f} nats", "rel_gap": "the gap was {:.1%} of val",
                 "above_best": "val was {:.3f} nats above its best"}
        return units[self.signal].format(measurement)

    def explain(self, changes, max_iters: int) -> str:
        """``PID held 0 until iteration 240, when 97% of the training loss's improvement failed to reach val
        (setpoint 80%); then 0.1-0.3; mean rate 0.17``."""
        setpoint = f"{self.setpoint:.0%}" if self.signal == "transfer" else f"{self.setpoint:g}"
        schedule = describe_schedule(changes, max_iters)
        if self.raised_at is None:
            peak = self._words(self.peak) if math.isfinite(self.peak) else "nothing was measured"
            return f"PID ({self.signal}) held {self.bias:g} all run: at most {peak} (setpoint {setpoint}); {schedule}"
        it, measured = self.raised_at
        _, _, after = schedule.partition(", then ")
        return (f"PID ({self.signal}) held {self.bias:g} until iteration {int(it)}, when {self._words(measured)} "
                f"(setpoint {setpoint}); then {after or schedule}")

    def internals(self) -> dict[str, float]:
        return {
            "p": self.p_term,
            "i": self.i_term,
            "d": self.d_term,
            "derivative": self.derivative,
            "error": self.error,
            "measurement": self.measurement,
            "output": self.output,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_eval_iter": int(self.last_eval_iter),
            "prev_t": self.prev_t,
            "recent": [list(r) for r in self.recent],
            "prev_measurement": self.prev_measurement,
            "i_term": float(self.i_term),
            "d_state": [float(z) for z in self.d_state],
            "derivative": float(self.derivative),
            "p_term": float(self.p_term),
            "d_term": float(self.d_term),
            "error": float(self.error),
            "measurement": float(self.measurement),
            "output": float(self.output),
            "first_log_train": self.first_log_train,
            "raised_at": self.raised_at,
            "peak": self.peak if math.isfinite(self.peak) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def opt(x: Any) -> float | None:
            return None if x is None else float(x)

        self.last_eval_iter = int(state["last_eval_iter"])
        self.prev_t = opt(state["prev_t"])
        self.recent = [tuple(float(v) for v in r) for r in state.get("recent", [])]
        self.prev_measurement = opt(state["prev_measurement"])
        self.i_term = float(state["i_term"])
        self.d_state = [float(z) for z in state["d_state"]]
        self.derivative = float(state["derivative"])
        self.p_term, self.d_term = float(state["p_term"]), float(state["d_term"])
        self.error, self.measurement = float(state["error"]), float(state["measurement"])
        self.output = float(state["output"])
        self.first_log_train = opt(state.get("first_log_train"))
        self.raised_at = [float(v) for v in state["raised_at"]] if state.get("raised_at") else None
        self.peak = -math.inf if state.get("peak") is None else float(state["peak"])
