"""KTO (`kind: kto`; Ethayarajh et al. 2024, arXiv:2402.01306): alignment from unpaired binary
feedback, with TRL's KTOTrainer loss, config and metric names (`losses.kto_loss`).

Rows are TRL's unpaired preference format `{prompt, completion, label}` (text or conversations;
`label` true for a desirable completion); paired preference rows `{prompt, chosen, rejected}` are
unpaired as TRL's `unpair_preference_dataset` does (within each run of 1,000 pairs: the chosen
rows, then the rejected ones).

The KL reference point z0 is estimated, as in TRL, from mismatched pairs: example i's prompt with
example i-1's completion (the first with the last), fixed once in data order. Each example is
packed as `[prompt][completion][mismatched completion]` -- the prompt computed once, the layout DPO
uses for its pair -- so one forward gives both log-probs. z0 is the clamped mean over the
micro-batch (TRL: over the device batch, gathered); the loss is the mean over the step's rows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from jaxrlhf.data import DataError, PreferenceExample
from jaxrlhf.data.preference import parse_row
from jaxrlhf.losses import KTO_LOSS_TYPES, kto_loss
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.algorithms.dpo import with_reference
from jaxrlhf.train.config import Section
from jaxrlhf.train.objectives import Batch, pair_logps
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

UNPAIR_CHUNK = 1000  # TRL unpairs with `datasets.map(batched=True)`: runs of 1,000 pairs


class KTOConfig(Section):
    """KTO (kind: kto) on unpaired `{prompt, completion, label}` rows (or unpaired preference pairs).
    Names follow TRL's `KTOConfig`."""

    beta: float = Field(0.1, gt=0)
    """Temperature of the implied reward `log pi - log pi_ref`."""
    loss_type: Literal[KTO_LOSS_TYPES] = "kto"  # type: ignore[valid-type]
    """`kto` (the paper's loss) or `apo_zero_unpaired` (no KL reference point)."""
    desirable_weight: float = Field(1.0, ge=0)
    """Weight of the desirable examples' losses (TRL advises weight x count between 1:1 and 4:3 against
    the undesirable ones)."""
    undesirable_weight: float = Field(1.0, ge=0)
    """Weight of the undesirable examples' losses."""
    precompute_ref_log_probs: bool = False
    """Reference log-probs computed once over the data before training (cached on disk) instead of by a
    frozen copy in each step."""


