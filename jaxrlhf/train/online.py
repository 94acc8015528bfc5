"""What the online-RL trainers share (PPO in `ppo_trainer.py`, GRPO / RLOO in `grpo_trainer.py`): the
prompts of the data files (with the rows' other columns, which reward functions receive), and
`run_online` -- the run around an engine's step:
resume, held-out and task evaluation (before, every `train.eval_every` steps, after), the step loop
with checkpoints and preemption, the export and `summary.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import BatchIterator, DataError, bucket_length, left_pad, load_rows
from jaxrlhf.evaluation import TaskPrompt, format_task_report
from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.common import TrainResult, check_base, export_model, fresh_start, run_task_eval, to_global
from jaxrlhf.train.config import ExperimentConfig, config_to_dict
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger

Print = Callable[[str], None]


def load_prompt_rows(
    files: list[str], tokenizer: Any, *, max_prompt_length: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Token ids of every row's `prompt` (conversations get the chat template and a generation
    prompt), truncated from the left to `max_prompt_length`, each with the row's other columns.
    Bad rows raise `DataError` naming the file, row and field."""
    out: list[tuple[np.ndarray, dict[str, Any]]] = []
    for file in files:
        rows = load_rows(file)
        for i in range(len(rows)):
            prompt = rows[i].get("prompt")
            if isinstance(prompt, list):
                try:
                    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                except Exception as e:  # malformed messages
                    error = DataError(f"cannot render the conversation ({e})", field="prompt")
                    raise error.located(*rows.locate(i)) from e
            elif isinstance(prompt, str) and prompt.strip():
                text = prompt
            else:
                got = "missing" if prompt is None else f"a {type(prompt).__name__}"
                error = DataError(f"expected a non-empty string or a list of messages, got {got}",
                                  field="prompt")  # fmt: skip
                raise error.located(*rows.locate(i))
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
            out.append((ids[-max_prompt_length:], {k: v for k, v in rows[i].items() if k != "prompt"}))
    return out


def load_prompts(files: list[str], tokenizer: Any, *, max_prompt_length: int) -> list[np.ndarray]:
    """The token ids of `load_prompt_rows`, without the other columns."""
    return [ids for ids, _ in load_prompt_rows(files, tokenizer, max_prompt_length=max_prompt_length)]


def decode_rollout(ids: np.ndarray, response_mask: np.ndarray, tokenizer: Any) -> tuple[list[str], list[str]]:
    """Prompt and completion texts of a rollout (`ids` [B, P+N], `response_mask` [B, N]), without
    special tokens."""
    n = response_mask.shape[1]
    prompts = tokenizer.batch_decode(ids[:, :-n], skip_special_tokens=True)
    completions = [
        tokenizer.decode(row[m == 1], skip_special_tokens=True)
        for row, m in zip(ids[:, -n:], response_mask, strict=True)
    ]
    return prompts, completions


def prompt_batches(
    prompts: list[np.ndarray], pad_id: int, buckets: Any, batch_size: int, *, seed: int = 0,
    train: bool = True,
) -> BatchIterator:  # fmt: skip
    """This host's share of global prompt batches: `prompt_ids` / `prompt_mask` left-padded to the
    bucketed width of the longest prompt in the global batch, and `index` (the prompts' positions in
    `prompts`, -1 on padding rows). `train`: shuffled, endless, whole batches; else one pass in order,
    the last batch padded."""

    def collate(items: list[tuple[int, np.ndarray]], *, batch_size: int, min_length: int) -> dict[str, Any]:
        rows = [ids for _, ids in items]
        width = bucket_length(max([min_length, *(len(r) for r in rows)]), buckets)
        ids, mask = left_pad(rows, pad_id, width=width, batch_size=batch_size)
        index = np.full((batch_size,), -1, np.int32)
        index[: len(items)] = [i for i, _ in items]
        return {"prompt_ids": ids, "prompt_mask": mask, "index": index}

    order = dict(seed=seed, drop_last=True) if train else dict(shuffle=False, drop_last=False, num_epochs=1)
    return BatchIterator(
        list(enumerate(prompts)), collate, global_batch_size=batch_size, length_fn=lambda it: len(it[1]),
        shard_index=jax.process_index(), num_shards=jax.process_count(), **order,
    )  # fmt: skip


