"""Supervised fine-tuning (`kind: sft`): the token-mean negative log-likelihood of the trained tokens.

Rows in every TRL format (`jaxrlhf.data.sft`): `text`, `messages`, prompt-completion (strings or
messages), conversational preference rows (`chosen` as the completion). Each example is one
sequence with a per-token loss mask (`sft.completion_only`, `sft.assistant_only`); with
`sft.packing` several share a row, apart by segment ids (`collate_sft`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.data import DataError
from jaxrlhf.data.sft import PackedRow, SFTText, collate_sft, pack_sequences, render_sft_row, tokenize_sft
from jaxrlhf.train.algorithms.base import Algorithm, Context, Learner
from jaxrlhf.train.config import DataConfig, Section
from jaxrlhf.train.objectives import SFTObjective, sft_token_logps
from jaxrlhf.train.offline import Indexed, OfflineLearner
from jaxrlhf.train.pipeline import PreparedData, prepare_data


class SFTConfig(Section):
    """Supervised fine-tuning (kind: sft)."""

    completion_only: bool = True
    """Prompt-completion rows: train on the completion tokens only (TRL's `completion_only_loss`);
    false: every token."""
    assistant_only: bool = True
    """`messages` rows: train on every assistant turn (TRL's `assistant_only_loss`, which needs a
    template with generation markers; here any template that renders prefixes works); false: every
    token (TRL's default)."""
    packing: bool = False
    """Pack several examples into each row of `data.max_length` tokens (best-fit decreasing, TRL's
    "bfd"), kept apart by a block-diagonal attention mask and positions restarting per example:
    less padding, the same loss."""


def parse_sft_rows(
    rows: Any, tokenizer: Any, *, skip_invalid: bool, drop_degenerate: bool, source: str,
    completion_only: bool = True, assistant_only: bool = True,
) -> tuple[list[SFTText], dict[str, int]]:  # fmt: skip
    """SFT rows (every format of `jaxrlhf.data.sft`) -> rendered texts with their trained spans, and counts
    of skipped rows and of rows with an empty completion (dropped with `drop_degenerate`)."""
    out: list[SFTText] = []
    counts = {"skipped": 0, "empty_completion": 0, "dropped_degenerate": 0}
    for i in range(len(rows)):
        try:
            row = rows[i]
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            text = render_sft_row(row, tokenizer, completion_only=completion_only,
                                  assistant_only=assistant_only)  # fmt: skip
        except DataError as e:
            where = rows.locate(i) if hasattr(rows, "locate") else (source, i + 1, "row")
            if not skip_invalid:
                raise e.located(*where) from None
            counts["skipped"] += 1
            continue
        counts["empty_completion"] += text.empty_completion
        if text.empty_completion and drop_degenerate:
            counts["dropped_degenerate"] += 1
            continue
        out.append(text)
    return out, counts


def prepare_sft_data(
    data: DataConfig, tokenizer: Any, sft: SFTConfig | None = None, *, log: Callable[[str], None] = print
) -> PreparedData:
    """`prepare_data` with SFT's parser and tokenization: `SFTTokens` per split, counts in the report."""
    sft = sft or SFTConfig()
    parse = functools.partial(
        parse_sft_rows, completion_only=sft.completion_only, assistant_only=sft.assistant_only
    )
    tokenize = functools.partial(
        tokenize_sft, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
        truncation_mode=data.truncation_mode, add_bos=data.add_bos, append_eos=data.append_eos,
    )  # fmt: skip
    return prepare_data(data, tokenizer, parse=parse, tokenize=tokenize, log=log)


def sequence_length(item: Indexed) -> int:
    return item.pair.length


class SFTLearner(OfflineLearner):
    def __init__(self, ctx: Context, train: list[Indexed], eval_: list[Indexed], report: dict[str, int]):
        self.objective = SFTObjective()
        super().__init__(ctx, ctx.load_policy(), self.objective, train, self._collate, sequence_length,
                         eval_examples=eval_, report=report)  # fmt: skip

    def _collate(self, items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        return collate_sft([it.pair for it in items], pad_id=self.ctx.pad_id, batch_size=batch_size,
                           buckets=self.ctx.cfg.data.buckets, min_length=min_length)  # fmt: skip

    def held_out(self, stage: str) -> dict[str, float] | None:
        """Token NLL and perplexity of the held-out examples' trained tokens."""
        if not self.eval_examples:
            return None

        def nll(model: Any, batch: Any) -> dict[str, jax.Array]:  # per row: NLL sum and token count
            logps, weight = sft_token_logps(model, batch)
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
        c, d = ctx.cfg.sft, ctx.cfg.data
        data = prepare_sft_data(d, ctx.tokenizer, c, log=ctx.say)
        train = [PackedRow((seq,)) for seq in data.train]
        if c.packing:
            bins = pack_sequences([seq.length for seq in data.train], d.max_length)
            train = [PackedRow(tuple(data.train[i] for i in b)) for b in bins]
            tokens = sum(seq.length for seq in data.train)
            data.report["train/packed_rows"] = len(train)
            ctx.say(f"data: packed {len(data.train)} sequences into {len(train)} rows of <= {d.max_length} "
                    f"tokens ({tokens / (len(train) * d.max_length):.0%} full)")  # fmt: skip
        eval_ = [Indexed(i, PackedRow((seq,))) for i, seq in enumerate(data.eval)]
        return SFTLearner(ctx, [Indexed(i, row) for i, row in enumerate(train)], eval_, data.report)
