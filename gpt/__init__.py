"""The GPT, its data and its trainer. Imports ``controllers`` (the interface), never ``envs`` or ``runs``."""
from .config import PRESETS, TrainConfig, make_config
from .data import CharData
from .model import GPT, GPTConfig
from .trainer import Diverged, Trainer, load_checkpoint

__all__ = ["PRESETS", "TrainConfig", "make_config", "CharData", "GPT", "GPTConfig", "Diverged", "Trainer",
           "load_checkpoint"]
