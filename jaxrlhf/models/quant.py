"""The frozen base of a QLoRA run, stored quantized and dequantized on the fly (Dettmers et al. 2023,
arXiv:2305.14314).

Each decoder projection kernel `W [in, out]` is replaced by codes and scales:

* `int8`: `qkernel` int8 `[in, out]` and `qscale` float32 `[1, out]`, one absmax scale per output
  column: `W ~ qkernel * qscale / 127`.
* `nf4`: 4-bit NormalFloat codes, two per byte along `in` (`qkernel` uint8 `[in / 2, out]`), and
  one absmax per block of `b` consecutive inputs of a column (`qscale` float32 `[in / b, out]`,
  `b = 64` where `in` allows): `W ~ NF4[code] * absmax`. NF4's 16 levels are the quantiles of a
  standard normal, the values bitsandbytes uses.

The layer dequantizes its kernel right before the matmul (inside the jitted step, one layer at a
time), so the stored base costs 1 byte (int8) or about 0.56 bytes (nf4) per weight. Both arrays keep
the kernel's `[in, out]` orientation, so the kernel's partition rule shards them the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QUANTIZATIONS = ("none", "int8", "nf4")

NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip


class QuantizedParam(nnx.Param):
    """Codes or scales of a quantized frozen kernel (never trained)."""


def nf4_block(d_in: int) -> int:
    """Inputs per absmax block: 64 as in QLoRA, or the largest power of two <= 64 dividing `d_in`."""
    return next(b for b in (64, 32, 16, 8, 4, 2) if d_in % b == 0)


def quantize(w_IxO: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a kernel `[..., in, out]` (leading axes: stacked layers)."""
    w = w_IxO.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True)  # [..., 1, out]
        codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale) * 127.0)
        return jnp.clip(codes, -127, 127).astype(jnp.int8), scale
    if kind == "nf4":
        *lead, d_in, d_out = w.shape
        block = nf4_block(d_in)
        blocks = w.reshape(*lead, d_in // block, block, d_out)
        absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., in / b, out]
        normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
        codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
        codes = codes.reshape(*lead, d_in // 2, 2, d_out)
        packed = (codes[..., 0, :] << 4) | codes[..., 1, :]  # row 2i in the high nibble, 2i+1 low
        return packed, absmax
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS[1:])}, got {kind!r}")


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, dtype: Any) -> jax.Array:
    """The kernel `[..., in, out]` in `dtype` from `quantize`'s codes and scales."""
    if kind == "int8":
        return (codes.astype(jnp.float32) * (scales / 127.0)).astype(dtype)
    *lead, half, d_out = codes.shape
    d_in = 2 * half
    block = d_in // scales.shape[-2]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(*lead, d_in, d_out)
    values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    w = values.reshape(*lead, d_in // block, block, d_out) * scales[..., None, :]
    return w.reshape(*lead, d_in, d_out).astype(dtype)
