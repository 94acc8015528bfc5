"""Attention backends behind one switch (`ModelConfig.attention`, `model.attention`).

Every backend takes the same arguments: queries `[B, T, N, H]`, keys and values `[B, S, K, H]`
(grouped-query: N a multiple of K) and a boolean mask `[B, T, S]` (True = the query sees the key),
and returns `[B, T, N, H]`. The mask carries everything that varies per example: causality,
padding (either side), sliding windows, and the packed DPO / reward row `[prompt][chosen][rejected]`
where both completions see the prompt and not each other. A boolean `[B, T, S]` costs a byte per
entry, shared by every head and layer; the fused kernels never build the float32 `[B, N, T, S]`
scores that the XLA path does.

* `xla`: two einsums around float32 scores: the reference, and the default on CPU.
* `splash`: the Pallas TPU splash-attention kernel that ships with jax, with a *dynamic* per-example
  mask: the kernel skips every fully masked `[bq, bkv]` block (above the diagonal, and between the
  chosen and rejected segments of a packed row), so the packed row keeps its shared prompt and
  gains block sparsity. Run per device under `shard_map` (batch over `data`/`fsdp`, heads over
  `tensor`); off TPU it runs in Pallas interpret mode (tests).
* `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention` with the boolean
  mask (bfloat16 / float16 only, head dim <= 256; the mask enters as a bias, no `[T, S]` scores).
* `auto`: splash on TPU; cudnn on GPU when the compute dtype and head dim allow it; xla otherwise.

Gemma 2's soft-capping of the scores (`cap * tanh(s / cap)` after scaling, before the mask) is done
by `xla` and `splash` (the kernel's `attn_logits_soft_cap`); cuDNN's fused kernel has no soft cap, so
`auto` picks `xla` on GPU for such models and an explicit `cudnn` is refused. Sliding windows are part
of the mask, so every backend applies them.

Rows where a query sees no key at all (a dummy row, left padding) have no defined output. The XLA
path returns the mean of the values there; the kernels get the query's first key unmasked so
nothing is NaN. Such outputs are never read (their tokens carry no loss).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrlhf.parallel.partition import batch_axes

Array = jax.Array
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

# The values of `ModelConfig.attention` (re-exported by jaxrlhf.models.config, which imports this
# module, never the other way round): auto = splash on TPU, cudnn on GPU where the dtype allows, xla
# otherwise.
ATTENTION_BACKENDS = ("auto", "xla", "splash", "cudnn")


def resolve_backend(
    name: str, dtype: Any, head_dim: int, platform: str | None = None, *, soft_cap: float | None = None
) -> str:
    """`name` with "auto" replaced by the backend for `platform` (default: jax's default backend)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "cudnn" and soft_cap is not None:
        raise ValueError(
            "attention=cudnn has no score soft-capping (attn_logit_softcapping of Gemma 2): use "
            "attention=auto or xla"
        )
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm") and soft_cap is None and cudnn_supports(dtype, head_dim):
        return "cudnn"
    return "xla"


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform of `mesh`'s devices; jax's default backend without a mesh. They differ when a
    CPU process compiles for a TPU topology (`jaxrlhf.plan`): the kernel must then be Mosaic, not
    Pallas interpret mode (which would lower the kernel to plain XLA ops on TPU)."""
    if mesh is None:
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def cudnn_supports(dtype: Any, head_dim: int) -> bool:
    """cuDNN flash attention: float16 / bfloat16 inputs, head dim a multiple of 8 up to 256."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and head_dim % 8 == 0 and head_dim <= 256


def xla_attention(
    q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *, scale: float,
    soft_cap: float | None = None,
) -> Array:
    """Softmax attention as two einsums, scores and softmax in float32 (transformers' numerics);
    with `soft_cap`, scores `cap * tanh(s / cap)` before masking (Gemma 2)."""
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxSxKxH.shape[2]
    dtype = q_BxTxNxH.dtype
    # Grouped-query attention without repeating K/V: query heads are grouped per key head.
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH.astype(dtype), preferred_element_type=jnp.float32
    ) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH.astype(dtype))
    return out.reshape(b, t, n, h)


