"""Reward modelling (`kind: reward`): a score head trained on preference pairs with the
Bradley-Terry loss (`losses.reward_loss`; TRL's RewardTrainer), optionally with the data's
`margin` and a centring penalty. Pairs are packed `[prompt][chosen][rejected]` rows, the prompt
computed once; the score is read at each completion's last token or averaged over it (`pooling`).
With `group_by_prompt` a prompt's pairs train together, each completion scored once
(`jaxrlhf.data.groups`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from jaxrlhf.data.groups import TokenizedGroup, collate_groups, group_pairs
from jaxrlhf.losses import reward_loss
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.config import Section
from jaxrlhf.train.objectives import GroupedRewardObjective, RewardObjective, pair_scores
from jaxrlhf.train.offline import (
    Indexed,
    OfflineLearner,
    eval_batch_size,
    eval_pass,
    packed_length,
    pair_collate,
)
from jaxrlhf.train.pipeline import prepare_data


class RewardConfig(Section):
    """Reward-model training (kind: reward): Bradley-Terry loss."""

    center_rewards_coefficient: float | None = Field(None, ge=0)
    """Weight of the mean-squared reward penalty that keeps rewards centred (e.g. 0.01); None: off."""
    use_margin: bool = True
    """Subtract the dataset's `margin` column (0 where absent) inside the loss."""
    group_by_prompt: bool = False
    """Train on each prompt's pairs together (InstructGPT's K-wise comparisons, arXiv:2203.02155): one
    packed row per prompt holds each distinct completion once, scored once for every pair it is in, and
    the loss is the mean over all comparisons (the same value as pair by pair). `train.batch_size` then
    counts prompts, and a row is as long as the prompt and all its completions. Suits ranked rows
    (`completions` + `scores`: all their pairs) and any data with several pairs per prompt. Evaluation
    stays pair by pair."""
    pooling: Literal["last", "mean"] = "last"
    """Where the score is read: `last`, the score head at the completion's last token (TRL's reward
    models, `*ForSequenceClassification`); `mean`, the head's mean over the completion's tokens (a
    token-level reward summed into one score; suits rewards that add up over the text). Stored in
    the exported checkpoint, so PPO, GRPO and RLOO read scores the same way."""


class RewardLearner(OfflineLearner):
    pairs_per_row = 1  # grouped rows: half the mean completions of a group

    def held_out(self, stage: str) -> dict[str, float] | None:
        """The Bradley-Terry loss, pairwise accuracy and mean scores on the held-out pairs."""
        if not self.eval_examples:
            return None

        def scores(model: Any, batch: Any) -> dict[str, jax.Array]:
            chosen, rejected = pair_scores(model, batch)
            return {"chosen": chosen, "rejected": rejected}

        # Pair by pair, whatever the training rows are; a group row holds about `pairs_per_row`
        # pair rows' tokens, so evaluation batches as many.
        out = eval_pass(self.ctx, self.graphdef, self.params(), scores, self.eval_examples,
                        pair_collate(self.ctx), packed_length,
                        eval_batch_size(self.ctx, self.pairs_per_row))  # fmt: skip
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
        eval_ = [Indexed(i, p) for i, p in enumerate(data.eval)]
        model = ctx.load_policy(head="score", init_score_head=True)
        model.config = model.config.replace(score_pooling=r.pooling)  # exported with the weights
        pairs_per_row = 1
        if r.group_by_prompt:
            groups = group_pairs(data.train)
            pairs_per_row = max(1, round(sum(len(g.completions) for g in groups) / len(groups) / 2))
            data.report["train/groups"] = len(groups)
            ctx.say(f"data: {len(data.train)} training pairs in {len(groups)} groups (one row per prompt), "
                    f"{sum(len(g.completions) for g in groups)} distinct completions")  # fmt: skip
            objective: Any = GroupedRewardObjective(r.center_rewards_coefficient, r.use_margin)
            train, collate = [Indexed(i, g) for i, g in enumerate(groups)], group_collate(ctx, groups)
        else:
            objective = RewardObjective(r.center_rewards_coefficient, r.use_margin)
            train, collate = [Indexed(i, p) for i, p in enumerate(data.train)], pair_collate(ctx)
        learner = RewardLearner(ctx, model, objective, train, collate, packed_length,
                                eval_examples=eval_, report=data.report)  # fmt: skip
        learner.pairs_per_row = pairs_per_row
        return learner


def group_collate(ctx: Context, groups: list[TokenizedGroup]) -> Any:
    """Packed group rows with the completion and comparison slots of the largest group (one shape
    per row length, on every host)."""
    slots = max(len(g.completions) for g in groups)
    comparisons = -(-max(len(g.comparisons) for g in groups) // 8) * 8
    buckets, longest = ctx.cfg.data.buckets, max(g.packed_length for g in groups)
    if buckets and longest > max(buckets):  # a group is as long as all its completions together
        buckets = [*buckets, -(-longest // 64) * 64]
        ctx.say(f"data: the longest group row has {longest} tokens, more than data.buckets allow: "
                f"bucket {buckets[-1]} added")  # fmt: skip

    def collate(items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, Any]:
        return collate_groups([it.pair for it in items], pad_id=ctx.pad_id, batch_size=batch_size,
                              buckets=buckets, min_length=min_length, completions=slots,
                              comparisons=comparisons)  # fmt: skip

    return collate



