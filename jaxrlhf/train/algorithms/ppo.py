"""RLHF with PPO (`kind: ppo`; Ouyang et al. 2022, arXiv:2203.02155; TRL's PPOTrainer): the policy
samples responses to the prompts, a reward model (or a reward function) scores them at the end, a
per-token KL penalty keeps the policy near the frozen reference, GAE gives the advantages, and
`ppo.num_ppo_epochs` x `ppo.num_mini_batches` clipped policy and value updates follow
(`train/ppo.py`: `PPOEngine`, one `jax.jit` per phase).

Prompts come from the `prompt` column of the training files (strings, or conversations rendered
with the chat template and a generation prompt); held-out prompts are `data.eval_files` or
`data.eval_fraction` of them.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from jaxrlhf.data import BatchIterator
from jaxrlhf.parallel import host_array
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.algorithms.tool_use import ToolRollout, ToolSettings, tool_rows
from jaxrlhf.train.common import import_function, model_directory, to_global
from jaxrlhf.train.config import ConfigError
from jaxrlhf.train.multiturn import episode_metrics
from jaxrlhf.train.online import EngineLearner, decode_rollout, load_prompt_rows, prompt_batches
from jaxrlhf.train.pipeline import held_out_split, resolve_data_files
from jaxrlhf.train.ppo import PPOEngine, ScoreFn

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig


class PPOConfig(ToolSettings):
    """RLHF with PPO (kind: ppo): rollouts, rewards, KL penalty, GAE and the clipped updates.

    `train.batch_size` is the number of prompts per rollout; each rollout is followed by
    `num_ppo_epochs` passes over it in `num_mini_batches` minibatches.
    """

    reward_model: str | None = None
    """Reward model checkpoint (a `*ForSequenceClassification` export); or give `reward_fn`."""
    reward_fn: str | None = None
    """`module:function` computing `f(prompts, completions, **columns) -> scores` on the host (verifiable
    rewards; the prompt rows' other columns by name when it takes them, e.g. `answer`); used instead of
    `reward_model`."""
    critic_init: Literal["reward_model", "policy"] = "reward_model"
    """Initialise the critic from the reward model (TRL's choice) or from the policy with a fresh score
    head."""
    response_length: int = Field(48, gt=0)
    """Maximum new tokens per response."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature; also divides the logits when training."""
    top_k: int = Field(0, ge=0)
    """Sample from the top-k tokens only (0: off)."""
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    """Nucleus sampling mass (1: off)."""
    rescore_policy: bool = False
    """Recompute the rollout's policy log-probs with a full forward instead of taking the sampler's (one
    forward more; for when sampling and training numerics differ, e.g. bf16)."""
    kl_coef: float = Field(0.05, ge=0)
    """(Initial) coefficient of the per-token KL penalty."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020)."""
    target_kl: float | None = Field(None, gt=0)
    """Adaptive KL controller target (Ziegler et al. 2019); None: fixed `kl_coef`."""
    kl_horizon: int = Field(10000, gt=0)
    """Horizon of the adaptive KL controller."""
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    """Subtracted from the score of responses without an EOS token (TRL's rule); None: off."""
    missing_eos_score: float | None = None
    """Score given to responses without an EOS token, replacing the reward model's: it never saw a response
    cut off mid-sentence, so its score there means nothing and the policy may learn to never stop. Exclusive
    with `missing_eos_penalty`."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards of each rollout."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE discount."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE lambda."""
    cliprange: float = Field(0.2, gt=0)
    """Policy ratio clip epsilon."""
    cliprange_value: float = Field(0.2, gt=0)
    """Value clip around the rollout's values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    num_ppo_epochs: int = Field(4, gt=0)
    """Passes over each rollout."""
    num_mini_batches: int = Field(1, gt=0)
    """Minibatches per pass (must divide the rollout)."""

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        if self.missing_eos_penalty is not None and self.missing_eos_score is not None:
            raise ConfigError(
                "ppo.missing_eos_penalty and ppo.missing_eos_score are exclusive: set one to null"
            )
        return self


class ScoreFunction:
    """`ppo.reward_fn`: a `module:function` called as `f(prompts, completions, **columns) -> scores`
    on decoded rollouts, the prompt rows' other columns passed by name when it takes them (named
    parameters or `**kwargs`, as GRPO's reward functions). With `tools` (a multi-turn rollout), the
    completions are its conversations (lists of messages, tool results included, the final answer
    last). `bind(columns)` gives the host `ScoreFn` of one batch's rows."""

    def __init__(self, spec: str, tokenizer: Any, tools: ToolRollout | None = None):
        self.fn = import_function(spec, "ppo.reward_fn")  # a typo fails here, before anything loads
        self.tokenizer, self.tools = tokenizer, tools
        params = inspect.signature(self.fn).parameters.values()
        self.any_column = any(p.kind is p.VAR_KEYWORD for p in params)
        self.named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def bind(self, columns: list[dict[str, Any]]) -> ScoreFn:
        keys = sorted({k for row in columns for k in row})
        wanted = [k for k in keys if k not in ("prompts", "completions")
                  and (self.any_column or k in self.named)]  # fmt: skip
        kwargs = {k: [row.get(k) for row in columns] for k in wanted}

        def score(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
            prompts, completions = decode_rollout(ids, response_mask, self.tokenizer)
            if self.tools is not None:
                completions = self.tools.completions()
            return np.asarray(self.fn(prompts, completions, **kwargs), np.float32)

        return score


Rows = list[tuple[np.ndarray, dict[str, Any]]]


def train_and_eval_rows(cfg: ExperimentConfig, tokenizer: Any, template_kwargs: dict[str, Any] | None = None
                        ) -> tuple[Rows, Rows]:  # fmt: skip
    """Training prompt rows (ids and the other columns), and held-out ones: `data.eval_files`, or
    `data.eval_fraction` of the training prompts (chosen by `data.seed`), or none."""
    d = cfg.data

    def load(files: Any) -> Rows:
        return load_prompt_rows(resolve_data_files(files), tokenizer, max_prompt_length=d.max_prompt_length,
                                template_kwargs=template_kwargs)  # fmt: skip

    rows = load(d.train_files)
    if d.eval_files:
        return rows, load(d.eval_files)
    if d.eval_fraction > 0:
        train_idx, eval_idx = held_out_split(len(rows), d.eval_fraction, d.seed)
        return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    return rows, []


def evaluate_policy(
    engine: PPOEngine, batches: BatchIterator, mesh: Any, score_fn: ScoreFunction | None, *, seed: int,
    tools: ToolRollout | None = None, columns: list[dict[str, Any]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Means over the held-out prompts of `PPOEngine.evaluate` (a fixed sampling seed per batch):
    the score, the summed KL to the reference, `score - kl_coef * kl`, response length and the
    fraction of responses that stop. Padding rows of the last batch are left out. The prompt rows'
    `columns` go to the reward function and, with `tools` (episodes of several turns), reset the
    environments."""
    per_row: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        rows = to_global(batch, mesh, micro=None)
        batch_rows = tool_rows(columns or [], host_array(rows["index"]))
        rollout = None if tools is None else functools.partial(tools, batch_rows)
        fn = None if score_fn is None else score_fn.bind(batch_rows)
        out = engine.evaluate(rows["prompt_ids"], rows["prompt_mask"], fn, seed=seed * 100_003 + i,
                              rollout=rollout)  # fmt: skip
        real = host_array(rows["prompt_mask"]).sum(axis=1) > 0
        for k, v in out.items():
            per_row.setdefault(k, []).append(v[real])
        if tools is not None:  # the episodes' tool metrics, per real row
            real_episodes = [e for e, r in zip(tools.episodes, real, strict=True) if r]
            for k, x in episode_metrics(real_episodes).items():
                per_row.setdefault(k, []).append(np.full(len(real_episodes), x))
    v = {k: np.concatenate(x) for k, x in per_row.items()}
    tool_metrics = {k: float(x.mean()) for k, x in v.items() if k.startswith("tools/")}
    return {
        **tool_metrics,
        "objective/scores": float(v["scores"].mean()),
        "objective/kl": float(v["kl"].mean()),
        "objective/rlhf_reward": float((v["scores"] - engine.kl_coef * v["kl"]).mean()),
        "val/response_length": float(v["length"].mean()),
        "val/eos_fraction": float(v["eos"].mean()),
        "prompts": float(len(v["scores"])),
    }


class PPOLearner(EngineLearner):
    reward_name = "score with the missing-EOS rule"

    def __init__(self, ctx: Context, engine: PPOEngine, rows: Rows, eval_rows: Rows,
                 score_fn: ScoreFunction | None, total_steps: int,
                 tools: ToolRollout | None = None):  # fmt: skip
        d, t = ctx.cfg.data, ctx.cfg.train
        batches = prompt_batches([ids for ids, _ in rows], ctx.pad_id, d.buckets, t.batch_size, seed=d.seed)
        super().__init__(ctx, engine, batches, total_steps)
        self.columns, self.eval_rows = [c for _, c in rows], eval_rows
        self.score_fn, self.tools = score_fn, tools

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = tool_rows(self.columns, host_array(batch["index"]))  # the batch's prompt rows
        fn = None if self.score_fn is None else self.score_fn.bind(rows)
        if self.tools is None:
            return self.engine.step(batch["prompt_ids"], batch["prompt_mask"], fn)
        self.engine.rollout = functools.partial(self.tools, rows)  # environments reset with the rows
        out = self.engine.step(batch["prompt_ids"], batch["prompt_mask"], fn)
        return {**out, **episode_metrics(self.tools.episodes)}

    def held_out(self, stage: str) -> dict[str, float] | None:
        if not self.eval_rows:
            return None
        c, t = self.ctx, self.ctx.cfg.train
        rows = prompt_batches([ids for ids, _ in self.eval_rows], c.pad_id, c.cfg.data.buckets, t.batch_size,
                              train=False)  # fmt: skip
        return evaluate_policy(self.engine, rows, c.mesh, self.score_fn, seed=t.seed, tools=self.tools,
                               columns=[col for _, col in self.eval_rows])  # fmt: skip

    def save_extra(self) -> dict[str, Any]:  # the adaptive KL controller's coefficient
        return {"kl_coef": self.engine.kl_coef}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        self.engine.kl_coef = float(extra["kl_coef"])

    def last_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.engine.last_rollout
        n = r.response_mask.shape[1]  # the whole completion (a multi-turn one's tool messages too)
        return host_array(r.ids), host_array(r.scores), host_array(r.mask)[:, -n:]


class PPO(Algorithm):
    name: ClassVar[str] = "ppo"
    help: ClassVar[str] = "RLHF with PPO against a reward model or a reward function"
    section: ClassVar[str | None] = "ppo"
    config_class = PPOConfig

    def plan_steps(self) -> tuple[str, ...]:
        return ("ppo", "score", "generate")

    def build(self, ctx: Context) -> Learner:
        cfg, p = ctx.cfg, ctx.cfg.ppo
        if (p.reward_model is None) == (p.reward_fn is None):
            raise ConfigError("ppo: give exactly one of ppo.reward_model and ppo.reward_fn")
        if cfg.train.batch_size % p.num_mini_batches:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                              f"ppo.num_mini_batches ({p.num_mini_batches})")  # fmt: skip
        if p.reward_model is not None:  # a bad checkpoint fails here, before the data is read
            model_directory(p.reward_model)
        tools = ctx.tool_rollout(p, p.response_length)
        # a typo in the function's name fails here, before anything is loaded
        score_fn = ScoreFunction(p.reward_fn, ctx.tokenizer, tools) if p.reward_fn else None
        rows, eval_rows = train_and_eval_rows(cfg, ctx.tokenizer, tools.template_kwargs() if tools else None)
        ctx.say(f"ppo: {len(rows)} prompts ({len(eval_rows)} held out)")
        total_steps = ctx.total_steps(len(rows))
        optimizer, _ = ctx.optimizer(total_steps * p.num_ppo_epochs * p.num_mini_batches)
        policy = ctx.load_policy()  # LoRA: adapters; the base is the reference (and the critic's base)
        reward_model = ctx.load_frozen(p.reward_model) if p.reward_model is not None else None
        from_rm = p.critic_init == "reward_model" and reward_model is not None
        critic_from = "reward_model" if from_rm else "policy"
        critic = ctx.load_model(p.reward_model if critic_from == "reward_model" else None, head="score",
                                init_score_head=critic_from == "policy", lora=cfg.lora.critic)  # fmt: skip
        engine = PPOEngine(
            policy, critic, reward_model, p, optimizer, ctx.mesh, eos_token_ids=ctx.eos_ids,
            pad_token_id=ctx.pad_id, seed=cfg.train.seed, frozen_dtype=cfg.model.frozen_dtype,
            critic_frozen_from=critic_from,
        )  # fmt: skip
        return PPOLearner(ctx, engine, rows, eval_rows, score_fn, total_steps, tools)
