"""Training engine: configuration, metrics logging, checkpointing (and, later, the trainers)."""

from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard
from jaxrlhf.train.config import (
    ConfigError,
    DataConfig,
    DPOConfig,
    ExperimentConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
    config_from_dict,
    config_markdown,
    config_to_dict,
    load_config,
)
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu

__all__ = [
    # config.py
    "ConfigError",
    "DataConfig",
    "DPOConfig",
    "ExperimentConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "RewardConfig",
    "SFTConfig",
    "TrainConfig",
    "config_from_dict",
    "config_markdown",
    "config_to_dict",
    "load_config",
    # metrics.py
    "MetricsLogger",
    "device_peak_flops",
    "mfu",
    # checkpoint.py
    "Checkpointer",
    "PreemptionGuard",
]
