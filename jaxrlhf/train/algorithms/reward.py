"""Reward modelling (`kind: reward`): a score head trained on preference pairs with the
Bradley-Terry loss (`losses.reward_loss`; TRL's RewardTrainer), optionally with the data's
`margin` and a centring penalty. Pairs are packed `[prompt][chosen][rejected]` rows, the prompt
computed once; the score is read at each completion's last token.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from jaxrlhf.losses import reward_loss
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.config import Section
from jaxrlhf.train.objectives import RewardObjective, pair_scores
from jaxrlhf.train.offline import Indexed, OfflineLearner, packed_length, pair_collate
from jaxrlhf.train.pipeline import prepare_data


class RewardConfig(Section):
    """Reward-model training (kind: reward): Bradley-Terry loss."""

    center_rewards_coefficient: float | None = Field(None, ge=0)
    """Weight of the mean-squared reward penalty that keeps rewards centred (e.g. 0.01); None: off."""
    use_margin: bool = True
    """Subtract the dataset's `margin` column (0 where absent) inside the loss."""
    pooling: Literal["last", "mean"] = "last"
    """Where the score is read: `last`, the score head at the completion's last token (TRL's reward
    models, `*ForSequenceClassification`); `mean`, the head's mean over the completion's tokens (a
    token-level reward summed into one score; suits rewards that add up over the text). Stored in
    the exported checkpoint, so PPO, GRPO and RLOO read scores the same way."""


class RewardLearner(OfflineLearner):
    def held_out(self, stage: str) -> dict[str, float] | None:
        """The Bradley-Terry loss, pairwise accuracy and mean scores on the held-out pairs."""
        if not self.eval_examples:
            return None

        def scores(model: Any, batch: Any) -> dict[str, jax.Array]:
            chosen, rejected = pair_scores(model, batch)
            return {"chosen": chosen, "rejected": rejected}

        out = self.eval_pass(scores)
        loss, metrics = reward_loss(jnp.asarray(out["chosen"]), jnp.asarray(out["rejected"]))
        return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


class Reward(Algorithm):
    name: ClassVar[str] = "reward"
    help: ClassVar[str] = "a reward model (score head) on preference pairs, Bradley-Terry loss"
    section: ClassVar[str | None] = "reward"
    config_class = RewardConfig
    measures_tasks: ClassVar[bool] = False  # a score head does not answer

    def plan_steps(self) -> tuple[str, ...]:
        return ("reward",)

    def build(self, ctx: Context) -> Learner:
        r = ctx.cfg.reward
        data = prepare_data(ctx.cfg.data, ctx.tokenizer, log=ctx.say)
        train, eval_ = ([Indexed(i, p) for i, p in enumerate(split)] for split in (data.train, data.eval))
        model = ctx.load_policy(head="score", init_score_head=True)
        model.config = model.config.replace(score_pooling=r.pooling)  # exported with the weights
        objective = RewardObjective(r.center_rewards_coefficient, r.use_margin)
        return RewardLearner(ctx, model, objective, train, pair_collate(ctx), packed_length,
                             eval_examples=eval_, report=data.report)  # fmt: skip



