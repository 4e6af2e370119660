"""unipool: Mixture-of-Experts language models with one globally shared expert pool (UniPool)."""

__version__ = "0.1.0"

from unipool.model.config import PRESETS, ConfigError, ModelConfig, get_preset
from unipool.model.model import ModelOutput, Unipool, build_model

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "PRESETS", "Unipool", "build_model", "get_preset", "__version__"]
