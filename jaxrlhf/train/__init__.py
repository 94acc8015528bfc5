"""Training engine: configs, the SFT / reward / DPO trainer (`train`), PPO (`PPOEngine`, `train_ppo`),
metrics logging and checkpointing."""

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
    TaskEvalConfig,
    TrainConfig,
    config_from_dict,
    config_markdown,
    config_to_dict,
    load_config,
)
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.ppo_trainer import train_ppo
from jaxrlhf.train.trainer import TrainResult, train

__all__ = [
    # trainers
    "PPOEngine",
    "TrainResult",
    "train",
    "train_ppo",
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
    "TaskEvalConfig",
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
