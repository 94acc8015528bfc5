"""What every method shares, as functions of the config: start-up (distributed, mesh and rules,
model and tokenizer directories), the optimizer, global batches, task evaluation, LoRA set-up
checks and the export. The runner (`run.py`) and the methods' `Context` (`algorithms/base.py`)
call them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxrlhf.evaluation import (
    TaskEvalResult,
    TaskPrompt,
    evaluate_tasks,
    has_task_columns,
    load_task_prompts,
    write_task_eval,
)
from jaxrlhf.models import check_checkpoint, resolve_checkpoint, save_pretrained
from jaxrlhf.models.demo import demo_model_path
from jaxrlhf.models.peft_io import read_adapter_config, save_adapter
from jaxrlhf.parallel import DEFAULT_RULES, make_mesh
from jaxrlhf.train.config import ConfigError
from jaxrlhf.train.pipeline import resolve_data_files
from jaxrlhf.train.step import batch_sharding, frozen_params, make_optimizer

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig

@dataclasses.dataclass
class TrainResult:
    steps: int
    train_metrics: list[dict[str, float]]
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    export_dir: str | None
    preempted: bool = False
    task_before: TaskEvalResult | None = None  # task accuracy (eval data with checkers), before training
    task_after: TaskEvalResult | None = None


def import_function(spec: str, key: str) -> Callable[..., Any]:
    """The function `module:function` that config key `key` names; a typo is a `ConfigError`."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module!r} ({e})") from e
    except AttributeError:
        raise ConfigError(f"{key}: module {module!r} has no function {name!r}") from None


def maybe_initialize_distributed(cfg: ExperimentConfig) -> None:
    """Join the other processes with `jax.distributed.initialize`: with the coordinator given in the
    config (`mesh.coordinator_address`, `num_processes`, `process_id`), or auto-detected on a
    multi-host TPU slice (JAX reads the TPU metadata itself). Single-host runs skip it."""
    if jax.distributed.is_initialized():  # e.g. by a notebook; must not touch the backend first
        return
    m = cfg.mesh
    if m.coordinator_address is not None or m.num_processes is not None:
        jax.distributed.initialize(
            coordinator_address=m.coordinator_address, num_processes=m.num_processes, process_id=m.process_id
        )
    elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()


def fresh_start(output_dir: str, resume: bool) -> None:
    """Without `train.resume`, a run in an existing directory starts clean: earlier checkpoints and
    metrics are moved aside (never deleted) so they can neither be resumed by accident nor mixed in."""
    if resume or jax.process_index() != 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "metrics.jsonl"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.replace(path, f"{path}.old-{stamp}")