def run_online(
    cfg: ExperimentConfig,
    engine: Any,
    batches: BatchIterator,
    train_step: Callable[[dict[str, jax.Array]], dict[str, float]],
    *,
    tokenizer: Any,
    tasks: list[TaskPrompt],
    mesh: Any,
    total_steps: int,
    fingerprint: str | None,
    say: Print,
    show_samples: Callable[[int, Print], None],
    held_out: Callable[[], dict[str, float] | None] = lambda: None,
    save_extra: Callable[[], dict[str, Any]] = dict,
    restore_extra: Callable[[dict[str, Any]], None] = lambda extra: None,
) -> TrainResult:
    """Train `engine` (a `RolloutEngine`: `state`, `policy_model()`) for `total_steps` steps of
    `train_step(global_batch) -> metrics` on `batches`, resuming from `<output_dir>/checkpoints`
    when `train.resume`. `held_out()` gives held-out metrics and `tasks` task accuracy, both logged
    under the split `eval` before training, every `train.eval_every` steps and after. `save_extra` /
    `restore_extra`: host state that exact resume needs besides the engine state and data position.
    `show_samples(step, print)` prints a few rollouts after the first and the last step."""
    t = cfg.train
    os.makedirs(t.output_dir, exist_ok=True)
    fresh_start(t.output_dir, t.resume)
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), keep=t.keep_checkpoints)

    def snapshot() -> tuple[Any, dict[str, Any]]:  # the engine state, and what exact resume needs
        extra = {"data": batches.state(), "config": config_to_dict(cfg), "base_fingerprint": fingerprint}
        return engine.state, {**extra, **save_extra()}

    step = 0
    if t.resume and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), engine.state
        )
        step, engine.state, extra = checkpointer.restore(abstract_state=abstract)
        check_base(extra, fingerprint, checkpointer.directory, cfg)
        batches.restore(extra["data"])
        restore_extra(extra)
        say(f"resumed from step {step}")
    logger = MetricsLogger(t.output_dir, total_steps=total_steps, tensorboard=t.tensorboard, start_step=step)
    iterator = iter(batches)
    results: dict[str, Any] = {}  # task accuracy by stage name

    def evaluate(name: str, at: int) -> dict[str, float] | None:  # held-out metrics, task accuracy
        metrics = held_out()
        if tasks:
            results[name] = run_task_eval(engine.policy_model(), tokenizer, tasks, cfg, mesh, name)
            metrics = {**(metrics or {}), **results[name].summary()}
            if name == "before":
                logger.print(format_task_report(results["before"], None))
            elif name == "after":
                logger.print(format_task_report(results.get("before"), results["after"]))
        if metrics:
            logger.log(at, metrics, split="eval")
        return metrics

    eval_before = evaluate("before", step) if step == 0 else None

    def global_step() -> dict[str, float]:
        return train_step(to_global(next(iterator), mesh, micro=None))  # this host's rows -> global

    def after_step(step: int, saved: bool) -> None:
        if t.eval_every and step % t.eval_every == 0 and step < total_steps:
            evaluate(f"step{step}", step)
        if step in (1, total_steps):  # what the rewards mean, at the start and the end
            show_samples(step, logger.print)

    try:
        loop = run_loop(
            global_step, snapshot, checkpointer, logger, step=step, total_steps=total_steps,
            log_every=t.log_every, save_every=t.save_every, say=logger.print, after_step=after_step,
            on_nonfinite=t.on_nonfinite,
        )  # fmt: skip
    except BaseException:
        logger.close()
        raise
    finally:
        checkpointer.close()
    step, history, preempted = loop.step, loop.history, loop.preempted
    eval_after = None if preempted else evaluate("after", step)
    export_dir = None
    if t.export and not preempted:
        export_dir = export_model(engine.policy_model(), cfg, tokenizer, logger.print)
    summary = {
        "steps": step, "preempted": preempted, "export_dir": export_dir,
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "eval_before": eval_before, "eval_after": eval_after,
    }  # fmt: skip
    if jax.process_index() == 0:
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    return TrainResult(step, history, eval_before, eval_after, export_dir, preempted,
                       results.get("before"), results.get("after"))  # fmt: skip
