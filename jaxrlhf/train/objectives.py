"""What each trainer minimises, as pure functions of `(model, micro_batch)`.

Every objective returns `(numerator, denominator, metrics)`: the compiled step sums numerators and
their gradients over the micro-batches of a step and divides by the summed denominator, so gradient
accumulation gives the same update as one big batch (token-weighted for SFT; per micro-batch means
for the pairwise losses, as TRL does).

DPO and reward models read the packed layout of `jaxrlhf.data.collate_pairs`: one row per pair,
`[prompt][chosen][rejected]`, the prompt computed once, each completion attending to the prompt and
itself. `add_targets` adds the compact list of completion positions so the LM head runs only there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.data.collate import CHOSEN, REJECTED, bucket_length
from jaxrlhf.losses import dpo_loss, orpo_loss, reward_loss, simpo_loss
from jaxrlhf.models.decoder import CausalLM

Array = jax.Array
Batch = dict[str, Any]
Objective = Callable[[CausalLM, Batch, Any], tuple[Array, Array, dict[str, Array]]]


def add_targets(batch: dict[str, np.ndarray], buckets: Any = None) -> dict[str, np.ndarray]:
    """Add `target_index [B, Lc]` (positions of chosen then rejected tokens), `target_chosen` and
    `target_rejected` masks; `Lc` is the bucket of the longest completion total (min 16)."""
    seg = batch["segment_ids"]
    is_target = (seg == CHOSEN) | (seg == REJECTED)
    counts = is_target.sum(axis=1)
    lc = bucket_length(max(int(counts.max(initial=0)), 16), buckets)
    b = seg.shape[0]
    index = np.zeros((b, lc), np.int32)
    chosen = np.zeros((b, lc), np.float32)
    rejected = np.zeros((b, lc), np.float32)
    for i in range(b):
        where = np.nonzero(is_target[i])[0]
        index[i, : len(where)] = where
        chosen[i, : len(where)] = seg[i, where] == CHOSEN
        rejected[i, : len(where)] = seg[i, where] == REJECTED
    return {**batch, "target_index": index, "target_chosen": chosen, "target_rejected": rejected}


def packed_mask(segment_ids_BxL: Array) -> Array:
    """`[B, L, L]`: key is real and is prompt or in the query's own segment (causality is added by
    the model)."""
    key = segment_ids_BxL[:, None, :]
    return (key != 0) & ((key == 1) | (key == segment_ids_BxL[:, :, None]))


def packed_hidden(model: CausalLM, batch: Batch) -> Array:
    return model.hidden_states(batch["input_ids"], packed_mask(batch["segment_ids"]), batch["positions"])


def pair_logps(model: CausalLM, batch: Batch, *, chunk_size: int = 1024) -> dict[str, Array]:
    """Summed completion log-probs and lengths of chosen and rejected, `[B]` each."""
    hidden_BxLxD = packed_hidden(model, batch)
    target_BxC = batch["target_index"]
    source_BxC = jnp.take_along_axis(batch["prev_index"], target_BxC, axis=1)
    hidden_BxCxD = jnp.take_along_axis(hidden_BxLxD, source_BxC[..., None], axis=1)
    labels_BxC = jnp.take_along_axis(batch["input_ids"], target_BxC, axis=1)
    logps_BxC = model.token_logprobs(hidden_BxCxD, labels_BxC, chunk_size=chunk_size)
    chosen, rejected = batch["target_chosen"], batch["target_rejected"]
    return {
        "chosen": jnp.sum(logps_BxC * chosen, axis=1),
        "rejected": jnp.sum(logps_BxC * rejected, axis=1),
        "chosen_len": jnp.sum(chosen, axis=1),
        "rejected_len": jnp.sum(rejected, axis=1),
    }


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """DPO (and SimPO / ORPO) on packed pairs; the reference comes from `ref_model` (same step) or
    from `batch["ref_chosen"]` / `batch["ref_rejected"]` (precomputed)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    chunk_size: int = 1024

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and self.loss_type not in ("simpo", "orpo")

    def loss(self, logps: dict[str, Array], ref: dict[str, Array] | None) -> tuple[Array, dict[str, Array]]:
        pc, pr, lc, lr = logps["chosen"], logps["rejected"], logps["chosen_len"], logps["rejected_len"]
        if self.loss_type == "simpo":
            loss, metrics = simpo_loss(
                pc, pr, lc, lr, beta=self.beta, gamma=self.simpo_gamma, label_smoothing=self.label_smoothing
            )
        elif self.loss_type == "orpo":
            loss, metrics = orpo_loss(pc, pr, lc, lr, beta=self.beta)
        else:
            loss, metrics = dpo_loss(
                pc, pr, None if ref is None else ref["chosen"], None if ref is None else ref["rejected"],
                beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                reference_free=ref is None, chosen_lengths=lc, rejected_lengths=lr,
                discopop_tau=self.discopop_tau,
            )  # fmt: skip
        metrics = dict(metrics)
        if self.rpo_alpha is not None:  # RPO (arXiv:2404.19733): + alpha * token-mean NLL of chosen
            nll = -jnp.sum(pc) / jnp.maximum(jnp.sum(lc), 1.0)
            loss = loss + self.rpo_alpha * nll
            metrics["nll_loss"] = jax.lax.stop_gradient(nll)
        metrics.setdefault("logps/chosen", jnp.mean(jax.lax.stop_gradient(pc)))
        metrics.setdefault("logps/rejected", jnp.mean(jax.lax.stop_gradient(pr)))
        return loss, metrics

    def __call__(self, model: CausalLM, batch: Batch, ref_model: CausalLM | None):
        logps = pair_logps(model, batch, chunk_size=self.chunk_size)
        ref = None
        if self.needs_reference:
            if "ref_chosen" in batch:
                ref = {"chosen": batch["ref_chosen"], "rejected": batch["ref_rejected"]}
            else:
                ref = jax.lax.stop_gradient(pair_logps(ref_model, batch, chunk_size=self.chunk_size))
        loss, metrics = self.loss(logps, ref)
        return loss, jnp.float32(1.0), metrics


