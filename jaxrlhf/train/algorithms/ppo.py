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

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from jaxrlhf.data import BatchIterator
from jaxrlhf.parallel import host_array
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.common import import_function, model_directory, to_global
from jaxrlhf.train.config import ConfigError, Section
from jaxrlhf.train.online import EngineLearner, decode_rollout, load_prompts, prompt_batches
from jaxrlhf.train.pipeline import held_out_split, resolve_data_files
from jaxrlhf.train.ppo import PPOEngine, ScoreFn

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig


class PPOConfig(Section):
    """RLHF with PPO (kind: ppo): rollouts, rewards, KL penalty, GAE and the clipped updates.

    `train.batch_size` is the number of prompts per rollout; each rollout is followed by
    `num_ppo_epochs` passes over it in `num_mini_batches` minibatches.
    """

    reward_model: str | None = None
    """Reward model checkpoint (a `*ForSequenceClassification` export); or give `reward_fn`."""
    reward_fn: str | None = None
    """`module:function` computing `f(prompts, completions) -> scores` on the host (verifiable rewards); used
    instead of `reward_model`."""
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


def load_score_fn(spec: str, tokenizer: Any) -> ScoreFn:
    """`module:function` taking `(prompts: list[str], completions: list[str]) -> scores`, wrapped to
    take token ids."""
    fn = import_function(spec, "ppo.reward_fn")

    def score(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        return np.asarray(fn(*decode_rollout(ids, response_mask, tokenizer)), np.float32)

    return score


def train_and_eval_prompts(cfg: ExperimentConfig, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """Training prompts, and held-out ones: `data.eval_files`, or `data.eval_fraction` of the
    training prompts (chosen by `data.seed`), or none."""
    d = cfg.data
    length = d.max_prompt_length
    prompts = load_prompts(resolve_data_files(d.train_files), tokenizer, max_prompt_length=length)
    if d.eval_files:
        return prompts, load_prompts(resolve_data_files(d.eval_files), tokenizer, max_prompt_length=length)
    if d.eval_fraction > 0:
        train_idx, eval_idx = held_out_split(len(prompts), d.eval_fraction, d.seed)
        return [prompts[i] for i in train_idx], [prompts[i] for i in eval_idx]
    return prompts, []


def evaluate_policy(
    engine: PPOEngine, batches: BatchIterator, mesh: Any, score_fn: ScoreFn | None, *, seed: int
) -> dict[str, float]:
    """Means over the held-out prompts of `PPOEngine.evaluate` (a fixed sampling seed per batch):
    the score, the summed KL to the reference, `score - kl_coef * kl`, response length and the
    fraction of responses that stop. Padding rows of the last batch are left out."""
    per_row: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        rows = to_global(batch, mesh, micro=None)
        out = engine.evaluate(rows["prompt_ids"], rows["prompt_mask"], score_fn, seed=seed * 100_003 + i)
        real = host_array(rows["prompt_mask"]).sum(axis=1) > 0
        for k, v in out.items():
            per_row.setdefault(k, []).append(v[real])
    v = {k: np.concatenate(x) for k, x in per_row.items()}
    return {
        "objective/scores": float(v["scores"].mean()),
        "objective/kl": float(v["kl"].mean()),
        "objective/rlhf_reward": float((v["scores"] - engine.kl_coef * v["kl"]).mean()),
        "val/response_length": float(v["length"].mean()),
        "val/eos_fraction": float(v["eos"].mean()),
        "prompts": float(len(v["scores"])),
    }


class PPOLearner(EngineLearner):
    reward_name = "score with the missing-EOS rule"

    def __init__(self, ctx: Context, engine: PPOEngine, prompts: list[Any], eval_prompts: list[Any],
                 score_fn: ScoreFn | None, total_steps: int):  # fmt: skip
        d, t = ctx.cfg.data, ctx.cfg.train
        batches = prompt_batches(prompts, ctx.pad_id, d.buckets, t.batch_size, seed=d.seed)
        super().__init__(ctx, engine, batches, total_steps)
        self.eval_prompts, self.score_fn = eval_prompts, score_fn

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.engine.step(batch["prompt_ids"], batch["prompt_mask"], self.score_fn)

    def held_out(self, stage: str) -> dict[str, float] | None:
        if not self.eval_prompts:
            return None
        c, t = self.ctx, self.ctx.cfg.train
        rows = prompt_batches(self.eval_prompts, c.pad_id, c.cfg.data.buckets, t.batch_size, train=False)
        return evaluate_policy(self.engine, rows, c.mesh, self.score_fn, seed=t.seed)

    def save_extra(self) -> dict[str, Any]:  # the adaptive KL controller's coefficient
        return {"kl_coef": self.engine.kl_coef}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        self.engine.kl_coef = float(extra["kl_coef"])

    def last_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.engine.last_rollout
        return host_array(r.ids), host_array(r.scores), host_array(r.response_mask)


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
        score_fn = load_score_fn(p.reward_fn, ctx.tokenizer) if p.reward_fn else None  # a typo fails early
        prompts, eval_prompts = train_and_eval_prompts(cfg, ctx.tokenizer)
        ctx.say(f"ppo: {len(prompts)} prompts ({len(eval_prompts)} held out)")
        total_steps = ctx.total_steps(len(prompts))
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
        return PPOLearner(ctx, engine, prompts, eval_prompts, score_fn, total_steps)
