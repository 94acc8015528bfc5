"""A prompt's pairs as one group: each distinct completion scored once for all the pairs it is in.

InstructGPT's reward model (Ouyang et al. 2022, arXiv:2203.02155, section 3.5) trains on all
``K choose 2`` comparisons of a prompt's K ranked completions as one batch element: one forward pass
per completion instead of one per pair, and no completion seen again in a later step (which
overfits, the paper reports). `group_pairs` gathers the tokenized pairs that share a prompt into a
`TokenizedGroup`; `collate_groups` packs each group into one row, the prompt stored once::

    [prompt][completion 0][completion 1] ... [completion K-1][pad ...]

================  ===============  ==================================  =====
array [B, L]      prompt 0..P-1    completion k (n_k tokens)           pad
================  ===============  ==================================  =====
``input_ids``     prompt ids       its ids                             pad_id
``positions``     ``0..P-1``       ``P..P+n_k-1``                      0
``segment_ids``   1                ``k + 2``                           0
================  ===============  ==================================  =====

As in `collate_pairs` (whose layout is the K = 2 case), a completion attends to the prompt and to
itself. Per row, ``[B, S]`` ``completion_valid`` marks the S completion slots in use, and
``[B, M]`` ``winner`` / ``loser`` (slot indices), ``comparison_weight`` (1 for a real comparison)
and ``margin`` list the comparisons. ``S`` and ``M`` are fixed per run (the largest group) so the
step compiles once per row length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxrlhf.data.collate import PROMPT, Batch, bucket_length
from jaxrlhf.data.tokenize import TokenizedPair


@dataclass(frozen=True)
class TokenizedGroup:
    """A prompt's distinct completions and the comparisons among them.

    ``comparisons[m] = (winner, loser)`` index ``completions``; ``margins[m]`` is the pair's
    ``margin`` (0 where it has none)."""

    prompt_ids: np.ndarray
    completions: tuple[np.ndarray, ...]
    comparisons: np.ndarray  # [M, 2] int32
    margins: np.ndarray  # [M] float32

    @property
    def packed_length(self) -> int:
        """Tokens in the packed row: the prompt once, then every completion."""
        return len(self.prompt_ids) + sum(len(c) for c in self.completions)


def group_shape(examples: Sequence[Any]) -> tuple[int, int]:
    """``(completions, comparisons)`` of the largest group of parsed (untokenized) pairs -- what
    `group_pairs` would make of them, read before any tokenizer runs (`jaxrlhf plan`). Examples are
    anything with ``prompt``, ``chosen`` and ``rejected`` (`PreferenceExample`); equal values (text,
    token ids or messages) are one prompt or one completion."""
    key = lambda value: json.dumps(value, sort_keys=True, default=repr)  # noqa: E731
    completions: dict[str, set[str]] = {}
    comparisons: dict[str, int] = {}
    for ex in examples:
        prompt = key(ex.prompt)
        completions.setdefault(prompt, set()).update((key(ex.chosen), key(ex.rejected)))
        comparisons[prompt] = comparisons.get(prompt, 0) + 1
    if not completions:
        return 0, 0
    return max(len(c) for c in completions.values()), max(comparisons.values())


def group_pairs(pairs: Sequence[TokenizedPair]) -> list[TokenizedGroup]:
    """Pairs with the same prompt ids as one group each, in the order prompts first appear; within a
    group completions are kept once (equal ids are one completion) in the order they first appear,
    and every pair is one comparison, in pair order (a pair given twice counts twice)."""
    order: dict[bytes, int] = {}
    prompts: list[np.ndarray] = []
    completions: list[dict[bytes, int]] = []
    arrays: list[list[np.ndarray]] = []
    comparisons: list[list[tuple[int, int]]] = []
    margins: list[list[float]] = []
    for pair in pairs:
        key = pair.prompt_ids.tobytes()
        if key not in order:
            order[key] = len(prompts)
            prompts.append(pair.prompt_ids)
            completions.append({})
            arrays.append([])
            comparisons.append([])
            margins.append([])
        g = order[key]

        def slot(ids: np.ndarray, g: int = g) -> int:
            k = completions[g].setdefault(ids.tobytes(), len(arrays[g]))
            if k == len(arrays[g]):
                arrays[g].append(ids)
            return k

        comparisons[g].append((slot(pair.chosen_ids), slot(pair.rejected_ids)))
        margins[g].append(pair.margin or 0.0)
    return [
        TokenizedGroup(prompts[g], tuple(arrays[g]), np.asarray(comparisons[g], np.int32).reshape(-1, 2),
                       np.asarray(margins[g], np.float32))  # fmt: skip
        for g in range(len(prompts))
    ]


def collate_groups(
    groups: Sequence[TokenizedGroup],
    *,
    pad_id: int,
    batch_size: int | None = None,
    buckets: Sequence[int] | None = None,
    min_length: int = 0,
    completions: int | None = None,
    comparisons: int | None = None,
) -> Batch:
    """Packed rows of ``groups`` (see the module docstring). ``B = batch_size`` (default
    ``len(groups)``, extra rows are dummies with ``row_valid`` 0); ``L`` the bucket of the longest
    row (or of ``min_length``); ``S = completions`` and ``M = comparisons`` default to this batch's
    largest group."""
    B = len(groups) if batch_size is None else batch_size
    if len(groups) > B or B == 0:
        raise ValueError(f"{len(groups)} groups do not fit a batch of {B}")
    S = max((len(g.completions) for g in groups), default=1) if completions is None else completions
    M = max((len(g.comparisons) for g in groups), default=1) if comparisons is None else comparisons
    L = bucket_length(max([min_length, *(g.packed_length for g in groups)]), buckets)
    input_ids_BxL = np.full((B, L), pad_id, np.int32)
    positions_BxL = np.zeros((B, L), np.int32)
    segment_ids_BxL = np.zeros((B, L), np.int32)
    completion_valid_BxS = np.zeros((B, S), np.float32)
    winner_BxM = np.zeros((B, M), np.int32)
    loser_BxM = np.zeros((B, M), np.int32)
    weight_BxM = np.zeros((B, M), np.float32)
    margin_BxM = np.zeros((B, M), np.float32)
    row_valid_B = np.zeros((B,), np.float32)
    for b, group in enumerate(groups):
        K, C = len(group.completions), len(group.comparisons)
        if K > S or C > M:
            raise ValueError(f"group {b} has {K} completions and {C} comparisons, more than {S} and {M}")
        P = len(group.prompt_ids)
        input_ids_BxL[b, :P], positions_BxL[b, :P] = group.prompt_ids, np.arange(P)
        segment_ids_BxL[b, :P] = PROMPT
        start = P
        for k, ids in enumerate(group.completions):
            end = start + len(ids)
            input_ids_BxL[b, start:end] = ids
            positions_BxL[b, start:end] = np.arange(P, P + len(ids))
            segment_ids_BxL[b, start:end] = k + 2
            start = end
        completion_valid_BxS[b, :K] = 1.0
        winner_BxM[b, :C], loser_BxM[b, :C] = group.comparisons[:, 0], group.comparisons[:, 1]
        weight_BxM[b, :C] = 1.0
        margin_BxM[b, :C] = group.margins
        row_valid_B[b] = 1.0
    return {
        "input_ids": input_ids_BxL,
        "positions": positions_BxL,
        "segment_ids": segment_ids_BxL,
        "completion_valid": completion_valid_BxS,
        "winner": winner_BxM,
        "loser": loser_BxM,
        "comparison_weight": weight_BxM,
        "margin": margin_BxM,
        "row_valid": row_valid_B,
    }
