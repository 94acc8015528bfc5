"""Per-device memory of the real train steps at pod scale, from XLA's compiled memory analysis.

Builds models abstractly (`nnx.eval_shape`: no parameter is allocated) from a Hugging Face
`config.json` dict (Llama-3.1-8B / 70B shapes are written below), puts every parameter, optimizer
moment and batch array at the `NamedSharding` the trainer would give it, lowers and compiles the
project's own step functions on a mesh of N fake CPU devices and prints, per device:
arguments (parameters + optimizer state + batch), outputs, temporaries, aliased (donated) bytes,
and the peak estimate `argument + output + temp - alias`, next to the arithmetic of
docs/scaling.md, and a verdict against a per-chip HBM budget.

Steps (`--steps`):
  dpo            `make_train_step` + `DPOObjective`, precomputed reference log-probs (policy only)
  dpo_same_step  the same with a frozen reference in the state (`TrainState.ref_params`)
  sft            `make_train_step` + `SFTObjective`
  ppo            `PPOEngine._update_fn` (policy + critic, clipped losses, one jit), lowered as is
  score          `PPOEngine._score_fn`: the rollout scoring pass (reference, critic, reward model)
  generate       `jaxrlhf.generation.sampling._generate`: the KV-cache sampler of the rollout

The fake devices are XLA's host platform (`--xla_force_host_platform_device_count`), set here
before jax is imported. CPU compilation fuses and lays out differently from TPU/GPU: the numbers
are an estimate of the accelerator's, not a measurement of it (see docs/scaling.md).

    python bench/memory_plan.py --model 8b --mesh fsdp=64 --mesh fsdp=16,tensor=4
    python bench/memory_plan.py --model 8b --mesh fsdp=8 --steps dpo,dpo_same_step,sft,ppo,score,generate
    python bench/memory_plan.py --model 8b --mesh fsdp=64 --mesh fsdp=8 --steps dpo --remat full,none
    python bench/memory_plan.py --model 70b --devices 256 --mesh fsdp=64,tensor=4 --chip v5e
    python bench/memory_plan.py --model 70b --devices 256 --mesh fsdp=256 --batch 256 --chip v5e
    python bench/memory_plan.py --model tiny --layers 2 --vocab 16384 --mesh fsdp=8 --batch 8 \\
        --seq 256 --json /tmp/plan.json

Everything is placed by the library itself: parameters at `param_sharding`, Adam's moments at
`step.optimizer_state_shardings` (as `create_state` and `PPOEngine` create them), batch arrays at
`step.batch_sharding`, and each abstract model gets `activation_sharding(mesh)` as
`from_pretrained(mesh=...)` sets it. docs/scaling.md has the measured tables and the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

GB = 1e9  # decimal gigabytes, as HBM capacities are quoted

# Llama-3.1 config.json contents (the fields `from_hf_config` reads).
LLAMA31_8B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
LLAMA31_70B: dict[str, Any] = {
    **LLAMA31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
MODELS = {"8b": LLAMA31_8B, "70b": LLAMA31_70B, "tiny": {**LLAMA31_8B, "num_hidden_layers": 4}}

# HBM per chip in GB: TPU v5p 95, v5e 16, H200 141.
CHIPS = {"v5p": 95.0, "v5e": 16.0, "h200": 141.0}
STEPS = ("dpo", "dpo_same_step", "sft", "ppo", "score", "generate")
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")
# Most to least activation memory kept on the device; searched in this order when a configuration
# does not fit its chip (offload_dots keeps what full keeps on the device).
SEARCH_REMATS = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


# ---------------------------------------------------------------------------------------------
# Command line (parsed before jax is imported: the device count must be in XLA_FLAGS first)


def parse_mesh(text: str) -> dict[str, int]:
    """`fsdp=16,tensor=4` -> {"data": 1, "fsdp": 16, "tensor": 4}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad mesh {text!r}: expected e.g. fsdp=16,tensor=4")
        sizes[name.strip()] = int(value)
    return sizes


