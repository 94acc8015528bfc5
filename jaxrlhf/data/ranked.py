"""Ranked rows: several completions of one prompt with a score each, read as all their pairs.

A **ranked** row has ``prompt``, ``completions`` (a list of at least two completions: strings, lists
of token ids, or lists of messages starting with an assistant message) and ``scores`` (one finite
number per completion, higher is better), e.g. the K samples of a prompt a labeller ranked
(InstructGPT, Ouyang et al. 2022, arXiv:2203.02155, section 3.5) or a judge scored::

    {"prompt": "I watched ...", "completions": ["a", "b", "c"], "scores": [0.6, -0.2, 0.1]}

It stands for every pair of its completions whose scores differ by more than ``min_score_gap``,
the higher one chosen (equal scores make no pair): ``("a", "b"), ("a", "c"), ("c", "b")`` above.
Each pair is then an ordinary preference row (the row's other fields, e.g. ``tools``, kept), so
DPO trains on all of them, and a reward model with ``reward.group_by_prompt`` scores each
completion once for all its pairs (`jaxrlhf.data.groups`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jaxrlhf.data.loading import DataError

RANKED_FIELDS = ("completions", "scores")


def is_ranked(row: Any) -> bool:
    """A row with ``completions`` and no ``chosen`` (`ranked_pairs` checks the rest). A file that
    mixes ranked rows and pairs loads (through `datasets`) with every column in every row, the
    absent ones None."""
    return isinstance(row, Mapping) and row.get("completions") is not None and row.get("chosen") is None


def ranked_pairs(row: Mapping[str, Any], min_score_gap: float = 0.0) -> list[dict[str, Any]]:
    """The preference rows a ranked row stands for, in the order of `itertools.combinations` of its
    completions; a bad row raises `DataError` naming the field."""
    if row.get("prompt") is None:
        raise DataError("missing: a ranked row needs its prompt (the completions share it)", field="prompt")
    completions, scores = row.get("completions"), row.get("scores")
    if not isinstance(completions, list) or len(completions) < 2:
        raise DataError(f"expected a list of at least two completions, got {_describe(completions)}",
                        field="completions")  # fmt: skip
    if scores is None:
        raise DataError("missing: a ranked row needs one score per completion", field="scores")
    if not isinstance(scores, list) or len(scores) != len(completions):
        raise DataError(f"expected a list of {len(completions)} numbers (one per completion), got "
                        f"{_describe(scores)}", field="scores")  # fmt: skip
    values = [_score(s, k) for k, s in enumerate(scores)]
    kinds = {_completion_kind(c, k) for k, c in enumerate(completions)}
    if len(kinds) > 1:
        raise DataError(f"completions mix {' and '.join(sorted(kinds))}", field="completions")
    rest = {k: v for k, v in row.items() if k not in RANKED_FIELDS}
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if abs(values[i] - values[j]) <= min_score_gap:
                continue
            hi, lo = (i, j) if values[i] > values[j] else (j, i)
            pairs.append({**rest, "chosen": completions[hi], "rejected": completions[lo]})
    return pairs


def _score(value: Any, k: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"score {k}: expected a finite number, got {value!r}", field="scores")
    return float(value)


def _completion_kind(value: Any, k: int) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return "messages"
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return "token ids"
    raise DataError(f"completion {k}: expected a string, a list of messages or a list of token ids, got "
                    f"{_describe(value)}", field="completions")  # fmt: skip


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__
