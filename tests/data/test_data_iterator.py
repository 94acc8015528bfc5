"""Batch iterator: deterministic shuffling, exact resume, host sharding, fixed shapes."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest

from jaxrlhf.data import BatchIterator, TokenizedPair, collate_pairs


def as_list(rows, *, batch_size, min_length):
    """A collate function that shows which examples a host got."""
    return list(rows)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_same_seed_same_order_and_every_epoch_is_a_permutation():
    a = BatchIterator(range(10), as_list, global_batch_size=5, seed=3, drop_last=True)
    b = BatchIterator(range(10), as_list, global_batch_size=5, seed=3, drop_last=True)
    batches = take(a, 6)  # 3 epochs
    assert batches == take(b, 6)
    for epoch in range(3):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == list(range(10))
    assert batches[:2] != batches[2:4]  # a new order each epoch
    other = BatchIterator(range(10), as_list, global_batch_size=5, seed=4, drop_last=True)
    assert take(other, 2) != batches[:2]
    expected = np.random.default_rng([3, 1]).permutation(10)[:5].tolist()
    assert batches[2] == expected


def test_no_shuffle_and_num_epochs():
    iterator = BatchIterator(range(5), as_list, global_batch_size=2, shuffle=False, num_epochs=2)
    assert list(iterator) == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])
def test_restore_continues_exactly(k):
    make = functools.partial(BatchIterator, range(7), as_list, global_batch_size=3, seed=11)
    original = make()
    take(original, k)
    saved = json.loads(json.dumps(original.state()))  # survives a JSON checkpoint
    expected = take(original, 5)
    resumed = make()
    resumed.restore(saved)
    assert take(resumed, 5) == expected


def test_state_is_small_and_epoch_rolls_over():
    iterator = BatchIterator(range(7), as_list, global_batch_size=3, seed=1)
    assert iterator.steps_per_epoch == 3
    take(iterator, 4)
    state = iterator.state()
    assert state == {
        "epoch": 1,
        "index": 1,
        "seed": 1,
        "num_examples": 7,
        "global_batch_size": 3,
    }


def test_restore_refuses_other_data_or_settings():
    iterator = BatchIterator(range(7), as_list, global_batch_size=3, seed=1)
    for key, value in [("seed", 2), ("num_examples", 8), ("global_batch_size", 4)]:
        with pytest.raises(ValueError, match=f"saved {key}"):
            iterator.restore(dict(iterator.state(), **{key: value}))
    with pytest.raises(ValueError, match="no batch 3"):
        iterator.restore(dict(iterator.state(), index=3))


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_together_make_the_global_batch(drop_last):
    examples = range(22)
    full = BatchIterator(examples, as_list, global_batch_size=8, seed=5, drop_last=drop_last)
    shards = [
        BatchIterator(
            examples,
            as_list,
            global_batch_size=8,
            seed=5,
            drop_last=drop_last,
            shard_index=s,
            num_shards=4,
        )
        for s in range(4)
    ]
    for _ in range(2 * full.steps_per_epoch):
        global_batch = next(full)
        local = [next(shard) for shard in shards]
        for s in range(4):
            assert local[s] == [x for i, x in enumerate(global_batch) if i % 4 == s]
        assert sorted(itertools.chain(*local)) == sorted(global_batch)


def test_shards_share_one_shape_and_pad_short_batches():
    lengths = [3, 40, 5, 90, 7]  # one long pair decides everyone's bucket
    pairs = [TokenizedPair([1] * (n - 2), [2], [3]) for n in lengths]
    collate = functools.partial(collate_pairs, pad_id=0)
    shards = [
        BatchIterator(
            pairs,
            collate,
            global_batch_size=4,
            shuffle=False,
            length_fn=lambda pair: pair.packed_length,
            shard_index=s,
            num_shards=2,
        )
        for s in range(2)
    ]
    first = [next(shard) for shard in shards]
    assert [b["input_ids"].shape for b in first] == [(2, 96), (2, 96)]  # 90 -> 96
    last = [next(shard) for shard in shards]  # the fifth pair alone, then dummy rows
    assert [b["input_ids"].shape for b in last] == [(2, 64), (2, 64)]
    assert last[0]["row_valid"].tolist() == [1, 0] and last[1]["row_valid"].tolist() == [0, 0]
    assert not last[1]["segment_ids"].any()


def test_bad_settings():
    with pytest.raises(ValueError, match="multiple of num_shards"):
        BatchIterator(range(8), as_list, global_batch_size=6, num_shards=4)
    with pytest.raises(ValueError, match="shard_index"):
        BatchIterator(range(8), as_list, global_batch_size=4, shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="make no batch"):
        BatchIterator(range(3), as_list, global_batch_size=4, drop_last=True)
