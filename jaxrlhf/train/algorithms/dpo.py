"""Direct preference optimisation (`kind: dpo`; Rafailov et al. 2023, arXiv:2305.18290) and its
variants: every TRL `loss_type`, SimPO and ORPO (reference-free), RPO's NLL term.

Pairs are packed `[prompt][chosen][rejected]` rows (the prompt computed once) and the LM head runs
only on completion tokens (`objectives.pair_logps`). The reference log-probs come from a frozen
copy in the same step (`dpo.reference: same_step`; with LoRA: the base, adapters off) or are
computed once before training and cached on disk (`precompute`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax.numpy as jnp
import numpy as np
from pydantic import Field

from jaxrlhf.losses import dpo_loss
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.config import Section
from jaxrlhf.train.objectives import DPOObjective
from jaxrlhf.train.offline import (
    Collate,
    Indexed,
    OfflineLearner,
    cached_reference_logps,
    packed_length,
    pair_collate,
    pair_logps_of,
)
from jaxrlhf.train.pipeline import prepare_data

# The loss types of `jaxrlhf.losses.dpo_loss` (kept in sync by tests/train/test_config.py).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "aot", "aot_unpaired", "discopop", "sigmoid_norm",
)  # fmt: skip
# Everything `dpo.loss_type` accepts: the DPO family plus the reference-free SimPO and ORPO.
LOSS_TYPES: tuple[str, ...] = DPO_LOSS_TYPES + ("simpo", "orpo")


class DPOConfig(Section):
    """Preference optimisation (kind: dpo): DPO and its variants, SimPO, ORPO."""

    beta: float = Field(0.1, gt=0)
    """Inverse temperature of the implicit reward (DPO family, typ. 0.1; SimPO typ. 2.0) or the odds-ratio
    weight (ORPO)."""
    loss_type: Literal[LOSS_TYPES] = "sigmoid"
    """One of the 14 `dpo_loss` types, or `simpo` / `orpo` (reference-free)."""
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    """Assumed label-noise rate (cDPO / robust / SimPO); only some loss types use it."""
    reference_free: bool = False
    """Use an implicit uniform reference model (no reference log-probs)."""
    reference: Literal["same_step", "precompute"] = "same_step"
    """Reference log-probs computed with each batch ("same_step") or once over the data before training
    ("precompute")."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    rpo_alpha: float | None = Field(None, ge=0)
    """RPO (Pang et al. 2024, arXiv:2404.19733; TRL's name): add `rpo_alpha` x the token-mean negative
    log-likelihood of the chosen completions to the loss (the paper uses 1.0); None: off."""
    discopop_tau: float = Field(0.05, gt=0)
    """DiscoPOP temperature tau."""

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses reference-model log-probs."""
        return not self.reference_free and self.loss_type not in ("simpo", "orpo")


def dpo_eval_metrics(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None, d: Any
) -> dict[str, float]:
    """Held-out DPO metrics from per-pair log-probs (`d`: the `dpo` section): the DPO loss and
    implicit rewards against the reference, and how often the policy itself prefers chosen
    (meaningful before training too)."""
    metrics: dict[str, float] = {
        "logps/chosen": float(got["chosen"].mean()),
        "logps/rejected": float(got["rejected"].mean()),
        "preference_accuracy": float(np.mean(got["chosen"] > got["rejected"])),
        "preference_accuracy_per_token": float(
            np.mean(got["chosen"] / got["chosen_len"] > got["rejected"] / got["rejected_len"])
        ),
    }
    if ref is not None and d.loss_type not in ("simpo", "orpo"):
        loss, m = dpo_loss(
            jnp.asarray(got["chosen"]), jnp.asarray(got["rejected"]),
            jnp.asarray(ref["chosen"]), jnp.asarray(ref["rejected"]),
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            reference_free=d.reference_free, chosen_lengths=jnp.asarray(got["chosen_len"]),
            rejected_lengths=jnp.asarray(got["rejected_len"]), discopop_tau=d.discopop_tau,
        )  # fmt: skip
        metrics["loss"] = float(loss)
        metrics.update({k: float(v) for k, v in m.items() if k.startswith("rewards/")})
    return metrics


def with_reference(collate: Collate, ref: dict[str, np.ndarray]) -> Collate:
    """`collate` plus each row's precomputed reference log-probs (`ref_chosen`, `ref_rejected`)."""

    def collate_ref(items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        batch = collate(items, batch_size=batch_size, min_length=min_length)
        for key in ("chosen", "rejected"):
            values = np.zeros((batch_size,), np.float32)
            values[: len(items)] = ref[key][[it.index for it in items]]
            batch[f"ref_{key}"] = values
        return batch

    return collate_ref


class DPOLearner(OfflineLearner):
    def __init__(self, ctx: Context, train: list[Indexed], eval_: list[Indexed], report: dict[str, int]):
        d = ctx.cfg.dpo
        objective = DPOObjective(
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            reference_free=d.reference_free, simpo_gamma=d.simpo_gamma, discopop_tau=d.discopop_tau,
            rpo_alpha=d.rpo_alpha,
        )  # fmt: skip
        same_step = objective.needs_reference and d.reference == "same_step"
        precompute = objective.needs_reference and not same_step
        super().__init__(ctx, ctx.load_policy(), objective, train, pair_collate(ctx), packed_length,
                         eval_examples=eval_, report=report, same_step_reference=same_step)  # fmt: skip
        # log-probs of the initial policy = the reference
        if precompute:
            ref = cached_reference_logps(ctx, self.graphdef, self.params(), train)
            self.batches.collate = with_reference(self.collate, ref)
        self.eval_ref = None
        if objective.needs_reference and eval_:
            self.eval_ref = pair_logps_of(ctx, self.graphdef, self.params(), eval_)

    def held_out(self, stage: str) -> dict[str, float] | None:
        if not self.eval_examples:
            return None
        if stage == "before" and self.eval_ref is not None:  # the policy is still the reference
            return dpo_eval_metrics(self.eval_ref, self.eval_ref, self.ctx.cfg.dpo)
        got = pair_logps_of(self.ctx, self.graphdef, self.params(), self.eval_examples)
        return dpo_eval_metrics(got, self.eval_ref, self.ctx.cfg.dpo)


class DPO(Algorithm):
    name: ClassVar[str] = "dpo"
    help: ClassVar[str] = "direct preference optimisation (all TRL loss types, SimPO, ORPO, RPO)"
    section: ClassVar[str | None] = "dpo"
    config_class = DPOConfig

    def plan_steps(self) -> tuple[str, ...]:
        d = self.cfg.dpo
        return ("dpo_same_step",) if d.needs_reference and d.reference == "same_step" else ("dpo",)

    def build(self, ctx: Context) -> Learner:
        data = prepare_data(ctx.cfg.data, ctx.tokenizer, log=ctx.say)
        train, eval_ = ([Indexed(i, p) for i, p in enumerate(split)] for split in (data.train, data.eval))
        return DPOLearner(ctx, train, eval_, data.report)



