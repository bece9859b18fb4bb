"""The GPT, its data, its trainer and its run configuration. Imports ``controllers`` (the interface) and
``dyndrop``, never ``envs``, ``experiments``, ``bench`` or ``runs``."""
from .config import PRESETS, TrainConfig, make_config, resolve_preset
from .data import CharData, shared_data
from .model import GPT, GPTConfig
from .trainer import Diverged, Trainer, TrainingHistory, load_checkpoint

__all__ = ["PRESETS", "TrainConfig", "make_config", "resolve_preset", "CharData", "shared_data", "GPT", "GPTConfig",
           "Diverged", "Trainer", "TrainingHistory", "load_checkpoint"]
