"""`jaxrlhf plan`: a user's run config compiled for a pod slice, before they rent it.

The run's config (the YAML `jaxrlhf train` takes, with the same overrides) gives the model's
`config.json`, LoRA / QLoRA, batch, sequence lengths, mesh, remat, scan and dtypes; `plan_run` turns it
into the steps that run would compile (`specs_from_config`), compiles each for the topology on shapes
alone (no TPU, no weights) and reports whether it fits each chip's HBM, the memory by part, the
compiler's estimated step time and MFU, and when it does not fit, the nearest settings that do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from jaxrlhf.plan.steps import PlanSpec
from jaxrlhf.plan.target import GB, PlanError, Target
from jaxrlhf.train.algorithms import algorithm_for


# the steps a run of each kind compiles
def model_config_json(path: str) -> dict[str, Any]:
    """`config.json` of `model.path`: a known name (`llama-3.1-8b`, ...), a local model directory or
    file, "demo", or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    from jaxrlhf.plan.models import ALIASES, MODELS, hf_config

    if path.lower() in MODELS or path.lower() in ALIASES or os.path.exists(path):
        return hf_config(path)
    if path == "demo":
        from jaxrlhf.models.demo import demo_model_path

        return hf_config(demo_model_path())
    try:
        from huggingface_hub import hf_hub_download

        return hf_config(hf_hub_download(path, "config.json", local_files_only=True))
    except Exception:
        raise PlanError(
            f"model.path {path!r}: no such directory, known model name ({', '.join(MODELS)}) or hub id in "
            "the local Hugging Face cache"
        ) from None


def mesh_sizes(data: int, fsdp: int, tensor: int, devices: int) -> dict[str, int]:
    """The config's mesh with its one -1 ("the rest") resolved against the target's device count."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            if devices % known:
                raise PlanError(f"mesh {sizes}: {devices} devices do not split into {known}")
            sizes[k] = devices // known
    if math.prod(sizes.values()) != devices:
        raise PlanError(
            f"mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} has "
            f"{math.prod(sizes.values())} devices; the slice has {devices} (set one axis to -1)"
        )
    return sizes


def specs_from_config(cfg: Any, target: Target, hf: dict[str, Any]) -> list[PlanSpec]:
    """The steps a `jaxrlhf train` run of `cfg` (an `ExperimentConfig`) compiles, as `PlanSpec`s."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if cfg.mesh.expert != 1:
        raise PlanError("mesh.expert > 1 is not planned yet: set mesh.expert=1 (experts then follow fsdp)")
    remat = m.remat
    remat = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    scan = True if m.scan_layers == "auto" else bool(m.scan_layers)  # auto: on for TPU / GPU
    if remat == "auto":
        remat = "dots_saveable" if scan else "none"
    completion = d.max_length - d.max_prompt_length
    base = PlanSpec(
        model=m.path, hf=hf, step="",
        mesh=mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, target.count),
        remat=remat, batch=t.batch_size, seq=d.max_length, accum=t.grad_accum_steps,
        frozen_dtype=m.frozen_dtype or m.param_dtype, scan=scan, lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha, quantize=cfg.lora.quantize_base, attention=m.attention, dtype=m.dtype,
        param_dtype=m.param_dtype,
    )  # fmt: skip
    specs = []
    algorithm = algorithm_for(cfg)  # the method says which steps its run compiles
    if not algorithm.plan_steps():
        raise PlanError(f"kind {algorithm.name} is not planned yet")
    for step in algorithm.plan_steps():
        spec = dataclasses.replace(base, step=step)
        if step == "reward" and cfg.reward.group_by_prompt:  # one row per prompt: all its completions
            spec.slots, spec.comparisons = data_group_shape(d)
            spec.seq = d.max_prompt_length + spec.slots * completion
        elif step in ("dpo_same_step", "dpo", "reward"):  # one packed row per pair: prompt, chosen, rejected
            spec.seq, spec.target_len = d.max_length + completion, 2 * completion
        elif step in ("ppo", "score", "generate"):
            p = cfg.ppo
            spec.prompt_len, spec.seq = d.max_prompt_length, d.max_prompt_length + p.response_length
            spec.accum, spec.epochs = (p.num_mini_batches, p.num_ppo_epochs) if step == "ppo" else (1, None)
        elif step in ("grpo", "grpo_generate"):
            g = algorithm.group_config()
            spec.prompt_len, spec.seq = d.max_prompt_length, d.max_prompt_length + g.max_completion_length
            spec.num_generations, spec.grpo_beta = g.num_generations, g.beta
            spec.accum, spec.epochs = (g.num_mini_batches, g.num_iterations) if step == "grpo" else (1, None)
        specs.append(spec)
    return specs


