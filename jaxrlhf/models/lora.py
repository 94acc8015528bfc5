"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's linear layers.

A targeted `Linear` computes `y = x W + (x A) B * alpha / r` with `A [in, r]` and `B [r, out]`:
`A` is drawn like PEFT's (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and `B`
starts at zero, so the adapted model starts exactly at the base model. The adapter matrices are
`LoRAParam`s (a subclass of `nnx.Param`), stacked `[L, ...]` with the layers when they are scanned,
and named `lora_a` / `lora_b` beside the layer's `kernel`.

Why not qwix (the JAX LoRA library the issue suggests): qwix 0.1.8 adds its adapters by tracing a
call of the model and creating parameters where it meets a matmul; inside our `lax.scan` over
stacked layers that creation fails (`IndexError` in the scan), and scanned layers are the default on
accelerators. Owning the two matrices also makes the PEFT names, the stacked layout and "the base
with adapters switched off" (the DPO / PPO reference) direct.

LoRA dropout (`LoRASpec.dropout`) draws its masks from a PRNG key passed as a value: the forward pass
takes `dropout_key` (`CausalLM.__call__` / `hidden_states`; None, the default, is no dropout) and
hands each layer the key folded with the layer number, each adapter folds in its projection
(`dropout_input`). A train step whose objective calls the model itself binds the key to a copy of the
model instead: `model.with_lora_dropout(key)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# PEFT's module names, in the order PEFT lists them for llama-style decoders.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """A low-rank adapter matrix: the only decoder weights a LoRA run trains."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which linear layers get adapters, and their rank `r` and scale `alpha / r`."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA target_modules {unknown or '(none)'}: expected some of {', '.join(LORA_TARGETS)} "
                "or 'all-linear'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def build(
        cls, rank: int, alpha: float, target_modules: str | Sequence[str] = "all-linear", dropout: float = 0.0
    ) -> LoRASpec:
        """From PEFT-style settings: `target_modules` is a list of module names or "all-linear"."""
        if isinstance(target_modules, str):
            targets = LORA_TARGETS if target_modules == "all-linear" else (target_modules,)
        else:
            targets = tuple(t for t in LORA_TARGETS if t in set(target_modules))
            extra = sorted(set(target_modules) - set(LORA_TARGETS))
            targets = targets + tuple(extra)  # rejected by __post_init__ with the list of valid names
        return cls(rank=int(rank), alpha=float(alpha), targets=targets, dropout=float(dropout))


def init_adapters(
    rngs: nnx.Rngs, d_in: int, d_out: int, spec: LoRASpec, dtype: Any
) -> tuple[LoRAParam, LoRAParam]:
    """`A [in, r]` ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform, a = sqrt(5)) and `B = 0`."""
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(rngs.params(), (d_in, spec.rank), jnp.float32, -bound, bound)
    return LoRAParam(a.astype(dtype)), LoRAParam(jnp.zeros((spec.rank, d_out), dtype))


def dropout_input(x: Any, rate: float, key: Any, site: int) -> Any:
    """PEFT's `lora_dropout` on an adapter's input: `x * keep / (1 - rate)`, `keep ~ Bernoulli(1 - rate)`
    drawn from `key` (the decoder layer's dropout key) folded with `site` (the projection's index in
    `LORA_TARGETS`, so each projection draws its own mask); `x` unchanged when `key` is None (no
    dropout: sampling, scoring, evaluation) or `rate` is 0.

    The key is a value handed down the forward pass (`CausalLM.hidden_states(dropout_key=...)`, or
    the key a train step binds with `CausalLM.with_lora_dropout`), folded with the layer number by
    the decoder, so the masks are a function of (key, layer, projection) and equal scanned and
    unrolled."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def is_adapter(path: Sequence[Any]) -> bool:
    """A parameter path (`.../q_proj/lora_a`) that names an adapter matrix."""
    return any(str(k) in ("lora_a", "lora_b") for k in path)


def adapters_off(params: nnx.State) -> nnx.State:
    """`params` with every adapter matrix zeroed: the model then computes the base exactly (the
    DPO / PPO reference of a LoRA run, without a second copy of the base)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if is_adapter([getattr(k, "key", k) for k in path]) else x, params
    )


def trainable(head: str) -> Any:
    """The nnx filter of what a LoRA run trains: the adapters, and a score head's weights."""
    if head == "score":
        return nnx.Any(LoRAParam, nnx.PathContains("score"))
    return LoRAParam


def base_fingerprint(directory: str) -> str:
    """A short hash naming a base checkpoint: its `config.json`, and each safetensors file's size with
    its first and last MiB (the header lists every tensor's name, dtype, shape and offsets). Stored
    with a LoRA checkpoint so that resuming on another base fails instead of mixing weights."""
    import hashlib
    import os

    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(directory) if n == "config.json" or n.endswith(".safetensors"))
    for name in names:
        path = os.path.join(directory, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(size - (1 << 20), 1 << 20))
                digest.update(f.read())
    return digest.hexdigest()[:16]
