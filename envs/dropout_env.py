"""``DynamicDropout-v0``: one episode is one short GPT training run; the agent sets its dropout rate.

Each step applies the action as the rate, trains one control interval, evaluates, and observes the
run through :class:`controllers.features.Featurizer`, the same featurizer the ``ppo`` controller uses
in deployment. See :class:`DropoutEnv` for the observation, action, reward and instances.
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from controllers import TrainingStats
from controllers.features import FEATURE_VERSION, Featurizer, action_to_rates, check_bounds
from dyndrop import UserError
from gpt import Diverged, Trainer, make_config, shared_data
from gpt.config import MAX_SEED, TrainConfig
from gpt.trainer import check_memory, resolve_device

from .micro import DECISIONS, EVAL_REGIMES, LENGTHS, MICRO, TRAIN_REGIMES, micro_regime

REWARDS = ("best_val", "val", "final")

EPISODES: dict[str, dict[str, Any]] = {
    # Data-limited: a 3-layer, 128-wide model on the first 8,000 characters overfits within the episode, so
    # how much dropout, and when, matters; the tiny model (2 x 64) never gained from dropout in episodes of
    # up to 1,200 steps on 3,000-8,000 characters (docs/results.md has the measurements that chose this).
    "overfit": dict(preset="tiny", max_iters=1000, interval=100,
                    config={"train_chars": 8000, "n_layer": 3, "n_embd": 128}),
    # The first default: the whole training split; the tiny model still underfits at the end, rate 0 is best.
    "tiny": dict(preset="tiny", max_iters=160, interval=16, config={}),
    # A family, one micro-regime drawn per episode from the instance's seed (envs.micro): PPO's training episodes.
    MICRO: dict(preset="tiny", max_iters=max(LENGTHS), interval=max(LENGTHS) // DECISIONS, config={}, family=True),
}
"""Named episode configurations: the preset, episode length, control interval and setting overrides."""
DEFAULT_EPISODE = "overfit"
TRAIN_SEEDS = tuple(range(1000, 1064))  # 64 training instances
EVAL_SEEDS = tuple(range(9000, 9008))  # 8 held-out instances, never drawn in training

def episode_config(preset: str = "tiny", max_iters: int = 160, interval: int = 16, seed: int = 0,
                   **overrides: Any) -> TrainConfig:
    """The training config of one episode: evaluate and control every ``interval`` steps, no side effects.

    Also what ``runs.eval_policy`` gives every controller, so the comparison matches the episodes.
    """
    return make_config(preset, max_iters=max_iters, eval_interval=interval, control_interval=interval,
                       seed=seed, **{"device": "cpu", **overrides}).quiet()


class DropoutEnv(gym.Env):
    """Set the dropout rate of a short GPT training run, one control interval at a time.

    **Episode**: a ``preset`` run of ``max_iters`` optimizer steps whose training seed is an instance
    (below), by default the ``overfit`` configuration of :data:`EPISODES`. ``reset`` builds the model and evaluates it; each ``step`` trains ``interval`` steps at the
    chosen rate and evaluates, so an episode has ``ceil(max_iters / interval)`` steps. No checkpoints,
    logging or progress bars inside an episode.

    **Observation**: :data:`controllers.features.FEATURES` (float32, one box per feature): progress, log
    eval losses, relative gap, slopes of log val/train per unit of progress, current rate, fraction of
    the run since the best val, log(val / best val), log(smoothed train loss / eval train loss).

    **Action**: ``Box(-1, 1, (1,))``, or ``(n_layer,)`` with ``per_layer``: mapped linearly onto
    ``[p_min, p_max]`` (clipped first) by :func:`controllers.features.action_to_rates`.

    **Reward** (``reward``), in units of ``reward_scale`` x nats of log loss:

    - ``best_val`` (default): ``log(best_{t-1}) - log(best_t)`` each step, the lowering of the best val
      loss so far (>= 0; sums to ``log(best_0 / best_T)``), plus at the last step a terminal term
      ``terminal_weight * log(best_0 / best_T)``, the whole episode's improvement, which credits the
      outcome to late states too.
    - ``val``: ``log(val_{t-1}) - log(val_t)``, the change of the current val loss (may be negative).
    - ``final``: sparse, only at the last step: ``log(best_0 / best_T)``.

    Divergence (NaN/inf loss, :class:`gpt.Diverged`) ends the episode with ``-divergence_penalty``.

    **Instances**: training seeds :data:`TRAIN_SEEDS`, held-out seeds :data:`EVAL_SEEDS` (disjoint).
    ``reset(seed=s)`` seeds the env's generator, which draws the instance from the split's seeds;
    ``reset(options={"instance": k})`` runs seed ``k`` directly, ``options={"split": "eval"}`` draws from the
    held-out seeds. The same instance and actions give the same observations and rewards.

    :param episode: a named configuration of :data:`EPISODES` (preset, length, interval, settings); the next
        four arguments override its parts.
    :param preset: the :mod:`gpt.config` preset of the trained model; None = the episode's.
    :param max_iters: optimizer steps per episode; None = the episode's.
    :param interval: optimizer steps per env step (evaluation and control interval); None = the episode's.
    :param p_min: rate for action -1, in [0, 1).
    :param p_max: rate for action +1, in [p_min, 1).
    :param per_layer: one action (rate) per transformer layer instead of one for all.
    :param reward: one of :data:`REWARDS`.
    :param reward_scale: multiplies every reward (log-loss changes are ~0.01).
    :param terminal_weight: weight of the ``best_val`` terminal term.
    :param divergence_penalty: reward (negated, before scaling) when training diverges.
    :param split: ``"train"`` or ``"eval"``: which seeds ``reset`` draws from by default.
    :param train_seeds: training instances; default :data:`TRAIN_SEEDS`.
    :param eval_seeds: held-out instances; default :data:`EVAL_SEEDS`; must be disjoint from train_seeds.
    :param torch_threads: ``torch.set_num_threads`` for this process; 1 because on a shared 2-core machine
        more threads oversubscribe (docs/results.md); None = leave it.
    :param data: the dataset path (default: ``$DYNDROP_DATA_DIR``/the cache), read once per process.
    :param config: further :class:`gpt.config.TrainConfig` overrides (e.g. ``eval_iters``), over the episode's;
        ``max_iters`` and ``preset`` there are the arguments of those names. ``seed`` (the instance's),
        ``eval_interval`` and ``control_interval`` (``interval``) are the env's own and refused.

    Every argument is checked here (numbers finite and in range, seeds in range): a bad one raises ``UserError``.
    """

    metadata = {"render_modes": []}

    def __init__(self, episode: str = DEFAULT_EPISODE, preset: str | None = None, max_iters: int | None = None,
                 interval: int | None = None, p_min: float = 0.0,
                 p_max: float = 0.5, per_layer: bool = False, reward: str = "best_val", reward_scale: float = 10.0,
                 terminal_weight: float = 1.0, divergence_penalty: float = 1.0, split: str = "train",
                 train_seeds: tuple[int, ...] = TRAIN_SEEDS, eval_seeds: tuple[int, ...] = EVAL_SEEDS,
                 torch_threads: int | None = 1, data: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        if not isinstance(episode, str) or episode not in EPISODES:
            raise UserError(f"unknown episode {episode!r}; choose one of: {', '.join(EPISODES)}")
        named = EPISODES[episode]
        if config is not None and not isinstance(config, dict):
            _refuse("config", config, "a dict of settings, or None")
        config = dict(config or {})
        for key, arg in (("seed", "reset(options={'instance': k})"), ("eval_interval", "interval"),
                         ("control_interval", "interval")):
            if key in config:
                raise UserError(f"config[{key!r}] is set by the env: use {arg}")
        for key, given in (("max_iters", max_iters), ("preset", preset)):  # the same setting, two ways in
            if key in config and given is not None and config[key] != given:
                raise UserError(f"{key}={given!r} and config[{key!r}]={config[key]!r} disagree; give one of them")
        preset = preset if preset is not None else config.pop("preset", None)
        max_iters = max_iters if max_iters is not None else config.pop("max_iters", None)
        config.pop("preset", None), config.pop("max_iters", None)
        self.length_given = (max_iters, interval)  # a family's own lengths give way to these (tests shorten runs)
        preset = preset if preset is not None else named["preset"]
        max_iters = max_iters if max_iters is not None else named["max_iters"]
        interval = interval if interval is not None else named["interval"]
        for name, value in (("max_iters", max_iters), ("interval", interval)):
            if not _is_int(value):
                _refuse(name, value, "a whole number")
        for name, value, low in (("reward_scale", reward_scale, "> 0"), ("terminal_weight", terminal_weight, ">= 0"),
                                 ("divergence_penalty", divergence_penalty, ">= 0")):
            if not (_is_number(value) and math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
                _refuse(name, value, f"a finite number {low}")
        if not isinstance(per_layer, (bool, np.bool_)):
            _refuse("per_layer", per_layer, "True or False")
        if torch_threads is not None and not (_is_int(torch_threads) and torch_threads >= 0):
            _refuse("torch_threads", torch_threads, "a whole number >= 0, or None")
        for name, seeds in (("train_seeds", train_seeds), ("eval_seeds", eval_seeds)):
            if not (isinstance(seeds, (tuple, list, range)) and all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds)):
                _refuse(name, seeds, f"a sequence of whole numbers in [0, {MAX_SEED}]")
        if not isinstance(preset, str):
            _refuse("preset", preset, "a preset's name")
        if data is not None and not isinstance(data, str):
            _refuse("data", data, "a path, or None")
        try:
            if not (_is_number(p_min) and _is_number(p_max)):
                raise ValueError(f"p_min={p_min!r} and p_max={p_max!r} must be numbers")
            check_bounds(p_min, p_max)
        except ValueError as e:
            raise UserError(str(e)) from None
        if reward not in REWARDS:
            raise UserError(f"unknown reward {reward!r}; choose one of: {', '.join(REWARDS)}")
        if split not in ("train", "eval"):
            raise UserError(f"split must be 'train' or 'eval', not {split!r}")
        if not train_seeds or not eval_seeds:
            raise UserError("train_seeds and eval_seeds must both be non-empty")
        if set(train_seeds) & set(eval_seeds):
            raise UserError(f"training and held-out seeds overlap: {sorted(set(train_seeds) & set(eval_seeds))}")
        if interval < 1 or max_iters < interval:
            raise UserError(f"need 1 <= interval <= max_iters, got interval={interval}, max_iters={max_iters}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.episode, self.preset, self.max_iters, self.interval = episode, preset, max_iters, interval
        self.p_min, self.p_max, self.per_layer = p_min, p_max, per_layer
        self.reward_kind, self.reward_scale = reward, reward_scale
        self.terminal_weight, self.divergence_penalty = terminal_weight, divergence_penalty
        self.family = bool(named.get("family"))
        if self.family and train_seeds is TRAIN_SEEDS and eval_seeds is EVAL_SEEDS:  # the family's own instances
            train_seeds, eval_seeds = TRAIN_REGIMES, EVAL_REGIMES
        self.split, self.train_seeds, self.eval_seeds = split, tuple(train_seeds), tuple(eval_seeds)
        self.config_overrides = {**named["config"], **config}
        self.base_config = episode_config(preset, max_iters, interval, **self.config_overrides)
        self.data = shared_data(data, str(resolve_device(self.base_config.device)))
        check_memory(self.base_config, self.data.vocab_size)  # config={"n_embd": ...} builds a model at every reset
        self.score = EpisodeScore(reward, reward_scale, terminal_weight, divergence_penalty)
        n_actions = self.base_config.n_layer if per_layer else 1
        self.action_space = gym.spaces.Box(-1.0, 1.0, (n_actions,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(Featurizer.low, Featurizer.high, dtype=np.float32)
        self.trainer: Trainer | None = None
        self.instance = -1

    def metadata_dict(self) -> dict[str, Any]:
        """What a saved policy must record to be deployed with the same features and action mapping."""
        return {"feature_version": FEATURE_VERSION, "p_min": self.p_min, "p_max": self.p_max,
                "per_layer": self.per_layer, "n_layer": self.base_config.n_layer, "episode": self.episode,
                "preset": self.preset,
                "max_iters": self.max_iters, "interval": self.interval, "reward": self.reward_kind,
                "reward_scale": self.reward_scale, "terminal_weight": self.terminal_weight,
                "config": self.config_overrides, "train_seeds": list(self.train_seeds),
                "eval_seeds": list(self.eval_seeds)}

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.instance = draw_instance(self.np_random, options, self.split, self.train_seeds, self.eval_seeds)
        self.trainer = Trainer(self.config_for(self.instance), data=self.data)  # no controller: the env sets the rate
        self.trainer.evaluate()
        stats = self.trainer.stats()
        return self.score.start(stats), self._info(stats)

    def step(self, action):
        if self.trainer is None:
            raise RuntimeError("the episode has not started or has ended; call reset() before step()")
        shape = np.shape(action)
        if shape != self.action_space.shape:
            raise ValueError(f"an action of shape {shape} does not fit the action space {self.action_space}")
        trainer = self.trainer
        rates = trainer.set_dropout(action_to_rates(action, self.p_min, self.p_max, self.base_config.n_layer))
        try:
            trainer.advance(min(trainer.cfg.eval_interval, trainer.cfg.max_iters - trainer.iteration))
            trainer.evaluate()
        except Diverged:
            stats = trainer.stats()
            self.trainer = None  # the run is over; a step now needs a reset
            obs, reward = self.score.diverged(stats)
            return obs, reward, True, False, {**self._info(stats), "diverged": True}
        stats = trainer.stats()
        done = trainer.iteration >= trainer.cfg.max_iters
        obs, reward = self.score.step(stats, done)
        if done:
            self.trainer = None  # gymnasium's rule: a finished episode steps again only after reset()
        return obs, reward, done, False, {**self._info(stats), "rates": rates}

    def _info(self, stats: TrainingStats) -> dict[str, Any]:
        return episode_info(self.instance, stats)

    def config_for(self, instance: int, seed: int | None = None) -> TrainConfig:
        """The run of an episode of ``instance``, trained with ``seed`` (default: the instance): the named
        configuration, or for a family the instance's micro-regime (:func:`envs.micro.micro_regime`); the env's
        ``config`` overrides on top."""
        seed = instance if seed is None else seed
        if not self.family:
            return episode_config(self.preset, self.max_iters, self.interval, seed=seed, **self.config_overrides)
        regime = micro_regime(instance)
        max_iters, interval = (given or own for given, own in zip(self.length_given,
                                                                  (regime["max_iters"], regime["interval"])))
        return episode_config(regime["preset"], max_iters, interval, seed=seed,
                              **{**regime["config"], **self.config_overrides})


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        float(value)  # an int too long for a float is no number here
    except OverflowError:
        return False
    return True


def _refuse(name: str, value: Any, must: str) -> Any:
    raise UserError(f"{name}={str(value)[:60]!r} is invalid: it must be {must}")


def episode_info(instance: int, stats: TrainingStats) -> dict[str, Any]:
    """The info dict of an env step: the instance, where its run is, and its losses and rate."""
    return {"instance": instance, "iteration": stats.iteration, "val_loss": stats.eval_val_loss,
            "best_val_loss": stats.best_val_loss, "rate": stats.rate}


def draw_instance(np_random: np.random.Generator, options: dict[str, Any] | None, split: str,
                  train_seeds: tuple[int, ...], eval_seeds: tuple[int, ...]) -> int:
    """The training seed of a new episode: ``options["instance"]``, or a draw from ``options["split"]``'s
    seeds (default ``split``). Raises ``ValueError`` for unknown options or values (gymnasium's way)."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"instance", "split"})
    if unknown or len(options) > 1:
        raise ValueError(f"reset options take one of 'instance' (a seed) or 'split' ('train' or 'eval'), "
                         f"got {sorted(options)}")
    if "instance" in options:
        k = options["instance"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= MAX_SEED:
            raise ValueError(f"options['instance'] must be a seed, an integer in [0, {MAX_SEED}], not {k!r}")
        return int(k)
    split = options.get("split", split)
    if split not in ("train", "eval"):
        raise ValueError(f"options['split'] must be 'train' or 'eval', not {split!r}")
    seeds = eval_seeds if split == "eval" else train_seeds
    return int(seeds[int(np_random.integers(len(seeds)))])


class EpisodeScore:
    """The observation and reward of each step of one episode (see :class:`DropoutEnv`), from the run's
    ``TrainingStats``: the featurizer's state and the losses the rewards compare against.

    :param reward: one of :data:`REWARDS`.
    :param reward_scale: multiplies every reward.
    :param terminal_weight: weight of the ``best_val`` terminal term.
    :param divergence_penalty: reward (negated, before scaling) when training diverges.
    """

    def __init__(self, reward: str, reward_scale: float, terminal_weight: float, divergence_penalty: float) -> None:
        self.kind, self.scale = reward, reward_scale
        self.terminal_weight, self.divergence_penalty = terminal_weight, divergence_penalty
        self.featurizer = Featurizer()

    def start(self, stats: TrainingStats) -> np.ndarray:
        """A new episode whose run has been evaluated once; returns the first observation."""
        self.featurizer.reset()
        self.best0 = self.prev_best = stats.best_val_loss
        self.prev_val = stats.eval_val_loss
        return self.featurizer.observe(stats)

    def step(self, stats: TrainingStats, done: bool) -> tuple[np.ndarray, float]:
        """The observation and reward after a step that ended with an evaluation."""
        best, val = stats.best_val_loss, stats.eval_val_loss
        if self.kind == "best_val":
            reward = math.log(self.prev_best / best)
            if done:
                reward += self.terminal_weight * math.log(self.best0 / best)
        elif self.kind == "val":
            reward = math.log(self.prev_val / val)
        else:
            reward = math.log(self.best0 / best) if done else 0.0
        self.prev_best, self.prev_val = best, val
        return self.featurizer.observe(stats), float(reward * self.scale)

    def diverged(self, stats: TrainingStats) -> tuple[np.ndarray, float]:
        """The observation and reward of a step whose training diverged (the episode ends)."""
        return self.featurizer.observe(stats), -self.divergence_penalty * self.scale
