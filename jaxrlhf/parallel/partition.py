"""Device meshes and partition rules: which mesh axis each parameter dimension is split over.

Axes: `data` (pure data parallelism: parameters replicated), `fsdp` (parameters and batch both split:
ZeRO-3 style), `expert` (mixture-of-experts: each device group holds its share of the experts; outside
the experts it splits the batch like `data`), `tensor` (Megatron-style: attention heads and MLP width
split). Rules are
`(regex over the parameter path, PartitionSpec-like tuple)`; the first match wins. A mesh axis that is
absent, of size 1, or does not divide the dimension is dropped from that dimension, so one rule set
serves every mesh shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "tensor")

Rule = tuple[str, tuple[Any, ...]]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"experts/(gate_proj|up_proj)/kernel$", ("expert", "fsdp", "tensor")),  # [E, D, F]
    (r"experts/down_proj/kernel$", ("expert", "tensor", "fsdp")),  # [E, F, D]
    (r"router/kernel$", ("fsdp", None)),  # [D, E]
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"embed_positions/embedding$", (None, "fsdp")),  # [P, D]
    # kernel, or a quantized kernel's codes / scales (same [in, out] orientation; jaxrlhf.models.quant)
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/(kernel|qkernel|qscale)$", ("fsdp", "tensor")),  # [D, out]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", ("tensor",)),
    (r"(o_proj|down_proj)/(kernel|qkernel|qscale)$", ("tensor", "fsdp")),  # [in, D]
    (r"lm_head/kernel$", ("fsdp", "tensor")),  # [D, V]
    (r"score/kernel$", ("fsdp", None)),  # [D, 1]
    (r".*", ()),  # norms, biases of D-sized outputs: replicated
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, expert: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `(data, fsdp, expert, tensor)` mesh over all devices of all hosts; one size may be -1
    ("the rest")."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, expert, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} expert={expert} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into axes {dict(zip(AXES, sizes, strict=True))}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def is_stacked(path: Sequence[Any]) -> bool:
    """A scanned model's stacked layer parameter (`layers/self_attn/...`, leading `[L]` axis), as
    opposed to one layer's (`layers/3/self_attn/...`)."""
    parts = [str(p) for p in path]
    return any(p == "layers" and not q.isdigit() for p, q in zip(parts, parts[1:], strict=False))


def partition_spec(
    path: Sequence[Any], shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of one parameter under `rules`, reduced to what `mesh` and `shape` allow.

    The rules describe one layer; a stacked `[L, ...]` parameter keeps its layer axis whole (each
    device holds its shard of every layer, which is what a scan over layers reads)."""
    if is_stacked(path):
        return PartitionSpec(None, *_rule_spec(path_str(path), shape[1:], mesh, rules))
    return _rule_spec(path_str(path), shape, mesh, rules)


def _rule_spec(name: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule]) -> PartitionSpec:
    spec = next((spec for pattern, spec in rules if re.search(pattern, name)), ())
    axes: list[Any] = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        size = mesh.shape.get(axis, 1) if axis is not None else 1
        axes.append(axis if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*axes)


BATCH_AXES = ("data", "fsdp", "expert")


def batch_axes(mesh: Mesh) -> tuple[str, ...] | None:
    """The mesh axes a batch dimension is split over: `data`, `fsdp` and `expert` where larger than 1."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1) or None


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """Activations `[B, T, D]`: the batch split over (`data`, `fsdp`, `expert`), the rest whole."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), None, None))


def param_sharding(
    path: Sequence[Any], shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


def host_array(x: jax.Array) -> np.ndarray:
    """The whole (global) value of `x` as numpy on this host. When `x` spans several processes this
    is an all-gather: every process must call it."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
