"""Supervised fine-tuning (`kind: sft`): the token-mean negative log-likelihood of completions.

Rows: `prompt` / `completion` strings, a `messages` conversation (the last assistant message is
the completion), or a conversational preference row (its `chosen` answer is the completion). Each
example is collated as one padded sequence; the loss covers the completion tokens
(`sft.completion_only`, TRL's `completion_only_loss`) or every real token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.data import DataError, PreferenceExample, check_roles, collate_sequences
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.config import Section
from jaxrlhf.train.objectives import SFTObjective
from jaxrlhf.train.offline import Indexed, OfflineLearner
from jaxrlhf.train.pipeline import prepare_data


class SFTConfig(Section):
    """Supervised fine-tuning (kind: sft)."""

    completion_only: bool = True
    """Train on completion tokens only (prompt tokens masked out of the loss)."""


def parse_sft_rows(
    rows: Any, tokenizer: Any, *, skip_invalid: bool, drop_degenerate: bool, source: str
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """SFT rows -> examples with the completion as `chosen` (and as the `rejected` placeholder that
    tokenization expects; dropped after it), and counts of skipped rows and of rows with an empty
    completion (dropped with `drop_degenerate`)."""
    out: list[PreferenceExample] = []
    counts = {"skipped": 0, "empty_completion": 0, "dropped_degenerate": 0}
    for i in range(len(rows)):
        row = rows[i]
        where = rows.locate(i) if hasattr(rows, "locate") else (source, i + 1, "row")
        try:
            if isinstance(row.get("prompt"), list) and isinstance(row.get("chosen"), list):
                row = {"messages": row["prompt"] + row["chosen"]}  # a conversational preference row
            if "messages" in row and row["messages"] is not None:
                prompt, completion, empty = _split_messages(row["messages"], tokenizer)
            else:
                for field in ("prompt", "completion"):
                    if field not in row:
                        raise DataError(f"missing column {field!r} (or give 'messages')", field=field)
                    if not isinstance(row[field], str):
                        raise DataError(f"expected a string, got {type(row[field]).__name__}", field=field)
                prompt, completion = row["prompt"], row["completion"]
                empty = not completion.strip()
        except DataError as e:
            e = e.located(*where) if hasattr(e, "located") else e
            if not skip_invalid:
                raise e from None
            counts["skipped"] += 1
            continue
        counts["empty_completion"] += empty
        if empty and drop_degenerate:
            counts["dropped_degenerate"] += 1
            continue
        out.append(PreferenceExample(prompt, completion, completion, None))
    return out, counts


def _split_messages(msgs: Any, tokenizer: Any) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether the completion is empty) of a conversation."""
    if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
        raise DataError("expected a list of messages ending with an assistant turn", field="messages")
    check_roles(msgs, tokenizer, "messages")
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template does not render the prompt as a prefix", field="messages")
    completion = full[len(prompt) :]
    if tokenizer.eos_token and completion.rstrip().endswith(tokenizer.eos_token):
        completion = completion.rstrip()
    return prompt, completion, not str(msgs[-1].get("content") or "").strip()


def sequence_length(item: Indexed) -> int:
    return len(item.pair.prompt_ids) + len(item.pair.chosen_ids)


class SFTLearner(OfflineLearner):
    def __init__(self, ctx: Context, train: list[Indexed], eval_: list[Indexed], report: dict[str, int]):
        self.objective = SFTObjective(completion_only=ctx.cfg.sft.completion_only)
        super().__init__(ctx, ctx.load_policy(), self.objective, train, self._collate, sequence_length,
                         eval_examples=eval_, report=report)  # fmt: skip

    def _collate(self, items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        seqs = [(it.pair.prompt_ids, it.pair.chosen_ids) for it in items]
        return collate_sequences(seqs, pad_id=self.ctx.pad_id, batch_size=batch_size,
                                 buckets=self.ctx.cfg.data.buckets, min_length=min_length)  # fmt: skip

    def held_out(self, stage: str) -> dict[str, float] | None:
        """Token NLL and perplexity of the held-out completions."""
        if not self.eval_examples:
            return None

        def nll(model: Any, batch: Any) -> dict[str, jax.Array]:  # per row: NLL sum and token count
            weight = batch["completion_mask"] if self.objective.completion_only else batch["attention_mask"]
            hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["positions"])
            logps = model.token_logprobs(hidden[:, :-1], batch["input_ids"][:, 1:])
            weight = weight[:, 1:].astype(logps.dtype)
            return {"nll": -jnp.sum(logps * weight, axis=1), "tokens": jnp.sum(weight, axis=1)}

        out = self.eval_pass(nll)
        mean = float(out["nll"].sum()) / max(float(out["tokens"].sum()), 1.0)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


class SFT(Algorithm):
    name: ClassVar[str] = "sft"
    help: ClassVar[str] = "supervised fine-tuning on prompt / completion rows or conversations"
    section: ClassVar[str | None] = "sft"
    config_class = SFTConfig

    def plan_steps(self) -> tuple[str, ...]:
        return ("sft",)

    def build(self, ctx: Context) -> Learner:
        data = prepare_data(ctx.cfg.data, ctx.tokenizer, parse=parse_sft_rows, log=ctx.say)
        empty = np.zeros((0,), np.int32)  # the placeholder completion tokenization needed
        train, eval_ = ([Indexed(i, dataclasses.replace(p, rejected_ids=empty)) for i, p in enumerate(split)]
                        for split in (data.train, data.eval))  # fmt: skip
        return SFTLearner(ctx, train, eval_, data.report)