def mesh_name(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "single"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="8b", help="8b, 70b, tiny (4 layers of the 8B) or a config.json path")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (fast development runs)")
    p.add_argument("--vocab", type=int, help="override vocab_size")
    p.add_argument("--devices", type=int, help="fake CPU devices (default: the largest mesh)")
    p.add_argument("--mesh", action="append", type=parse_mesh, help="e.g. fsdp=64 (repeatable)")
    p.add_argument("--remat", default="full", help=f"comma list of {', '.join(REMATS)}")
    p.add_argument("--steps", default="dpo,dpo_same_step,sft,ppo,score", help=f"comma list of {STEPS}")
    p.add_argument("--batch", type=int, default=64, help="sequences (DPO: pairs) per optimizer step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (DPO: one packed pair)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--target-len", type=int, help="DPO completion positions per row (default --seq)")
    p.add_argument("--prompt-len", type=int, help="PPO prompt tokens (default --seq / 2)")
    p.add_argument("--ppo-minibatches", type=int, default=1, help="ppo.num_mini_batches")
    p.add_argument(
        "--frozen-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="model.frozen_dtype: DPO same-step reference, PPO reference and reward model",
    )
    p.add_argument("--chip", choices=tuple(CHIPS), help="HBM budget (default: h200 at 8 devices, else v5p)")
    p.add_argument("--hbm", type=float, help="HBM budget in GB per device (overrides --chip)")
    p.add_argument("--no-search", action="store_true", help="do not search for a setting that fits")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers (scan_layers=False)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on all seven projections; 0: off")
    p.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none", help="QLoRA base storage")
    p.add_argument("--json", help="write the rows (and the commands) as JSON here")
    args = p.parse_args(argv)
    args.mesh = args.mesh or [parse_mesh("fsdp=8")]
    args.remat = [r for r in args.remat.split(",") if r]
    args.steps = [s for s in args.steps.split(",") if s]
    for r in args.remat:
        if r not in REMATS:
            p.error(f"--remat {r!r}: expected one of {REMATS}")
    for s in args.steps:
        if s not in STEPS:
            p.error(f"--steps {s!r}: expected one of {STEPS}")
    sizes = [math.prod(m.values()) for m in args.mesh]
    args.devices = args.devices or max(sizes)
    if max(sizes) > args.devices:
        p.error(f"mesh of {max(sizes)} devices, but --devices {args.devices}")
    return args