def data_group_shape(data: Any) -> tuple[int, int]:
    """`(completions, comparisons)` of the largest prompt group in `data.train_files`, as the grouped
    reward model pads every row to them (`reward.group_by_prompt`); comparisons rounded up to 8 as
    the trainer rounds them. Text and token-id rows are read without a tokenizer; conversations
    would need the model's chat template, which a plan does not load."""
    from jaxrlhf.data import DataError, group_shape, load_rows
    from jaxrlhf.train.pipeline import parse_preference_rows, resolve_data_files

    examples: list[Any] = []
    for file in resolve_data_files(data.train_files):
        try:
            parsed, _ = parse_preference_rows(load_rows(file), None, skip_invalid=data.skip_invalid,
                                              drop_degenerate=data.drop_degenerate, source=file,
                                              min_score_gap=data.min_score_gap)  # fmt: skip
        except DataError as err:
            raise PlanError(f"reward.group_by_prompt: the plan reads data.train_files for the size of a "
                            f"prompt's group and could not: {err}") from None  # fmt: skip
        examples.extend(parsed)
    slots, comparisons = group_shape(examples)
    if not slots:
        raise PlanError("reward.group_by_prompt: data.train_files hold no pairs")
    return slots, -(-comparisons // 8) * 8


def overrides_for(spec: PlanSpec, found: dict[str, Any]) -> list[str]:
    """The `key=value` overrides that turn `spec` into the found setting."""
    out = []
    if found["remat"] != spec.remat:
        out.append(f"model.remat={found['remat']}")
    if found["accum"] != spec.accum:
        key = {"ppo": "ppo.num_mini_batches", "grpo": "grpo.num_mini_batches"}.get(spec.step)
        out.append(f"{key or 'train.grad_accum_steps'}={found['accum']}")
    if found["frozen_dtype"] != spec.frozen_dtype:
        out.append(f"model.frozen_dtype={found['frozen_dtype']}")
    for axis in ("data", "fsdp", "tensor"):
        if found["mesh_sizes"][axis] != spec.mesh[axis]:
            out.append(f"mesh.{axis}={found['mesh_sizes'][axis]}")
    return out


def plan_run(
    specs: Sequence[PlanSpec], target: Target, *, search: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Compile every step of a run for `target`; the verdict, rows, and for a step that does not fit
    the nearest setting that does (as overrides)."""
    from jaxrlhf.plan import planner

    rows, suggestions = [], {}
    for spec in specs:
        log(f"compiling {spec.step} for {target.name} ({target.count} x {target.chip.name}) ...")
        row = planner.compile_plan(spec, target)
        rows.append(row)
        log(format_row(row))
        if not row["fits"] and search:
            log(f"{spec.step} does not fit {target.chip.hbm_gb:g} GB: trying nearby settings")
            found = planner.search(spec, target, log=log)
            if found is not None:
                suggestions[spec.step] = overrides_for(spec, found)
                rows.append(found)
    fits = all(r["fits"] for r in rows if not r.get("searched"))
    return {"target": target.name, "chip": dataclasses.asdict(target.chip), "devices": target.count,
            "fits": fits, "rows": rows, "suggestions": suggestions}  # fmt: skip


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def format_row(r: dict[str, Any]) -> str:
    """One step's verdict, memory by part and the compiler's estimates, for the terminal."""
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    if r.get("oom"):  # the TPU compiler refused it: its temporaries alone exceed the chip's HBM
        return (f"  {r['step']}: DOES NOT FIT -- the TPU compiler needs {_gb(r['temp'])} GB of "
                f"temporaries beside {_gb(r['argument'])} GB of arguments per device (mesh {r['mesh']}, "
                f"remat {r['remat']}, micro-batches {r['accum']})")  # fmt: skip
    lines = [
        f"  {r['step']}: {verdict} -- {_gb(r['total'])} GB per device of {r['hbm'] / GB:g} GB "
        f"(mesh {r['mesh']}, remat {r['remat']}, micro-batches {r['accum']}, "
        f"attention {r['attention_backend']})",
        f"    arguments {_gb(r['argument'])} GB ("
        + ", ".join(f"{k} {_gb(v)}" for k, v in r["inputs"].items() if k != "state_unsharded") + ")",
        f"    temporaries {_gb(r['temp'])} GB, outputs {_gb(r['output'])} GB, donated {_gb(r['alias'])} GB"
        + (f", kept beside it {_gb(r['resident'])} GB" if r["resident"] else ""),
    ]  # fmt: skip
    if r.get("attention_note"):
        lines.append(f"    {r['attention_note']}")
    if r.get("slots"):  # reward.group_by_prompt
        lines.append(f"    rows of one prompt and its {r['slots']} completions ({r['seq']} tokens), "
                     f"{r['comparisons']} comparisons a row")  # fmt: skip
    if r.get("step_s"):
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"    estimated by the TPU compiler: step {r['step_s'] * 1e3:.1f} ms, "
            f"{r['tokens_per_s_per_chip']:,.0f} tokens/s per chip, MFU {mfu} "
            f"(compute {r['compute_s'] * 1e3:.1f} ms, collectives {r['ici_s'] * 1e3:.1f} ms)"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)
