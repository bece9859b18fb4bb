"""Dropout-rate controllers: the interface, the registry, the spec grammar and the built-in controllers.

Importing this package registers every controller, so ``make_controller("pid:kp=0.5")`` works.
"""
from . import features, pid, ppo, schedules  # noqa: F401  (imported to register their controllers)
from .base import CONTROLLERS, Controller, HoldRate, Rate, TrainingStats, check_rate, register
from .specs import make_controller, parse_controllers, spec_name, spec_policy, with_policy

__all__ = [
    "CONTROLLERS",
    "Controller",
    "HoldRate",
    "Rate",
    "TrainingStats",
    "check_rate",
    "make_controller",
    "parse_controllers",
    "register",
    "spec_name",
    "spec_policy",
    "with_policy",
]