def set_device_count(n: int) -> None:
    """Ask XLA for `n` host (CPU) devices; only effective before jax is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("set the device count before importing jax")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    set_device_count(parse_args().devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxrlhf.models.config import ModelConfig, from_hf_config  # noqa: E402
from jaxrlhf.models.decoder import CausalLM  # noqa: E402
from jaxrlhf.models.lora import LoRASpec  # noqa: E402
from jaxrlhf.models.lora import trainable as lora_trainable  # noqa: E402
from jaxrlhf.parallel import activation_sharding, is_stacked, make_mesh, param_sharding  # noqa: E402
from jaxrlhf.train.config import PPOConfig  # noqa: E402
from jaxrlhf.train.objectives import DPOObjective, SFTObjective  # noqa: E402
from jaxrlhf.train.step import (  # noqa: E402
    TrainState,
    batch_sharding,
    make_optimizer,
    make_schedule,
    make_train_step,
    optimizer_state_shardings,
    state_shardings,
)

# ---------------------------------------------------------------------------------------------
# Arithmetic (docs/scaling.md): bytes per device, no compiler involved


@dataclasses.dataclass(frozen=True)
class Dims:
    """The shape symbols of docs/scaling.md."""

    V: int  # vocabulary
    D: int  # hidden
    F: int  # MLP width
    L: int  # layers
    N: int  # query heads
    K: int  # key/value heads
    H: int  # head dim

    @classmethod
    def of(cls, cfg: ModelConfig) -> Dims:
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                   cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)  # fmt: skip

    @property
    def layer_params(self) -> int:
        """q, k, v, o, gate, up, down and the two norm scales of one decoder layer."""
        d, q, kv = self.D, self.N * self.H, self.K * self.H
        return d * q + 2 * d * kv + q * d + 3 * d * self.F + 2 * d

    def params(self, head: str = "lm") -> int:
        """P: embedding, layers, final norm, and an untied LM head `[D, V]` or a score head `[D, 1]`."""
        out = self.V if head == "lm" else 1
        return self.V * self.D + self.L * self.layer_params + self.D + self.D * out


def saved_per_token(d: Dims, remat: str, t_len: int, tp: int) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (bf16 activations, attention
    scores float32), under each remat policy; `tp` splits heads and the MLP width."""
    q, kv, f, n = d.N * d.H / tp, d.K * d.H / tp, d.F / tp, d.N / tp
    layer_input = 2 * d.D
    weight_dots = 2 * (q + 2 * kv) + 2 * d.D + 2 * 2 * f + 2 * d.D  # q,k,v  o  gate,up  down
    attention_dots = 4 * n * t_len + 2 * q  # QK^T scores (f32) and PV
    everything = (
        weight_dots + attention_dots
        + (2 + 4) * n * t_len  # softmax probabilities (bf16) and exponentials (f32)
        + 2 * (q + kv)  # rotated q, k
        + 2 * 2 * f  # activation, gate * up
        + 2 * 4 * d.D  # the two norms' float32 intermediates
    )  # fmt: skip
    if remat in ("full", "offload_dots"):  # offload_dots keeps its dots in host memory
        return layer_input
    if remat == "dots_with_no_batch_dims_saveable":
        return layer_input + weight_dots
    if remat == "dots_saveable":
        return layer_input + weight_dots + attention_dots
    return layer_input + everything


