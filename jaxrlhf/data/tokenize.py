"""Tokenize preference examples into `TokenizedPair`s, with one documented truncation policy.

Token ids:

* prompt: ``tokenizer(prompt, add_special_tokens=False)``, then, if ``add_bos`` and the
  tokenizer has a BOS token, BOS is put in front unless the ids already start with it. No EOS.
* each completion: ``tokenizer(completion, add_special_tokens=False)`` + EOS, unless the ids
  already end with EOS (a chat-rendered completion does) or ``append_eos=False`` (completions that
  are continuations cut at a length, as sampled rollouts are).
* pre-tokenized examples (lists of ids) skip the tokenizer but get the same BOS/EOS rules.

A pair whose prompt has no tokens at all (no BOS, and text the tokenizer normalises away)
is dropped (``dropped_empty``): the packed layout needs a prompt token to predict each
completion's first token. Then lengths (``P`` prompt, ``C`` chosen, ``R`` rejected tokens),
in this order:

1. ``max_prompt_length``: a longer prompt is, by ``truncation_mode``,
   ``"keep_end"`` -- cut from the left to its last ``max_prompt_length`` tokens (a leading
   BOS or system text is lost with the rest), or ``"drop"`` -- the pair is dropped
   (counted in ``dropped_long_prompt``).
2. ``max_length`` bounds each sequence, ``P + C <= max_length`` and ``P + R <= max_length``:
   completions are cut from the right to ``max_length - P`` tokens (a cut completion loses
   its EOS). If the prompt leaves no room (``P >= max_length``) the pair is dropped
   (``dropped_no_room``).

A packed row (`collate_pairs`) then holds ``P + C + R <= 2 * max_length - P`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from jaxrlhf.data.preference import PreferenceExample, Text

TruncationMode = Literal["keep_end", "drop"]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair (int32 arrays); ``len(prompt_ids) >= 1``."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    margin: float | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int32))

    @property
    def packed_length(self) -> int:
        """Tokens in the packed row ``[prompt][chosen][rejected]``."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeStats:
    """Pairs seen, kept, dropped (by reason) and truncated by `tokenize_pairs`."""

    pairs: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0
    dropped_no_room: int = 0
    dropped_empty: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_long_prompt + self.dropped_no_room + self.dropped_empty


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: TruncationMode = "keep_end",
    add_bos: bool = True,
    append_eos: bool = True,
    chunk_size: int = 1024,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize and truncate ``examples`` as the module docstring says."""
    _check_limits(max_length, max_prompt_length, truncation_mode)
    eos = tokenizer.eos_token_id
    if eos is None and append_eos:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    bos = tokenizer.bos_token_id if add_bos else None
    stats = TokenizeStats()
    pairs = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start : start + chunk_size]
        n = len(chunk)
        ids = _token_ids(tokenizer, [e.prompt for e in chunk] + [e.chosen for e in chunk]
                         + [e.rejected for e in chunk])  # fmt: skip
        prompts, chosens, rejecteds = ids[:n], ids[n : 2 * n], ids[2 * n :]
        for example, prompt, chosen, rejected in zip(
            chunk, prompts, chosens, rejecteds, strict=True
        ):
            stats.pairs += 1
            if bos is not None and prompt[:1] != [bos]:
                prompt = [bos, *prompt]
            pair = _fit(
                prompt,
                _with_eos(chosen, eos) if append_eos else chosen,
                _with_eos(rejected, eos) if append_eos else rejected,
                max_length,
                max_prompt_length,
                truncation_mode,
                stats,
            )
            if pair is not None:
                prompt, chosen, rejected = pair
                pairs.append(TokenizedPair(prompt, chosen, rejected, example.margin))
                stats.kept += 1
    return pairs, stats


def _fit(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: TruncationMode,
    stats: TokenizeStats,
) -> tuple[list[int], list[int], list[int]] | None:
    """Apply the truncation policy to one pair; None (and a count) if it is dropped."""
    if not prompt:
        stats.dropped_empty += 1
        return None
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if truncation_mode == "drop":
            stats.dropped_long_prompt += 1
            return None
        prompt = prompt[-max_prompt_length:]
        stats.truncated_prompt += 1
    if max_length is not None:
        room = max_length - len(prompt)
        if room < 1:
            stats.dropped_no_room += 1
            return None
        if len(chosen) > room or len(rejected) > room:
            stats.truncated_completion += 1
            chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


def _check_limits(
    max_length: int | None, max_prompt_length: int | None, truncation_mode: str
) -> None:
    if truncation_mode not in ("keep_end", "drop"):
        raise ValueError(f"truncation_mode must be 'keep_end' or 'drop', got {truncation_mode!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if max_length is not None and max_prompt_length is not None:
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})"
            )


def _token_ids(tokenizer: Any, texts: list[Text]) -> list[list[int]]:
    """Token ids of each text (a fresh list each); lists of ids pass through. Each distinct string
    is tokenized once, all in one call: a ranked row's completions recur in many of its pairs."""
    distinct = list(dict.fromkeys(text for text in texts if isinstance(text, str)))
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []
    ids = dict(zip(distinct, encoded, strict=True))
    return [list(ids[text]) if isinstance(text, str) else list(text) for text in texts]


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids[-1:] == [eos] else [*ids, eos]
