"""Compiled sampling with a KV cache: one prefill, then a `lax.while_loop` of one-token decode steps
that stops as soon as every row has produced an end-of-sequence token.

Static shapes throughout (prompt length P, `max_new_tokens` N, cache of P + N slots), so a rollout
compiles once per (B, P, N). Prompts are left-padded: the last prompt slot holds every row's last real
token, generation starts at slot P for all rows, and each row's positions continue from its own
prompt length (the same positions transformers' `generate` uses).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrlhf.models.decoder import CausalLM

Array = jax.Array


@struct.dataclass
class Generation:
    tokens: Array  # [B, N] sampled ids; pad after a row's first EOS
    completion_mask: Array  # [B, N] 1 up to and including the first EOS
    logprobs: Array  # [B, N] log-prob of each sampled token under softmax(logits / temperature); 0 on pad
    entropy: Array  # [B, N] entropy of softmax(logits / temperature) at each step; 0 on pad
    # [B, N] 1 on the policy's own tokens, where a completion also holds others (a multi-turn rollout's
    # tool messages: `jaxrlhf.train.multiturn`); None: all of the completion is the policy's
    policy_mask: Array | None = None


def filter_logits(logits_BxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Mask (to the dtype's minimum) tokens outside the top-k and outside the nucleus of mass `top_p`
    (Holtzman et al. 2020, arXiv:1904.09751); the most likely token always survives.

    Both avoid sorting the vocabulary (slow on CPU): top-k reads the k-th value from `lax.top_k`, and
    the nucleus threshold is found by bisection on the probability: the largest t with
    `sum(p[p >= t]) >= top_p`, in 32 halvings.
    """
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth = jnp.min(jax.lax.top_k(logits_BxV, top_k)[0], axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
            return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

        start = (jnp.zeros_like(probs[:, :1]), jnp.max(probs, axis=-1, keepdims=True))
        threshold, _ = jax.lax.fori_loop(0, 32, halve, start)
        logits_BxV = jnp.where(probs >= threshold, logits_BxV, neg)
    return logits_BxV


def sample_tokens(
    logits_BxV: Array, rng: Array, *, temperature: float, top_k: int, top_p: float
) -> tuple[Array, Array, Array]:
    """Sampled ids `[B]`, their log-probs under `softmax(logits / temperature)` (plain softmax when
    greedy, at 0) and the entropy `[B]` of that distribution. Top-k/top-p restrict the sampling only:
    log-probs and entropy are of the unfiltered distribution, the one PPO trains."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        token = jnp.argmax(logits_BxV, axis=-1)
        logp = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled = logits_BxV / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        token = jax.random.categorical(rng, filter_logits(scaled, top_k=top_k, top_p=top_p), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], entropy


def record_step(i: Array, step: tuple[Array, Array, Array], done: Array, out: tuple[Array, Array, Array],
                pad_id: Array) -> tuple[Array, Array, Array, Array]:  # fmt: skip
    """Decode step i's `(token, logp, entropy)` `[B]` written into column i of `out` (`[B, N]` tokens,
    log-probs, entropies): padding and zeros for rows already `done`. Returns the token and `out`."""
    token, logp, ent = step
    token = jnp.where(done, pad_id, token)
    logp, ent = jnp.where(done, 0.0, logp), jnp.where(done, 0.0, ent)
    tokens, logps, ents = (jax.lax.dynamic_update_slice_in_dim(x, v[:, None], i, axis=1)
                           for x, v in zip(out, (token, logp, ent), strict=True))  # fmt: skip
    return token, tokens, logps, ents


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    eos_ids,
    pad_id,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
):
    model: CausalLM = nnx.merge(graphdef, state)
    b, p = prompt_ids.shape
    n = max_new_tokens
    prompt_pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    gen_pos_BxN = prompt_pos[:, -1:] + 1 + jnp.arange(n, dtype=jnp.int32)[None]
    key_pos = jnp.concatenate([prompt_pos, gen_pos_BxN], axis=1)
    key_valid = jnp.concatenate([prompt_mask, jnp.ones((b, n), prompt_mask.dtype)], axis=1)
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    cache = model.init_cache(b, p + n)
    hidden, cache = model.cached_hidden_states(prompt_ids, prompt_pos, cache, 0, key_valid, key_pos)
    rng, key = jax.random.split(rng)
    token, logp, ent = sample(model.apply_head(hidden[:, -1:])[:, 0], key)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
    ents = jnp.zeros((b, n), jnp.float32).at[:, 0].set(ent)
    done = jnp.isin(token, eos_ids)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tokens, logps, ents, done, cache, rng = carry
        previous = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        positions = jax.lax.dynamic_slice_in_dim(gen_pos_BxN, i - 1, 1, axis=1)
        hidden, cache = model.cached_hidden_states(previous, positions, cache, p + i - 1, key_valid, key_pos)
        rng, key = jax.random.split(rng)
        step = sample(model.apply_head(hidden)[:, 0], key)
        token, tokens, logps, ents = record_step(i, step, done, (tokens, logps, ents), pad_id)
        return i + 1, tokens, logps, ents, done | jnp.isin(token, eos_ids), cache, rng

    _, tokens, logps, ents, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tokens, logps, ents, done, cache, rng)
    )
    is_eos = jnp.isin(tokens, eos_ids).astype(jnp.int32)
    after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    mask = (~after_eos).astype(jnp.int32)
    return Generation(
        tokens=jnp.where(mask == 1, tokens, pad_id),
        completion_mask=mask,
        logprobs=logps * mask,
        entropy=ents * mask,
    )


def generate(
    model: CausalLM,
    prompt_ids: Array,
    prompt_mask: Array,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    rng: Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Generation:
    """Sample up to `max_new_tokens` continuations of left-padded prompts `[B, P]`.

    `temperature=0` is greedy decoding. Returns the tokens, the completion mask (through the first EOS)
    and the log-prob of each sampled token under the temperature-scaled distribution (before top-k /
    top-p filtering, the quantity PPO's ratio uses). Works unchanged with a model sharded on a mesh.
    """
    if rng is None:
        if temperature != 0.0:
            raise ValueError("sampling with temperature > 0 needs an rng key")
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask, jnp.int32),
        jnp.asarray(list(eos_token_ids), jnp.int32),
        jnp.int32(pad_token_id),
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
