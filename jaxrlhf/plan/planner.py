"""Compile one run shape for a target and read what the compiler says: memory, time, FLOPs, collectives.

`compile_plan(spec, target)` lowers the project's step (`steps.lower`) on a mesh over the target's
devices, compiles it, and returns a row of plain numbers:

* memory (per device, bytes): XLA's `memory_analysis()` -- arguments, outputs, temporaries, donated
  (aliased) bytes, `peak = argument + output + temp - alias` -- plus what an RL engine keeps resident
  beside the step, next to the arithmetic of docs/scaling.md (`arithmetic.estimate`);
* cost (TPU): `hlo_cost.analyze` of the optimized HLO -- the compiler's cycle estimates and the dot
  FLOPs with every loop counted by its trip count -- the collectives' bytes by kind, and from them the
  estimated step time, tokens/s per chip and MFU (model FLOPs / (time x chip peak)).

Every time and MFU is the TPU compiler's estimate, never a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.parallel import make_mesh
from jaxrlhf.plan.arithmetic import Dims, attention_flops, estimate, model_flops
from jaxrlhf.plan.hlo_cost import analyze
from jaxrlhf.plan.shapes import abstract_params, layers_stacked, model_config
from jaxrlhf.plan.steps import PlanSpec, lower
from jaxrlhf.plan.target import GB, Target

# Most to least activation memory kept on the device; searched in this order when a configuration
# does not fit its chip (offload_dots keeps what full keeps on the device).
SEARCH_REMATS = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


def mesh_name(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "single"


def parse_mesh(text: str) -> dict[str, int]:
    """`fsdp=16,tensor=4` -> {"data": 1, "fsdp": 16, "tensor": 4}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit():
            raise ValueError(f"bad mesh {text!r}: expected e.g. fsdp=16,tensor=4")
        sizes[name.strip()] = int(value)
    return sizes


def check(spec: PlanSpec, target: Target) -> None:
    """The shape errors a user can make, named before anything is compiled."""
    devices = math.prod(spec.mesh.values())
    if devices != target.count:
        raise ValueError(f"mesh {mesh_name(spec.mesh)}: {devices} devices; {target.name}: {target.count}")
    split = spec.mesh["data"] * spec.mesh["fsdp"] * (spec.accum if spec.step not in ("ppo", "grpo") else 1)
    if spec.batch % split:
        raise ValueError(f"batch {spec.batch} does not split into {split} (data x fsdp x micro-batches)")


