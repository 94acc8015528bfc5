"""Training engine: configs, `train(cfg)` (dispatching on `cfg.kind` through
`algorithms.TRAINERS`), the SFT / reward / DPO loop, PPO (`PPOEngine`, `train_ppo`), GRPO / RLOO
(`GRPOEngine`, `train_grpo`), metrics logging and checkpointing."""

from jaxrlhf.train.algorithms import TRAINERS, train
from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard
from jaxrlhf.train.common import TrainResult
from jaxrlhf.train.config import (
    ConfigError,
    DataConfig,
    DPOConfig,
    ExperimentConfig,
    GRPOConfig,
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
from jaxrlhf.train.grpo import GRPOEngine
from jaxrlhf.train.grpo_trainer import train_grpo
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu
from jaxrlhf.train.online import load_prompt_rows, load_prompts, run_online
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.ppo_trainer import train_ppo
from jaxrlhf.train.trainer import train_offline

__all__ = [
    # trainers
    "GRPOEngine",
    "PPOEngine",
    "TRAINERS",
    "TrainResult",
    "train",
    "train_grpo",
    "train_offline",
    "train_ppo",
    # config.py
    "ConfigError",
    "DataConfig",
    "DPOConfig",
    "ExperimentConfig",
    "GRPOConfig",
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
    # online.py (what the PPO and GRPO trainers share)
    "load_prompt_rows",
    "load_prompts",
    "run_online",
    # metrics.py
    "MetricsLogger",
    "device_peak_flops",
    "mfu",
    # checkpoint.py
    "Checkpointer",
    "PreemptionGuard",
]
