"""One Flax NNX decoder for every supported family (llama, mistral, qwen2, qwen3, SmolLM2, gpt2,
gemma, gemma2, gemma3, mixtral, qwen3_moe).

The families differ only in switches read from `ModelConfig`: RMSNorm or LayerNorm (Gemma: weights
as `1 + w`), RoPE or learned positions, gated SiLU/GELU MLP or a mixture of experts
(`jaxrlhf.models.moe`), q/k/v biases, q/k RMSNorm, grouped-query attention, tied (Gemma: scaled)
embeddings, sliding windows, norms around both sublayers and soft-capped scores and logits (Gemma 2/3).
Shapes: B batch, T query length, S key length, D hidden, N query heads, K key/value heads,
G = N / K queries per key head, H head dim, F MLP width, V vocab.

Numerics follow transformers: norms and softmax in float32, RoPE tables in float32, everything else in
the compute dtype `config.dtype`; parameters are stored in `config.param_dtype`.

The blocks this module shares with the MoE (`Linear`, `Norm`, `MLP`, `ACTIVATIONS`, RoPE, `soft_cap`)
live in `jaxrlhf.models.layers` and are importable from here too. What varies per forward pass is
passed as a value: the LoRA dropout key (`hidden_states(dropout_key=...)`, or bound to a copy of the
model with `CausalLM.with_lora_dropout`) goes down the layers to each adapter, and an MoE model's
router statistics come out as `moe.RouterStats` under `nnx.capture`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.losses.token import token_logprobs_from_hidden
from jaxrlhf.models import attention as attention_backends
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import ACTIVATIONS as ACTIVATIONS  # re-exported: the blocks lived here
from jaxrlhf.models.layers import (
    MLP,
    Linear,
    Norm,
    apply_rope,
    normal_param,
    projection,
    rope_inv_freq,
    rope_tables,
    soft_cap,
)
from jaxrlhf.models.moe import MoE, sow_router_stats

Array = jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = projection(cfg, rngs, "q_proj", d, n * h, cfg.qkv_bias)
        self.k_proj = projection(cfg, rngs, "k_proj", d, k * h, cfg.qkv_bias)
        self.v_proj = projection(cfg, rngs, "v_proj", d, k * h, cfg.qkv_bias)
        self.o_proj = projection(cfg, rngs, "o_proj", n * h, d, cfg.o_bias)
        if cfg.qk_norm:  # (Gemma 3's are Gemma norms: the offset comes with cfg)
            self.q_norm = Norm(h, kind="rms", eps=cfg.norm_eps, cfg=cfg)
            self.k_norm = Norm(h, kind="rms", eps=cfg.norm_eps, cfg=cfg)
        else:
            self.q_norm = self.k_norm = None
        self.n, self.k, self.h = n, k, h
        self.rope = cfg.position_embedding == "rope"
        self.dtype = cfg.dtype
        self.scale, self.soft_cap = cfg.attention_scale, cfg.attn_logit_softcap
        self.backend = cfg.effective_attention  # resolved once: "xla", "splash" or "cudnn"
        self.mesh: Any = None  # set by CausalLM.set_mesh: the splash kernel runs under shard_map

    def project(
        self, x_BxTxD: Array, cos: Array | None, sin: Array | None, dropout_key: Any = None
    ) -> tuple[Array, Array, Array]:
        """Queries `[B, T, N, H]`, keys and values `[B, T, K, H]`, normed and rotated."""
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD, dropout_key).reshape(b, t, self.n, self.h)
        k = self.k_proj(x_BxTxD, dropout_key).reshape(b, t, self.k, self.h)
        v = self.v_proj(x_BxTxD, dropout_key).reshape(b, t, self.k, self.h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(
        self, q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, dropout_key: Any = None
    ) -> Array:
        b, t = q_BxTxNxH.shape[:2]
        backend = self.backend if t > 1 else "xla"  # one-token decode steps stay on XLA
        out = attention_backends.attend(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, backend=backend, scale=self.scale,
            soft_cap=self.soft_cap, mesh=self.mesh,
        )
        return self.o_proj(out.reshape(b, t, self.n * self.h), dropout_key)

    def __call__(
        self, x_BxTxD: Array, mask_BxTxS: Array, cos: Array | None, sin: Array | None, dropout_key: Any = None
    ) -> Array:
        """`dropout_key`: the layer's LoRA dropout key (None: no dropout)."""
        q, k, v = self.project(x_BxTxD, cos, sin, dropout_key)
        return self.attend(q, k, v, mask_BxTxS, dropout_key)

    def cached(
        self, x_BxTxD: Array, mask_BxTxS: Array, cos: Any, sin: Any, cache: tuple[Array, Array], index: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        """Attend from T new tokens written at cache slots `index..index+T-1` to the whole cache."""
        q, k, v = self.project(x_BxTxD, cos, sin)
        k_cache = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
        return self.attend(q, k_cache, v_cache, mask_BxTxS), (k_cache, v_cache)

    def cached_stacked(
        self, x_BxTxD: Array, mask_BxTxS: Array, cos: Any, sin: Any, cache: tuple[Array, Array],
        layer: Array, index: Array,
    ) -> tuple[Array, tuple[Array, Array]]:
        """`cached` for a scanned model: the cache is the stacked `[L, B, S, K, H]` pair, and only
        the T new keys/values of `layer` are written into it (in place inside the decode loop)."""
        q, k, v = self.project(x_BxTxD, cos, sin)
        at = (layer, 0, index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache[0], k[None].astype(cache[0].dtype), at)
        v_all = jax.lax.dynamic_update_slice(cache[1], v[None].astype(cache[1].dtype), at)
        out = self.attend(q, k_all[layer], v_all[layer], mask_BxTxS)
        return out, (k_all, v_all)


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy of `ModelConfig.remat` (None: save nothing but the layer input)."""
    cp = jax.checkpoint_policies
    if name == "dots_saveable":
        return cp.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
    return None  # "full" (and "none", where no checkpoint is applied at all)


def _checkpointed(policy: Any) -> Any:
    """`DecoderLayer.__call__` under `jax.checkpoint(policy=...)`: the layer's parameters go in as a
    pure state (merged inside), so it works wherever the model was merged, jit included."""

    def call(layer: DecoderLayer, x: Array, mask: Array, cos: Any, sin: Any, key: Any) -> Any:
        graphdef, state = nnx.split(layer)

        def pure(state: Any, x: Array, mask: Array, cos: Any, sin: Any, key: Any) -> Any:
            return nnx.merge(graphdef, state)(x, mask, cos, sin, key)

        return jax.checkpoint(pure, policy=policy)(state, x, mask, cos, sin, key)

    return call


RouterSums = tuple[Array, Array] | None  # an MoE layer's (assignments [E], probabilities [E])


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks. With `sandwich_norm` (Gemma 2/3) each block's output is
    normed too: `post_attention_layernorm` then means the norm *after* attention, and the MLP sits
    between `pre_feedforward_layernorm` and `post_feedforward_layernorm`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        norm = lambda: Norm(cfg.hidden_size, kind=cfg.norm_type, eps=cfg.norm_eps, cfg=cfg)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)
        self.moe = moe

    def _feed_forward(
        self, x: Array, attn: Array, mask: Array | None, dropout_key: Any = None
    ) -> tuple[Array, RouterSums]:
        """The residual adds around attention's output `attn` and the MLP; the MoE's router sums
        (over the tokens whose mask diagonal is set: the real ones) when `mask` is given."""
        if self.pre_feedforward_layernorm is not None:
            x = x + self.post_attention_layernorm(attn)
            h = self.pre_feedforward_layernorm(x)
        else:
            x = x + attn
            h = self.post_attention_layernorm(x)
        sums = None
        if self.moe:
            valid = jnp.ones(h.shape[:2], bool) if mask is None else jnp.diagonal(mask, axis1=1, axis2=2)
            h, sums = self.mlp(h, valid)
        else:
            h = self.mlp(h, dropout_key)
        if self.post_feedforward_layernorm is not None:
            h = self.post_feedforward_layernorm(h)
        return x + h, sums

    def __call__(
        self, x: Array, mask: Array, cos: Array | None, sin: Array | None, dropout_key: Any = None
    ) -> tuple[Array, RouterSums]:
        """The layer's output and its MoE router sums (None for a dense MLP); `dropout_key`: the
        layer's LoRA dropout key (None: no dropout)."""
        attn = self.self_attn(self.input_layernorm(x), mask, cos, sin, dropout_key)
        return self._feed_forward(x, attn, mask, dropout_key)

    def cached(
        self, x: Array, mask: Array, cos: Any, sin: Any, cache: Any, index: Array
    ) -> tuple[Array, Any]:
        attn, cache = self.self_attn.cached(self.input_layernorm(x), mask, cos, sin, cache, index)
        return self._feed_forward(x, attn, None)[0], cache

    def cached_stacked(
        self, x: Array, mask: Array, cos: Any, sin: Any, cache: Any, layer: Array, index: Array
    ) -> tuple[Array, Any]:
        normed = self.input_layernorm(x)
        attn, cache = self.self_attn.cached_stacked(normed, mask, cos, sin, cache, layer, index)
        return self._feed_forward(x, attn, None)[0], cache


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """`num_layers` decoder layers as one module with parameters stacked on a leading `[L]` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=layer_rngs, moe=cfg.layer_is_moe(0))

    return make(rngs)


Rope = tuple[tuple[Array, Array], tuple[Array, Array] | None] | None


def _pick_rope(rope: Rope, windowed: Any) -> tuple[Array | None, Array | None]:
    """The `(cos, sin)` a layer uses: the local tables on sliding-window layers where the model has
    them (`windowed` a Python bool, or a traced flag inside a scan), the global ones otherwise."""
    if rope is None:
        return None, None
    glob, local = rope
    if local is None or windowed is False:
        return glob
    if windowed is True:
        return local
    return jnp.where(windowed, local[0], glob[0]), jnp.where(windowed, local[1], glob[1])


def _layer_key(key: Any, layer: Any) -> Any:
    """The LoRA dropout key of decoder layer `layer` (an int, or a traced index inside a scan): `key`
    folded with it, so every layer draws its own masks (the same scanned and unrolled); None when
    dropout is off."""
    return None if key is None else jax.random.fold_in(key, layer)


def _add_sums(a: RouterSums, b: RouterSums) -> RouterSums:
    if a is None or b is None:
        return b if a is None else a
    return a[0] + b[0], a[1] + b[1]


def make_attention_mask(
    attention_mask: Array | None, positions: Array, *, window: int | None = None
) -> Array:
    """Boolean `[B, T, S]`: causal (by index) AND key is real AND (optionally) inside the window.

    `attention_mask` may be `[B, S]` (1 = real token, any padding side) or an explicit boolean
    `[B, T, S]` (e.g. the packed DPO layout); causality is applied on top of either. The sliding window
    is measured in positions, which equals index distance in a padded row and stays right when
    segments are packed into one row.
    """
    batch, length = positions.shape
    idx = jnp.arange(length)
    allowed = jnp.broadcast_to(idx[None, :] <= idx[:, None], (batch, length, length))
    if window is not None:
        allowed &= positions[:, :, None] - positions[:, None, :] < window
    if attention_mask is None:
        return allowed
    if attention_mask.ndim == 2:
        return allowed & (attention_mask[:, None, :] != 0)
    return allowed & attention_mask.astype(bool)


def default_positions(attention_mask: Array | None, batch: int, length: int) -> Array:
    """Position ids that skip left padding: `cumsum(mask) - 1`, clipped at 0; `arange` without a mask."""
    if attention_mask is None or attention_mask.ndim != 2:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """Decoder with a language-model head (`head="lm"`, logits `[B, T, V]`) or a scalar score head
    (`head="score"`, scores `[B, T]`, laid out like transformers' `*ForSequenceClassification`)."""

    def __init__(self, cfg: ModelConfig, *, head: str = "lm", rngs: nnx.Rngs):
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.config, self.head_type = cfg, head
        # Set by from_pretrained(mesh=...): the [B, T, D] activations between layers are pinned to
        # the batch sharding, so the partitioner gathers (FSDP) weights rather than activations.
        self.activation_sharding: Any = None
        # The LoRA dropout key of this model's forward passes: None, or a key `with_lora_dropout`
        # bound to a copy (a train step's, for code such as an objective that calls the model itself).
        self.dropout_key: Any = None
        embed_init = jax.nn.initializers.normal(0.02)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=embed_init,
            rngs=rngs,
        )
        if cfg.position_embedding == "learned":
            self.embed_positions = nnx.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=embed_init,
                rngs=rngs,
            )
        else:
            self.embed_positions = None
        if cfg.scan_layers:  # one module whose parameters are stacked [L, ...]
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, rngs=rngs, moe=cfg.layer_is_moe(i)) for i in range(cfg.num_layers)]
            )
        self.norm = Norm(cfg.hidden_size, kind=cfg.norm_type, eps=cfg.norm_eps, cfg=cfg)
        untied = head == "lm" and not cfg.tie_word_embeddings
        self.lm_head = (
            Linear(cfg.hidden_size, cfg.vocab_size, bias=False, cfg=cfg, rngs=rngs) if untied else None
        )
        self.score = Linear(cfg.hidden_size, 1, bias=False, cfg=cfg, rngs=rngs) if head == "score" else None
        if self.score is not None:  # TRL's reward-model init: N(0, 1/sqrt(D+1))
            std = 1.0 / math.sqrt(cfg.hidden_size + 1)
            self.score.kernel = normal_param(rngs, (cfg.hidden_size, 1), cfg.param_dtype, std=std)

    def with_lora_dropout(self, key: Any) -> CausalLM:
        """This model with LoRA dropout drawn from `key` in every forward pass that is not handed its
        own `dropout_key`: a copy sharing the parameters (this model is unchanged). A train step binds
        its (step, micro-batch) key so that the objective's plain `model.hidden_states(...)` calls
        drop; `key=None` gives the model back without dropout. The bound key is part of the copy's
        state (`nnx.data`): split it with `...` as the last filter, or split the unbound model."""
        if key is None:
            return nnx.with_attributes(self, only=CausalLM, dropout_key=None)
        return nnx.with_attributes(self, only=CausalLM, dropout_key=nnx.data(key))

    def set_mesh(self, mesh: Any) -> None:
        """The device mesh the model is sharded over: attention kernels that XLA cannot partition
        (splash) then run per device under `shard_map`. A one-device mesh is kept too: its platform
        says whether the kernel is compiled for TPU or interpreted (`attention.mesh_platform`)."""
        attns = [self.layers.self_attn] if self.config.scan_layers else [x.self_attn for x in self.layers]
        for attn in attns:
            attn.mesh = mesh

    def _constrain(self, x_BxTxD: Array) -> Array:
        sharding = self.activation_sharding
        if sharding is None:
            return x_BxTxD
        spec = sharding.spec[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        if x_BxTxD.shape[0] % math.prod(sharding.mesh.shape[a] for a in axes):
            return x_BxTxD  # a batch the mesh does not divide (e.g. a tiny eval batch): leave it
        return jax.lax.with_sharding_constraint(x_BxTxD, sharding)

    def _embed(self, input_ids: Array, positions: Array) -> tuple[Array, Rope]:
        """Token (+ learned position) embeddings, and the RoPE tables: (global, local) `(cos, sin)`
        pairs `[B, T, H]`, local None unless the sliding-window layers have their own (Gemma 3)."""
        cfg = self.config
        # Ids outside the vocabulary (e.g. a pad token added past it) may only sit at masked
        # positions; embed them as id 0 so they cannot bring NaN (jnp.take fills with NaN).
        in_vocab = (input_ids >= 0) & (input_ids < cfg.vocab_size)
        x = self.embed_tokens(jnp.where(in_vocab, input_ids, 0))
        if cfg.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as transformers does
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=x.dtype)
        if self.embed_positions is not None:
            return x + self.embed_positions(positions), None
        return x, self._rope(positions)

    def _rope(self, positions: Array) -> Rope:
        cfg = self.config
        if self.embed_positions is not None:
            return None
        local = None
        if cfg.local_rope_theta is not None:
            local = rope_tables(positions, rope_inv_freq(cfg, local=True))
        return (rope_tables(positions, rope_inv_freq(cfg)), local)

    def trunk_states(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        """The frozen trunk's output `[B, T, D]` (compute dtype): the residual stream after the
        embeddings and the first `config.frozen_layers` decoder layers, the part no gradient reaches.
        Models that share those weights (a policy, its reference, a critic and a reward model
        trained above the same frozen base) compute it once: `hidden_states(..., trunk=x)` goes on
        from it and gives what the whole pass gives."""
        n = self.config.frozen_layers
        if n == 0:
            raise ValueError("trunk_states needs a model with frozen_layers > 0")
        if self.config.num_experts:
            raise ValueError("trunk_states: mixture-of-experts models record router statistics per layer")
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        x, rope = self._embed(input_ids, positions)
        return self._layers(x, attention_mask, positions, rope, self.dropout_key, stop=n)[0]

    def hidden_states(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None, *,
        dropout_key: Any = None, trunk: Array | None = None,
    ) -> Array:
        """Final-norm hidden states `[B, T, D]` (compute dtype).

        `dropout_key`: the PRNG key of LoRA dropout in this pass (train steps only), folded with the
        layer number for each layer and with the projection in each adapter; default: the key bound
        by `with_lora_dropout`, and without one no dropout (sampling, scoring, evaluation).

        `trunk`: `trunk_states` of these inputs (of this model or of one with the same frozen
        weights): the pass starts above the frozen layers instead of at the embeddings.

        An MoE model's router statistics of the pass (`moe.RouterStats`) are sown on the model under
        `nnx.capture(fn, RouterStats)`, which returns them; a plain call records nothing."""
        cfg = self.config
        key = self.dropout_key if dropout_key is None else dropout_key
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        if trunk is not None:
            if cfg.frozen_layers == 0 or cfg.num_experts:
                raise ValueError("hidden_states(trunk=...) needs a dense model with frozen_layers > 0")
            x, _ = self._layers(jax.lax.stop_gradient(trunk), attention_mask, positions,
                                self._rope(positions), key, start=cfg.frozen_layers)  # fmt: skip
            return self.norm(x)
        x, rope = self._embed(input_ids, positions)
        x, sums = self._layers(x, attention_mask, positions, rope, key)
        if sums is not None:  # MoE: the router statistics, as a value an nnx.capture collects
            moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.num_layers))
            full_mask = make_attention_mask(attention_mask, positions)
            tokens = jnp.sum(jnp.diagonal(full_mask, axis1=1, axis2=2).astype(jnp.float32))
            sow_router_stats(self, *sums, moe_layers * tokens)
        return self.norm(x)

    def _layers(
        self, x: Array, attention_mask: Array | None, positions: Array, rope: Rope, key: Any, *,
        start: int = 0, stop: int | None = None,
    ) -> tuple[Array, RouterSums]:
        """Decoder layers `start .. stop - 1` on the residual stream `x`; the gradient stops above
        the frozen layers. Returns the stream (before the final norm) and the MoE router sums."""
        cfg = self.config
        stop = cfg.num_layers if stop is None else stop
        full_mask = make_attention_mask(attention_mask, positions)
        window_mask = None
        if cfg.sliding_window is not None:
            window_mask = make_attention_mask(attention_mask, positions, window=cfg.sliding_window)
        if cfg.scan_layers:
            return self._scanned(x, full_mask, window_mask, rope, key, start=start, stop=stop)
        layer_fn = DecoderLayer.__call__
        if cfg.effective_remat != "none":
            layer_fn = _checkpointed(remat_policy(cfg.effective_remat))
        x, sums = self._constrain(x), None
        for i in range(start, stop):
            windowed = cfg.layer_uses_window(i)
            mask = window_mask if windowed else full_mask
            x, layer_sums = layer_fn(self.layers[i], x, mask, *_pick_rope(rope, windowed), _layer_key(key, i))
            x = self._constrain(x)
            sums = _add_sums(sums, layer_sums)
            if i + 1 == cfg.frozen_layers:  # frozen below: their backward pass is never computed
                x = jax.lax.stop_gradient(x)
        return x, sums

    def _window_flags(self) -> Array | None:
        """Per layer `[L]`: does the sliding window apply? None when every layer is alike."""
        cfg = self.config
        if cfg.sliding_window is None or cfg.sliding_layers is None or all(cfg.sliding_layers):
            return None
        return jnp.asarray(cfg.sliding_layers, dtype=bool)

    def _layer_mask(self, flag: Array | None, full_mask: Array, window_mask: Array | None) -> Array:
        if window_mask is None:
            return full_mask
        return window_mask if flag is None else jnp.where(flag, window_mask, full_mask)

    def _windowed(self, flag: Array | None) -> Any:
        """Does the sliding window apply to a scanned layer: its flag, or the same for all layers."""
        return (self.config.sliding_window is not None) if flag is None else flag

    def _scanned(
        self, x: Array, full_mask: Array, window_mask: Array | None, rope: Rope, key: Any, *,
        start: int, stop: int,
    ) -> tuple[Array, RouterSums]:
        """Decoder layers `start .. stop - 1` as `lax.scan`s over the stacked parameters (one below
        the frozen layers' top, one above): traced and compiled once whatever the depth; the remat
        policy applies inside the scanned body (per layer). Returns the hidden states and the MoE
        router sums over layers (None for dense layers)."""
        cfg = self.config
        graphdef, stacked = nnx.split(self.layers)
        flags = self._window_flags()

        def body(x: Array, xs: Any) -> tuple[Array, RouterSums]:
            layer_state, flag, i = xs
            layer = nnx.merge(graphdef, layer_state)
            mask = self._layer_mask(flag, full_mask, window_mask)
            x, sums = layer(x, mask, *_pick_rope(rope, self._windowed(flag)), _layer_key(key, i))
            return self._constrain(x), sums

        if cfg.effective_remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(cfg.effective_remat), prevent_cse=False)

        def run(x: Array, start: int, stop: int) -> tuple[Array, RouterSums]:
            whole = (start, stop) == (0, cfg.num_layers)
            part = stacked if whole else jax.tree.map(lambda a: a[start:stop], stacked)
            part_flags = None if flags is None else flags[start:stop]
            ids = jnp.arange(start, stop, dtype=jnp.int32)  # layer numbers (LoRA dropout keys)
            x, sums = jax.lax.scan(body, x, (part, part_flags, ids))
            return x, None if sums is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), sums)

        x, n = self._constrain(x), cfg.frozen_layers
        if not start < n <= stop:  # no frozen top inside these layers
            return run(x, start, stop) if start < stop else (x, None)
        x, sums = run(x, start, n)
        x = jax.lax.stop_gradient(x)  # frozen below: their backward pass is never computed
        if n == stop:
            return x, sums
        x, upper = run(x, n, stop)
        return x, _add_sums(sums, upper)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> Any:
        """Empty key/value cache (compute dtype by default): per layer two `[B, S, K, H]` arrays, or
        with scanned layers two stacked `[L, B, S, K, H]` arrays."""
        cfg = self.config
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.dtype
        if cfg.scan_layers:
            stacked = (cfg.num_layers, *shape)
            return (jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

    def cached_hidden_states(
        self,
        input_ids_BxT: Array,
        positions_BxT: Array,
        cache: list[tuple[Array, Array]],
        index: Array,
        key_valid_BxS: Array,
        key_positions_BxS: Array,
    ) -> tuple[Array, list[tuple[Array, Array]]]:
        """Hidden states of T new tokens written at cache slots `index..index+T-1`, and the cache.

        Keys are visible when their slot is at or before the query's (causal by slot) and
        `key_valid_BxS` is set (prompt padding is not); the sliding window uses positions, as in
        `hidden_states`, so both paths give the same numbers.
        """
        cfg = self.config
        t = input_ids_BxT.shape[1]
        x, rope = self._embed(input_ids_BxT, positions_BxT)
        q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(key_valid_BxS.shape[1])
        full = (k_slot[None, :] <= q_slot[:, None])[None] & (key_valid_BxS[:, None, :] != 0)
        window = None
        if cfg.sliding_window is not None:
            distance = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
            window = full & (distance < cfg.sliding_window)
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            flags = self._window_flags()

            # The stacked cache rides in the carry, so each layer writes only its T new
            # keys/values in place (as xs/ys it would be copied whole at every decode step).
            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                x, cache = carry
                layer_state, flag, i = xs
                layer = nnx.merge(graphdef, layer_state)
                mask = self._layer_mask(flag, full, window)
                cos, sin = _pick_rope(rope, self._windowed(flag))
                x, cache = layer.cached_stacked(x, mask, cos, sin, cache, i, index)
                return (self._constrain(x), cache), None

            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            carry = (self._constrain(x), tuple(cache))
            (x, cache), _ = jax.lax.scan(body, carry, (stacked, flags, layer_ids))
            return self.norm(x), cache
        new_cache, x = [], self._constrain(x)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            windowed = cfg.layer_uses_window(i)
            mask = window if windowed else full
            x, layer_cache = layer.cached(x, mask, *_pick_rope(rope, windowed), layer_cache, index)
            x = self._constrain(x)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def lm_head_kernel(self) -> Array:
        """The `[D, V]` output projection (the transposed embedding when embeddings are tied)."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...]
        return self.embed_tokens.embedding[...].T

    def batch_shards(self, batch: int) -> int:
        """Devices a batch of `batch` rows is split over (the activation sharding's batch axes), 1
        without a mesh or for a batch they do not divide (as `_constrain` leaves it)."""
        sharding = self.activation_sharding
        if sharding is None:
            return 1
        spec = sharding.spec[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        shards = math.prod(sharding.mesh.shape[a] for a in axes)
        return shards if batch % shards == 0 else 1

    def token_logprobs(self, hidden_BxTxD: Array, labels_BxT: Array, *, temperature: float = 1.0,
                       chunk_size: int = 1024) -> Array:  # fmt: skip
        """Log-probs `[B, T]` (float32) of `labels` from hidden states, through the LM head in chunks
        of `chunk_size` positions per device (`losses.token_logprobs_from_hidden`): the `[B, T, V]`
        logits are never whole."""
        head_DxV = self.lm_head_kernel().astype(hidden_BxTxD.dtype)
        shards = self.batch_shards(hidden_BxTxD.shape[0])
        if shards > 1:
            # Gather the head over the batch's devices once, before the chunk loop: left to the
            # partitioner, every chunk gathered it again (or streamed it around the ring) and
            # reduced its gradient again (TPU compiler, Llama-3.1-8B DPO on 64 chips: 607 GB of
            # all-reduce per step). Its vocabulary stays split over `tensor` when that divides it.
            mesh = self.activation_sharding.mesh
            tensor = mesh.shape.get("tensor", 1)
            vocab = "tensor" if tensor > 1 and head_DxV.shape[1] % tensor == 0 else None
            head_DxV = jax.lax.with_sharding_constraint(head_DxV, NamedSharding(mesh, P(None, vocab)))
        return token_logprobs_from_hidden(
            hidden_BxTxD, head_DxV, labels_BxT, chunk_size=chunk_size, temperature=temperature,
            soft_cap=self.config.final_logit_softcap, batch_shards=shards,
        )  # fmt: skip

    def apply_head(self, hidden_BxTxD: Array) -> Array:
        """Logits `[B, T, V]` (float32) or scores `[B, T]` (float32) from hidden states."""
        dtype = self.config.dtype
        if self.score is not None:
            kernel = self.score.kernel[...].astype(dtype)
            return jnp.dot(hidden_BxTxD, kernel, preferred_element_type=jnp.float32)[..., 0]
        kernel = self.lm_head_kernel().astype(dtype)
        return soft_cap(jnp.dot(hidden_BxTxD, kernel, preferred_element_type=jnp.float32),
                        self.config.final_logit_softcap)  # fmt: skip

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None, *,
        dropout_key: Any = None, trunk: Array | None = None,
    ) -> Array:
        """Logits `[B, T, V]` or scores `[B, T]`; `dropout_key` and `trunk` as in `hidden_states`."""
        hidden = self.hidden_states(input_ids, attention_mask, positions, dropout_key=dropout_key,
                                    trunk=trunk)  # fmt: skip
        return self.apply_head(hidden)
