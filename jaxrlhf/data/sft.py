"""Supervised fine-tuning rows in TRL's formats -> token ids with a per-token loss mask; packing.

Row formats (TRL's names; docs/data.md has one-row examples):

=========================  ==========================================  =================================
format                     fields                                      tokens the loss counts
=========================  ==========================================  =================================
language modelling         ``text``                                    all
conversational LM          ``messages``                                every assistant turn
                                                                       (``assistant_only``) or all
prompt-completion          ``prompt``, ``completion`` (strings)        the completion
                                                                       (``completion_only``) or all
conversational p-c         ``prompt``, ``completion`` (messages)       the same
conversational preference  ``prompt``, ``chosen`` (messages)           ``chosen`` as the completion
=========================  ==========================================  =================================

A row is first rendered to one text with the character spans the loss covers (`SFTText`), then
tokenized once as a whole with offsets (`tokenize_sft`), as TRL tokenizes the full sequence: a token
is trained when its first character lies in a trained span. Conversations are rendered by the
tokenizer's chat template with the row's ``tools`` and ``chat_template_kwargs`` columns (TRL's);
ShareGPT rows (``conversations`` of ``from`` / ``value``) are read as ChatML (`to_chatml`), and
messages need only ``role``:

* every assistant turn of ``messages`` is the rendering of the conversation up to and including it
  minus the rendering up to it with a generation prompt; whitespace after its final EOS is not
  trained (the template's line break between turns; TRL's generation markers leave it out too);
* a conversational prompt's end is where its rendering (with a generation prompt, or continuing its
  last message when that is an assistant turn: TRL's prefill) and the whole row's rendering part:
  their common prefix, so templates that rewrite earlier turns (DeepSeek-R1 drops their reasoning)
  still split. Whitespace after the completion's final EOS is not trained (TRL's completion mask
  trains it; the model stops at EOS). With ``completion_only=False`` every token is trained.

Text rows and string prompt-completion rows get EOS appended (``append_eos``; trained where the end
of the text is) and BOS in front (``add_bos``, when the tokenizer has one), as `tokenize_pairs` does;
chat renderings carry their own. Then ``max_prompt_length`` cuts the prompt from the left
(``truncation_mode="keep_end"``) or drops the row (``"drop"``), and ``max_length`` cuts the sequence
from the right. A sequence's first token is never a target (nothing in it predicts it), so a packed
row's loss equals its examples' unpacked losses.

**Packing** (`pack_sequences`, TRL's best-fit decreasing): sequences placed into rows of at most
``capacity`` tokens, each row's examples kept apart by `collate_sft`'s segment ids (attention only
within a segment) and positions restarting at 0.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxrlhf.data.collate import Batch, _batch_size, bucket_length
from jaxrlhf.data.loading import DataError
from jaxrlhf.data.preference import render_messages, template_kwargs, to_chatml, trim_after_eos
from jaxrlhf.data.tokenize import TokenizeStats


@dataclass(frozen=True)
class SFTText:
    """A row rendered to `text`, the character spans `[start, end)` its loss counts, where its
    prompt ends (0: no prompt to truncate), and whether it is plain text that ends with EOS."""

    text: str
    trained: tuple[tuple[int, int], ...]
    prompt_end: int = 0
    plain: bool = False
    empty_completion: bool = False


@dataclass(frozen=True)
class SFTTokens:
    """Token ids and the int32 loss mask of one sequence (1 where the token is a target)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedRow:
    """Sequences that share one row of a batch (one sequence when not packing)."""

    sequences: tuple[SFTTokens, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.sequences)


