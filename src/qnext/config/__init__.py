"""Typed recipe config: schema (``schema.py``), Hydra composition (``load.py``), checks (``validate.py``)."""
from .schema import (
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    RecipeConfig,
    TrainConfig,
)
from .load import load_config, to_yaml
from .validate import validate_config

__all__ = [
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ParallelConfig",
    "RecipeConfig",
    "TrainConfig",
    "load_config",
    "to_yaml",
    "validate_config",
]
