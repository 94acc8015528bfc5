"""Packed DPO layout, attention rule, unpacked sequences and bucketing, on literal examples."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrlhf.data import (
    TokenizedPair,
    bucket_length,
    collate_pairs,
    collate_sequences,
    left_pad,
    packed_attention_mask,
)

PAD = 99
# Pair A: P=3, C=2, R=1 (margin 0.5). Pair B: P=2, C=3, R=2.
PAIR_A = TokenizedPair([11, 12, 13], [21, 22], [31], margin=0.5)
PAIR_B = TokenizedPair([41, 42], [51, 52, 53], [61, 62])


@pytest.fixture
def batch():
    return collate_pairs([PAIR_A, PAIR_B], pad_id=PAD, batch_size=3, buckets=(4, 8, 16))


def test_packed_layout_is_exactly_as_written(batch):
    expected = {
        "input_ids": [
            [11, 12, 13, 21, 22, 31, PAD, PAD],
            [41, 42, 51, 52, 53, 61, 62, PAD],
            [PAD] * 8,
        ],
        "positions": [
            [0, 1, 2, 3, 4, 3, 0, 0],
            [0, 1, 2, 3, 4, 2, 3, 0],
            [0] * 8,
        ],
        "segment_ids": [
            [1, 1, 1, 2, 2, 3, 0, 0],
            [1, 1, 2, 2, 2, 3, 3, 0],
            [0] * 8,
        ],
        "prev_index": [
            [0, 0, 1, 2, 3, 2, 0, 0],
            [0, 0, 1, 2, 3, 1, 5, 0],
            [0] * 8,
        ],
        "chosen_mask": [
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0, 0],
            [0] * 8,
        ],
        "rejected_mask": [
            [0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0] * 8,
        ],
        "row_valid": [1, 1, 0],
        "margin": [0.5, 0, 0],
    }
    assert sorted(batch) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(batch[name], np.array(value), err_msg=name)
    for name in ("input_ids", "positions", "segment_ids", "prev_index"):
        assert batch[name].dtype == np.int32 and batch[name].shape == (3, 8)
    for name in ("chosen_mask", "rejected_mask", "row_valid", "margin"):
        assert batch[name].dtype == np.float32


def test_packed_attention_mask_is_exactly_as_written(batch):
    mask = packed_attention_mask(batch["segment_ids"])
    assert mask.dtype == bool and mask.shape == (3, 8, 8)
    expected_a = [  # segments 1 1 1 2 2 3 0 0
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # padding queries see the prompt (keys 0 are never seen)
        [1, 1, 1, 0, 0, 0, 0, 0],
    ]
    expected_b = [  # segments 1 1 2 2 2 3 3 0
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
    np.testing.assert_array_equal(mask[0], np.array(expected_a, dtype=bool))
    np.testing.assert_array_equal(mask[1], np.array(expected_b, dtype=bool))
    assert not mask[2].any()  # a dummy row has no keys at all


def _toy_logits(ids_L, positions_L, mask_LxL, seed=0, vocab=100, dim=8):
    """One attention layer with learned-style position embeddings, in numpy."""
    rng = np.random.default_rng(seed)
    tok_VxD, pos_LxD = rng.normal(size=(vocab, dim)), rng.normal(size=(32, dim))
    wq, wk, wv = (rng.normal(size=(dim, dim)) for _ in range(3))
    wo = rng.normal(size=(dim, vocab))
    h = tok_VxD[ids_L] + pos_LxD[positions_L]
    scores = (h @ wq) @ (h @ wk).T / np.sqrt(dim)
    scores = np.where(mask_LxL, scores, -1e9)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    logits = (h + weights @ (h @ wv)) @ wo
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log-softmax


def _sequence_logprob(prompt, completion):
    ids = np.array([*prompt, *completion])
    n = len(ids)
    logp = _toy_logits(ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    return sum(logp[i - 1, ids[i]] for i in range(len(prompt), n))


def test_packed_log_probs_equal_separate_sequences(batch):
    """Gathering through prev_index under the packed mask gives each sequence's own log-prob."""
    mask = packed_attention_mask(batch["segment_ids"])
    for b, pair in enumerate([PAIR_A, PAIR_B]):
        logp = _toy_logits(batch["input_ids"][b], batch["positions"][b], mask[b])
        token_logp = logp[batch["prev_index"][b], batch["input_ids"][b]]
        chosen = (token_logp * batch["chosen_mask"][b]).sum()
        rejected = (token_logp * batch["rejected_mask"][b]).sum()
        assert chosen == pytest.approx(_sequence_logprob(pair.prompt_ids, pair.chosen_ids))
        assert rejected == pytest.approx(_sequence_logprob(pair.prompt_ids, pair.rejected_ids))


def test_collate_sequences_is_exactly_as_written():
    batch = collate_sequences(
        [([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0, batch_size=3, buckets=(8,)
    )
    expected = {
        "input_ids": [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0], [0] * 8],
        "attention_mask": [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8],
        "positions": [[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0], [0] * 8],
        "completion_mask": [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0] * 8],
        "last_index": [4, 3, 0],
        "row_valid": [1, 1, 0],
    }
    assert sorted(batch) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(batch[name], np.array(value), err_msg=name)
    assert batch["input_ids"].dtype == batch["last_index"].dtype == np.int32
    assert batch["completion_mask"].dtype == np.float32


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, 64),
        (1, 64),
        (64, 64),
        (65, 96),
        (97, 128),
        (129, 192),
        (256, 256),
        (257, 384),
        (385, 512),
        (513, 768),
        (1024, 1024),
        (1025, 1280),
    ],
)
def test_default_buckets(n, expected):
    assert bucket_length(n) == expected


def test_custom_buckets():
    assert bucket_length(5, (16, 8, 32)) == 8
    assert bucket_length(9, (16, 8, 32)) == 16
    with pytest.raises(ValueError, match="largest bucket 32"):
        bucket_length(33, (16, 8, 32))


def test_shapes_come_from_buckets_and_min_length():
    short = collate_pairs([PAIR_A], pad_id=0, batch_size=4)
    assert short["input_ids"].shape == (4, 64)
    assert collate_pairs([PAIR_A], pad_id=0, batch_size=4, min_length=65)["input_ids"].shape == (
        4,
        96,
    )
    long_pair = TokenizedPair(np.ones(100), np.ones(50), np.ones(30))
    assert collate_pairs([long_pair, PAIR_A], pad_id=0)["input_ids"].shape == (2, 192)


def test_batch_size_errors():
    with pytest.raises(ValueError, match="do not fit"):
        collate_pairs([PAIR_A, PAIR_B], pad_id=0, batch_size=1)
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], pad_id=0)
    empty = collate_pairs([], pad_id=0, batch_size=2)
    assert not empty["row_valid"].any() and not empty["segment_ids"].any()


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0, width=4, batch_size=4)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == mask.dtype == np.int32
    ids, mask = left_pad([[1, 2], [3, 4, 5]], pad_id=9)  # width and batch from the rows
    np.testing.assert_array_equal(ids, [[9, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="width 2"):
        left_pad([[1, 2, 3]], pad_id=0, width=2)
    with pytest.raises(ValueError, match="batch of 1"):
        left_pad([[1], [2]], pad_id=0, batch_size=1)
