"""Verifiable reward functions for GRPO, with TRL's reward-function signature:

    f(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns)
        -> list[float | None]

One entry per completion. The dataset's other columns arrive as keyword lists aligned with the
completions (e.g. `family=[...]`, `answer=[...]`, one entry per completion, so a prompt sampled G
times has its columns repeated G times); functions take the columns they need and ignore the rest
(`**_`). `None` means "does not apply to this row" (TRL ignores it in the weighted sum of rewards).
A completion may also be a conversation (a list of `{"role", "content"}` messages, as TRL passes for
conversational data); its last message's content is judged.

A config names a function by import path, e.g. `jaxrlhf.rewards:accuracy_reward`. The shipped GRPO
demo data (`asset:grpo_demo/train.jsonl`) has `family` and `answer` columns for both functions.
`vader_sentiment` is the ground truth of the controlled-sentiment task (docs/sentiment.md): a lexicon
and rules, no weights, independent of every model of ours.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from jaxrlhf.evaluation.checkers import CHECKERS, check

__all__ = ["FORMAT_MAX_WORDS", "accuracy_reward", "format_reward", "vader_sentiment"]

FORMAT_MAX_WORDS = 12
# A numeral ("14", "-3", "1,000", "2.5") at the very end of the reply, optionally followed by "." or "!".
_ENDS_WITH_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?[.!]?$")


def _text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The reply text of a completion: the string, or the last message's content of a conversation."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1].get("content", "")) if completion else ""


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
    *, family: Sequence[str | None], answer: Sequence[Any], **_: Any,
) -> list[float | None]:  # fmt: skip
    """1.0 when `jaxrlhf.evaluation.checkers.check(family, reply, answer)` passes (for `arithmetic` and
    `word_problem`: the reply's last number equals the answer), else 0.0; None for a row whose family
    has no checker (or no family)."""
    return [
        (1.0 if check(f, _text(c), str(a)) else 0.0) if f in CHECKERS else None
        for c, f, a in zip(completions, family, answer, strict=True)
    ]


def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
    **_: Any,
) -> list[float]:  # fmt: skip
    """1.0 when the reply is short and ends with its answer, else 0.0: after stripping whitespace it
    has at most `FORMAT_MAX_WORDS` (12) whitespace-separated words and ends with a numeral, optionally
    followed by "." or "!" ("14", "16 - 2 = 14", "The sum is 30." pass; "The answer is fourteen.",
    "14 apples" and a truncated ramble do not). It does not look at correctness."""
    out = []
    for c in completions:
        reply = _text(c).strip()
        ok = len(reply.split()) <= FORMAT_MAX_WORDS and _ENDS_WITH_NUMBER.search(reply) is not None
        out.append(1.0 if ok else 0.0)
    return out


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
    **_: Any,
) -> list[float]:  # fmt: skip
    """VADER's compound sentiment of each completion, in [-1, 1] (Hutto & Gilbert 2014, ICWSM; the
    `vaderSentiment` package): lexicon valences with rules for negation, intensifiers, "but",
    capitals and punctuation, summed and squashed, `x / sqrt(x^2 + 15)`. The prompt is not read, so
    a policy gains only by what it writes. Also usable as `ppo.reward_fn` (it takes `(prompts,
    completions)` first)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(_text(c))["compound"]) for c in completions]
