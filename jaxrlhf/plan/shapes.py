"""Abstract models, optimizer states and batches at the shardings the trainers give them.

Nothing is allocated: parameters are `jax.ShapeDtypeStruct`s from `nnx.eval_shape`, each placed at
`param_sharding`; Adam's moments at `step.optimizer_state_shardings` (as `create_state` and the RL
engines create them); batch arrays at `step.batch_sharding` (as `common.to_global` places them).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.models.config import ModelConfig, from_hf_config
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.lora import LoRASpec
from jaxrlhf.models.lora import trainable as lora_trainable
from jaxrlhf.parallel import activation_sharding, is_stacked, param_sharding
from jaxrlhf.train.step import batch_sharding, optimizer_state_shardings


def _plain(keypath: Any) -> tuple[Any, ...]:
    """A jax key path as plain keys (`layers`, 3, `kernel`), without the Variable's `value`."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        out.append(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return tuple(out)


def model_config(
    hf: dict[str, Any], *, remat: str, scan: bool, attention: str = "auto", platform: str | None = None,
    lora_rank: int = 0, lora_alpha: float | None = None, quantize: str = "none",
    moe_dispatch: str = "auto", dtype: str = "bfloat16", param_dtype: str = "float32",
) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` dict as a trainer would build it (by default
    bf16 compute, float32 master weights); "auto" attention and MoE dispatch resolved for `platform`
    (the plan's target, not this process's backend)."""
    lora = LoRASpec.build(lora_rank, lora_alpha or 2.0 * lora_rank) if lora_rank else None
    cfg = from_hf_config(
        hf, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat, scan_layers=scan,
        lora=lora, quantize=quantize, attention=attention, moe_dispatch=moe_dispatch,
    )
    return cfg.for_platform(platform or jax.default_backend())


def abstract_params(
    cfg: ModelConfig, head: str, mesh: Mesh, dtype: Any = None, *, split_trainable: bool = False
) -> tuple[Any, ...]:
    """`(graphdef, params)`: the model's parameters as `ShapeDtypeStruct`s at their shardings. The
    graphdef carries `activation_sharding(mesh)`, as `from_pretrained(mesh=...)` sets it (an
    `nnx.eval_shape` model has None: the decoder would not pin its residual stream).
    `split_trainable` (LoRA): `(graphdef, adapters, frozen base)` as `create_state` splits them."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, head=head, rngs=nnx.Rngs(0)))
    model.activation_sharding = activation_sharding(mesh)
    model.set_mesh(mesh)  # splash runs per device under shard_map, compiled for the mesh's platform
    if split_trainable:
        graphdef, *states = nnx.split(model, lora_trainable(head), nnx.Param)
    else:
        graphdef, *states = nnx.split(model, nnx.Param)

    def place(keypath: Any, x: Any) -> jax.ShapeDtypeStruct:
        sharding = param_sharding(_plain(keypath), x.shape, mesh)
        keep = dtype is None or not jnp.issubdtype(x.dtype, jnp.floating)  # quantized codes stay ints
        return jax.ShapeDtypeStruct(x.shape, x.dtype if keep else dtype, sharding=sharding)

    return (graphdef, *(jax.tree_util.tree_map_with_path(place, s) for s in states))


def layers_stacked(params: Any) -> bool:
    """Did the decoder stack its layers `[L, ...]` (scan_layers)?"""
    return any(is_stacked(_plain(kp)) for kp, _ in jax.tree_util.tree_leaves_with_path(params))


def abstract_opt_state(optimizer: Any, params: Any) -> Any:
    """`optimizer.init(params)` as `ShapeDtypeStruct`s at `step.optimizer_state_shardings`: each moment
    at its parameter's sharding, counts replicated (what `create_state` / `PPOEngine` create)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    shardings = optimizer_state_shardings(optimizer, params, mesh)
    shapes = jax.eval_shape(optimizer.init, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding), tree)


def _scalar(mesh: Mesh, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype: Any, *, micro: bool) -> jax.ShapeDtypeStruct:
    """A batch array split over (data, fsdp) on its row axis, as `common.to_global` places it."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), micro_axis=micro))


def dpo_batch(mesh: Mesh, a: int, b: int, length: int, targets: int, *, precomputed: bool) -> dict[str, Any]:
    """`collate_pairs` + `add_targets` (+ `ref_*`): `[A, B/A, L]` packed rows, `[A, B/A, Lc]` targets."""
    i32, f32 = jnp.int32, jnp.float32
    rows = {
        **{k: _rows(mesh, (a, b, length), i32, micro=True)
           for k in ("input_ids", "positions", "segment_ids", "prev_index")},
        **{k: _rows(mesh, (a, b, length), f32, micro=True) for k in ("chosen_mask", "rejected_mask")},
        **{k: _rows(mesh, (a, b), f32, micro=True) for k in ("row_valid", "margin")},
        "target_index": _rows(mesh, (a, b, targets), i32, micro=True),
        **{k: _rows(mesh, (a, b, targets), f32, micro=True) for k in ("target_chosen", "target_rejected")},
    }  # fmt: skip
    if precomputed:
        rows.update({k: _rows(mesh, (a, b), f32, micro=True) for k in ("ref_chosen", "ref_rejected")})
    return rows


def group_batch(mesh: Mesh, a: int, b: int, length: int, slots: int, comparisons: int) -> dict[str, Any]:
    """`collate_groups`: `[A, B/A, L]` rows of a prompt and its `slots` completions, `[A, B/A, M]`
    comparisons (the grouped reward model, `reward.group_by_prompt`)."""
    i32, f32 = jnp.int32, jnp.float32
    return {
        **{k: _rows(mesh, (a, b, length), i32, micro=True)
           for k in ("input_ids", "positions", "segment_ids")},
        "completion_valid": _rows(mesh, (a, b, slots), f32, micro=True),
        **{k: _rows(mesh, (a, b, comparisons), i32, micro=True) for k in ("winner", "loser")},
        **{k: _rows(mesh, (a, b, comparisons), f32, micro=True) for k in ("comparison_weight", "margin")},
        "row_valid": _rows(mesh, (a, b), f32, micro=True),
    }  # fmt: skip


def sft_batch(mesh: Mesh, a: int, b: int, length: int) -> dict[str, Any]:
    """`collate_sft`: `[A, B/A, T]` rows of one or more sequences (segment ids)."""
    i32, f32 = jnp.int32, jnp.float32
    return {
        **{k: _rows(mesh, (a, b, length), i32, micro=True)
           for k in ("input_ids", "positions", "segment_ids")},
        "loss_mask": _rows(mesh, (a, b, length), f32, micro=True),
        "row_valid": _rows(mesh, (a, b), f32, micro=True),
    }  # fmt: skip


def nbytes(tree: Any, *, unsharded: bool = False) -> float:
    """Per-device bytes of a tree of sharded `ShapeDtypeStruct`s (`unsharded`: the whole arrays)."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None and not unsharded else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total

