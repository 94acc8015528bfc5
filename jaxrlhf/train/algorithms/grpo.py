"""GRPO (`kind: grpo`; Shao et al. 2024, arXiv:2402.03300) and RLOO (`kind: rloo`; Ahmadian et al.
2024, arXiv:2402.14740): critic-free online RL with group-relative advantages (`train/grpo.py`:
`GRPOEngine`; the two differ by their advantage estimator), TRL's GRPOTrainer / RLOOTrainer names.

Prompts come from the `prompt` column of the training files; every other column of a row (e.g.
`answer`, `family`) is passed to the reward functions by name, one entry per completion. Each step
is one `GRPOEngine.step` on `train.batch_size` prompts x `grpo.num_generations` completions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import Field, field_validator, model_validator

from jaxrlhf.data import DataError
from jaxrlhf.parallel import host_array
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.algorithms.tool_use import ToolRollout, ToolSettings, tool_rows
from jaxrlhf.train.common import import_function, model_directory
from jaxrlhf.train.config import ConfigError, fail
from jaxrlhf.train.grpo import GRPOEngine, RewardFn
from jaxrlhf.train.multiturn import episode_metrics
from jaxrlhf.train.online import EngineLearner, decode_rollout, load_prompt_rows, prompt_batches
from jaxrlhf.train.pipeline import resolve_data_files

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig

class GRPOConfig(ToolSettings):
    """Critic-free online RL (kind: grpo or rloo): `num_generations` samples per prompt, advantages
    from each prompt's group of rewards, and the clipped surrogate of `jaxrlhf.losses.grpo_loss`.

    `train.batch_size` is the number of prompts per rollout (so `batch_size * num_generations`
    completions); each rollout is followed by `num_iterations` passes over it in
    `num_mini_batches` minibatches. Names follow TRL's `GRPOConfig`.
    """

    reward_funcs: list[str] = Field(default_factory=list)
    """Reward functions, `module:function`, each `f(prompts, completions, completion_ids, **columns) ->
    list[float | None]` (the prompt rows' other columns passed by name; None = does not apply). E.g.
    `jaxrlhf.rewards:accuracy_reward`."""
    reward_model: str | None = None
    """A trained reward model (a `*ForSequenceClassification` export) scoring each completion at its last
    token (or by the mean over its tokens for a `reward.pooling: mean` model): one more reward, after
    the functions."""
    reward_weights: list[float] | None = None
    """Weights of the rewards (functions, then the reward model) in the summed reward; None: all 1."""
    num_generations: int = Field(8, gt=0)
    """Completions sampled per prompt (G >= 2)."""
    num_iterations: int = Field(1, gt=0)
    """Passes over each rollout (TRL's num_iterations, mu); the sampler's log-probs are the old policy."""
    num_mini_batches: int = Field(1, gt=0)
    """Optimizer steps per pass, each on whole groups (must divide train.batch_size)."""
    max_completion_length: int = Field(64, gt=0)
    """Maximum new tokens per completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (also divides the training logits)."""
    top_k: int = Field(0, ge=0)
    """Sample from the top-k tokens only (0: off)."""
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    """Nucleus sampling mass (1: off)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL to the reference; 0: no reference model is kept (with LoRA the reference is the
    base anyway)."""
    epsilon: float = Field(0.2, gt=0)
    """Lower (and default upper) ratio clip."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper ratio clip (DAPO's clip-higher); None: epsilon."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """How per-token losses are averaged (docs/losses.md)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Per-token ratios, or GSPO's per-sequence ratio."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide the advantages by the group's reward std (GRPO), the batch's, or nothing (Dr. GRPO; TRL's RLOO
    default)."""
    mask_truncated_completions: bool = False
    """Leave completions that never reached EOS out of the loss (DAPO)."""
    rescore_policy: bool = False
    """Recompute the old log-probs with a full forward instead of taking the sampler's."""
    pack_groups: bool = True
    """Train on one packed row per prompt (the prompt once, then its G completions, each attending to the
    prompt and itself): Lp + G N tokens instead of G (Lp + N); same numbers."""

    @property
    def response_length(self) -> int:  # the sampler's name
        return self.max_completion_length

    @field_validator("reward_funcs")
    @classmethod
    def _reward_funcs(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if n.count(":") != 1 or not all(n.partition(":")[::2])]
        if bad:
            raise fail(f"expected 'module:function' names, got {bad}")
        return v

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        n = len(self.reward_funcs) + (self.reward_model is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ConfigError(
                f"grpo.reward_weights has {len(self.reward_weights)} weights for {n} rewards "
                "(reward_funcs, then reward_model)"
            )
        return self


RewardFunc = Callable[..., list[float | None]]


def load_reward_funcs(specs: list[str], section: str = "grpo") -> list[tuple[str, RewardFunc]]:
    """`(name, function)` of each `module:function` of `<section>.reward_funcs`; a typo fails here."""
    return [(spec.partition(":")[2], import_function(spec, f"{section}.reward_funcs")) for spec in specs]


def reward_table(
    funcs: list[tuple[str, RewardFunc]], tokenizer: Any, columns: list[dict[str, Any]], group_size: int,
    index: np.ndarray, completions_of: Callable[[], list[Any]] | None = None,
) -> RewardFn:  # fmt: skip
    """The host reward function of one batch: completions decoded, each function called as
    `f(prompts=..., completions=..., completion_ids=..., **columns)` (the prompt rows' columns,
    each repeated for the row's `group_size` completions), None -> NaN. `index` [P]: the rows.
    `completions_of()`: the completions as conversations instead (a multi-turn rollout's messages,
    tool results included; TRL's form, whose last message is the final answer)."""
    rows = tool_rows(columns, index, group_size)
    keys = sorted({k for r in rows for k in r})
    by_column = {k: [r.get(k) for r in rows] for k in keys}

    def rewards(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        prompts, completions = decode_rollout(ids, response_mask, tokenizer)
        if completions_of is not None:
            completions = completions_of()
        n = response_mask.shape[1]
        completion_ids = [row[m == 1].tolist() for row, m in zip(ids[:, -n:], response_mask, strict=True)]
        out = np.full((len(ids), len(funcs)), np.nan, np.float32)
        for j, (name, fn) in enumerate(funcs):
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **by_column)
            if len(values) != len(ids):
                raise ValueError(f"reward function {name}: {len(values)} values for {len(ids)} completions")
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out

    return rewards


class GroupLearner(EngineLearner):
    """A `GRPOEngine` (or a subclass) on prompt rows whose other columns feed the reward functions."""

    def __init__(self, ctx: Context, engine: GRPOEngine, rows: list[tuple[np.ndarray, dict[str, Any]]],
                 funcs: list[tuple[str, RewardFunc]], total_steps: int):  # fmt: skip
        d = ctx.cfg.data
        batches = prompt_batches([ids for ids, _ in rows], ctx.pad_id, d.buckets, ctx.cfg.train.batch_size,
                                 seed=d.seed)  # fmt: skip
        super().__init__(ctx, engine, batches, total_steps)
        self.columns, self.funcs = [c for _, c in rows], funcs
        self.group_size = engine.cfg.num_generations
        self.tool_rollout: ToolRollout | None = None

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = host_array(batch["index"])  # the global batch's rows: their reward-function columns
        fn, completions_of, tools = None, None, self.tool_rollout
        if tools is not None:  # one environment per completion, reset with its prompt row
            rows = tool_rows(self.columns, index, self.group_size)
            self.engine.rollout = functools.partial(tools, rows)
            completions_of = tools.completions
        if self.funcs:
            fn = reward_table(self.funcs, self.ctx.tokenizer, self.columns, self.group_size, index,
                              completions_of)  # fmt: skip
        out = self.engine.step(batch["prompt_ids"], batch["prompt_mask"], fn, [n for n, _ in self.funcs])
        return out if tools is None else {**out, **episode_metrics(tools.episodes)}

    def last_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.engine.last_rollout.flat()  # gathered on every process (a collective)
        return tuple(host_array(r[k]) for k in ("ids", "rewards", "completion_mask"))  # type: ignore[return-value]

    def shown_rows(self, n: int) -> range:  # the first completion of the first three groups
        return range(0, min(3 * self.group_size, n), self.group_size)


def load_group_data(
    ctx: Context, reward_funcs: list[str], reward_model: str | None, section: str,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """The prompt rows of `data.train_files` and the reward functions; a bad reward model or a typo
    in a function's name fails first, before the data is read. `template_kwargs` (the tools' schemas)
    go to the chat template of every conversational prompt."""
    if reward_model is not None:
        model_directory(reward_model)
    funcs = load_reward_funcs(reward_funcs, section)
    rows = load_prompt_rows(resolve_data_files(ctx.cfg.data.train_files), ctx.tokenizer,
                            max_prompt_length=ctx.cfg.data.max_prompt_length,
                            template_kwargs=template_kwargs)  # fmt: skip
    if len(rows) < ctx.cfg.train.batch_size:
        raise DataError(f"{len(rows)} prompts are fewer than one batch "
                        f"(train.batch_size={ctx.cfg.train.batch_size})", field="train_files")  # fmt: skip
    return rows, funcs


class GRPO(Algorithm):
    name: ClassVar[str] = "grpo"
    help: ClassVar[str] = "GRPO: group-relative advantages over sampled completions, reward functions"
    section: ClassVar[str | None] = "grpo"
    config_class = GRPOConfig
    estimator: ClassVar[str] = "grpo"  # group_advantages' estimator

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        g = cfg.grpo
        if not g.reward_funcs and g.reward_model is None:
            raise ConfigError("grpo: give grpo.reward_funcs and/or grpo.reward_model")
        if cls.estimator == "rloo" and g.num_generations < 2:
            raise ConfigError("grpo.num_generations must be >= 2 for rloo (a leave-one-out baseline)")
        if cfg.train.batch_size % g.num_mini_batches:  # minibatches of whole groups
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                              f"grpo.num_mini_batches ({g.num_mini_batches})")  # fmt: skip

    def plan_steps(self) -> tuple[str, ...]:
        return ("grpo", "grpo_generate")

    def group_config(self) -> GRPOConfig:
        """The engine settings the planner compiles the group steps with."""
        return self.cfg.grpo

    def build(self, ctx: Context) -> Learner:
        cfg, g = ctx.cfg, ctx.cfg.grpo
        tools = ctx.tool_rollout(g, g.max_completion_length)
        rows, funcs = load_group_data(ctx, g.reward_funcs, g.reward_model, "grpo",
                                      tools.template_kwargs() if tools is not None else None)  # fmt: skip
        ctx.say(f"{self.name}: {len(rows)} prompts x {g.num_generations} completions per step")
        total_steps = ctx.total_steps(len(rows))
        optimizer, _ = ctx.optimizer(total_steps * g.num_iterations * g.num_mini_batches)
        policy = ctx.load_policy()
        reward_model = ctx.load_frozen(g.reward_model) if g.reward_model is not None else None
        engine = GRPOEngine(
            policy, g, optimizer, ctx.mesh, pad_token_id=ctx.pad_id, eos_token_ids=ctx.eos_ids,
            estimator=self.estimator, reward_model=reward_model, reward_weights=g.reward_weights,
            num_reward_funcs=len(funcs), seed=cfg.train.seed, frozen_dtype=cfg.model.frozen_dtype,
        )  # fmt: skip
        learner = GroupLearner(ctx, engine, rows, funcs, total_steps)
        learner.tool_rollout = tools
        return learner


class RLOO(GRPO):
    name: ClassVar[str] = "rloo"
    help: ClassVar[str] = "RLOO: GRPO's engine with the leave-one-out baseline (reads the grpo section)"
    estimator: ClassVar[str] = "rloo"