def mesh_and_rules(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """The device mesh of `cfg.mesh`, and its partition rules: the configured ones first, then the
    defaults."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, expert=cfg.mesh.expert)
    if not cfg.mesh.rules:
        return mesh, DEFAULT_RULES
    return mesh, [(pattern, tuple(axes)) for pattern, axes in cfg.mesh.rules] + list(DEFAULT_RULES)


def model_directory(path: str) -> str:
    """The local checkpoint directory of `model.path` ("demo": the embedded model), checked to be
    loadable (config, model type, whole safetensors files) before anything else is read."""
    return demo_model_path() if path == "demo" else check_checkpoint(path)


def tokenizer_directory(cfg: ExperimentConfig, model_dir: str) -> str:
    if not cfg.model.tokenizer:
        return model_dir
    return demo_model_path() if cfg.model.tokenizer == "demo" else resolve_checkpoint(cfg.model.tokenizer)


def task_prompts(cfg: ExperimentConfig, tokenizer: Any) -> list[TaskPrompt]:
    """The held-out prompts to measure task accuracy on: those of `data.eval_files` when every eval
    file has `family` and `answer` columns and `task_eval.enabled`; else none."""
    files = resolve_data_files(cfg.data.eval_files)
    if not cfg.task_eval.enabled or not files or not has_task_columns(files):
        return []
    return load_task_prompts(files, tokenizer)


def run_task_eval(
    model: Any, tokenizer: Any, prompts: list[TaskPrompt], cfg: ExperimentConfig, mesh: Any, name: str,
) -> TaskEvalResult:  # fmt: skip
    """Task accuracy of `model` (greedy replies), written to `<output_dir>/task_eval/<name>.json`."""
    te = cfg.task_eval
    result = evaluate_tasks(
        model, tokenizer, prompts, max_new_tokens=te.max_new_tokens, batch_size=te.batch_size,
        samples_per_family=te.samples_per_family, mesh=mesh,
    )  # fmt: skip
    if jax.process_index() == 0:
        path = os.path.join(cfg.train.output_dir, "task_eval", f"{name}.json")
        write_task_eval(path, result, model=cfg.model.path, data=resolve_data_files(cfg.data.eval_files),
                        stage=name)  # fmt: skip
    return result


def model_kwargs(cfg: ExperimentConfig, mesh: Any, rules: Any) -> dict[str, Any]:
    """The `from_pretrained` keywords of `cfg.model` and the mesh that every trainer's models share."""
    m = cfg.model
    return dict(
        dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules, remat=m.remat,
        scan_layers=m.use_scan, frozen_layers=m.frozen_layers, attention=m.attention,
        router_aux_loss_coef=m.router_aux_loss_coef, moe_dispatch=m.moe_dispatch,
    )  # fmt: skip


def optimizer_from_config(cfg: ExperimentConfig, schedule: Any) -> Any:
    """AdamW of `cfg.optim` on `schedule`, with the score head's learning rate and the frozen layers
    of `cfg.model` (shared by every trainer)."""
    o, m = cfg.optim, cfg.model
    return make_optimizer(
        schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, max_grad_norm=o.max_grad_norm,
        head_lr_scale=o.head_lr_scale,
        frozen=frozen_params(m.frozen_layers, scan_layers=m.use_scan) if m.frozen_layers else None,
    )


def lora_spec(cfg: ExperimentConfig) -> Any:
    """The `LoRASpec` of the run: `model.adapter`'s own (rank, alpha, targets), or the `lora`
    section's; None without adapters."""
    if not cfg.model.adapter:
        return cfg.lora.spec()
    lora = read_adapter_config(cfg.model.adapter)
    if cfg.lora.enabled and (cfg.lora.rank, cfg.lora.alpha) != (lora.rank, lora.alpha):
        raise ConfigError(
            f"lora.rank={cfg.lora.rank}, lora.alpha={cfg.lora.alpha} but model.adapter "
            f"{cfg.model.adapter} has r={lora.rank}, lora_alpha={lora.alpha}: drop the lora settings"
        )
    return lora


def check_base(extra: dict[str, Any], fingerprint: str | None, directory: str, cfg: ExperimentConfig) -> None:
    """Refuse to resume a LoRA checkpoint on another base model than the one it was trained on."""
    if extra.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"{directory}: its checkpoint was trained on base {extra.get('base_fingerprint')}, but "
            f"model.path {cfg.model.path} is base {fingerprint}: use the same base model "
            "(or train.resume=false)"
        )


def export_model(model: Any, cfg: ExperimentConfig, tokenizer: Any, say: Callable[[str], None]) -> str:
    """Write `<output_dir>/export/`: the full model, or with LoRA the PEFT adapter (and the merged
    full model in `export_merged/`). Returns the export directory."""
    export_dir = os.path.join(cfg.train.output_dir, "export")
    if model.config.lora is None:
        save_pretrained(model, export_dir, tokenizer=tokenizer)
        say(f"exported to {export_dir}")
        return export_dir
    save_adapter(model, export_dir, base_model=cfg.model.path)
    merged_dir = os.path.join(cfg.train.output_dir, "export_merged")
    save_pretrained(model, merged_dir, tokenizer=tokenizer)
    say(f"exported the adapter to {export_dir} and the merged model to {merged_dir}")
    return export_dir


def to_global(batch: dict[str, np.ndarray], mesh: Any, *, micro: int | None) -> dict[str, jax.Array]:
    """This host's numpy batch -> global arrays sharded over (data, fsdp); `micro` adds the leading
    micro-batch axis."""
    out = {}
    for k, v in batch.items():
        if micro is not None:
            v = v.reshape(micro, v.shape[0] // micro, *v.shape[1:])
        sharding: NamedSharding = batch_sharding(mesh, v.ndim, micro_axis=micro is not None)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
