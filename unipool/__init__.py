"""unipool: Mixture-of-Experts language models with one globally shared expert pool (UniPool)."""

__version__ = "0.1.0"

from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import ModelOutput, Unipool, build_model
from unipool.presets import PRESETS, get_preset
from unipool.run import Run

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "ModelOutput", "Run", "Unipool", "__version__", "build_model",
           "get_preset"]
