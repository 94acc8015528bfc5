"""Tool use in the online methods (GRPO, RLOO, PPO, online DPO): the config keys every one of them
shares (`ToolSettings`, mixed into their sections) and the multi-turn rollout of a batch
(`ToolRollout`, called by an engine in place of its single-turn sampler). The episode loop is
`jaxrlhf.train.multiturn`; docs/tools.md is the user's page.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, Literal, Self

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from pydantic import Field, model_validator

from jaxrlhf.generation.sampling import Generation
from jaxrlhf.parallel import host_array
from jaxrlhf.tools import Environment, ToolEnvironment, tool_schema
from jaxrlhf.train.common import import_function
from jaxrlhf.train.config import ConfigError, Section
from jaxrlhf.train.multiturn import (
    Episode,
    ToolTurnTemplate,
    episode_arrays,
    reprefill,
    reset_environments,
    run_episodes,
)
from jaxrlhf.train.rollout import RolloutEngine


class ToolSettings(Section):
    """The tool-use keys of an online method's section (docs/tools.md)."""

    max_turns: int = Field(1, ge=1)
    """Assistant turns per episode: 1 is single-turn; more lets the policy call `tools` (or talk to an
    `environment`) and read the results before it answers (docs/tools.md)."""
    tools: list[str] = Field(default_factory=list)
    """Tools the policy may call, `module:function` (e.g. `jaxrlhf.tools:calculator`): plain functions whose
    JSON schemas, from type hints and docstrings, go to the chat template (`tools=`)."""
    environment: str | None = None
    """Instead of `tools`: `module:factory` of an environment (`jaxrlhf.tools.Environment`: `tools`,
    `reset(row)`, `step(calls)`), called once per completion."""
    max_turn_tokens: int | None = Field(None, gt=0)
    """New tokens per turn (None: the whole completion budget); all turns and the tool messages share the
    completion budget."""
    tool_timeout: float = Field(5.0, gt=0)
    """Seconds a tool call may take before the model is told it timed out (`tools` only)."""
    turn_cache: Literal["carry", "reprefill"] = "carry"
    """Multi-turn sampling: carry the KV cache across turns and prefill only the tool messages, or re-prefill
    each row's whole context every turn (same episodes, more compute; docs/tools.md)."""

    @model_validator(mode="after")
    def _check_tools(self) -> Self:
        s = self.SECTION or "tools"
        if self.tools and self.environment is not None:
            raise ConfigError(f"{s}: give {s}.tools or {s}.environment, not both")
        if bool(self.tools or self.environment is not None) != (self.max_turns > 1):
            raise ConfigError(f"{s}: tools ({s}.tools or {s}.environment) need {s}.max_turns >= 2, and "
                              f"{s}.max_turns >= 2 needs tools")  # fmt: skip
        return self

    def tool_keys(self) -> dict[str, Any]:
        """The tool keys' values, to build another section with the same tools."""
        return {k: getattr(self, k) for k in ToolSettings.model_fields}


def environment_factory(cfg: ToolSettings) -> Callable[[], Environment]:
    """The per-completion environment of `environment`, or a `ToolEnvironment` of `tools`."""
    s = cfg.SECTION or "tools"
    if cfg.environment is not None:
        return import_function(cfg.environment, f"{s}.environment")
    tools = [import_function(spec, f"{s}.tools") for spec in cfg.tools]
    return functools.partial(ToolEnvironment, tools, timeout=cfg.tool_timeout)


class ToolRollout:
    """The multi-turn rollout of a batch (`jaxrlhf.train.multiturn`), called by an engine in place
    of its single-turn sampler: `ToolRollout(...)(rows, engine, prompt_ids, prompt_mask)`, `rows`
    the prompt rows (one per completion) that reset the environments. `max_tokens`: the completion
    budget (the `[B, N]` width of the returned `Generation`)."""

    def __init__(self, tokenizer: Any, cfg: ToolSettings, *, max_tokens: int, eos_ids: list[int], pad_id: int,
                 buckets: Any = None):  # fmt: skip
        self.tokenizer, self.cfg, self.max_tokens = tokenizer, cfg, max_tokens
        self.eos_ids, self.pad_id, self.buckets = eos_ids, pad_id, buckets
        self.factory = environment_factory(cfg)
        self.schemas = [tool_schema(fn) for fn in self.factory().tools]
        self.template = ToolTurnTemplate.of(tokenizer, **self.template_kwargs())
        self.episodes: list[Episode] = []
        self.rebuilds = 0  # the carried caches' rebuilds in the last rollout

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template gets with every prompt: the tools' schemas."""
        return {"tools": self.schemas} if self.schemas else {}

    def completions(self) -> list[list[dict[str, str]]]:
        return [e.messages for e in self.episodes]

    def __call__(self, rows: list[dict[str, Any]], engine: RolloutEngine, prompt_ids: Any, prompt_mask: Any,
                 *, seed: int | None = None) -> Generation:  # fmt: skip
        """The episodes of a batch; `seed`: sampling keys from it (held-out evaluation), not from the
        training stream."""
        ids, mask = host_array(prompt_ids), host_array(prompt_mask)
        prompts = [row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)]
        c = self.cfg
        turn_tokens = c.max_turn_tokens or self.max_tokens
        if c.turn_cache == "carry":
            sample: Any = engine.turn_cache(len(prompts), ids.shape[1], max_tokens=self.max_tokens,
                                            turn_tokens=turn_tokens, buckets=self.buckets,
                                            seed=seed)  # fmt: skip
        else:
            turns = itertools.count()

            def generate(i: np.ndarray, m: np.ndarray, n: int) -> Generation:
                turn_seed = None if seed is None else seed * 64 + next(turns)
                return engine.generate(i, m, max_new_tokens=n, seed=turn_seed)

            sample = reprefill(generate, self.pad_id, self.buckets)
        self.episodes = run_episodes(
            sample, self.tokenizer, prompts, reset_environments(self.factory, rows), eos_ids=self.eos_ids,
            max_turns=c.max_turns, max_tokens=self.max_tokens, turn_tokens=turn_tokens,
            template=self.template,
        )  # fmt: skip
        self.rebuilds = max(getattr(sample, "rebuilds", 0), 0)
        arrays = episode_arrays(self.episodes, self.max_tokens, self.pad_id)
        replicated = NamedSharding(engine.mesh, PartitionSpec())
        return Generation(**{k: jax.device_put(v, replicated) for k, v in arrays.items()})


def tool_rows(columns: list[dict[str, Any]], index: np.ndarray, group_size: int = 1) -> list[dict[str, Any]]:
    """The prompt row of each completion (`index`: the batch's rows, -1 for padding; `group_size`
    completions per prompt), which resets its environment."""
    return [columns[i] if i >= 0 else {} for i in np.repeat(index, group_size)]
