"""Per-device memory (and on TPU, estimated time and MFU) of the real steps at pod scale, compiled.

The library part lives in `jaxrlhf.plan` (also behind `jaxrlhf plan`); this script is its table for
docs/scaling.md: models by name, several meshes and remat policies per run, a HBM budget per chip.
`--platform tpu --topology v5p:4x4x4` compiles with the TPU compiler (libtpu, no TPU needed);
`--platform cpu` (the default) on fake CPU devices, memory only.

Builds models abstractly (`nnx.eval_shape`: no parameter is allocated) from a Hugging Face
`config.json` dict (Llama-3.1-8B / 70B shapes are written below), puts every parameter, optimizer
moment and batch array at the `NamedSharding` the trainer would give it, lowers and compiles the
project's own step functions on a mesh of N fake CPU devices and prints, per device:
arguments (parameters + optimizer state + batch), outputs, temporaries, aliased (donated) bytes,
and the peak estimate `argument + output + temp - alias`, next to the arithmetic of
docs/scaling.md, and a verdict against a per-chip HBM budget.

Steps (`--steps`, see `jaxrlhf.plan.steps`): sft, reward, dpo (precomputed reference), dpo_same_step,
ppo (update), score, generate (the PPO rollout sampler), grpo (update), grpo_generate.

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
    python bench/memory_plan.py --platform tpu --topology v5p:4x4x4 --model 8b --mesh data=4,fsdp=16 \\
        --steps sft,dpo,dpo_same_step,ppo,score,generate,grpo,grpo_generate

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
import sys
from typing import Any

from jaxrlhf.plan import planner
from jaxrlhf.plan.arithmetic import Dims, saved_per_token  # noqa: F401  (tests read them here)
from jaxrlhf.plan.models import LLAMA31_8B, hf_config
from jaxrlhf.plan.steps import PlanSpec
from jaxrlhf.plan.target import Target, cpu_target, set_host_devices, tpu_target

GB = 1e9  # decimal gigabytes, as HBM capacities are quoted
BUDGETS = {"v5p": 95.0, "v5e": 16.0, "v6e": 32.0, "h100": 80.0, "h200": 141.0}  # --platform cpu budgets
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")
STEPS = ("sft", "reward", "dpo", "dpo_same_step", "ppo", "score", "generate", "grpo", "grpo_generate")


def parse_mesh(text: str) -> dict[str, int]:
    """`fsdp=16,tensor=4` -> {"data": 1, "fsdp": 16, "tensor": 4} (`planner.parse_mesh`, for argparse)."""
    try:
        return planner.parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="8b",
                   help="8b, 70b, tiny (4 layers of the 8B), gemma-2-9b, gemma-2-27b, qwen3-30b-a3b, "
                   "or a config.json / model directory")  # fmt: skip
    p.add_argument("--layers", type=int, help="override num_hidden_layers (fast development runs)")
    p.add_argument("--vocab", type=int, help="override vocab_size")
    p.add_argument("--platform", choices=("cpu", "tpu"), default="cpu",
                   help="cpu: fake host devices (memory only); tpu: the TPU compiler")  # fmt: skip
    p.add_argument("--topology", help="--platform tpu: the slice, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8")
    p.add_argument("--devices", type=int, help="--platform cpu: fake CPU devices (default: largest mesh)")
    p.add_argument("--mesh", action="append", type=parse_mesh, help="e.g. fsdp=64 (repeatable)")
    p.add_argument("--remat", default="full", help=f"comma list of {', '.join(REMATS)}")
    p.add_argument("--steps", default="dpo,dpo_same_step,sft,ppo,score", help=f"comma list of {STEPS}")
    p.add_argument("--batch", type=int, default=64, help="sequences (DPO: pairs; GRPO: prompts) per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (DPO: one packed pair)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--target-len", type=int, help="DPO completion positions per row (default --seq)")
    p.add_argument("--prompt-len", type=int, help="PPO / GRPO / sampler prompt tokens (default --seq / 2)")
    p.add_argument("--ppo-minibatches", type=int, default=1, help="ppo.num_mini_batches (grpo too)")
    p.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument(
        "--frozen-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="model.frozen_dtype: DPO same-step reference, PPO reference and reward model",
    )
    p.add_argument("--chip", choices=tuple(BUDGETS),
                   help="--platform cpu: HBM budget (default: h200 at 8 devices, else v5p)")  # fmt: skip
    p.add_argument("--hbm", type=float, help="HBM budget in GB per device (overrides the chip's)")
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
    if args.platform == "tpu" and not args.topology:
        p.error("--platform tpu needs --topology, e.g. v5p:4x4x4")
    sizes = [math.prod(m.values()) for m in args.mesh]
    args.devices = args.devices or max(sizes)
    if args.platform == "cpu" and max(sizes) > args.devices:
        p.error(f"mesh of {max(sizes)} devices, but --devices {args.devices}")
    return args




def model_dict(args: argparse.Namespace) -> dict[str, Any]:
    hf = {**LLAMA31_8B, "num_hidden_layers": 4} if args.model == "tiny" else hf_config(args.model)
    if args.layers is not None:
        hf["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        hf["vocab_size"] = args.vocab
    return hf


def target_for(args: argparse.Namespace, mesh: dict[str, int]) -> Target:
    count = math.prod(mesh.values())
    if args.platform == "tpu":
        target = tpu_target(args.topology)
        return dataclasses.replace(target, devices=target.devices[:count]) if count < target.count else target
    return cpu_target(count)


def budget_gb(args: argparse.Namespace, target: Target) -> tuple[str, float]:
    if args.hbm is not None:
        return f"{args.hbm:g} GB", args.hbm
    if target.platform == "tpu":
        return target.chip.name, target.chip.hbm_gb
    chip = args.chip or ("h200" if target.count == 8 else "v5p")
    return chip, BUDGETS[chip]


def lora_tag(r: dict[str, Any]) -> str:
    if not r.get("lora_rank"):
        return ""
    return f" LoRA r={r['lora_rank']}" + (f" {r['quantize']}" if r.get("quantize", "none") != "none" else "")


def fmt_row(r: dict[str, Any]) -> str:
    g = lambda v: f"{v / GB:7.2f}"  # noqa: E731
    e = r["estimate"] or {"args": float("nan"), "total": float("nan")}  # LoRA / MoE rows: no arithmetic
    total_est = e["total"] + e.get("resident", 0.0)
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    speed = ""
    if r.get("step_s"):
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        speed = f" {r['step_s'] * 1e3:,.0f} | {r['tokens_per_s_per_chip']:,.0f} | {mfu} |"
    return (
        f"| {r['model']}{lora_tag(r)} | {r['step']} | {r['mesh']} | {r['remat']} | "
        f"{r['batch']}x{r['seq']}/{r['accum']} |"
        f"{g(r['argument'])} |{g(e['args'])} |{g(r['temp'])} |{g(r['output'])} |{g(r['alias'])} |"
        f"{g(r['peak'])} |{g(r['total'])} |{g(total_est)} | {r['compile_s']:.0f}s | "
        f"{r.get('budget', r['chip'])} {verdict} |{speed}"
    )


def header(tpu: bool) -> str:
    cols = ("| model | step | mesh | remat | batch x seq / accum | args GB | args est | temp GB | out GB | "
            "alias GB | peak GB | +resident GB | est. GB | compile | verdict |")  # fmt: skip
    rule = "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    if tpu:
        cols += " est. step ms | est. tokens/s/chip | est. MFU |"
        rule += "---:|---:|---:|"
    return f"{cols}\n{rule}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.platform == "cpu":  # before jax starts its backends (jax.devices() below)
        set_host_devices(args.devices)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    hf = model_dict(args)
    import jax

    where = args.topology if args.platform == "tpu" else f"{args.devices} fake CPU devices"
    say(f"# plan: {args.model}, {where}, jax {jax.__version__}; GB = 1e9 bytes per device"
        + ("; times and MFU are the TPU compiler's estimates" if args.platform == "tpu" else ""))  # fmt: skip
    rows: list[dict[str, Any]] = []
    say(header(args.platform == "tpu"))
    for mesh in args.mesh:
        target = target_for(args, mesh)
        budget = budget_gb(args, target)
        for step in args.steps:
            for remat in args.remat:
                accum = {"ppo": args.ppo_minibatches, "grpo": args.ppo_minibatches, "score": 1,
                         "generate": 1, "grpo_generate": 1}.get(step, args.grad_accum)  # fmt: skip
                spec = PlanSpec(
                    args.model, hf, step, mesh, remat=remat, batch=args.batch, seq=args.seq, accum=accum,
                    target_len=args.target_len, prompt_len=args.prompt_len, frozen_dtype=args.frozen_dtype,
                    scan=not args.no_scan, lora_rank=args.lora_rank, quantize=args.quantize,
                    num_generations=args.num_generations,
                )  # fmt: skip
                try:
                    row = planner.compile_plan(spec, target, hbm_gb=budget[1])
                    row["budget"] = budget[0]
                except Exception as e:  # e.g. a remat policy this backend cannot compile
                    say(f"| {args.model} | {step} | {planner.mesh_name(mesh)} | {remat} | failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]} |")  # fmt: skip
                    rows.append({"step": step, "mesh": planner.mesh_name(mesh), "remat": remat,
                                 "error": repr(e)})  # fmt: skip
                    continue
                rows.append(row)
                say(fmt_row(row))
                if not row["fits"] and not args.no_search:
                    found = planner.search(spec, target, log=say, hbm_gb=budget[1])
                    row["fits_with"] = None if found is None else {
                        k: found[k] for k in ("remat", "accum", "mesh", "frozen_dtype", "peak", "total")
                    }  # fmt: skip
                    if found is not None:
                        rows.append(found)
                    else:
                        say(f"  {step} on {planner.mesh_name(mesh)}: no searched setting fits {budget[0]}")
    notes = [
        "peak = argument + output + temp - alias (XLA's per-device memory analysis, "
        f"{'TPU' if args.platform == 'tpu' else 'CPU'} compiler)",
        "+resident: RL steps only, what the engine also keeps on the device outside that function "
        "(ppo: reference + reward model; score: the policy + Adam state; generate: all but the policy)",
        "the RL steps lower PPOEngine / GRPOEngine._update_fn, _score_fn and sampling._generate themselves "
        "(engines built with __new__, no __init__), with abstract inputs",
    ]
    if args.platform == "tpu":
        notes.append("est. step = max(compute, collectives): the compiler's cycle estimates with loop trip "
                     "counts (jaxrlhf.plan.hlo_cost) + splash kernels' FLOPs at peak; collectives: a ring")
    if not all(r.get("scanned", True) for r in rows) and not args.no_scan:
        notes.append("scan_layers was requested but the decoder did not stack the layers")
    for note in notes:
        say(f"- {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"argv": sys.argv, "notes": notes, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
