"""The GRPO / RLOO training loop: `train_grpo(cfg) -> TrainResult` (`jaxrlhf train grpo|rloo`).

Prompts come from the `prompt` column of the training files; every other column of a row (e.g.
`answer`, `family`) is passed to the reward functions by name, one entry per completion. Each step is
one `GRPOEngine.step` on `train.batch_size` prompts x `grpo.num_generations` completions. Same
engine as the other trainers: mesh, LoRA, orbax checkpoints with exact resume, SIGTERM save, JSONL /
TensorBoard metrics, task accuracy on held-out prompts with checkable answers, and the export.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import BatchIterator, DataError, bucket_length, left_pad
from jaxrlhf.evaluation import format_task_report
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.models.lora import base_fingerprint
from jaxrlhf.models.peft_io import load_adapter
from jaxrlhf.parallel import host_array
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.common import (
    TrainResult,
    check_base,
    export_model,
    fresh_start,
    lora_spec,
    maybe_initialize_distributed,
    mesh_and_rules,
    model_directory,
    optimizer_from_config,
    run_task_eval,
    task_prompts,
    to_global,
    tokenizer_directory,
)
from jaxrlhf.train.config import ConfigError, ExperimentConfig, config_to_dict
from jaxrlhf.train.grpo import GRPOEngine, RewardFn
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger
from jaxrlhf.train.pipeline import resolve_data_files
from jaxrlhf.train.ppo_trainer import decode_rollout, load_prompt_rows
from jaxrlhf.train.step import make_schedule

RewardFunc = Callable[..., list[float | None]]


def load_reward_funcs(specs: list[str]) -> list[tuple[str, RewardFunc]]:
    """`(name, function)` of each `module:function` in `grpo.reward_funcs`; a typo fails here."""
    funcs = []
    for spec in specs:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise ConfigError(f"grpo.reward_funcs: cannot import module {module!r} ({e})") from e
        except AttributeError:
            raise ConfigError(f"grpo.reward_funcs: module {module!r} has no function {name!r}") from None
        funcs.append((name, fn))
    return funcs


def reward_table(
    funcs: list[tuple[str, RewardFunc]], tokenizer: Any, columns: list[dict[str, Any]], group_size: int,
    index: np.ndarray,
) -> RewardFn:  # fmt: skip
    """The host reward function of one batch: completions decoded, each function called as
    `f(prompts=..., completions=..., completion_ids=..., **columns)` (the prompt rows' columns,
    each repeated for the row's `group_size` completions), None -> NaN. `index` [P]: the rows."""
    rows = [columns[i] if i >= 0 else {} for i in np.repeat(index, group_size)]
    keys = sorted({k for r in rows for k in r})
    by_column = {k: [r.get(k) for r in rows] for k in keys}

    def rewards(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        prompts, completions = decode_rollout(ids, response_mask, tokenizer)
        n = response_mask.shape[1]
        completion_ids = [row[m == 1].tolist() for row, m in zip(ids[:, -n:], response_mask, strict=True)]
        out = np.full((len(ids), len(funcs)), np.nan, np.float32)
        for j, (name, fn) in enumerate(funcs):
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **by_column)
            if len(values) != len(ids):
                raise ValueError(f"reward function {name}: {len(values)} values for {len(ids)} completions")
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out

    return rewards


def _collate(pad_id: int, buckets: Any) -> Callable[..., dict[str, np.ndarray]]:
    def collate(items: list[tuple[int, np.ndarray]], *, batch_size: int, min_length: int) -> dict[str, Any]:
        rows = [ids for _, ids in items]
        width = bucket_length(max([min_length, *(len(r) for r in rows)]), buckets)
        ids, mask = left_pad(rows, pad_id, width=width, batch_size=batch_size)
        index = np.full((batch_size,), -1, np.int32)
        index[: len(items)] = [i for i, _ in items]
        return {"prompt_ids": ids, "prompt_mask": mask, "index": index}

    return collate


def train_grpo(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """GRPO (`kind: grpo`) or RLOO (`kind: rloo`) as configured."""
    maybe_initialize_distributed(cfg)
    t, g = cfg.train, cfg.grpo
    mesh, rules = mesh_and_rules(cfg)
    say = log or (lambda msg: print(msg, flush=True))
    policy_dir = model_directory(cfg.model.path)  # bad checkpoints fail here, before any data is read
    reward_dir = model_directory(g.reward_model) if g.reward_model is not None else None
    tokenizer = load_tokenizer(tokenizer_directory(cfg, policy_dir))
    funcs = load_reward_funcs(g.reward_funcs)  # a typo fails here, early
    rows = load_prompt_rows(resolve_data_files(cfg.data.train_files), tokenizer,
                            max_prompt_length=cfg.data.max_prompt_length)  # fmt: skip
    if len(rows) < t.batch_size:
        raise DataError(f"{len(rows)} prompts are fewer than one batch (train.batch_size={t.batch_size})",
                        field="train_files")  # fmt: skip
    columns = [c for _, c in rows]
    tasks = task_prompts(cfg, tokenizer)
    say(f"{cfg.kind}: {len(rows)} prompts x {g.num_generations} completions per step, {len(tasks)} "
        f"held-out task prompts, {jax.device_count()} devices, mesh {dict(mesh.shape)}")  # fmt: skip
    kw = dict(
        dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh, rules=rules,
        remat=cfg.model.remat, scan_layers=cfg.model.use_scan, frozen_layers=cfg.model.frozen_layers,
        attention=cfg.model.attention, router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        moe_dispatch=cfg.model.moe_dispatch,
    )  # fmt: skip
    lora = lora_spec(cfg)
    policy = from_pretrained(policy_dir, lora=lora, quantize_base=cfg.lora.quantize_base, **kw)
    if cfg.model.adapter:
        load_adapter(policy, cfg.model.adapter)
    reward_model = None
    if reward_dir is not None:
        frozen = {"param_dtype": cfg.model.frozen_dtype} if cfg.model.frozen_dtype else {}
        reward_model = from_pretrained(reward_dir, head="score", **{**kw, **frozen})
    total_steps = t.max_steps or t.num_epochs * (len(rows) // t.batch_size)
    o = cfg.optim
    schedule = make_schedule(
        o.learning_rate, total_steps * g.num_iterations * g.num_mini_batches, warmup_steps=o.warmup_steps,
        kind=o.schedule, min_lr_ratio=o.min_lr_ratio,
    )  # fmt: skip
    engine = GRPOEngine(
        policy, g, optimizer_from_config(cfg, schedule), mesh, pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=sorted({int(tokenizer.eos_token_id)}), estimator=cfg.kind, reward_model=reward_model,
        reward_weights=g.reward_weights, num_reward_funcs=len(funcs), seed=t.seed,
        frozen_dtype=cfg.model.frozen_dtype,
    )  # fmt: skip
    del policy, reward_model
    fingerprint = base_fingerprint(policy_dir) if lora is not None else None
    batches = BatchIterator(
        [(i, ids) for i, (ids, _) in enumerate(rows)], _collate(tokenizer.pad_token_id, cfg.data.buckets),
        global_batch_size=t.batch_size, seed=cfg.data.seed, drop_last=True, length_fn=lambda it: len(it[1]),
        shard_index=jax.process_index(), num_shards=jax.process_count(),
    )  # fmt: skip
    os.makedirs(t.output_dir, exist_ok=True)
    fresh_start(t.output_dir, t.resume)
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), keep=t.keep_checkpoints)

    def snapshot() -> tuple[Any, dict[str, Any]]:  # the engine state, and what exact resume needs
        extra = {"data": batches.state(), "config": config_to_dict(cfg), "base_fingerprint": fingerprint}
        return engine.state, extra

    step = 0
    if t.resume and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), engine.state
        )
        step, engine.state, extra = checkpointer.restore(abstract_state=abstract)
        check_base(extra, fingerprint, checkpointer.directory, cfg)
        batches.restore(extra["data"])
        say(f"resumed from step {step}")
    logger = MetricsLogger(t.output_dir, total_steps=total_steps, tensorboard=t.tensorboard, start_step=step)
    iterator = iter(batches)

    def task_eval(name: str) -> Any:
        return run_task_eval(engine.policy_model(), tokenizer, tasks, cfg, mesh, name)

    eval_before = task_before = None
    if tasks and step == 0:
        task_before = task_eval("before")
        eval_before = task_before.summary()
        logger.print(format_task_report(task_before, None))
        logger.log(step, eval_before, split="eval")

    def train_step() -> dict[str, float]:
        batch = to_global(next(iterator), mesh, micro=None)  # this host's rows -> the global batch
        index = host_array(batch["index"])
        fn = reward_table(funcs, tokenizer, columns, g.num_generations, index) if funcs else None
        return engine.step(batch["prompt_ids"], batch["prompt_mask"], fn, [n for n, _ in funcs])

    def after_step(step: int, saved: bool) -> None:
        if t.eval_every and step % t.eval_every == 0 and step < total_steps and tasks:
            logger.log(step, task_eval(f"step{step}").summary(), split="eval")
        if step in (1, total_steps):
            show_samples(step)

    def show_samples(step: int) -> None:
        r = engine.last_rollout.flat()  # gathered on every process (a collective), printed by process 0
        ids, rewards, completion_mask = (host_array(r[k]) for k in ("ids", "rewards", "completion_mask"))
        prompts, completions = decode_rollout(ids, completion_mask, tokenizer)
        logger.print(f"step {step} samples (reward | prompt end | completion):")
        for i in range(0, min(3 * g.num_generations, len(completions)), g.num_generations):
            logger.print(f"  {rewards[i]:+.2f} | ...{prompts[i].strip()[-60:]!r} | {completions[i]!r}")

    try:
        loop = run_loop(
            train_step, snapshot, checkpointer, logger, step=step, total_steps=total_steps,
            log_every=t.log_every, save_every=t.save_every, say=logger.print, after_step=after_step,
            on_nonfinite=t.on_nonfinite,
        )  # fmt: skip
    except BaseException:
        logger.close()
        raise
    finally:
        checkpointer.close()
    step, history, preempted = loop.step, loop.history, loop.preempted
    eval_after = task_after = None
    if tasks and not preempted:
        task_after = task_eval("after")
        eval_after = task_after.summary()
        logger.print(format_task_report(task_before, task_after))
        logger.log(step, eval_after, split="eval")
    export_dir = None
    if t.export and not preempted:
        export_dir = export_model(engine.policy_model(), cfg, tokenizer, logger.print)
    summary = {
        "steps": step, "preempted": preempted, "export_dir": export_dir,
        "first": history[0] if history else None,
        "last": history[-1] if history else None,
        "eval_before": eval_before, "eval_after": eval_after,
    }  # fmt: skip
    if jax.process_index() == 0:
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    return TrainResult(step, history, eval_before, eval_after, export_dir, preempted, task_before, task_after)