def estimate(
    d: Dims, step: str, mesh: dict[str, int], remat: str, batch: int, seq: int, accum: int,
    *, batch_bytes: float, prompt_len: int, minibatches: int, frozen_bytes: int = 4, chunk: int = 1024,
) -> dict[str, float]:  # fmt: skip
    """Per-device bytes by component, for one call of `step` under FSDP (docs/scaling.md).

    Assumes the step is partitioned as FSDP intends: activations split over the batch, each layer's
    weights all-gathered when used. `total` is the sum of the components; `resident` (PPO) is what
    the engine keeps on the device outside the compiled function."""
    tp = mesh["tensor"]
    shards = mesh["fsdp"] * tp  # parameters are split over fsdp x tensor, replicated over data
    rows = batch / (mesh["data"] * mesh["fsdp"])  # rows per device per step
    p_lm, p_score = d.params("lm"), d.params("score")
    # One layer's weights gathered (f32) and its gradient before the reduce-scatter; the LM head
    # `[D, V]` is gathered the same way (the head runs data-parallel), at another time: the larger.
    layer = 2 * 4 * max(d.layer_params, d.D * d.V) / tp
    # One chunk of f32 logits and their cotangent: token_logprobs_from_hidden takes chunk // B
    # positions of each of the B rows of the (micro-)batch, so a device holds its own rows' share.
    per_row = max(1, min(chunk // max(batch // accum, 1), seq))
    logits = 2 * 4 * rows / accum * per_row * d.V / tp
    working = saved_per_token(d, "none", seq, tp)  # one layer's forward values while it runs
    out: dict[str, float] = {"batch": batch_bytes}
    if step in ("dpo", "dpo_same_step", "sft"):
        out["params"] = 4 * p_lm / shards
        out["opt_state"] = 8 * p_lm / shards  # Adam mu, nu in float32
        if step == "dpo_same_step":
            out["reference"] = frozen_bytes * p_lm / shards
        # the float32 gradient, the accumulator (accum > 1) and the optimizer's update tree
        out["grads"] = (4 + 4 * (accum > 1) + 4) * p_lm / shards
        out["activations"] = rows / accum * seq * (d.L * saved_per_token(d, remat, seq, tp) + working)
        out["weights"], out["logits"] = layer, logits
    elif step == "ppo":
        p = p_lm + p_score
        out["params"], out["opt_state"], out["grads"] = 4 * p / shards, 8 * p / shards, 8 * p / shards
        # policy and critic both keep their activations until the joint backward pass
        tokens = rows / minibatches * seq
        out["activations"] = tokens * (2 * d.L * saved_per_token(d, remat, seq, tp) + working)
        out["weights"], out["logits"] = layer, logits
        out["resident"] = frozen_bytes * (p_lm + p_score) / shards  # reference and reward model
    elif step == "score":  # no gradients: one layer's values at a time
        out["params"] = (4 * p_score + frozen_bytes * (p_lm + p_score)) / shards  # critic, ref, reward
        out["activations"] = rows * seq * working
        out["weights"], out["logits"] = layer / 2, logits / 2
        out["resident"] = (4 * p_lm + 8 * (p_lm + p_score)) / shards  # the policy; Adam state
    elif step == "generate":
        out["params"] = 4 * p_lm / shards
        out["kv_cache"] = rows * 2 * d.L * seq * d.K * d.H / tp * 2  # k and v [B, P+N, K, H], bf16
        out["activations"] = rows * prompt_len * saved_per_token(d, "none", prompt_len, tp)  # prefill
        out["weights"], out["logits"] = layer / 2, 3 * 4 * rows * d.V / tp
        out["resident"] = (8 * p_lm + 12 * p_score + 2 * frozen_bytes * p_lm) / shards
    out["args"] = out["batch"] + sum(out.get(k, 0.0) for k in ("params", "opt_state", "reference"))
    out["total"] = sum(v for k, v in out.items() if k not in ("args", "resident"))
    return out


# ---------------------------------------------------------------------------------------------
# Abstract models, states and batches


def _plain(keypath: Any) -> tuple[Any, ...]:
    """A jax key path as plain keys (`layers`, 3, `kernel`), without the Variable's `value`."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        out.append(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return tuple(out)


def model_config(
    name: str, layers: int | None, vocab: int | None, remat: str, scan: bool, lora_rank: int = 0,
    quantize: str = "none",
) -> ModelConfig:
    if name in MODELS:
        hf = dict(MODELS[name])
    else:
        with open(name, encoding="utf-8") as f:
            hf = json.load(f)
    if layers is not None:
        hf["num_hidden_layers"] = layers
    if vocab is not None:
        hf["vocab_size"] = vocab
    lora = LoRASpec.build(lora_rank, 2.0 * lora_rank) if lora_rank else None
    return from_hf_config(hf, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat, scan_layers=scan,
                          lora=lora, quantize=quantize)  # fmt: skip


def abstract_params(
    cfg: ModelConfig, head: str, mesh: Mesh, dtype: Any = None, *, split_trainable: bool = False
) -> tuple[Any, ...]:
    """`(graphdef, params)`: the model's parameters as `ShapeDtypeStruct`s at their shardings. The
    graphdef carries `activation_sharding(mesh)`, as `from_pretrained(mesh=...)` sets it (an
    `nnx.eval_shape` model has None: the decoder would not pin its residual stream).
    `split_trainable` (LoRA): `(graphdef, adapters, frozen base)` as `create_state` splits them."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, head=head, rngs=nnx.Rngs(0)))
    model.activation_sharding = activation_sharding(mesh)
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


def sft_batch(mesh: Mesh, a: int, b: int, length: int) -> dict[str, Any]:
    """`collate_sequences`: `[A, B/A, T]` right-padded rows."""
    i32, f32 = jnp.int32, jnp.float32
    return {
        **{k: _rows(mesh, (a, b, length), i32, micro=True)
           for k in ("input_ids", "attention_mask", "positions")},
        "completion_mask": _rows(mesh, (a, b, length), f32, micro=True),
        "last_index": _rows(mesh, (a, b), i32, micro=True),
        "row_valid": _rows(mesh, (a, b), f32, micro=True),
    }  # fmt: skip


def nbytes(tree: Any, *, unsharded: bool = False) -> float:
    """Per-device bytes of a tree of sharded `ShapeDtypeStruct`s (`unsharded`: the whole arrays)."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None and not unsharded else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Lowering the project's step functions


@dataclasses.dataclass
class Plan:
    """One configuration to compile."""

    model: str
    step: str
    mesh: dict[str, int]
    remat: str
    batch: int
    seq: int
    accum: int = 1


def _lower_train(plan: Plan, cfg: ModelConfig, mesh: Mesh, args: argparse.Namespace) -> tuple[Any, dict]:
    schedule = make_schedule(1e-6, 1000, warmup_steps=10)
    optimizer = make_optimizer(schedule)
    lora = cfg.lora is not None
    graphdef, params, *frozen = abstract_params(cfg, "lm", mesh, split_trainable=lora)
    state = TrainState(
        step=_scalar(mesh, (), jnp.int32),
        params=params,
        opt_state=abstract_opt_state(optimizer, params),
        rng=_scalar(mesh, (2,), jnp.uint32),
        # model.frozen_dtype: the same-step reference may be stored narrower than the policy; with
        # LoRA the reference is the frozen base with the adapters off (no copy)
        ref_params=_cast(params, args.frozen_dtype) if plan.step == "dpo_same_step" and not lora else None,
        frozen=frozen[0] if lora else None,
        base_reference=lora and plan.step == "dpo_same_step",
    )
    a, b = plan.accum, plan.batch // plan.accum
    if plan.step == "sft":
        objective: Any = SFTObjective()
        batch = sft_batch(mesh, a, b, plan.seq)
    else:
        objective = DPOObjective()
        targets = args.target_len or plan.seq
        batch = dpo_batch(mesh, a, b, plan.seq, targets, precomputed=plan.step == "dpo")
    run = make_train_step(graphdef, objective, optimizer, schedule, state_shardings(state), mesh)
    parts = {
        "params": nbytes(params),
        "opt_state": nbytes(state.opt_state),
        "batch": nbytes(batch),
        "state_unsharded": nbytes((state.params, state.opt_state, state.ref_params), unsharded=True),
    }
    if state.frozen is not None:
        parts["frozen_base"] = nbytes(state.frozen)
    if state.ref_params is not None:
        parts["reference"] = nbytes(state.ref_params)
    return run.lower(state, batch), parts


def _engine(cfg: ModelConfig, mesh: Mesh, args: argparse.Namespace, minibatches: int) -> tuple[Any, dict]:
    """A `PPOEngine` with its compiled functions' inputs, built without `__init__` (which loads and
    allocates): the attributes `_update_fn` / `_score_fn` read, and abstract parameters."""
    from jaxrlhf.train.ppo import PPOEngine

    optimizer = make_optimizer(make_schedule(1e-6, 1000, warmup_steps=10))
    engine = PPOEngine.__new__(PPOEngine)
    engine.cfg = PPOConfig(num_mini_batches=minibatches)
    engine.optimizer, engine.mesh = optimizer, mesh
    engine.eos = np.asarray([128001, 128009][: 1 + (cfg.vocab_size > 128009)], np.int32)
    engine.policy_def, policy = abstract_params(cfg, "lm", mesh)
    engine.critic_def, critic = abstract_params(cfg, "score", mesh)
    frozen = jnp.dtype(args.frozen_dtype)
    engine.rm_def, rm = abstract_params(cfg, "score", mesh, frozen)
    _, ref = abstract_params(cfg, "lm", mesh, frozen)
    params = {"policy": policy, "critic": critic}
    return engine, {"params": params, "ref": ref, "rm": rm, "optimizer": optimizer}


def _lower_ppo(plan: Plan, cfg: ModelConfig, mesh: Mesh, args: argparse.Namespace) -> tuple[Any, dict]:
    from jaxrlhf.generation.sampling import Generation, _generate
    from jaxrlhf.train.ppo import PPOState, Rollout

    engine, m = _engine(cfg, mesh, args, plan.accum if plan.step == "ppo" else 1)
    b, length = plan.batch, plan.seq
    p = args.prompt_len or length // 2
    n = length - p
    i32, f32 = jnp.int32, jnp.float32
    row = lambda shape, dtype: _rows(mesh, shape, dtype, micro=False)  # noqa: E731
    ids, mask = row((b, length), i32), row((b, length), i32)
    opt_state = abstract_opt_state(m["optimizer"], m["params"])
    if plan.step == "ppo":
        state = PPOState(step=_scalar(mesh, (), i32), params=m["params"], opt_state=opt_state,
                         rng=_scalar(mesh, (2,), jnp.uint32))  # fmt: skip
        rollout = Rollout(
            ids, mask, row((b, length), i32), row((b, n), i32),
            *(row((b, n), f32) for _ in range(5)), row((b,), f32), row((b, n), f32), row((b, n), f32),
        )  # fmt: skip
        update = jax.jit(engine._update_fn, static_argnames=("prompt_len",), donate_argnums=(0,))
        parts = {"params": nbytes(m["params"]), "opt_state": nbytes(opt_state), "batch": nbytes(rollout),
                 "state_unsharded": nbytes((m["params"], opt_state), unsharded=True),
                 "resident": nbytes(m["ref"]) + nbytes(m["rm"])}  # fmt: skip
        return update.lower(state, rollout, {"policy": None, "critic": None}, prompt_len=p), parts
    if plan.step == "score":
        gen = Generation(row((b, n), i32), row((b, n), i32), row((b, n), f32), row((b, n), f32))
        score = jax.jit(engine._score_fn, static_argnames=("prompt_len",))
        inputs = (ids, mask, gen, None, _scalar(mesh, (), f32))
        # Without ppo.rescore_policy (the default) the policy is not read: its parameters stay
        # resident beside this function, with the Adam state.
        parts = {"params": nbytes(m["params"]["critic"]) + nbytes(m["ref"]) + nbytes(m["rm"]),
                 "batch": nbytes(inputs),
                 "resident": nbytes(opt_state) + nbytes(m["params"]["policy"])}  # fmt: skip
        lowered = score.lower(m["params"], {"policy": None, "critic": None}, m["ref"], m["rm"], *inputs,
                              prompt_len=p)  # fmt: skip
        return lowered, parts
    # generate: the rollout sampler on the policy (prompt P, N new tokens, KV cache [B, P+N])
    prompts, prompt_mask = row((b, p), i32), row((b, p), i32)
    lowered = _generate.lower(
        engine.policy_def, m["params"]["policy"], prompts, prompt_mask,
        _scalar(mesh, engine.eos.shape, i32), _scalar(mesh, (), i32), _scalar(mesh, (2,), jnp.uint32),
        max_new_tokens=n, temperature=1.0, top_k=0, top_p=1.0,
    )  # fmt: skip
    resident = nbytes(opt_state) + nbytes(m["params"]["critic"]) + nbytes(m["ref"]) + nbytes(m["rm"])
    parts = {"params": nbytes(m["params"]["policy"]), "batch": nbytes((prompts, prompt_mask)),
             "resident": resident}  # fmt: skip
    return lowered, parts


def compile_plan(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Lower and compile `plan`; its memory analysis, the arithmetic beside it, and wall times."""
    devices = jax.devices()[: math.prod(plan.mesh.values())]
    split = plan.mesh["data"] * plan.mesh["fsdp"] * (plan.accum if plan.step not in ("ppo",) else 1)
    if plan.batch % split:
        raise ValueError(f"--batch {plan.batch} does not split into {split} (data x fsdp x micro-batches)")
    mesh = make_mesh(plan.mesh["data"], plan.mesh["fsdp"], plan.mesh["tensor"], devices=devices)
    cfg = model_config(args.model, args.layers, args.vocab, plan.remat, not args.no_scan, args.lora_rank,
                       args.quantize)  # fmt: skip
    row: dict[str, Any] = {
        **dataclasses.asdict(plan),
        "mesh": mesh_name(plan.mesh),
        "devices": len(devices),
        "layers": cfg.num_layers,
        "vocab": cfg.vocab_size,
    }
    start = time.perf_counter()
    if plan.step in ("dpo", "dpo_same_step", "sft"):
        lowered, parts = _lower_train(plan, cfg, mesh, args)
    else:
        lowered, parts = _lower_ppo(plan, cfg, mesh, args)
    row["lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - start
    ma = compiled.memory_analysis()
    row.update({
        "argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
        "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes,
        "code": ma.generated_code_size_in_bytes, "host_temp": ma.host_temp_size_in_bytes,
    })  # fmt: skip
    row["peak"] = row["argument"] + row["output"] + row["temp"] - row["alias"]
    row["resident"] = parts.pop("resident", 0.0)
    row["total"] = row["peak"] + row["resident"]  # PPO: what else the engine keeps on the device
    row["inputs"] = parts  # per-device bytes of the inputs from their shardings (state_unsharded: whole)
    dims = Dims.of(cfg)
    prompt = args.prompt_len or plan.seq // 2
    row["lora_rank"], row["quantize"] = args.lora_rank, args.quantize
    row["estimate"] = None if cfg.lora is not None else estimate(
        dims, plan.step, plan.mesh, plan.remat, plan.batch, plan.seq, plan.accum,
        batch_bytes=parts["batch"], prompt_len=prompt,
        minibatches=plan.accum, frozen_bytes=jnp.dtype(args.frozen_dtype).itemsize,
    )  # fmt: skip
    row["scanned"] = layers_stacked(abstract_params(cfg, "lm", mesh)[1])
    return row


# ---------------------------------------------------------------------------------------------
# Report


def budget(args: argparse.Namespace, devices: int) -> tuple[str, float]:
    if args.hbm is not None:
        return f"{args.hbm:g} GB", args.hbm
    chip = args.chip or ("h200" if devices == 8 else "v5p")
    return chip, CHIPS[chip]


def lora_tag(r: dict[str, Any]) -> str:
    if not r.get("lora_rank"):
        return ""
    return f" LoRA r={r['lora_rank']}" + (f" {r['quantize']}" if r.get("quantize", "none") != "none" else "")


def fmt_row(r: dict[str, Any]) -> str:
    g = lambda v: f"{v / GB:7.2f}"  # noqa: E731
    e = r["estimate"] or {"args": float("nan"), "total": float("nan")}  # LoRA rows: no arithmetic
    total_est = e["total"] + e.get("resident", 0.0)
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    step = r["step"]
    return (
        f"| {r['model']}{lora_tag(r)} | {step} | {r['mesh']} | {r['remat']} | "
        f"{r['batch']}x{r['seq']}/{r['accum']} |"
        f"{g(r['argument'])} |{g(e['args'])} |{g(r['temp'])} |{g(r['output'])} |{g(r['alias'])} |"
        f"{g(r['peak'])} |{g(r['total'])} |{g(total_est)} | {r['compile_s']:.0f}s | "
        f"{r['chip']} {verdict} |"
    )


HEADER = (
    "| model | step | mesh | remat | batch x seq / accum | args GB | args est | temp GB | out GB | alias GB "
    "| peak GB | +resident GB | est. GB | compile | verdict |\n"
    "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def search(plan: Plan, args: argparse.Namespace, chip: str, hbm: float, log: Any) -> dict[str, Any] | None:
    """The first setting that fits: each lighter remat policy, then `full` with twice, four times, ...
    the micro-batches (down to one row per device per micro-batch). For PPO `accum` is
    `ppo.num_mini_batches`, which also means more optimizer steps per rollout."""
    lighter = SEARCH_REMATS[SEARCH_REMATS.index(plan.remat) + 1 :] if plan.remat in SEARCH_REMATS else ()
    candidates = [dataclasses.replace(plan, remat=r) for r in lighter]
    # Train steps: each micro-batch keeps at least one row per device. PPO minibatches are cut
    # inside the compiled update, so they may be smaller than the batch axis.
    rows_per_device = plan.batch // (plan.mesh["data"] * plan.mesh["fsdp"])
    limit = {"score": 0, "generate": 0, "ppo": plan.batch}.get(plan.step, rows_per_device)
    accum = plan.accum * 2
    while accum <= limit:
        candidates.append(dataclasses.replace(plan, remat="full", accum=accum))
        accum *= 2
    for candidate in candidates:
        try:
            row = compile_plan(candidate, args)
        except Exception as e:  # report it and try the next setting
            log(f"  {candidate.remat} x{candidate.accum}: failed ({type(e).__name__})")
            continue
        row["chip"], row["fits"], row["searched"] = chip, row["total"] <= hbm * GB, True
        log(fmt_row(row))
        if row["fits"]:
            return row
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"# memory plan: {args.model}, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"jax {jax.__version__}; GB = 1e9 bytes per device")  # fmt: skip
    rows: list[dict[str, Any]] = []
    say(HEADER)
    for mesh in args.mesh:
        for step in args.steps:
            for remat in args.remat:
                # `accum`: micro-batches (train steps) or ppo.num_mini_batches (ppo)
                accum = {"ppo": args.ppo_minibatches, "score": 1, "generate": 1}.get(step, args.grad_accum)
                plan = Plan(args.model, step, mesh, remat, args.batch, args.seq, accum)
                chip, hbm = budget(args, math.prod(mesh.values()))
                try:
                    row = compile_plan(plan, args)
                except Exception as e:  # e.g. a remat policy this backend cannot compile
                    say(f"| {args.model} | {step} | {mesh_name(mesh)} | {remat} | failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]} |")  # fmt: skip
                    rows.append({**dataclasses.asdict(plan), "mesh": mesh_name(mesh), "error": repr(e)})
                    continue
                row["chip"], row["fits"] = chip, row["total"] <= hbm * GB
                rows.append(row)
                say(fmt_row(row))
                if not row["fits"] and not args.no_search:
                    found = search(plan, args, chip, hbm, say)
                    row["fits_with"] = None if found is None else {
                        k: found[k] for k in ("remat", "accum", "peak", "total")
                    }  # fmt: skip
                    if found is not None:
                        rows.append(found)
                    else:
                        say(f"  {step} on {mesh_name(mesh)}: no searched setting fits {chip}")
    notes = [
        "peak = argument + output + temp - alias (XLA's per-device memory analysis, CPU backend)",
        "+resident: PPO only, what the engine also keeps on the device outside that function "
        "(update: reference + reward model; score: the policy + Adam state; generate: all but the policy)",
        "ppo/score/generate lower PPOEngine._update_fn / _score_fn and sampling._generate themselves "
        "(the engine built with __new__, no __init__), with abstract inputs",
    ]
    if not all(r.get("scanned", True) for r in rows) and not args.no_scan:
        notes.append("scan_layers was requested but the decoder did not stack the layers")
    for note in notes:
        say(f"- {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"argv": sys.argv, "notes": notes, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
