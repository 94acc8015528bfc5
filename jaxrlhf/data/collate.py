"""Collate tokenized examples into fixed-shape numpy batches.

**Packed pairs** (DPO): one row per pair, ``[prompt][chosen][rejected][pad...]``, the prompt
stored once. For a pair with ``P`` prompt, ``C`` chosen and ``R`` rejected tokens:

================  ==========================  ==================  ==================  =====
array [B, L]      prompt ``0..P-1``           chosen              rejected            pad
================  ==========================  ==================  ==================  =====
``input_ids``     prompt ids                  chosen ids          rejected ids        pad_id
``positions``     ``0..P-1``                  ``P..P+C-1``        ``P..P+R-1``        0
``segment_ids``   1                           2                   3                   0
``prev_index``    ``i-1`` (0 for token 0)     ``i-1``             ``i-1``, but the    0
                                                                  first is ``P-1``
``chosen_mask``   0                           1                   0                   0
``rejected_mask`` 0                           0                   1                   0
================  ==========================  ==================  ==================  =====

``prev_index[b, i]`` is the token whose output predicts token ``i``: the log-prob of token
``i`` is ``log_softmax(logits[b, prev_index[b, i]])[input_ids[b, i]]``, counted where
``chosen_mask`` / ``rejected_mask`` is 1 (all completion tokens, EOS included). Attention:
query ``i`` may see key ``j`` iff ``j <= i``, ``seg[j] != 0`` and ``seg[j]`` is 1 or
``seg[i]`` (`packed_attention_mask`), so each completion sees the prompt and itself; padding
queries see the prompt, and the queries of a dummy row see nothing (use a finite mask value
so their ignored outputs are not NaN).

**Sequences** (reward models, SFT): one right-padded row per ``(prompt_ids, completion_ids)``
with ``input_ids``, ``attention_mask``, ``positions``, ``completion_mask`` and ``last_index``
(the last real token, where a reward model reads its score).

**Prompts** (generation): `left_pad` right-aligns prompts so every row's generation starts at
the same slot.

**Shapes**: ``L = bucket_length(longest row)``, so only a few lengths occur; with
``batch_size`` a short batch is filled with dummy rows (all masks 0, ``row_valid`` 0).
Index arrays are int32, masks and weights float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.tokenize import TokenizedPair

PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids; 0 is padding

Batch = dict[str, np.ndarray]


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """The smallest bucket ``>= n``.

    Default buckets: powers of two and their 1.5x from 64 up to 512, then multiples of 256
    (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1280, ...): at most ~33% padding, a handful of
    compilations.
    """
    if buckets is None:
        for bucket in (64, 96, 128, 192, 256, 384, 512):
            if n <= bucket:
                return bucket
        return -(-n // 256) * 256
    for bucket in sorted(buckets):
        if bucket >= n:
            return bucket
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in `[batch_size, width]` int32 arrays: `(ids, mask)`, mask 1 on real tokens.

    `width` defaults to the longest row, `batch_size` to the number of rows; extra rows are all padding
    (mask 0). Left padding puts every prompt's last token in the last column, where generation starts.
    """
    width = max(map(len, rows), default=0) if width is None else width
    batch_size = len(rows) if batch_size is None else batch_size
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} prompts do not fit a batch of {batch_size}")
    ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"prompt {i} has {len(row)} tokens, more than the width {width}")
        if len(row):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    *,
    pad_id: int,
    batch_size: int | None = None,
    buckets: Sequence[int] | None = None,
    min_length: int = 0,
) -> Batch:
    """Packed DPO batch of ``pairs`` (see the module docstring), ``[B, L]`` arrays plus
    ``row_valid`` and ``margin`` (0 where none) of shape ``[B]``.

    ``B = batch_size`` (default ``len(pairs)``); ``L`` is the bucket of the longest row, or
    of ``min_length`` if that is longer (hosts of one global batch pass its longest row).
    """
    B = _batch_size(len(pairs), batch_size)
    L = bucket_length(max([min_length, *(pair.packed_length for pair in pairs)]), buckets)
    input_ids_BxL = np.full((B, L), pad_id, dtype=np.int32)
    positions_BxL = np.zeros((B, L), dtype=np.int32)
    segment_ids_BxL = np.zeros((B, L), dtype=np.int32)
    prev_index_BxL = np.zeros((B, L), dtype=np.int32)
    chosen_mask_BxL = np.zeros((B, L), dtype=np.float32)
    rejected_mask_BxL = np.zeros((B, L), dtype=np.float32)
    row_valid_B = np.zeros((B,), dtype=np.float32)
    margin_B = np.zeros((B,), dtype=np.float32)
    for b, pair in enumerate(pairs):
        P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        n = P + C + R
        input_ids_BxL[b, :n] = np.concatenate([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids])
        positions_BxL[b, :n] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
        segment_ids_BxL[b, :P] = PROMPT
        segment_ids_BxL[b, P : P + C] = CHOSEN
        segment_ids_BxL[b, P + C : n] = REJECTED
        prev_index_BxL[b, 1:n] = np.arange(n - 1)
        prev_index_BxL[b, P + C] = P - 1
        chosen_mask_BxL[b, P : P + C] = 1.0
        rejected_mask_BxL[b, P + C : n] = 1.0
        row_valid_B[b] = 1.0
        margin_B[b] = pair.margin or 0.0
    return {
        "input_ids": input_ids_BxL,
        "positions": positions_BxL,
        "segment_ids": segment_ids_BxL,
        "prev_index": prev_index_BxL,
        "chosen_mask": chosen_mask_BxL,
        "rejected_mask": rejected_mask_BxL,
        "row_valid": row_valid_B,
        "margin": margin_B,
    }