def parse_kto_rows(
    rows: Any, tokenizer: Any, *, skip_invalid: bool, drop_degenerate: bool, source: str
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """KTO rows -> examples `(prompt, completion, completion, margin=label)`; the mismatched KL
    completion replaces the second completion in `kto_examples`. Paired rows are unpaired."""
    out: list[PreferenceExample] = []
    counts = {"skipped": 0, "empty_completion": 0, "dropped_degenerate": 0, "unpaired_pairs": 0}
    pending: list[tuple[PreferenceExample, PreferenceExample]] = []  # a run of pairs to unpair

    def flush() -> None:
        out.extend(c for c, _ in pending)
        out.extend(r for _, r in pending)
        pending.clear()

    for i in range(len(rows)):
        row = rows[i]
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected a row of named fields, got {type(row).__name__}")
            # (a file's rows share its columns: a row lacking one holds None there)
            if row.get("label") is not None or row.get("completion") is not None:
                flush()
                out.append(_unpaired(row, tokenizer))
                empty = not str(out[-1].chosen).strip()
            elif row.get("chosen") is not None and row.get("rejected") is not None:
                pair = parse_row(row, tokenizer)
                good = PreferenceExample(pair.prompt, pair.chosen, pair.chosen, 1.0)
                bad = PreferenceExample(pair.prompt, pair.rejected, pair.rejected, 0.0)
                pending.append((good, bad))
                counts["unpaired_pairs"] += 1
                empty = not str(pair.chosen).strip() or not str(pair.rejected).strip()
                if len(pending) == UNPAIR_CHUNK:
                    flush()
            else:
                raise DataError("expected `completion` and `label` (unpaired) or `chosen` and `rejected`",
                                field="completion")  # fmt: skip
        except DataError as e:
            if not skip_invalid:
                raise e.located(*rows.locate(i)) from None
            counts["skipped"] += 1
            continue
        counts["empty_completion"] += empty
    flush()
    if drop_degenerate:
        kept = [e for e in out if str(e.chosen).strip()]
        counts["dropped_degenerate"] = len(out) - len(kept)
        out = kept
    return out, counts


def _unpaired(row: dict[str, Any], tokenizer: Any) -> PreferenceExample:
    label = row.get("label")
    if isinstance(label, (bool, np.bool_)) or label in (0, 1):
        desirable = bool(label)
    else:
        got = "missing" if label is None else repr(label)
        raise DataError(f"expected true (desirable) or false (undesirable), got {got}", field="label")
    for name in ("prompt", "completion"):
        if row.get(name) is None:
            raise DataError(f"missing column {name!r}", field=name)
    try:  # as a pair whose both completions are this one: the same checks and chat template
        completion = row["completion"]
        pair = {k: v for k, v in row.items() if k not in ("completion", "label", "margin")}
        ex = parse_row({**pair, "chosen": completion, "rejected": completion}, tokenizer)  # tools etc. kept
    except DataError as e:
        field = "completion" if e.field in ("chosen", "rejected") else e.field
        raise DataError(e.reason.replace("chosen", "completion"), field=field) from None
    return PreferenceExample(ex.prompt, ex.chosen, ex.chosen, 1.0 if desirable else 0.0)


def kto_examples(examples: list[PreferenceExample]) -> list[PreferenceExample]:
    """Each example's second completion = the previous example's completion (the first takes the
    last's): TRL's mismatched pairs for the KL estimate. `margin` carries the label."""
    n = len(examples)
    return [PreferenceExample(e.prompt, e.chosen, examples[(i - 1) % n].chosen, e.margin)
            for i, e in enumerate(examples)]  # fmt: skip


class KTOObjective:
    """`losses.kto_loss` on packed `[prompt][completion][KL completion]` rows: returns the weighted
    loss sum and the row count, so gradient accumulation gives the mean over the step's rows."""

    def __init__(self, k: KTOConfig):
        self.k = k

    def __call__(self, model: Any, batch: Batch, ref_model: Any) -> tuple[jax.Array, jax.Array, dict]:
        got = pair_logps(model, batch)
        if "ref_chosen" in batch:
            ref = {"chosen": batch["ref_chosen"], "rejected": batch["ref_rejected"]}
        else:
            ref = jax.lax.stop_gradient(pair_logps(ref_model, batch))
        return self.loss(got, ref, batch["label"])

    def loss(self, got: dict, ref: dict, labels: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        k = self.k
        mask = got["chosen_len"] > 0  # padding rows have no completion
        total, metrics = kto_loss(
            got["chosen"], ref["chosen"], labels, got["rejected"], ref["rejected"], beta=k.beta,
            desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
            loss_type=k.loss_type, mask_B=mask, reduction="sum",
        )  # fmt: skip
        return total, jnp.sum(mask).astype(jnp.float32), metrics


def kto_collate(collate: Collate) -> Collate:
    """`collate` plus each row's label (`label`: 1 desirable, 0 undesirable or padding)."""

    def collate_labels(items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        batch = collate(items, batch_size=batch_size, min_length=min_length)
        labels = np.zeros((batch_size,), np.float32)
        labels[: len(items)] = [it.pair.margin for it in items]
        return {**batch, "label": labels}

    return collate_labels


class KTOLearner(OfflineLearner):
    def __init__(self, ctx: Context, train: list[Indexed], eval_: list[Indexed], report: dict[str, int]):
        k: KTOConfig = ctx.cfg.kto
        self.objective = KTOObjective(k)
        super().__init__(ctx, ctx.load_policy(), self.objective, train, kto_collate(pair_collate(ctx)),
                         packed_length, eval_examples=eval_, report=report,
                         same_step_reference=not k.precompute_ref_log_probs)  # fmt: skip
        if k.precompute_ref_log_probs:
            ref = cached_reference_logps(ctx, self.graphdef, self.params(), train, extra_key="kto")
            self.batches.collate = with_reference(self.collate, ref)
        self.eval_ref = pair_logps_of(ctx, self.graphdef, self.params(), eval_) if eval_ else None
        self.eval_labels = np.asarray([e.pair.margin for e in eval_], np.float32)

    def held_out(self, stage: str) -> dict[str, float] | None:
        """The KTO loss over the whole held-out set (z0 from all its mismatched pairs), the mean
        implied rewards and log-probs per class, and the accuracy of the implied reward's sign."""
        if self.eval_ref is None:
            return None
        got = self.eval_ref if stage == "before" else pair_logps_of(
            self.ctx, self.graphdef, self.params(), self.eval_examples)  # fmt: skip
        as_jax = {k: jnp.asarray(v) for k, v in got.items()}
        ref = {k: jnp.asarray(v) for k, v in self.eval_ref.items()}
        total, count, metrics = self.objective.loss(as_jax, ref, jnp.asarray(self.eval_labels))
        rewards = got["chosen"] - self.eval_ref["chosen"]
        desirable = self.eval_labels > 0
        out = {"loss": float(total / count), **{k: float(v) for k, v in metrics.items()}}
        out["rewards/accuracy"] = float(np.mean((rewards > 0) == desirable))
        return out


class KTO(Algorithm):
    name: ClassVar[str] = "kto"
    help: ClassVar[str] = "KTO on unpaired {prompt, completion, label} rows (TRL's KTOTrainer)"
    section: ClassVar[str | None] = "kto"
    config_class = KTOConfig

    def plan_steps(self) -> tuple[str, ...]:  # DPO's packed rows and shapes, with a reference
        return ("dpo",) if self.cfg.kto.precompute_ref_log_probs else ("dpo_same_step",)

    def build(self, ctx: Context) -> Learner:
        data = prepare_data(ctx.cfg.data, ctx.tokenizer, parse=parse_kto_rows, log=ctx.say,
                            pair_up=kto_examples)  # fmt: skip
        train, eval_ = ([Indexed(i, p) for i, p in enumerate(split)] for split in (data.train, data.eval))
        for name, split in (("train", train), ("eval", eval_)):
            labels = [it.pair.margin for it in split]
            data.report[f"{name}/desirable"] = int(sum(labels))
            data.report[f"{name}/undesirable"] = len(labels) - int(sum(labels))
        return KTOLearner(ctx, train, eval_, data.report)