@contextlib.contextmanager
def _no_compilation_cache() -> Iterator[None]:
    """A plan's executables are for another machine: jax's persistent cache (when on) cannot load
    them back here, and would fill with them."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def compile_plan(spec: PlanSpec, target: Target, *, hbm_gb: float | None = None) -> dict[str, Any]:
    """Lower and compile `spec` for `target`: memory, the compiler's cost, the arithmetic beside them.
    `hbm_gb`: the memory budget per device for the verdict (default: the target chip's HBM)."""
    check(spec, target)
    m = spec.mesh
    mesh = make_mesh(m["data"], m["fsdp"], m["tensor"], devices=target.devices)
    cfg = model_config(spec.hf, remat=spec.remat, scan=spec.scan, attention=spec.attention,
                       platform=target.platform, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                       quantize=spec.quantize, dtype=spec.dtype, param_dtype=spec.param_dtype)  # fmt: skip
    row: dict[str, Any] = {
        **{k: v for k, v in dataclasses.asdict(spec).items() if k != "hf"},
        "mesh": mesh_name(m), "mesh_sizes": dict(m), "target": target.name, "platform": target.platform,
        "chip": target.chip.name, "devices": target.count, "layers": cfg.num_layers, "vocab": cfg.vocab_size,
        "attention_backend": cfg.attention,
    }  # fmt: skip
    start = time.perf_counter()
    try:
        lowered, parts = lower(spec, cfg, mesh)
    except RuntimeError as e:
        if "cuDNN not found" not in str(e) or cfg.attention != "cudnn":
            raise
        # jax checks cuDNN's version when it lowers the fused attention, and a machine without a GPU
        # has no cuDNN library: plan with XLA's attention (more temporary memory, not less), say so
        cfg = cfg.replace(attention="xla")
        lowered, parts = lower(spec, cfg, mesh)
        row["attention_backend"] = "xla"
        row["attention_note"] = "cudnn needs the cuDNN library to compile: planned with xla attention"
    row["lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = None
    try:
        with _no_compilation_cache():
            compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program that cannot fit its HBM: that is a verdict
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        row.update(out_of_memory(str(e), parts))
    row["compile_s"] = time.perf_counter() - start
    if compiled is not None:
        ma = compiled.memory_analysis()
        row.update({
            "argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
            "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes,
            "code": ma.generated_code_size_in_bytes, "host_temp": ma.host_temp_size_in_bytes,
        })  # fmt: skip
    row["peak"] = row["argument"] + row["output"] + row["temp"] - row["alias"]
    row["resident"] = parts.pop("resident", 0.0)
    row["total"] = row["peak"] + row["resident"]  # RL engines: what else stays on the device
    row["inputs"] = parts
    row["hbm"] = (target.chip.hbm_gb if hbm_gb is None else hbm_gb) * GB
    row["fits"] = row["total"] <= row["hbm"] and compiled is not None
    dims = Dims.of(cfg)
    dense = cfg.lora is None and not cfg.num_experts
    row["estimate"] = None if not dense or spec.step in ("reward", "grpo", "grpo_generate") else estimate(
        dims, spec.step, m, spec.remat, spec.batch, spec.seq, spec.accum, batch_bytes=parts["batch"],
        prompt_len=spec.prompt, minibatches=spec.accum, frozen_bytes=jnp.dtype(spec.frozen_dtype).itemsize,
    )  # fmt: skip
    row["scanned"] = layers_stacked(abstract_params(cfg, "lm", mesh)[1])
    if cfg.num_experts and cfg.lora is None:
        # model FLOPs count what a token uses: its top-k experts' MLPs (3 D x moe_width each) and
        # the router (D x E), written as an MLP width so that the dense formulas apply
        active = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.num_experts / 3
        dims = dataclasses.replace(dims, F=active)
    if compiled is not None:
        row.update(cost_row(spec, target, compiled, dims, cfg.lora is None, parts["params"]))
    return row


def out_of_memory(message: str, parts: dict[str, float]) -> dict[str, Any]:
    """The row of a step the TPU compiler refused for its HBM ("Ran out of memory on HBM, the total
    memory required for HLO temporaries (297.47G) exceeds available HBM (15.75G)"): the inputs'
    bytes from their shardings, the temporaries the compiler asked for (G: GiB), no cost."""
    needed = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", message)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temp = float(needed.group(1)) * scale[needed.group(2)] if needed else float("nan")
    args = sum(v for k, v in parts.items() if k not in ("state_unsharded", "resident"))
    first = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    return {"argument": args, "output": 0.0, "temp": temp, "alias": 0.0, "code": 0, "host_temp": 0,
            "oom": first.strip()[:300]}  # fmt: skip


def cost_row(
    spec: PlanSpec, target: Target, compiled: Any, dims: Dims, dense: bool, params_bytes: float
) -> dict[str, Any]:
    """FLOPs, the compiler's time estimate, collectives and MFU of a compiled step (TPU)."""
    cost = analyze(compiled.as_text(), target.count)
    raw = compiled.cost_analysis() or {}
    raw = raw[0] if isinstance(raw, list | tuple) else raw
    chip = target.chip
    out: dict[str, Any] = {
        "flops": cost.flops,  # per device, loops counted
        "flops_loops_once": cost.flops_once,
        "loops": cost.loops,
        "unknown_loops": cost.unknown_loops,
        "collective_bytes": cost.collective_bytes,
        "collective_traffic": cost.collective_traffic,
        "xla_cost_analysis": {k: raw[k] for k in ("flops", "bytes accessed", "optimal_seconds") if k in raw},
    }
    if target.platform != "tpu":
        return out
    compute_s = cost.compute_seconds(chip.clock_hz)
    # Mosaic kernels (splash) have no cycle estimate: their FLOPs at the chip's peak (a lower bound)
    tokens = spec.rows * (spec.prompt if spec.step.endswith("generate") else spec.seq)
    kernel_s = 0.0
    if cost.kernel_calls and dense:
        kernel_flops = attention_flops(dims, spec.step, tokens, spec.seq, spec.remat) / target.count
        kernel_s = kernel_flops / chip.bf16_flops
    compute_s += kernel_s
    # each device's share of the collectives over one bidirectional ring (a torus axis): 2 links
    ici_s = sum(cost.collective_traffic.values()) / (2 * chip.link_bandwidth)
    step_s = max(compute_s, ici_s)  # collectives overlapped with compute (XLA's async collectives)
    sampler = spec.step.endswith("generate")
    generated = spec.rows * (spec.seq - spec.prompt) if sampler else 0.0
    model_tokens = tokens
    if spec.step == "grpo":  # one packed row per prompt (grpo.pack_groups): the prompt once
        model_tokens = spec.batch * (spec.prompt + spec.num_generations * (spec.seq - spec.prompt))
    model = model_flops(dims, spec.step, model_tokens, spec.seq, generated=generated) if dense else None
    if model is not None and spec.step in ("ppo", "grpo"):  # every pass over the rollout trains
        model *= spec.passes
    if sampler:  # decode is memory-bound: each new token reads the weights and the KV cache once
        steps = spec.seq - spec.prompt
        m = spec.mesh  # per cached token: k and v of every layer, bf16, this device's rows and heads
        kv = 2 * dims.L * spec.rows / (m["data"] * m["fsdp"]) * dims.K / m["tensor"] * dims.H * 2
        read = steps * (params_bytes + kv * (spec.prompt + steps / 2))  # the cache half full on average
        out["hbm_floor_s"] = read / chip.hbm_bandwidth
    out.update({
        "compute_s": compute_s,
        "kernel_s": kernel_s,
        "kernel_calls": cost.kernel_calls,
        "ici_s": ici_s,
        "step_s": step_s,
        "model_flops": model,  # all devices, no recompute
        "mfu": None if model is None or step_s <= 0 else model / target.count / (step_s * chip.bf16_flops),
        "hfu": cost.flops / (step_s * chip.bf16_flops) if step_s > 0 else None,  # recompute counted
        "tokens_per_s_per_chip": (generated or tokens) / step_s / target.count if step_s > 0 else None,
    })  # fmt: skip
    return out


def candidates(spec: PlanSpec, target: Target) -> list[PlanSpec]:
    """Settings near `spec` that use less memory per device, nearest first: lighter remat policies,
    then `full` with 2x, 4x, ... micro-batches (PPO / GRPO: minibatches), a narrower frozen dtype,
    and the same devices split fsdp x tensor."""
    out: list[PlanSpec] = []
    if spec.remat in SEARCH_REMATS:
        lighter = SEARCH_REMATS[SEARCH_REMATS.index(spec.remat) + 1 :]
        out += [dataclasses.replace(spec, remat=r) for r in lighter]
    if spec.step not in ("score", "generate", "grpo_generate"):
        rows = spec.batch // (spec.mesh["data"] * spec.mesh["fsdp"])
        limit = spec.batch if spec.step in ("ppo", "grpo") else rows * spec.accum
        accum = spec.accum * 2
        while accum <= limit and len(out) < 8:
            out.append(dataclasses.replace(spec, remat="full", accum=accum))
            accum *= 2
    frozen_steps = ("dpo_same_step", "ppo", "score", "generate")
    if spec.frozen_dtype == "float32" and spec.step in frozen_steps:
        out.append(dataclasses.replace(spec, frozen_dtype="bfloat16"))
    heads = spec.hf.get("num_key_value_heads", spec.hf.get("num_attention_heads", 1))
    split = spec.mesh["fsdp"] * spec.mesh["tensor"]
    for tp in (2, 4, 8):
        if tp > spec.mesh["tensor"] and heads % tp == 0 and split % tp == 0:
            out.append(dataclasses.replace(spec, mesh={**spec.mesh, "fsdp": split // tp, "tensor": tp}))
    return [c for c in out if _valid(c, target)]


def _valid(spec: PlanSpec, target: Target) -> bool:
    try:
        check(spec, target)
    except ValueError:
        return False
    return True


def search(
    spec: PlanSpec, target: Target, *, limit: int = 6, log: Any = None, hbm_gb: float | None = None
) -> dict[str, Any] | None:
    """The first of `candidates(spec)` that fits the chip's HBM, or `hbm_gb` (at most `limit` compiles)."""
    for candidate in candidates(spec, target)[:limit]:
        try:
            row = compile_plan(candidate, target, hbm_gb=hbm_gb)
        except Exception as e:  # report it and try the next setting
            if log:
                log(f"  {describe(candidate)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        row["searched"] = True
        if log:
            log(f"  {describe(candidate)}: {row['total'] / GB:.2f} GB" + (" fits" if row["fits"] else ""))
        if row["fits"]:
            return row
    return None


def describe(spec: PlanSpec) -> str:
    """The settings that differ between candidates, as a user would write them."""
    return (f"mesh {mesh_name(spec.mesh)}, remat {spec.remat}, micro-batches {spec.accum}, "
            f"frozen_dtype {spec.frozen_dtype}")  # fmt: skip