def pair_scores(model: CausalLM, batch: Batch) -> tuple[Array, Array]:
    """Reward-model scores of chosen and rejected `[B]`, pooled as `model.config.score_pooling`
    says: the score head at each completion's last token (`"last"`, a `*ForSequenceClassification`
    model), or its mean over the completion's tokens (`"mean"`)."""
    scores_BxL = model.apply_head(packed_hidden(model, batch))
    seg = batch["segment_ids"]
    if model.config.score_pooling == "mean":
        return segment_mean(scores_BxL, seg == CHOSEN), segment_mean(scores_BxL, seg == REJECTED)
    idx = jnp.arange(seg.shape[1])
    last_c = jnp.max(jnp.where(seg == CHOSEN, idx, 0), axis=1)
    last_r = jnp.max(jnp.where(seg == REJECTED, idx, 0), axis=1)
    take = lambda i: jnp.take_along_axis(scores_BxL, i[:, None], axis=1)[:, 0]  # noqa: E731
    return take(last_c), take(last_r)


def segment_mean(scores_BxL: Array, where_BxL: Array) -> Array:
    """`[B]`: the mean of `scores_BxL` over the positions `where_BxL` marks (0 where it marks none)."""
    w = where_BxL.astype(jnp.float32)
    return jnp.sum(scores_BxL.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


@dataclasses.dataclass(frozen=True)
class RewardObjective:
    """Bradley–Terry reward modelling on packed pairs (score head)."""

    center_rewards_coefficient: float | None = None
    use_margin: bool = False

    def __call__(self, model: CausalLM, batch: Batch, ref_model: CausalLM | None = None):
        chosen, rejected = pair_scores(model, batch)
        loss, metrics = reward_loss(
            chosen, rejected, margin=batch["margin"] if self.use_margin else None,
            center_rewards_coefficient=self.center_rewards_coefficient,
        )  # fmt: skip
        return loss, jnp.float32(1.0), metrics


def group_scores(model: CausalLM, batch: Batch) -> Array:
    """`[B, S]`: the reward-model score of every completion slot of `jaxrlhf.data.collate_groups`
    rows (segment `k + 2` is slot k), pooled as `pair_scores` pools; 0 in empty slots."""
    scores_BxL = model.apply_head(packed_hidden(model, batch)).astype(jnp.float32)
    seg_BxL = batch["segment_ids"]
    S = batch["completion_valid"].shape[1]
    in_slot_BxLxS = seg_BxL[:, :, None] == jnp.arange(2, S + 2)[None, None, :]
    if model.config.score_pooling == "mean":
        w_BxLxS = in_slot_BxLxS.astype(jnp.float32)
        return jnp.einsum("bl,bls->bs", scores_BxL, w_BxLxS) / jnp.maximum(jnp.sum(w_BxLxS, axis=1), 1.0)
    idx_1xLx1 = jnp.arange(seg_BxL.shape[1])[None, :, None]
    last_BxS = jnp.max(jnp.where(in_slot_BxLxS, idx_1xLx1, 0), axis=1)
    return jnp.take_along_axis(scores_BxL, last_BxS, axis=1) * batch["completion_valid"]


@dataclasses.dataclass(frozen=True)
class GroupedRewardObjective:
    """Bradley-Terry over every comparison of packed groups (`jaxrlhf.data.collate_groups`): each
    completion scored once; the loss is the mean over the step's comparisons (numerator: their
    summed loss, denominator: their number), so it equals `RewardObjective` on the same pairs."""

    center_rewards_coefficient: float | None = None
    use_margin: bool = False

    def __call__(self, model: CausalLM, batch: Batch, ref_model: CausalLM | None = None):
        scores_BxS = group_scores(model, batch)
        chosen_BxM = jnp.take_along_axis(scores_BxS, batch["winner"], axis=1)
        rejected_BxM = jnp.take_along_axis(scores_BxS, batch["loser"], axis=1)
        weight_BxM = batch["comparison_weight"]
        loss, metrics = reward_loss(
            chosen_BxM, rejected_BxM, margin=batch["margin"] if self.use_margin else None,
            center_rewards_coefficient=self.center_rewards_coefficient, weights=weight_BxM,
        )  # fmt: skip
        count = jnp.sum(weight_BxM)
        return loss * count, count, {**metrics, "comparisons": count}


def segment_attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """Bool `[B, L, L]`: a query sees the keys of its own segment (block-diagonal; 0 is padding and
    sees nothing); the model adds causality. One segment per row is the plain padding mask."""
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return same_BxLxL & (segment_ids_BxL[:, None, :] != 0)


def sft_token_logps(model: CausalLM, batch: Batch, chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """`(log p(token t | its segment before t), loss weight)`, both `[B, L-1]` for targets 1..L-1,
    of a `collate_sft` batch (one or several sequences per row)."""
    mask_BxLxL = segment_attention_mask(batch["segment_ids"])
    hidden_BxLxD = model.hidden_states(batch["input_ids"], mask_BxLxL, batch["positions"])
    logps_BxL1 = model.token_logprobs(hidden_BxLxD[:, :-1], batch["input_ids"][:, 1:], chunk_size=chunk_size)
    return logps_BxL1, batch["loss_mask"][:, 1:].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SFTObjective:
    """Token-mean negative log-likelihood of the trained tokens (`loss_mask`) of `collate_sft`
    batches: `sum(-log p * mask) / sum(mask)`, summed over micro-batches before dividing."""

    chunk_size: int = 1024

    def __call__(self, model: CausalLM, batch: Batch, ref_model: CausalLM | None = None):
        logps_BxL1, weight_BxL1 = sft_token_logps(model, batch, self.chunk_size)
        nll_sum = -jnp.sum(logps_BxL1 * weight_BxL1)
        tokens = jnp.sum(weight_BxL1)
        mean_nll = nll_sum / jnp.maximum(tokens, 1.0)
        return nll_sum, tokens, {"nll": jax.lax.stop_gradient(mean_nll)}
