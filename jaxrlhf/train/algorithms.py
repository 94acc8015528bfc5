"""One table from an experiment's `kind` to the function that trains it: `train(cfg)` dispatches.

Each entry is imported only when used, so `jaxrlhf train sft` never loads the RL engines. The
offline kinds (sft, reward, dpo) share one loop (`trainer.py`) and differ by objective
(`objectives.py`); the online ones have their own engine and loop (`ppo.py` + `ppo_trainer.py`,
`grpo.py` + `grpo_trainer.py`; GRPO and RLOO differ by their advantage estimator). Shared start-up,
evaluation and export code lives in `common.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from jaxrlhf.train.common import TrainResult
from jaxrlhf.train.config import KINDS, ExperimentConfig

TRAINERS: dict[str, str] = {
    "sft": "jaxrlhf.train.trainer:train_offline",
    "reward": "jaxrlhf.train.trainer:train_offline",
    "dpo": "jaxrlhf.train.trainer:train_offline",
    "ppo": "jaxrlhf.train.ppo_trainer:train_ppo",
    "grpo": "jaxrlhf.train.grpo_trainer:train_grpo",
    "rloo": "jaxrlhf.train.grpo_trainer:train_grpo",
}
assert set(TRAINERS) == set(KINDS), "every kind of the config has a trainer"


def trainer_for(kind: str) -> Callable[..., TrainResult]:
    """The training function of `kind`."""
    module, _, name = TRAINERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def train(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `cfg.kind` (sft, reward, dpo, ppo, grpo or rloo) as configured; returns the metrics,
    held-out evaluations and the export path."""
    return trainer_for(cfg.kind)(cfg, log=log)
