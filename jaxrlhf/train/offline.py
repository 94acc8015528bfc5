"""What the offline methods share (SFT, reward models, DPO, KTO: learning from a fixed data set):
`OfflineLearner` -- the model split into a `TrainState` with a compiled step over the method's
objective and collate --, and the passes over a data set that evaluation and the reference
log-probs make (`eval_pass`, `pair_logps_of`, `cached_reference_logps`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxrlhf.data import BatchIterator, collate_pairs
from jaxrlhf.models.demo import cache_dir
from jaxrlhf.models.lora import trainable as lora_trainable
from jaxrlhf.train.algorithms.base import Context, Learner
from jaxrlhf.train.common import lora_spec, to_global
from jaxrlhf.train.objectives import add_targets, pair_logps
from jaxrlhf.train.pipeline import checkpoint_fingerprint, pairs_fingerprint
from jaxrlhf.train.step import all_params, create_state, make_eval_fn, make_train_step, state_shardings

Collate = Callable[..., dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Indexed:
    """A tokenized example with its index in the split (to join precomputed reference log-probs)."""

    index: int
    pair: Any  # a TokenizedPair (SFT: the completion as `chosen`, no `rejected`)


def packed_length(item: Indexed) -> int:
    return item.pair.packed_length


def eval_batch_size(ctx: Context, rows_per_example: int = 1) -> int:
    """The global batch of evaluation passes: a micro-batch's rows (times `rows_per_example`, the
    evaluation rows one training row holds), rounded up to the batch shards."""
    shards = ctx.mesh.shape.get("data", 1) * ctx.mesh.shape.get("fsdp", 1)
    t = ctx.cfg.train
    per_micro = max(t.batch_size // t.grad_accum_steps, 1) * rows_per_example
    return max(shards, -(-per_micro // shards) * shards)


def iterate_once(examples: list[Indexed], collate: Collate, batch_size: int, length: Any) -> BatchIterator:
    """One pass in order over `examples`, this host's share of each global batch, the last padded."""
    return BatchIterator(
        examples, collate, global_batch_size=batch_size, shuffle=False, drop_last=False, num_epochs=1,
        length_fn=length, shard_index=jax.process_index(), num_shards=jax.process_count(),
    )  # fmt: skip


