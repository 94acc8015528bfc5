"""A KV cache carried across the turns of a multi-turn rollout: each turn appends the tokens the
cache has not seen (the prompt at first; later the previous turn's last token and the tool message
after it) by one prefill segment, then decodes the policy's next turn, all in one compiled call.

Layout: one cache per row, written left to right by every row at the same slot (`write`,
a traced scalar: no recompiles as it moves). A segment of width W is left-padded, so every row's last
new token lands in the segment's last slot, where decoding starts; padding slots, and the decode slots
of a row that has ended, stay invalid keys (`key_valid` 0), so a row's valid slots hold its sequence in
order, with its own positions (`key_pos`). Attention is causal by slot, which then equals causal by
position, and the log-probs equal those of one forward pass over the whole row.

A token sampled last in a turn (its EOS, or the token cut off by the turn's budget) is never written:
the next segment starts with it. Shapes: segments are padded to 8, 16, 32, 64 tokens, then to
the prompt buckets; the cache holds what the next segment and a whole turn need, rounded up to 64
slots, and grows (a copy into a larger one) when a turn needs more, up to C = the prompt's bucket +
the completion budget + two turns; early turns then do not attend over slots they cannot use yet.
When a segment and a full turn no longer fit in C, the cache is rebuilt from the rows' whole
contexts (one re-prefill; `TurnCache.rebuilds` counts them). The compiled call is reused for every
(batch, W, cache size, turn budget): a few compilations a run, none per turn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf.data import bucket_length, left_pad
from jaxrlhf.generation.sampling import Generation, record_step, sample_tokens
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.parallel import host_array

Array = jax.Array


@struct.dataclass
class CacheArrays:
    kv: Any  # the model's key/value cache, [B, C] slots
    key_valid: Array  # [B, C] 1 on slots that hold a token of the row's sequence
    key_pos: Array  # [B, C] that token's position


def _zeros(graphdef: nnx.GraphDef, state: nnx.State, batch: int, length: int) -> CacheArrays:
    model: CausalLM = nnx.merge(graphdef, state)  # the state only places the cache on the model's mesh
    zeros = jnp.zeros((batch, length), jnp.int32)
    return CacheArrays(model.init_cache(batch, length), zeros, zeros)


_empty = jax.jit(_zeros, static_argnames=("graphdef", "batch", "length"))


@functools.partial(jax.jit, static_argnames=("graphdef", "length"), donate_argnums=(2,))
def _grow(graphdef: nnx.GraphDef, state: nnx.State, cache: CacheArrays, *, length: int) -> CacheArrays:
    """The cache with `length` slots, the old ones first (the slot axis of any cache layout: each
    old array lands at the origin of a new zero one)."""
    new = _zeros(graphdef, state, cache.key_valid.shape[0], length)
    return jax.tree.map(lambda z, old: jax.lax.dynamic_update_slice(z, old, (0,) * old.ndim), new, cache)


_STATIC = ("graphdef", "max_new_tokens", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(2,))
def _extend(graphdef, state, cache: CacheArrays, seen_B, write, ids_BxW, mask_BxW, eos_ids, pad_id, rng, *,
            max_new_tokens, temperature, top_k, top_p):  # fmt: skip
    """Prefill the segment `[B, W]` at slots `write..write+W-1`, then decode up to `max_new_tokens`.
    `seen_B`: tokens of each row already in the cache (the segment's first position). Rows with an
    empty segment sample nothing."""
    model: CausalLM = nnx.merge(graphdef, state)
    b, w = ids_BxW.shape
    n = max_new_tokens
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    segment_pos = seen_B[:, None] + jnp.maximum(jnp.cumsum(mask_BxW, axis=1) - 1, 0)
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, mask_BxW, write, axis=1)
    key_pos = jax.lax.dynamic_update_slice_in_dim(cache.key_pos, segment_pos.astype(jnp.int32), write, axis=1)
    hidden, kv = model.cached_hidden_states(ids_BxW, segment_pos, cache.kv, write, key_valid, key_pos)
    next_pos_B = seen_B + jnp.sum(mask_BxW, axis=1)
    active = jnp.sum(mask_BxW, axis=1) > 0

    rng, key = jax.random.split(rng)
    token, logp, ent = sample(model.apply_head(hidden[:, -1:])[:, 0], key)
    token = jnp.where(active, token, pad_id)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(jnp.where(active, logp, 0.0))
    ents = jnp.zeros((b, n), jnp.float32).at[:, 0].set(jnp.where(active, ent, 0.0))
    done = jnp.isin(token, eos_ids) | ~active

    def cond(carry):
        i, *_, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tokens, logps, ents, kv, key_valid, key_pos, done, rng = carry
        # token i-1 is written at slot write + w + i - 1; it is a key of its row unless the row ended
        # with it or before (an EOS, or padding): the next segment then starts with that token
        slot = write + w + i - 1
        previous = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        positions = next_pos_B[:, None] + i - 1
        valid = (~done)[:, None].astype(jnp.int32)
        key_valid = jax.lax.dynamic_update_slice_in_dim(key_valid, valid, slot, 1)
        key_pos = jax.lax.dynamic_update_slice_in_dim(key_pos, positions.astype(jnp.int32), slot, 1)
        hidden, kv = model.cached_hidden_states(previous, positions, kv, slot, key_valid, key_pos)
        rng, key = jax.random.split(rng)
        step = sample(model.apply_head(hidden)[:, 0], key)
        token, tokens, logps, ents = record_step(i, step, done, (tokens, logps, ents), pad_id)
        return i + 1, tokens, logps, ents, kv, key_valid, key_pos, done | jnp.isin(token, eos_ids), rng

    carry = (jnp.int32(1), tokens, logps, ents, kv, key_valid, key_pos, done, rng)
    _, tokens, logps, ents, kv, key_valid, key_pos, _, _ = jax.lax.while_loop(cond, body, carry)
    is_eos = jnp.isin(tokens, eos_ids).astype(jnp.int32)
    mask = ((jnp.cumsum(is_eos, axis=1) - is_eos) == 0).astype(jnp.int32) * active[:, None]
    gen = Generation(jnp.where(mask == 1, tokens, pad_id), mask, logps * mask, ents * mask)
    return CacheArrays(kv, key_valid, key_pos), gen


def segment_width(n: int, buckets: Sequence[int] | None = None) -> int:
    """Width of a prefill segment of n tokens: 8, 16, 32 or 64, then `bucket_length`."""
    for width in (8, 16, 32, 64):
        if n <= width:
            return width
    return bucket_length(n, buckets)


class TurnCache:
    """The sampler of one multi-turn rollout (see the module docstring): `cache(contexts, active, n)`
    samples the next turn, up to n tokens, of every active row and returns its `Generation`;
    `contexts[i]` is row i's prompt and completion so far (it extends the row's context at its
    previous call by that call's turn and then anything else, e.g. a tool message).

    `model_state()` gives the policy's current parameters, `next_key()` a fresh sampling key, and
    `place(x)` puts a host array where the model's inputs go (e.g. replicated over processes)."""

    def __init__(
        self, graphdef: nnx.GraphDef, model_state: Callable[[], nnx.State], *, batch: int, length: int,
        eos_ids: Sequence[int], pad_id: int, next_key: Callable[[], Array], temperature: float,
        top_k: int = 0, top_p: float = 1.0, buckets: Sequence[int] | None = None,
        place: Callable[[np.ndarray], Any] = jnp.asarray,
    ):  # fmt: skip
        self.graphdef, self.model_state, self.next_key, self.place = graphdef, model_state, next_key, place
        self.batch, self.length, self.buckets = batch, length, buckets
        self.eos, self.pad_id = np.asarray(list(eos_ids), np.int32), int(pad_id)
        self.sampling = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}
        self.arrays: CacheArrays | None = None
        self.write = 0  # the first free slot
        self.seen = np.zeros(batch, np.int64)  # tokens of each row in the cache
        self.rebuilds = -1  # the first build is not a rebuild
        self.segment_tokens = 0  # prefilled tokens (real ones): the cost the carried cache saves

    @classmethod
    def of_model(cls, model: CausalLM, batch: int, prompt_width: int, *, max_tokens: int, turn_tokens: int,
                 rng: Array | None = None, **kwargs: Any) -> TurnCache:  # fmt: skip
        """A cache sampling from `model` (fixed parameters); `rng` is split once per turn (None: greedy
        decoding needs no key; `temperature=0`)."""
        graphdef, state = nnx.split(model)
        keys = [jax.random.key(0) if rng is None else rng]

        def next_key() -> Array:
            keys[0], key = jax.random.split(keys[0])
            return key

        length = cls.size(prompt_width, max_tokens, turn_tokens, kwargs.get("buckets"))
        return cls(graphdef, lambda: state, batch=batch, length=length, next_key=next_key, **kwargs)

    @staticmethod
    def size(prompt_width: int, max_tokens: int, turn_tokens: int,
             buckets: Sequence[int] | None = None) -> int:  # fmt: skip
        """The most slots per row (C): the prompt's bucket, the completion budget and two turns (room
        for the segments' padding), rounded up to 64; at least what a rebuild of the longest context
        and one turn need."""
        width = bucket_length(prompt_width, buckets)  # one size per prompt bucket
        room = -(-(width + max_tokens + 2 * turn_tokens) // 64) * 64
        return max(room, bucket_length(width + max_tokens, buckets) + turn_tokens)

    def _slots(self, needed: int) -> int:
        """Slots allocated for `needed`: rounded up to 64, at most `length`. The cache grows as the
        episodes do, so early turns do not attend over (and read) slots they cannot use yet."""
        return min(-(-needed // 64) * 64, self.length)

    def __call__(self, contexts: Sequence[Sequence[int]], active: Sequence[bool], max_new_tokens: int
                 ) -> Generation:  # fmt: skip
        if len(contexts) != self.batch:
            raise ValueError(f"{len(contexts)} contexts for a cache of {self.batch} rows")
        rows = list(zip(contexts, active, strict=True))
        new = [list(c[self.seen[i] :]) if a else [] for i, (c, a) in enumerate(rows)]
        width = segment_width(max(map(len, new)), self.buckets)
        if self.arrays is None or self.write + width + max_new_tokens > self.length:
            new = [list(c) if a else [] for c, a in rows]  # from the whole contexts
            width = bucket_length(max(map(len, new)), self.buckets)
            if width + max_new_tokens > self.length:
                raise ValueError(f"contexts of {width} tokens and a turn of {max_new_tokens} exceed the "
                                 f"cache's {self.length} slots")  # fmt: skip
            self.arrays = _empty(self.graphdef, self.model_state(), batch=self.batch,
                                 length=self._slots(width + max_new_tokens))  # fmt: skip
            self.write, self.seen[:], self.rebuilds = 0, 0, self.rebuilds + 1
        elif self.write + width + max_new_tokens > self.arrays.key_valid.shape[1]:
            self.arrays = _grow(self.graphdef, self.model_state(), self.arrays,
                                length=self._slots(self.write + width + max_new_tokens))  # fmt: skip
        ids, mask = left_pad(new, self.pad_id, width=width)
        self.segment_tokens += int(mask.sum())
        self.arrays, gen = _extend(
            self.graphdef, self.model_state(), self.arrays, self.place(self.seen.astype(np.int32)),
            np.int32(self.write), self.place(ids), self.place(mask), self.eos, np.int32(self.pad_id),
            self.next_key(), max_new_tokens=max_new_tokens, **self.sampling,
        )  # fmt: skip
        lengths = host_array(gen.completion_mask).sum(axis=1)
        # every row wrote one slot per decode step taken but its last token: the longest turn sets it
        self.write += width + max(int(lengths.max()), 1) - 1
        for i, (c, a) in enumerate(rows):
            if a:  # the context and the turn but its last token
                self.seen[i] = len(c) + max(int(lengths[i]) - 1, 0)
        return gen
