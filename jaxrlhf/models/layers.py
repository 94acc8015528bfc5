"""The building blocks the dense decoder (`jaxrlhf.models.decoder`) and the mixture of experts
(`jaxrlhf.models.moe`) share: the linear layer (with LoRA adapters and quantized kernels), the norms,
the activations and the gated / plain MLP, RoPE, and soft-capping.

Nothing here imports the decoder or the MoE module, so both import it at the top (the MoE's router is
a `Linear`, its experts use `ACTIVATIONS`). Numerics follow transformers: norms in float32, RoPE tables
in float32, everything else in the compute dtype `cfg.dtype`; parameters are stored in
`cfg.param_dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LORA_TARGETS, LoRASpec, dropout_input, init_adapters
from jaxrlhf.models.quant import QuantizedParam, dequantize, quantize

Array = jax.Array


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    """A parameter drawn from N(0, std^2) in float32, stored in `dtype`."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32).astype(dtype))


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel stored `[in, out]` (the transpose of torch's layout); with a
    `LoRASpec`, plus the low-rank update `(x @ lora_a) @ lora_b * alpha / r`. With `quant` ("int8" /
    "nf4") the kernel is stored as codes and scales (`qkernel`, `qscale`) and dequantized per call."""

    def __init__(
        self, d_in: int, d_out: int, *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs,
        lora: LoRASpec | None = None, quant: str = "none", site: int = 0,
    ):
        self.quant = quant
        if quant == "none":
            self.kernel = normal_param(rngs, (d_in, d_out), cfg.param_dtype)
        else:  # placeholders of the right shapes and dtypes; from_pretrained fills them
            codes, scales = jax.eval_shape(lambda: quantize(jnp.zeros((d_in, d_out)), quant))
            self.qkernel = QuantizedParam(jnp.zeros(codes.shape, codes.dtype))
            self.qscale = QuantizedParam(jnp.zeros(scales.shape, scales.dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), cfg.param_dtype)) if bias else None
        self.dtype = cfg.dtype
        no_adapters: tuple[Any, Any] = (None, None)
        adapters = no_adapters if lora is None else init_adapters(rngs, d_in, d_out, lora, cfg.param_dtype)
        self.lora_a, self.lora_b = adapters
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.lora_dropout = lora.dropout if lora is not None else 0.0
        self.lora_site = site  # which projection: folds the dropout key (own masks per projection)

    def weight(self) -> Array:
        """The kernel `[in, out]` in the compute dtype (dequantized when stored quantized)."""
        if self.quant == "none":
            return self.kernel[...].astype(self.dtype)
        return dequantize(self.qkernel[...], self.qscale[...], self.quant, self.dtype)

    def __call__(self, x: Array, dropout_key: Any = None) -> Array:
        """`dropout_key`: the layer's LoRA dropout key (train steps only); None: no dropout."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.weight())
        if self.lora_a is not None:
            x_in = dropout_input(x, self.lora_dropout, dropout_key, self.lora_site)
            x_a = jnp.dot(x_in, self.lora_a[...].astype(self.dtype))  # [..., r]: the cheap side first
            scale = jnp.asarray(self.lora_scale, self.dtype)
            y = y + jnp.dot(x_a, self.lora_b[...].astype(self.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def projection(cfg: ModelConfig, rngs: nnx.Rngs, name: str, d_in: int, d_out: int, bias: bool) -> Linear:
    """One of the seven decoder projections (PEFT's `name`): adapters where LoRA targets it, and
    stored quantized under `cfg.quantize`."""
    lora = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
    site = LORA_TARGETS.index(name)
    return Linear(d_in, d_out, bias=bias, cfg=cfg, rngs=rngs, lora=lora, quant=cfg.quantize, site=site)


class Norm(nnx.Module):
    """RMSNorm (llama family), Gemma's RMSNorm (`x_hat * (1 + w)`, multiplied in float32 before the
    cast) or LayerNorm with bias (gpt2), computed in float32."""

    def __init__(self, dim: int, *, kind: str, eps: float, cfg: ModelConfig):
        self.offset = cfg.norm_offset if kind == "rms" else 0.0
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - self.offset, cfg.param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), cfg.param_dtype)) if kind == "layernorm" else None
        self.kind, self.eps, self.dtype = kind, eps, cfg.dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        if self.offset:  # Gemma: (x_hat * (1 + w)) in float32, then the cast
            return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        if self.kind == "rms":  # transformers casts back before the weight multiply
            return self.scale[...].astype(self.dtype) * y.astype(self.dtype)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nnx.Module):
    """`down(act(gate(x)) * up(x))` (gated, the llama family) or `down(act(up(x)))` (gpt2)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = projection(cfg, rngs, "gate_proj", d, f, cfg.mlp_bias) if cfg.gated_mlp else None
        self.up_proj = projection(cfg, rngs, "up_proj", d, f, cfg.mlp_bias)
        self.down_proj = projection(cfg, rngs, "down_proj", f, d, cfg.mlp_bias)
        self.act = cfg.activation

    def __call__(self, x_BxTxD: Array, dropout_key: Any = None) -> Array:
        act, key = ACTIVATIONS[self.act], dropout_key
        if self.gate_proj is not None:
            return self.down_proj(act(self.gate_proj(x_BxTxD, key)) * self.up_proj(x_BxTxD, key), key)
        return self.down_proj(act(self.up_proj(x_BxTxD, key)), key)


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies `[H/2]` (float32), with linear or Llama 3 scaling applied; `local`: those
    of Gemma 3's sliding-window layers (their own base, no scaling)."""
    dim = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = {} if local else cfg.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":  # arXiv:2407.21783, as implemented by transformers
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions_BxT: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """The RoPE `(cos, sin)` tables `[B, T, H]` (float32) of `positions` for `inv_freq` `[H/2]`."""
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxH: Array, cos_BxTxH: Array, sin_BxTxH: Array) -> Array:
    """Rotary embedding in the "rotate half" layout used by Hugging Face checkpoints."""
    half = x_BxTxNxH.shape[-1] // 2
    x1, x2 = x_BxTxNxH[..., :half], x_BxTxNxH[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    return x_BxTxNxH * cos.astype(x_BxTxNxH.dtype) + rotated * sin.astype(x_BxTxNxH.dtype)


def soft_cap(x: Array, cap: float | None) -> Array:
    """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping); `x` unchanged when `cap` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