def _gathered(values: jax.Array, idx: np.ndarray) -> np.ndarray:
    # Row r of the global batch comes from host r % n, local position r // n.
    n = jax.process_count()
    arr = np.asarray(values)
    per_host = arr.shape[0] // n
    return np.asarray([arr[(r % n) * per_host + r // n] for r in range(len(idx))])


def eval_pass(
    ctx: Context, graphdef: Any, params: Any, fn: Callable[..., dict[str, jax.Array]],
    examples: list[Indexed], collate: Collate, length: Any, batch_size: int | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """`fn(model, batch) -> {name: [B] per-row values}` over every example, in example order
    (padding rows left out; on several processes the rows are put back in order); `batch_size`
    rows at a time (default `eval_batch_size`)."""
    compiled = make_eval_fn(graphdef, fn, ctx.mesh)
    out: dict[str, np.ndarray] = {}
    batches = iterate_once(examples, collate, batch_size or eval_batch_size(ctx), length)
    for i, batch in enumerate(batches):
        idx = batches.global_batch_indices(0, i)
        result = compiled(params, to_global(batch, ctx.mesh, micro=None))
        for k, v in result.items():
            column = out.setdefault(k, np.zeros((len(examples),), np.float32))
            column[idx] = np.asarray(v)[: len(idx)] if jax.process_count() == 1 else _gathered(v, idx)
    return out


def pair_collate(ctx: Context) -> Collate:
    """Packed `[prompt][chosen][rejected]` rows with the compact list of completion positions."""
    buckets = ctx.cfg.data.buckets
    multi_host = jax.process_count() > 1

    def collate(items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        batch = collate_pairs([it.pair for it in items], pad_id=ctx.pad_id, batch_size=batch_size,
                              buckets=buckets, min_length=min_length)  # fmt: skip
        # On several hosts the completion bucket must agree: use the full row length.
        return add_targets(batch, [batch["input_ids"].shape[1]] if multi_host else buckets)

    return collate


def pair_logps_of(ctx: Context, graphdef: Any, params: Any, examples: list[Indexed]) -> dict[str, np.ndarray]:
    """Summed chosen / rejected log-probs (and lengths) of every example, in example order."""
    return eval_pass(ctx, graphdef, params, pair_logps, examples, pair_collate(ctx), packed_length)


def cached_reference_logps(
    ctx: Context, graphdef: Any, params: Any, examples: list[Indexed], extra_key: str = ""
) -> dict[str, np.ndarray]:
    """Reference log-probs of the training pairs, computed once and cached on disk, keyed by the
    model checkpoint, the tokenized data and the dtype."""
    key = "-".join([checkpoint_fingerprint(ctx.model_dir), pairs_fingerprint([e.pair for e in examples]),
                    ctx.cfg.model.dtype, *([extra_key] if extra_key else [])])  # fmt: skip
    ref_dir = os.path.join(cache_dir(), "ref_logps")
    file = os.path.join(ref_dir, f"{key}.npz")
    if os.path.exists(file):
        ctx.say(f"reference log-probs: cached {file}")
        with np.load(file) as f:
            return {k: f[k] for k in f.files}
    start = time.perf_counter()
    ref = pair_logps_of(ctx, graphdef, params, examples)
    if jax.process_index() == 0:
        os.makedirs(ref_dir, exist_ok=True)
        tmp = f"{file}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **ref)
        os.replace(tmp, file)
    ctx.say(f"reference log-probs: computed for {len(examples)} pairs in {time.perf_counter() - start:.1f}s")
    return ref


class OfflineLearner(Learner):
    """A model trained by `make_train_step` on the method's `objective` over shuffled batches of
    `examples` (`collate(items, batch_size=, min_length=)`, `length(item)` for bucketing).
    `same_step_reference`: keep a frozen copy of the initial parameters (with LoRA: the base) as
    the reference the objective receives."""

    def __init__(
        self, ctx: Context, model: Any, objective: Any, examples: list[Indexed], collate: Collate,
        length: Callable[[Indexed], int], *, eval_examples: list[Indexed] = (),  # type: ignore[assignment]
        report: dict[str, int] | None = None, same_step_reference: bool = False,
    ):  # fmt: skip
        cfg, t = ctx.cfg, ctx.cfg.train
        self.ctx, self.collate, self.length = ctx, collate, length
        self.eval_examples, self.report = list(eval_examples), report or {}
        config = model.config
        self.built_with = {"attention": config.effective_attention, "scan_layers": config.scan_layers}
        self.total_steps = ctx.total_steps(len(examples))
        self.optimizer, self.schedule = ctx.optimizer(self.total_steps)
        lora = lora_spec(cfg)
        trained = lora_trainable(model.head_type) if lora is not None else None
        self.graphdef, self._state = create_state(
            model, self.optimizer, ctx.mesh, seed=t.seed, with_reference=same_step_reference,
            reference_dtype=cfg.model.frozen_dtype, trainable=trained,
        )  # fmt: skip
        self.batches = BatchIterator(
            examples, collate, global_batch_size=t.batch_size, seed=cfg.data.seed, shuffle=True,
            drop_last=True, length_fn=length, shard_index=jax.process_index(), num_shards=jax.process_count(),
        )  # fmt: skip
        self.micro_batches = t.grad_accum_steps
        self._step = make_train_step(
            self.graphdef, objective, self.optimizer, self.schedule, state_shardings(self._state), ctx.mesh
        )
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params()))

    @property
    def state(self) -> Any:  # a LoRA checkpoint holds the adapters, not the base
        return self._state.replace(frozen=None)

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value.replace(frozen=self._state.frozen)

    def params(self) -> nnx.State:
        """All parameters (with LoRA: the frozen base merged with the adapters)."""
        return all_params(self._state)

    def step(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        self._state, metrics = self._step(self._state, batch)
        return {**metrics, "compilations": self._step.num_compilations()}

    def tokens(self, batch: dict[str, np.ndarray]) -> float:
        return float((batch["input_ids"] != self.ctx.pad_id).sum() * jax.process_count())

    def policy_model(self) -> Any:
        return nnx.merge(self.graphdef, self.params())

    def summary(self) -> dict[str, Any]:
        return {"data": self.report, "model": self.built_with}

    def eval_pass(self, fn: Callable[..., dict[str, jax.Array]], params: Any = None) -> dict[str, np.ndarray]:
        """`eval_pass` of `fn` over the held-out examples with this method's collate."""
        params = self.params() if params is None else params
        return eval_pass(self.ctx, self.graphdef, params, fn, self.eval_examples, self.collate, self.length)
