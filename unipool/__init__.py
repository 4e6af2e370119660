"""unipool: Mixture-of-Experts language models with one globally shared expert pool (UniPool)."""

__version__ = "0.1.0"

from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import ModelOutput, Unipool, build_model
from unipool.presets import PRESETS, get_preset

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "PRESETS", "Unipool", "build_model", "get_preset", "__version__"]