def render_sft_row(
    row: Mapping[str, Any], tokenizer: Any, *, completion_only: bool = True, assistant_only: bool = True
) -> SFTText:
    """One SFT row (any format of the module docstring) as text with its trained spans; a bad row
    raises `DataError` naming the field."""
    row = to_chatml(row)
    if "text" in row and row["text"] is not None and "messages" not in row and "prompt" not in row:
        text = row["text"]
        if not isinstance(text, str):
            raise DataError(f"expected a string, got {type(text).__name__}", field="text")
        return SFTText(text, ((0, len(text)),), plain=True, empty_completion=not text.strip())
    template = _Template(tokenizer, row)
    if row.get("messages") is not None:
        return _conversation(row["messages"], template, assistant_only)
    prompt = row.get("prompt")
    completion_field = "completion" if row.get("completion") is not None else "chosen"
    completion = row.get(completion_field)
    if prompt is None or completion is None:
        raise DataError("expected 'text', 'messages', or 'prompt' with 'completion'", field="completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt + completion
        trained = ((len(prompt), len(text)),) if completion_only else ((0, len(text)),)
        return SFTText(text, trained, len(prompt), plain=True, empty_completion=not completion.strip())
    if isinstance(prompt, list) and isinstance(completion, list):
        return _prompt_completion(prompt, completion, template, completion_only, completion_field)
    raise DataError(
        f"'prompt' and '{completion_field}' must both be strings or both lists of messages, got "
        f"{type(prompt).__name__} and {type(completion).__name__}", field=completion_field,
    )  # fmt: skip


class _Template:
    """The tokenizer's chat template with a row's `tools` and `chat_template_kwargs`."""

    def __init__(self, tokenizer: Any, row: Mapping[str, Any]):
        self.tokenizer = tokenizer
        self.eos = getattr(tokenizer, "eos_token", None) or None
        self.kwargs = template_kwargs(row)

    def __call__(self, messages: Sequence[Any], field: str, *, generation: bool = False,
                 prefill: bool = False) -> str:  # fmt: skip
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m
                                                     for m in messages):  # fmt: skip
            raise DataError("expected a list of messages, each with a 'role'", field=field)
        generation_prompt = generation and not prefill
        return render_messages(self.tokenizer, messages, field, add_generation_prompt=generation_prompt,
                               continue_final_message=prefill, **self.kwargs)  # fmt: skip

    def end_of_turn(self, text: str, start: int, end: int) -> int:
        """`end`, moved back over whitespace the template writes after a turn's final EOS."""
        return start + len(trim_after_eos(text[start:end], self.eos))


def _conversation(messages: Any, template: _Template, assistant_only: bool) -> SFTText:
    full = template(messages, "messages")
    if not assistant_only:
        return SFTText(full, ((0, len(full)),))
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = template(messages[:k], "messages", generation=True) if k else ""
        upto = template(messages[: k + 1], "messages")
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"message {k}: the chat template does not render the conversation up to this assistant "
                "turn as a prefix of the whole (it rewrites earlier turns): give the row as prompt / "
                "completion messages instead", field="messages",
            )  # fmt: skip
        spans.append((len(before), template.end_of_turn(upto, len(before), len(upto))))
    if not spans:
        raise DataError("no assistant turn to train on", field="messages")
    empty = all(not str(m.get("content") or "").strip() and not m.get("tool_calls")
                for m in messages if m.get("role") == "assistant")  # fmt: skip
    return SFTText(full, tuple(spans), empty_completion=empty)


def _prompt_completion(prompt: list, completion: list, template: _Template, completion_only: bool,
                       field: str) -> SFTText:  # fmt: skip
    if not completion:
        raise DataError("no completion messages", field=field)
    prefill = bool(prompt) and prompt[-1].get("role") == "assistant"
    rendered_prompt = template(prompt, "prompt", generation=True, prefill=prefill)
    whole = prompt + completion
    if prefill and completion[0].get("role") == "assistant":  # the completion continues the prefill
        joined = str(prompt[-1].get("content") or "") + str(completion[0].get("content") or "")
        whole = [*prompt[:-1], {**completion[0], "content": joined}, *completion[1:]]
    full = template(whole, field)
    start = len(os.path.commonprefix([rendered_prompt, full]))
    if start == len(full):
        raise DataError("the completion renders to nothing", field=field)
    end = template.end_of_turn(full, start, len(full))
    trained = ((start, end),) if completion_only else ((0, len(full)),)
    empty = all(not str(m.get("content") or "").strip() and not m.get("tool_calls") for m in completion)
    return SFTText(full, trained, start, empty_completion=empty)