def dot_product_attention(
    q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *, scale: float,
    implementation: str | None = "cudnn",
) -> Array:
    """`jax.nn.dot_product_attention` with the boolean mask; `implementation="cudnn"` is the fused
    GPU kernel ("xla" runs the same call anywhere, which is how CPU tests check the plumbing)."""
    if implementation == "cudnn" and not cudnn_supports(q_BxTxNxH.dtype, q_BxTxNxH.shape[-1]):
        raise ValueError(
            f"attention=cudnn needs float16/bfloat16 compute and a head dim that is a multiple of 8 "
            f"up to 256, got {q_BxTxNxH.dtype} and {q_BxTxNxH.shape[-1]}: set model.dtype=bfloat16 "
            "or model.attention=xla"
        )
    dtype = q_BxTxNxH.dtype
    mask_Bx1xTxS = _some_key_visible(mask_BxTxS)[:, None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype), mask=mask_Bx1xTxS, scale=scale,
        implementation=implementation,
    )


def _some_key_visible(mask_BxTxS: Array) -> Array:
    """The mask with each query that sees nothing given its first key (defined, unread outputs)."""
    blind_BxT = ~jnp.any(mask_BxTxS, axis=-1)
    first_S = jnp.arange(mask_BxTxS.shape[-1]) == 0
    return mask_BxTxS | (blind_BxT[:, :, None] & first_S)


def _block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_local(
    q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *, scale: float,
    soft_cap: float | None, interpret: bool,
) -> Array:
    """Splash attention on one device's shard: T and S padded to blocks of 128, one MQA kernel per
    key head (its G query heads), vmapped over key heads and over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, n, h = q_BxTxNxH.shape
    s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // kv
    t_pad, s_pad = -t % 128, -s % 128
    tp, sp = t + t_pad, s + s_pad
    mask_BxTxS = jnp.pad(mask_BxTxS, ((0, 0), (0, t_pad), (0, s_pad)))
    mask_BxTxS = _some_key_visible(mask_BxTxS)
    dtype = q_BxTxNxH.dtype
    q_BxKxGxTxH = jnp.pad(q_BxTxNxH * jnp.asarray(scale, dtype), ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    q_BxKxGxTxH = q_BxKxGxTxH.reshape(b, tp, kv, g, h).transpose(0, 2, 3, 1, 4)
    k_BxKxSxH = jnp.pad(k_BxSxKxH.astype(dtype), ((0, 0), (0, s_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_BxKxSxH = jnp.pad(v_BxSxKxH.astype(dtype), ((0, 0), (0, s_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    bq, bkv = _block(tp), _block(sp)
    sizes = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
    )

    def one_example(mask_TxS: Array, q_KxGxTxH: Array, k_KxSxH: Array, v_KxSxH: Array) -> Array:
        kernel = splash.make_splash_mqa_single_device(
            jnp.broadcast_to(mask_TxS, (g, tp, sp)), block_sizes=sizes, attn_logits_soft_cap=soft_cap,
            interpret=interpret,
        )
        # The mask info is built from a traced mask; its `is_dynamic_mask` flag must stay a Python
        # bool (jax 0.10 turns it into an array, which a jitted call cannot branch on).
        for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
            info = getattr(kernel, name)
            if info is not None:
                setattr(kernel, name, info._replace(is_dynamic_mask=True))
        return jax.vmap(kernel)(q_KxGxTxH, k_KxSxH, v_KxSxH)

    out_BxKxGxTxH = jax.vmap(one_example)(mask_BxTxS, q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]


def splash_attention(
    q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *, scale: float,
    mesh: Mesh | None = None, soft_cap: float | None = None, interpret: bool | None = None,
) -> Array:
    """The splash kernel per device: under `shard_map` over `mesh` (the batch split like the
    activations, heads over `tensor` when it divides the key heads), directly without a mesh."""
    if interpret is None:
        interpret = mesh_platform(mesh) != "tpu"
    local = functools.partial(_splash_local, scale=scale, soft_cap=soft_cap, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
    batch = batch_axes(mesh)
    if batch is not None and q_BxTxNxH.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = None  # a batch the mesh does not divide (a tiny eval batch): every device takes it
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and k_BxSxKxH.shape[2] % tensor == 0 else None
    qkv = P(batch, None, heads, None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None, None)), out_specs=qkv, check_vma=False
    )(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)


def attend(
    q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *, backend: str,
    scale: float, soft_cap: float | None = None, mesh: Mesh | None = None,
) -> Array:
    """Attention output `[B, T, N, H]` by `backend` (resolved: "xla", "splash" or "cudnn")."""
    if backend == "xla":
        return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale, soft_cap=soft_cap)
    if backend == "splash":
        return splash_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale, mesh=mesh, soft_cap=soft_cap
        )
    if backend == "cudnn":
        if soft_cap is not None:
            raise ValueError("attention=cudnn has no score soft-capping: use attention=xla or auto")
        return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}")
