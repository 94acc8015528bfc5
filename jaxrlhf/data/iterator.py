"""Deterministic, resumable, host-sharded batches.

Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(n)`` (or
``0..n-1`` without shuffling) and cuts it into global batches of ``global_batch_size``; the
last short one is dropped with ``drop_last``, else filled with dummy rows by the collate
function. Each order depends only on ``(seed, epoch)``, so the position in the stream is
just ``(epoch, index)`` of the next global batch: `BatchIterator.state` returns it as a
small dict for a checkpoint and `BatchIterator.restore` continues exactly there.

With ``num_shards`` hosts, host ``shard_index`` yields rows ``i`` of every global batch with
``i % num_shards == shard_index``, in order, padded to ``global_batch_size // num_shards``
rows. All hosts pad to the same length (the bucket of the global batch's longest row, via
``length_fn``) so their batches form one global array. The state counts global batches, so
it can be restored with a different number of hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

T = TypeVar("T")


class Collate(Protocol[T]):
    """Turns one host's rows into a batch of ``batch_size`` rows, at least ``min_length`` long.

    `collate_pairs` and `collate_sequences` fit once their ``pad_id`` is bound
    (``functools.partial``).
    """

    def __call__(self, rows: list[T], *, batch_size: int, min_length: int) -> Any: ...


class BatchIterator(Generic[T]):
    """This host's share of every global batch of ``examples``, collated, epoch after epoch."""

    def __init__(
        self,
        examples: Sequence[T],
        collate: Collate[T],
        *,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_epochs: int | None = None,
        length_fn: Callable[[T], int] | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
    ) -> None:
        if global_batch_size < 1 or global_batch_size % num_shards:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"num_shards ({num_shards})"
            )
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
        self.examples = examples
        self.collate = collate
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // num_shards
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.length_fn = length_fn
        self.shard_index = shard_index
        self.num_shards = num_shards
        n, G = len(examples), global_batch_size
        self.steps_per_epoch = n // G if drop_last else -(-n // G)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} examples make no batch of {G} (drop_last={drop_last})")
        self._epoch = 0
        self._index = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        indices = self.global_batch_indices(self._epoch, self._index).tolist()
        rows = [self.examples[i] for i in indices[self.shard_index :: self.num_shards]]
        min_length = max(self.length_fn(self.examples[i]) for i in indices) if self.length_fn else 0
        batch = self.collate(rows, batch_size=self.local_batch_size, min_length=min_length)
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def global_batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """Example indices of global batch ``index`` of epoch ``epoch`` (all hosts)."""
        G = self.global_batch_size
        return self.epoch_order(epoch)[index * G : (index + 1) * G]

    def state(self) -> dict[str, int]:
        """Position of the next global batch, plus what must match when restoring."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "global_batch_size": self.global_batch_size,
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state`, which must come from the same data, seed and batch size."""
        current = self.state()
        for key in ("seed", "num_examples", "global_batch_size"):
            if int(state[key]) != current[key]:
                raise ValueError(f"cannot restore: saved {key}={state[key]}, here {current[key]}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"cannot restore: no batch {index} in epoch {epoch}")
        self._epoch, self._index = epoch, index
