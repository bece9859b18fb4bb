"""Dropout-rate controllers: the interface, the registry, and the built-in controllers.

Importing this package registers every controller, so ``make_controller("pid:kp=0.5")`` works.
"""
from . import features, pid, ppo, schedules  # noqa: F401  (imported to register their controllers)
from .base import CONTROLLERS, Controller, Rate, TrainingStats, check_rate, make_controller, register
from .errors import UserError

__all__ = [
    "CONTROLLERS",
    "Controller",
    "Rate",
    "TrainingStats",
    "UserError",
    "check_rate",
    "make_controller",
    "register",
]
