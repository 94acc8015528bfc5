"""The registry of training methods: `kind` -> `Algorithm`. This is the one place `cfg.kind` is read.

A method is one module here (its config section, data, objective or engine, metrics) plus its loss in
`jaxrlhf.losses`; registering it in `ALGORITHMS` gives it `jaxrlhf train KIND`, its config section,
its cross-field checks at load time and its rows in docs/configuration.md (docs/architecture.md,
"Adding a method"). `ExperimentConfig` -- a whole run's config -- is assembled here from the common
sections of `jaxrlhf.train.config` and the methods' own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxrlhf.train import config as _config
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.algorithms.dpo import DPO, DPOConfig
from jaxrlhf.train.algorithms.grpo import GRPO, RLOO, GRPOConfig
from jaxrlhf.train.algorithms.kto import KTO, KTOConfig
from jaxrlhf.train.algorithms.online_dpo import OnlineDPO, OnlineDPOConfig
from jaxrlhf.train.algorithms.ppo import PPO, PPOConfig
from jaxrlhf.train.algorithms.reward import Reward, RewardConfig
from jaxrlhf.train.algorithms.sft import SFT, SFTConfig

# In this order in `jaxrlhf train --help`, config files and docs/configuration.md.
ALGORITHMS: dict[str, type[Algorithm]] = {
    a.name: a for a in (SFT, Reward, DPO, PPO, GRPO, RLOO, KTO, OnlineDPO)
}
KINDS: tuple[str, ...] = tuple(ALGORITHMS)

ExperimentConfig = _config.experiment_class(
    {a.section: a.config_class for a in ALGORITHMS.values() if a.section and a.config_class},
    kinds={k: a.section for k, a in ALGORITHMS.items()},
    checks={k: a.check for k, a in ALGORITHMS.items()},
)


def algorithm_for(cfg: Any) -> Algorithm:
    """The method of `cfg.kind`, for this config."""
    return ALGORITHMS[cfg.kind](cfg)


def load_config(path: str | None, overrides: Sequence[str] = (), *, kind: str | None = None) -> Any:
    """The `ExperimentConfig` of YAML file `path` (None: defaults) with dotted `overrides`; `kind`
    (the CLI's) sets the method. Any invalid input raises `ConfigError` naming the key."""
    return _config.load_config(path, overrides, kind=kind, cls=ExperimentConfig)


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """The `ExperimentConfig` of a dict from `config_to_dict` (e.g. a checkpoint's)."""
    return _config.config_from_dict(d, ExperimentConfig)


def config_markdown() -> str:
    """docs/configuration.md: every key of every section, with its type, default and help."""
    return _config.config_markdown(ExperimentConfig)


__all__ = [
    "ALGORITHMS", "KINDS", "Algorithm", "Context", "DPOConfig", "ExperimentConfig", "GRPOConfig",
    "KTOConfig", "Learner", "OnlineDPOConfig", "PPOConfig", "RewardConfig", "SFTConfig", "algorithm_for",
    "config_from_dict", "config_markdown", "load_config",
]  # fmt: skip
