"""The one runner every method shares: `run(cfg) -> TrainResult` (what `jaxrlhf train KIND` calls).

Reads top to bottom: the method of `cfg.kind` (from the registry), distributed start-up and the
mesh, the tokenizer, the method's learner (its data, models, optimizer and state), resume, the
evaluation before training (held-out metrics, task accuracy, the reward-KL point), the step loop
(metrics, checkpoints, preemption, evaluation every `train.eval_every` steps), the evaluation after,
the export and `summary.json`.

The next global batch is prepared on a background thread (collate and transfer) while the device
runs the current step, and metrics are fetched every `train.log_every` steps (`loop.run_loop`).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxrlhf.data import BatchIterator
from jaxrlhf.evaluation import format_reward_kl, format_task_report
from jaxrlhf.models import load_tokenizer
from jaxrlhf.models.lora import base_fingerprint
from jaxrlhf.train.algorithms import ExperimentConfig, algorithm_for
from jaxrlhf.train.algorithms.base import Context
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
    run_task_eval,
    task_prompts,
    to_global,
    tokenizer_directory,
)
from jaxrlhf.train.config import config_to_dict
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu
from jaxrlhf.train.reward_eval import RewardEvaluator
from jaxrlhf.train.trackers import check_installed

# Test hook: simulate a crash (os._exit) right after the checkpoint of this step is written.
CRASH_ENV = "JAXRLHF_CRASH_AFTER_STEP"


class Prefetcher:
    """Global batches of `batches` made one ahead on a thread: `next()` gives `(host_batch,
    global_batch)`; `state()` is the data position after the last batch handed out (what a
    checkpoint must record, not the thread's position)."""

    def __init__(self, batches: BatchIterator, to_device: Callable[[dict[str, Any]], Any]):
        self._batches, self._to_device = batches, to_device
        self._state = batches.state()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="jaxrlhf-prefetch")
        self._thread.start()

    def _work(self) -> None:
        iterator: Iterator[Any] = iter(self._batches)
        while not self._stop.is_set():
            try:
                host = next(iterator)
                item: Any = (host, self._to_device(host), self._batches.state())
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self) -> tuple[dict[str, Any], Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        host, device, self._state = item
        return host, device

    def state(self) -> dict[str, Any]:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class InOrder(Prefetcher):
    """`Prefetcher`'s interface without the thread: each batch made when it is asked for."""

    def __init__(self, batches: BatchIterator, to_device: Callable[[dict[str, Any]], Any]):
        self._batches, self._to_device, self._state = batches, to_device, batches.state()
        self._iterator = iter(batches)

    def __next__(self) -> tuple[dict[str, Any], Any]:
        host = next(self._iterator)
        self._state = self._batches.state()
        return host, self._to_device(host)

    def close(self) -> None:
        pass


def run(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `cfg.kind` as configured; returns the metrics, held-out evaluations and the export path."""
    algorithm = algorithm_for(cfg)
    maybe_initialize_distributed(cfg)
    t = cfg.train
    if jax.process_index() == 0:  # a tracker that is not installed fails before anything is loaded
        check_installed(t.trackers)
    mesh, rules = mesh_and_rules(cfg)
    os.makedirs(t.output_dir, exist_ok=True)
    fresh_start(t.output_dir, t.resume)
    logger: MetricsLogger | None = None

    def say(msg: str) -> None:  # through the progress bar once it exists
        if log is not None:
            log(msg)
        elif logger is not None:
            logger.print(msg)
        elif jax.process_index() == 0:
            print(msg, flush=True)

    say(f"jaxrlhf {cfg.kind}: {jax.device_count()} devices, mesh {dict(mesh.shape)}")
    model_dir = model_directory(cfg.model.path)  # a bad model fails here, before the data is read
    tokenizer = load_tokenizer(tokenizer_directory(cfg, model_dir))
    ctx = Context(cfg, mesh, rules, model_dir, tokenizer, say)
    tasks = task_prompts(cfg, tokenizer) if algorithm.measures_tasks else []
    sampled = cfg.reward_eval.reward_funcs and algorithm.measures_tasks
    reward_kl = RewardEvaluator(ctx) if sampled else None
    learner = algorithm.build(ctx)
    fingerprint = base_fingerprint(model_dir) if lora_spec(cfg) is not None else None
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), keep=t.keep_checkpoints)
    step = 0
    if t.resume and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), learner.state
        )
        step, learner.state, extra = checkpointer.restore(abstract_state=abstract)
        check_base(extra, fingerprint, checkpointer.directory, cfg)
        learner.batches.restore(extra["data"])
        learner.restore_extra(extra)
        (log or functools.partial(print, flush=True))(f"resumed from step {step}")  # on every process
    total_steps = learner.total_steps
    logger = MetricsLogger(
        t.output_dir, total_steps=total_steps, start_step=step, report_to=t.trackers, project=t.project,
        run_name=t.run_name, config=config_to_dict(cfg),
    )  # fmt: skip
    results: dict[str, Any] = {}  # task accuracy by stage name

    def evaluate(stage: str, at: int) -> dict[str, float] | None:  # held-out metrics, task accuracy
        metrics = learner.held_out(stage)
        if reward_kl is not None:  # reward and KL of sampled continuations
            metrics = {**(metrics or {}), **reward_kl(learner.policy_model(), stage).summary()}
            done = reward_kl.results[stage]
            if stage == "after":
                say(format_reward_kl(reward_kl.results.get("before"), done))
            else:
                say(f"held-out {stage}: reward {done.reward:+.3f} ± {done.reward_sem:.3f}, "
                    f"KL to reference {done.kl:.2f} ± {done.kl_sem:.2f} ({done.samples} samples)")
        if tasks:
            results[stage] = run_task_eval(learner.policy_model(), tokenizer, tasks, cfg, mesh, stage)
            metrics = {**(metrics or {}), **results[stage].summary()}
            if stage == "before":
                say(format_task_report(results["before"], None))
            elif stage == "after":
                say(format_task_report(results.get("before"), results["after"]))
        if metrics:
            logger.log(at, metrics, split="eval")
        return metrics

    eval_before = evaluate("before", step) if step == 0 else None
    feed = Prefetcher if t.prefetch else InOrder
    batches = feed(learner.batches, lambda b: to_global(b, mesh, micro=learner.micro_batches))
    peak = device_peak_flops()
    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    window_tokens = 0.0

    def train_step() -> dict[str, Any]:
        nonlocal window_tokens
        host, batch = next(batches)
        window_tokens += learner.tokens(host)
        return learner.step(batch)

    def window(steps: int, seconds: float) -> dict[str, float]:  # throughput since the last log
        nonlocal window_tokens
        out = {"step_seconds": seconds / max(steps, 1)}
        if window_tokens:
            out["tokens_per_second"] = window_tokens / max(seconds, 1e-9)
            if peak and learner.num_params:
                flops = peak * jax.device_count()
                out["mfu"] = mfu(out["tokens_per_second"], learner.num_params, peak_flops=flops)
        window_tokens = 0.0
        return out

    def snapshot() -> tuple[Any, dict[str, Any]]:  # the state, and what exact resume needs
        extra = {"data": batches.state(), "config": config_to_dict(cfg), "base_fingerprint": fingerprint}
        return learner.state, {**extra, **learner.save_extra()}

    def after_step(step: int, saved: bool) -> None:
        if saved and crash_after and step >= crash_after:  # test hook: die right after a checkpoint
            checkpointer.wait()
            os._exit(17)
        if t.eval_every and step % t.eval_every == 0 and step < total_steps:
            evaluate(f"step{step}", step)
        if step in (1, total_steps):  # what the rewards mean, at the start and the end
            learner.show_samples(step, say)
        if t.log_completions and (step % t.log_every == 0 or step in (1, total_steps)):
            table = learner.completion_table(t.num_completions_to_print)  # every process (a collective)
            if table is not None:
                logger.log_table(step, "completions", *table)

    try:
        loop = run_loop(
            train_step, snapshot, checkpointer, logger, step=step, total_steps=total_steps,
            log_every=t.log_every, save_every=t.save_every, say=say, after_step=after_step,
            on_nonfinite=t.on_nonfinite, window=window,
        )  # fmt: skip
    except BaseException:  # a stop (non-finite step, error, Ctrl-C): flush the metrics written so far
        logger.close()
        raise
    finally:  # and finish pending checkpoints
        batches.close()
        checkpointer.close()
    step, history, preempted = loop.step, loop.history, loop.preempted
    eval_after = None if preempted else evaluate("after", step)
    export_dir = None
    if t.export and not preempted:
        export_dir = export_model(learner.policy_model(), cfg, tokenizer, say)
    summary = {
        "kind": cfg.kind, "steps": step, "preempted": preempted, "export_dir": export_dir,
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "eval_before": eval_before, "eval_after": eval_after, **learner.summary(),
    }  # fmt: skip
    if t.on_nonfinite == "skip" and history:
        summary["nonfinite_skipped"] = int(history[-1].get("nonfinite_skipped", 0))
    if jax.process_index() == 0:
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    return TrainResult(step, history, eval_before, eval_after, export_dir, preempted,
                       results.get("before"), results.get("after"))  # fmt: skip