def packed_attention_mask(segment_ids_BxL: np.ndarray) -> np.ndarray:
    """Bool ``[B, L, L]``: query ``i`` sees key ``j`` iff ``j <= i`` and ``seg[j] != 0`` and
    (``seg[j] == 1`` or ``seg[j] == seg[i]``)."""
    L = segment_ids_BxL.shape[-1]
    query_BxLx1 = segment_ids_BxL[:, :, None]
    key_Bx1xL = segment_ids_BxL[:, None, :]
    causal_LxL = np.tril(np.ones((L, L), dtype=bool))
    same_or_prompt = (key_Bx1xL == PROMPT) | (key_Bx1xL == query_BxLx1)
    return causal_LxL[None] & (key_Bx1xL != 0) & same_or_prompt


def collate_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int | None = None,
    buckets: Sequence[int] | None = None,
    min_length: int = 0,
) -> Batch:
    """Right-padded batch of ``(prompt_ids, completion_ids)`` rows, as is (no BOS/EOS added).

    ``[B, L]``: ``input_ids``, ``attention_mask`` (int32 1 on real tokens), ``positions``
    (``0..n-1``, 0 on padding), ``completion_mask`` (float32 1 on completion tokens: the
    targets of a next-token loss, shifted by the caller); ``[B]``: ``last_index`` (int32,
    index of the last real token, 0 in dummy rows) and ``row_valid``.
    """
    B = _batch_size(len(sequences), batch_size)
    lengths = [len(prompt) + len(completion) for prompt, completion in sequences]
    L = bucket_length(max([min_length, *lengths]), buckets)
    input_ids_BxL = np.full((B, L), pad_id, dtype=np.int32)
    attention_mask_BxL = np.zeros((B, L), dtype=np.int32)
    positions_BxL = np.zeros((B, L), dtype=np.int32)
    completion_mask_BxL = np.zeros((B, L), dtype=np.float32)
    last_index_B = np.zeros((B,), dtype=np.int32)
    row_valid_B = np.zeros((B,), dtype=np.float32)
    for b, ((prompt, completion), n) in enumerate(zip(sequences, lengths, strict=True)):
        if n == 0:
            raise ValueError(f"sequence {b} has no tokens")
        input_ids_BxL[b, :n] = np.concatenate([prompt, completion])
        attention_mask_BxL[b, :n] = 1
        positions_BxL[b, :n] = np.arange(n)
        completion_mask_BxL[b, len(prompt) : n] = 1.0
        last_index_B[b] = n - 1
        row_valid_B[b] = 1.0
    return {
        "input_ids": input_ids_BxL,
        "attention_mask": attention_mask_BxL,
        "positions": positions_BxL,
        "completion_mask": completion_mask_BxL,
        "last_index": last_index_B,
        "row_valid": row_valid_B,
    }


def _batch_size(rows: int, batch_size: int | None) -> int:
    if batch_size is None:
        if rows == 0:
            raise ValueError("cannot collate an empty batch without a batch_size")
        return rows
    if rows > batch_size:
        raise ValueError(f"{rows} rows do not fit a batch of {batch_size}")
    return batch_size
