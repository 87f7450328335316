"""Typed configs (schema.py) and their Hydra wiring (hydra.py)."""
from smat_dist.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    EvalConfig,
    LauncherConfig,
    LoggingConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = ["Config", "ModelConfig", "MethodConfig", "DataConfig", "DistConfig", "TrainConfig", "CheckpointConfig",
           "LoggingConfig", "LauncherConfig", "EvalConfig", "compose", "ConfigError", "load_yaml", "to_yaml"]


def __getattr__(name):  # Hydra is imported only by code that composes configs
    if name in ("compose", "ConfigError", "load_yaml", "to_yaml", "to_config"):
        from smat_dist.config import hydra as _h
        return getattr(_h, name)
    raise AttributeError(name)