def tokenize_sft(
    texts: Sequence[SFTText], tokenizer: Any, *, max_length: int | None = None,
    max_prompt_length: int | None = None, truncation_mode: str = "keep_end", add_bos: bool = True,
    append_eos: bool = True, chunk_size: int = 1024,
) -> tuple[list[SFTTokens], TokenizeStats]:
    """Token ids and loss masks of rendered rows (module docstring), truncated; dropped rows counted
    (`TokenizeStats`, as `tokenize_pairs` counts them)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SFT needs a fast tokenizer (character offsets of tokens)")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id if add_bos else None
    stats, out = TokenizeStats(pairs=len(texts)), []
    for start in range(0, len(texts), chunk_size):
        chunk = texts[start : start + chunk_size]
        enc = tokenizer([t.text for t in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for item, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            starts = np.asarray([a for a, _ in offsets], np.int64)
            mask = np.zeros(len(ids), np.int32)
            for a, b in item.trained:
                mask |= ((starts >= a) & (starts < b)).astype(np.int32)
            in_prompt = int(np.sum(starts < item.prompt_end))
            ids = list(ids)
            if item.plain and append_eos and eos is not None and ids[-1:] != [eos]:
                ends_trained = any(b == len(item.text) for _, b in item.trained)
                ids, mask = [*ids, eos], np.append(mask, np.int32(ends_trained))
            if item.plain and bos is not None and ids[:1] != [bos]:
                ids, mask, in_prompt = [bos, *ids], np.insert(mask, 0, 0), in_prompt + 1
            tokens = _fit(np.asarray(ids, np.int32), mask, in_prompt, max_length, max_prompt_length,
                          truncation_mode, stats)  # fmt: skip
            if tokens is not None:
                out.append(tokens)
    stats.kept = len(out)
    return out, stats


def _fit(
    ids: np.ndarray, mask: np.ndarray, in_prompt: int, max_length: int | None, max_prompt_length: int | None,
    truncation_mode: str, stats: TokenizeStats,
) -> SFTTokens | None:
    if max_prompt_length is not None and in_prompt > max_prompt_length:
        if truncation_mode == "drop":
            stats.dropped_long_prompt += 1
            return None
        cut = in_prompt - max_prompt_length
        ids, mask = ids[cut:], mask[cut:]
        stats.truncated_prompt += 1
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
        stats.truncated_completion += 1
    mask = mask.copy()
    mask[:1] = 0  # nothing of this sequence predicts its first token
    if len(ids) < 2 or not mask.any():
        stats.dropped_no_room += 1
        return None
    return SFTTokens(ids, mask)


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `lengths` grouped into bins whose lengths sum to at most
    `capacity`, each sequence (longest first; ties by index) placed in the bin it fills most tightly,
    a new bin when none fits. Deterministic; bins in the order they were opened."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, more than {capacity}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def collate_sft(
    rows: Sequence[PackedRow], *, pad_id: int, batch_size: int | None = None,
    buckets: Sequence[int] | None = None, min_length: int = 0,
) -> Batch:
    """Right-padded `[B, L]` rows of one or more sequences each: ``input_ids``, ``positions``
    (restarting at 0 per sequence), ``segment_ids`` (1, 2, ... per sequence, 0 on padding: a query
    sees keys of its own segment only), ``loss_mask`` (float32, 1 where the token is a target), and
    ``row_valid`` `[B]`. ``L`` is the bucket of the longest row (or of ``min_length``)."""
    B = _batch_size(len(rows), batch_size)
    L = bucket_length(max([min_length, *(row.length for row in rows)]), buckets)
    input_ids_BxL = np.full((B, L), pad_id, np.int32)
    positions_BxL = np.zeros((B, L), np.int32)
    segment_ids_BxL = np.zeros((B, L), np.int32)
    loss_mask_BxL = np.zeros((B, L), np.float32)
    row_valid_B = np.zeros((B,), np.float32)
    for b, row in enumerate(rows):
        at = 0
        for s, seq in enumerate(row.sequences, 1):
            n = seq.length
            input_ids_BxL[b, at : at + n] = seq.input_ids
            positions_BxL[b, at : at + n] = np.arange(n)
            segment_ids_BxL[b, at : at + n] = s
            loss_mask_BxL[b, at : at + n] = seq.loss_mask
            at += n
        row_valid_B[b] = 1.0
    return {"input_ids": input_ids_BxL, "positions": positions_BxL, "segment_ids": segment_ids_BxL,
            "loss_mask": loss_mask_BxL, "row_valid": row_valid_B}  # fmt: skip
