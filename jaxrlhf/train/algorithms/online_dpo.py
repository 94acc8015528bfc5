"""Online DPO (`kind: online_dpo`; Guo et al. 2024, arXiv:2402.04792; TRL's OnlineDPOTrainer):
each step samples two completions per prompt from the current policy, ranks them with reward
functions and / or a reward model (the judges GRPO takes), and takes one DPO step on the pair:
chosen = the higher reward (the first on a tie), the reference the frozen initial policy (with
LoRA: the base). As in TRL, `missing_eos_penalty` is subtracted before ranking, and the trained
log-probs are the raw model's (the temperature only shapes sampling).

The rollout, the rewards and the packed forward of a prompt's two completions are GRPO's
(`OnlineDPOEngine` is a `GRPOEngine` with G = 2 and the DPO loss); the metric names are TRL's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from jaxrlhf.losses import dpo_loss
from jaxrlhf.parallel import host_array
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.algorithms.grpo import GroupLearner, GRPOConfig, load_group_data
from jaxrlhf.train.algorithms.tool_use import ToolSettings
from jaxrlhf.train.config import ConfigError
from jaxrlhf.train.grpo import GroupRollout, GRPOEngine

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig

Array = jax.Array


class OnlineDPOConfig(ToolSettings):
    """Online DPO (kind: online_dpo): two sampled completions per prompt, ranked by the rewards, one
    DPO step on the pair. `train.batch_size` is the number of prompts per step. Names follow TRL's
    `OnlineDPOConfig`."""

    beta: float = Field(0.1, gt=0)
    """DPO's beta (IPO's tau for `loss_type: ipo`)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid` (DPO) or `ipo` (unnormalised, as TRL's online trainer)."""
    reward_funcs: list[str] = Field(default_factory=list)
    """Reward functions `module:function`, called as in the grpo section (the prompt rows' other
    columns passed by name)."""
    reward_model: str | None = None
    """A trained reward model scoring each completion (at its last token, or by the mean over its
    tokens for a `reward.pooling: mean` model): one more reward."""
    reward_weights: list[float] | None = None
    """Weights of the rewards (functions, then the reward model) in the summed reward; None: all 1."""
    max_new_tokens: int = Field(64, gt=0)
    """Maximum new tokens per completion."""
    temperature: float = Field(0.9, gt=0)
    """Sampling temperature (TRL's default 0.9); the trained log-probs are the raw model's."""
    top_k: int = Field(0, ge=0)
    """Sample from the top-k tokens only (0: off)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1: off)."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the reward of a completion that never reaches EOS, before the ranking."""

    def engine_config(self) -> GRPOConfig:
        """GRPO's engine settings that sample and score two completions per prompt."""
        return GRPOConfig(
            reward_funcs=self.reward_funcs, reward_model=self.reward_model,
            reward_weights=self.reward_weights, num_generations=2, max_completion_length=self.max_new_tokens,
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, beta=self.beta,
            scale_rewards="none", **self.tool_keys(),
        )  # fmt: skip


def online_dpo_loss(
    logps_Px2: Array, ref_logps_Px2: Array, rewards_Px2: Array, *, beta: float, loss_type: str
) -> tuple[Array, dict[str, Array]]:
    """TRL's OnlineDPO loss on summed completion log-probs `[P, 2]`: chosen is the completion with
    the higher reward (the first on a tie); sigmoid `-log sigma(beta h)` or IPO `(h - 1/(2 beta))^2`
    with `h` the policy's minus the reference's chosen-rejected log-ratio (IPO unnormalised, as TRL's
    OnlineDPO computes it). Returns the mean loss and TRL's `rewards/*` and `logps/*` metrics."""
    first = rewards_Px2[:, 0] >= rewards_Px2[:, 1]
    pick = lambda x, a: jnp.where(first, x[:, a], x[:, 1 - a])  # noqa: E731
    chosen, rejected = pick(logps_Px2, 0), pick(logps_Px2, 1)
    ref_chosen, ref_rejected = pick(ref_logps_Px2, 0), pick(ref_logps_Px2, 1)
    ones = jnp.ones_like(chosen)  # lengths of 1: IPO without the per-token normalisation
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                             chosen_lengths=ones, rejected_lengths=ones)  # fmt: skip
    metrics = {k: v for k, v in metrics.items() if k.startswith("rewards/")}
    metrics["logps/chosen"] = jnp.mean(jax.lax.stop_gradient(chosen))
    metrics["logps/rejected"] = jnp.mean(jax.lax.stop_gradient(rejected))
    return loss, metrics


class OnlineDPOEngine(GRPOEngine):
    """GRPO's rollout and scoring with G = 2, and one DPO update per rollout."""

    logprob_temperature = 1.0  # TRL's OnlineDPO trains on the raw logits

    def __init__(self, policy: Any, cfg: OnlineDPOConfig, optimizer: Any, mesh: Any, **kw: Any):
        self.dpo = cfg
        self.missing_eos_penalty = cfg.missing_eos_penalty
        super().__init__(policy, cfg.engine_config(), optimizer, mesh, estimator="grpo", **kw)

    def _loss(self, logps: Array, batch: GroupRollout) -> tuple[Array, dict[str, Array]]:
        mask = batch.loss_mask.astype(jnp.float32)  # the policy's tokens (not a rollout's tool messages)
        seq, ref = jnp.sum(logps * mask, axis=2), jnp.sum(batch.ref_logprobs * mask, axis=2)  # [P, 2]
        o = self.dpo
        loss, metrics = online_dpo_loss(seq, ref, batch.rewards, beta=o.beta, loss_type=o.loss_type)
        kl = jax.lax.stop_gradient(seq - ref)  # summed per completion
        metrics["objective/kl"] = jnp.mean(kl)
        metrics["objective/non_score_reward"] = -self.dpo.beta * jnp.mean(kl)
        metrics["objective/entropy"] = -jnp.mean(jax.lax.stop_gradient(seq))
        return loss, metrics

    def step(
        self, prompt_ids: Any, prompt_mask: Any, reward_fn: Any, reward_names: Any = None
    ) -> dict[str, float]:
        out = super().step(prompt_ids, prompt_mask, reward_fn, reward_names)
        rewards = host_array(self.last_rollout.rewards)  # [P, 2] with the missing-EOS penalty
        out["objective/scores"] = out.pop("reward")
        out["objective/scores_margin"] = float(np.mean(np.abs(rewards[:, 0] - rewards[:, 1])))
        out["objective/rlhf_reward"] = out["objective/scores"] + out["objective/non_score_reward"]
        out["val/contain_eos_token"] = 1.0 - out.pop("completions/clipped_ratio")
        out["beta"] = self.dpo.beta
        for key in ("reward_std", "frac_reward_zero_std", "clip_ratio"):
            out.pop(key, None)
        return out


class OnlineDPO(Algorithm):
    name: ClassVar[str] = "online_dpo"
    help: ClassVar[str] = "online DPO: two sampled completions per prompt ranked by rewards (TRL's OnlineDPO)"
    section: ClassVar[str | None] = "online_dpo"
    config_class = OnlineDPOConfig

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        o: OnlineDPOConfig = cfg.online_dpo
        if not o.reward_funcs and o.reward_model is None:
            raise ConfigError("online_dpo: give online_dpo.reward_funcs and/or online_dpo.reward_model")
        n = len(o.reward_funcs) + (o.reward_model is not None)
        if o.reward_weights is not None and len(o.reward_weights) != n:
            raise ConfigError(f"online_dpo.reward_weights has {len(o.reward_weights)} weights for {n} "
                              "rewards (reward_funcs, then reward_model)")  # fmt: skip

    def plan_steps(self) -> tuple[str, ...]:  # GRPO's rollout and packed update, G = 2
        return ("grpo", "grpo_generate")

    def group_config(self) -> GRPOConfig:
        return self.cfg.online_dpo.engine_config()

    def build(self, ctx: Context) -> Learner:
        cfg, o = ctx.cfg, ctx.cfg.online_dpo
        tools = ctx.tool_rollout(o, o.max_new_tokens)
        rows, funcs = load_group_data(ctx, o.reward_funcs, o.reward_model, "online_dpo",
                                      tools.template_kwargs() if tools is not None else None)  # fmt: skip
        ctx.say(f"online_dpo: {len(rows)} prompts x 2 completions per step")
        total_steps = ctx.total_steps(len(rows))
        optimizer, _ = ctx.optimizer(total_steps)  # one update per rollout
        reward_model = ctx.load_frozen(o.reward_model) if o.reward_model is not None else None
        engine = OnlineDPOEngine(
            ctx.load_policy(), o, optimizer, ctx.mesh, pad_token_id=ctx.pad_id, eos_token_ids=ctx.eos_ids,
            reward_model=reward_model, reward_weights=o.reward_weights, num_reward_funcs=len(funcs),
            seed=cfg.train.seed, frozen_dtype=cfg.model.frozen_dtype,
        )  # fmt: skip
        learner = GroupLearner(ctx, engine, rows, funcs, total_steps)
        learner.tool_rollout = tools
        return learner
