"""Greedy decoding by re-running the full forward pass over a fixed-size buffer.

Static shapes (one compilation per prompt length and `max_new_tokens`), no KV cache: simple and exact,
meant for demos and for checking our logits against transformers' `generate`. The KV-cache sampler
for PPO rollouts replaces it where speed matters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.decoder import CausalLM


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(graphdef, state, ids_BxP, mask_BxP, eos_ids, pad_id, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    b, p = ids_BxP.shape
    ids = jnp.concatenate([ids_BxP, jnp.full((b, max_new_tokens), pad_id, ids_BxP.dtype)], axis=1)
    mask = jnp.concatenate([mask_BxP, jnp.zeros((b, max_new_tokens), mask_BxP.dtype)], axis=1)

    def step(i, carry):
        ids, mask, done = carry
        logits = model(ids, mask)
        next_tok = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(ids.dtype)
        next_tok = jnp.where(done, pad_id, next_tok)
        ids = ids.at[:, p + i].set(next_tok)
        mask = mask.at[:, p + i].set(jnp.where(done, 0, 1).astype(mask.dtype))
        done = done | jnp.isin(next_tok, eos_ids)
        return ids, mask, done

    ids, mask, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask, jnp.zeros((b,), bool)))
    return ids[:, p:], mask[:, p:]


def greedy_generate(
    model: CausalLM,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of left-padded prompts: `(tokens [B, N], completion_mask [B, N])`.

    A row stops after its first EOS (which is kept and masked in); later slots hold `pad_token_id`.
    """
    graphdef, state = nnx.split(model)
    return _greedy(
        graphdef,
        state,
        jnp.asarray(prompt_ids_BxP, jnp.int32),
        jnp.asarray(prompt_mask_BxP, jnp.int32),
        jnp.asarray(list(eos_token_ids), jnp.int32),
        jnp.int32(pad_token_id),
        max_new_tokens,
    )
