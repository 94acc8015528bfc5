"""Training: configs, the methods (`algorithms`: one module each, `ALGORITHMS` by kind), the one
runner `train(cfg)` (`run.py`), the online engines (`PPOEngine`, `GRPOEngine`), metrics logging and
the experiment trackers, and checkpointing."""

from jaxrlhf.train.algorithms import (
    ALGORITHMS,
    KINDS,
    Algorithm,
    Context,
    DPOConfig,
    ExperimentConfig,
    GRPOConfig,
    KTOConfig,
    Learner,
    OnlineDPOConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    algorithm_for,
    config_from_dict,
    config_markdown,
    load_config,
)
from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard
from jaxrlhf.train.common import TrainResult
from jaxrlhf.train.config import (
    ConfigError,
    DataConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    Section,
    TaskEvalConfig,
    TrainConfig,
    config_to_dict,
)
from jaxrlhf.train.grpo import GRPOEngine
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu
from jaxrlhf.train.multiturn import Episode, ToolTurnTemplate, reprefill, run_episodes
from jaxrlhf.train.online import load_prompt_rows, load_prompts
from jaxrlhf.train.ppo import PPOEngine
from jaxrlhf.train.run import run as train
from jaxrlhf.train.trackers import TRACKERS, TrackerError, make_trackers

__all__ = [
    "Episode",
    "ToolTurnTemplate",
    "reprefill",
    "run_episodes",
    # the methods and the runner
    "ALGORITHMS",
    "Algorithm",
    "Context",
    "GRPOEngine",
    "Learner",
    "PPOEngine",
    "TrainResult",
    "algorithm_for",
    "train",
    # config: the common sections (config.py), the methods' (algorithms/), the whole run
    "KINDS",
    "KTOConfig",
    "LoRAConfig",
    "OnlineDPOConfig",
    "Section",
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
    # online.py (what the online methods share)
    "load_prompt_rows",
    "load_prompts",
    # metrics.py
    "MetricsLogger",
    "device_peak_flops",
    "mfu",
    # trackers.py (train.report_to)
    "TRACKERS",
    "TrackerError",
    "make_trackers",
    # checkpoint.py
    "Checkpointer",
    "PreemptionGuard",
]
