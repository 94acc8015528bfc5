"""The training loop shared by SFT, reward-model and DPO training: `train_offline(cfg) -> TrainResult`.

Reads top to bottom: start-up (distributed, mesh), tokenizer and data, model, objective, reference
log-probs, optimizer and state, resume, the step loop (log, evaluate, checkpoint, preemption), the
final evaluation and the export. Everything device-side lives in `step.py` and `objectives.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.data import BatchIterator, DataError, TokenizedPair, collate_pairs, collate_sequences
from jaxrlhf.evaluation import (
    format_task_report,
)
from jaxrlhf.losses import dpo_loss, reward_loss
from jaxrlhf.models import (
    from_pretrained,
    load_tokenizer,
)
from jaxrlhf.models.demo import cache_dir
from jaxrlhf.models.lora import base_fingerprint
from jaxrlhf.models.lora import trainable as lora_trainable
from jaxrlhf.models.peft_io import load_adapter
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
    model_kwargs,
    optimizer_from_config,
    run_task_eval,
    task_prompts,
    to_global,
    tokenizer_directory,
)
from jaxrlhf.train.config import ExperimentConfig, config_to_dict
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger, device_peak_flops, mfu
from jaxrlhf.train.objectives import DPOObjective, RewardObjective, SFTObjective, add_targets, pair_logps
from jaxrlhf.train.pipeline import checkpoint_fingerprint, pairs_fingerprint, prepare_data
from jaxrlhf.train.step import (
    all_params,
    create_state,
    make_eval_fn,
    make_schedule,
    make_train_step,
    state_shardings,
)

# Test hook: simulate a crash (os._exit) right after the checkpoint of this step is written.
_CRASH_ENV = "JAXRLHF_CRASH_AFTER_STEP"


@dataclasses.dataclass(frozen=True)
class Indexed:
    """A tokenized example with its index in the split (to join precomputed reference log-probs)."""

    index: int
    pair: TokenizedPair


def _objective(cfg: ExperimentConfig) -> Any:
    if cfg.kind == "dpo":
        d = cfg.dpo
        return DPOObjective(
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            reference_free=d.reference_free, simpo_gamma=d.simpo_gamma, discopop_tau=d.discopop_tau,
            rpo_alpha=d.rpo_alpha,
        )  # fmt: skip
    if cfg.kind == "reward":
        return RewardObjective(cfg.reward.center_rewards_coefficient, cfg.reward.use_margin)
    return SFTObjective(completion_only=cfg.sft.completion_only)


def _collate_fn(cfg: ExperimentConfig, pad_id: int, ref: dict[str, np.ndarray] | None) -> Callable[..., Any]:
    buckets = cfg.data.buckets
    multi_host = jax.process_count() > 1

    def collate(items: list[Indexed], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        pairs = [it.pair for it in items]
        if cfg.kind == "sft":
            seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
            return collate_sequences(
                seqs, pad_id=pad_id, batch_size=batch_size, buckets=buckets, min_length=min_length
            )
        batch = collate_pairs(
            pairs, pad_id=pad_id, batch_size=batch_size, buckets=buckets, min_length=min_length
        )
        if cfg.kind == "dpo":
            # On several hosts the completion bucket must agree: use the full row length.
            batch = add_targets(batch, [batch["input_ids"].shape[1]] if multi_host else buckets)
            if ref is not None:
                for key in ("chosen", "rejected"):
                    values = np.zeros((batch_size,), np.float32)
                    values[: len(items)] = ref[key][[it.index for it in items]]
                    batch[f"ref_{key}"] = values
        return batch

    return collate


def _length(cfg: ExperimentConfig) -> Callable[[Indexed], int]:
    if cfg.kind == "sft":
        return lambda it: len(it.pair.prompt_ids) + len(it.pair.chosen_ids)
    return lambda it: it.pair.packed_length


def _iterate_once(examples: list[Indexed], collate: Any, batch_size: int, length: Any) -> BatchIterator:
    return BatchIterator(
        examples, collate, global_batch_size=batch_size, shuffle=False, drop_last=False, num_epochs=1,
        length_fn=length, shard_index=jax.process_index(), num_shards=jax.process_count(),
    )  # fmt: skip


def compute_pair_logps(
    graphdef: Any, params: Any, examples: list[Indexed], cfg: ExperimentConfig, pad_id: int, mesh: Any
) -> dict[str, np.ndarray]:
    """Summed chosen/rejected log-probs (and lengths) of every example, in example order."""
    fn = make_eval_fn(graphdef, functools.partial(pair_logps), mesh)
    collate = _collate_fn(dataclasses.replace(cfg, kind="dpo"), pad_id, None)
    out = {
        k: np.zeros((len(examples),), np.float32)
        for k in ("chosen", "rejected", "chosen_len", "rejected_len")
    }
    batches = _iterate_once(examples, collate, _eval_batch_size(cfg, mesh), _length(cfg))
    for i, batch in enumerate(batches):
        idx = batches.global_batch_indices(0, i)
        result = fn(params, to_global(batch, mesh, micro=None))
        for k in out:
            out[k][idx] = (
                np.asarray(result[k])[: len(idx)] if jax.process_count() == 1 else _gathered(result[k], idx)
            )
    return out


def _gathered(values: jax.Array, idx: np.ndarray) -> np.ndarray:
    # Row r of the global batch comes from host r % n, local position r // n.
    n = jax.process_count()
    arr = np.asarray(values)
    per_host = arr.shape[0] // n
    rows = [arr[(r % n) * per_host + r // n] for r in range(len(idx))]
    return np.asarray(rows)


def _eval_batch_size(cfg: ExperimentConfig, mesh: Any) -> int:
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    per_micro = max(cfg.train.batch_size // cfg.train.grad_accum_steps, 1)
    return max(shards, -(-per_micro // shards) * shards)


def _reference_logps(
    graphdef: Any, params: Any, examples: list[Indexed], cfg: ExperimentConfig, pad_id: int, mesh: Any,
    model_dir: str, log: Callable[[str], None],
) -> dict[str, np.ndarray]:  # fmt: skip
    """Reference log-probs of the training pairs, computed once and cached on disk, keyed by the model
    checkpoint and the tokenized data."""
    key = "-".join([
        checkpoint_fingerprint(model_dir), pairs_fingerprint([e.pair for e in examples]), cfg.model.dtype,
    ])  # fmt: skip
    ref_dir = os.path.join(cache_dir(), "ref_logps")
    file = os.path.join(ref_dir, f"{key}.npz")
    if os.path.exists(file):
        log(f"reference log-probs: cached {file}")
        with np.load(file) as f:
            return {k: f[k] for k in f.files}
    start = time.perf_counter()
    ref = compute_pair_logps(graphdef, params, examples, cfg, pad_id, mesh)
    if jax.process_index() == 0:
        os.makedirs(ref_dir, exist_ok=True)
        tmp = f"{file}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **ref)
        os.replace(tmp, file)
    log(f"reference log-probs: computed for {len(examples)} pairs in {time.perf_counter() - start:.1f}s")
    return ref


def dpo_eval_metrics(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None, cfg: ExperimentConfig
) -> dict[str, float]:
    """Held-out DPO metrics from per-pair log-probs: the DPO loss and implicit rewards against the
    reference, and how often the policy itself prefers chosen (meaningful before training too)."""
    d = cfg.dpo
    metrics: dict[str, float] = {
        "logps/chosen": float(got["chosen"].mean()),
        "logps/rejected": float(got["rejected"].mean()),
        "preference_accuracy": float(np.mean(got["chosen"] > got["rejected"])),
        "preference_accuracy_per_token": float(
            np.mean(got["chosen"] / got["chosen_len"] > got["rejected"] / got["rejected_len"])
        ),
    }
    if ref is not None and d.loss_type not in ("simpo", "orpo"):
        loss, m = dpo_loss(
            jnp.asarray(got["chosen"]), jnp.asarray(got["rejected"]),
            jnp.asarray(ref["chosen"]), jnp.asarray(ref["rejected"]),
            beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            reference_free=d.reference_free, chosen_lengths=jnp.asarray(got["chosen_len"]),
            rejected_lengths=jnp.asarray(got["rejected_len"]), discopop_tau=d.discopop_tau,
        )  # fmt: skip
        metrics["loss"] = float(loss)
        metrics.update({k: float(v) for k, v in m.items() if k.startswith("rewards/")})
    return metrics


def evaluate(
    kind: str, graphdef: Any, params: Any, examples: list[Indexed], cfg: ExperimentConfig, pad_id: int,
    mesh: Any, eval_ref: dict[str, np.ndarray] | None,
) -> dict[str, float]:  # fmt: skip
    """Held-out metrics: DPO implicit-reward metrics and log-prob preference accuracy; reward-model
    accuracy; SFT token NLL."""
    if not examples:
        return {}
    if kind == "dpo":
        got = compute_pair_logps(graphdef, params, examples, cfg, pad_id, mesh)
        return dpo_eval_metrics(got, eval_ref, cfg)
    if kind == "reward":
        from jaxrlhf.train.objectives import pair_scores

        def scores(model: Any, batch: Any) -> dict[str, jax.Array]:
            c, r = pair_scores(model, batch)
            return {"chosen": c, "rejected": r}

        fn = make_eval_fn(graphdef, scores, mesh)
        collate = _collate_fn(cfg, pad_id, None)
        c_all, r_all = np.zeros(len(examples), np.float32), np.zeros(len(examples), np.float32)
        batches = _iterate_once(examples, collate, _eval_batch_size(cfg, mesh), _length(cfg))
        for i, batch in enumerate(batches):
            idx = batches.global_batch_indices(0, i)
            out = fn(params, to_global(batch, mesh, micro=None))
            c_all[idx], r_all[idx] = (
                np.asarray(out["chosen"])[: len(idx)],
                np.asarray(out["rejected"])[: len(idx)],
            )
        loss, m = reward_loss(jnp.asarray(c_all), jnp.asarray(r_all))
        return {"loss": float(loss), **{k: float(v) for k, v in m.items()}}
    objective = SFTObjective(completion_only=cfg.sft.completion_only)

    def nll(model: Any, batch: Any) -> dict[str, jax.Array]:
        num, den, _ = objective(model, batch)
        return {"nll_sum": num, "tokens": den}

    fn = make_eval_fn(graphdef, nll, mesh)
    total, tokens = 0.0, 0.0
    for batch in _iterate_once(
        examples, _collate_fn(cfg, pad_id, None), _eval_batch_size(cfg, mesh), _length(cfg)
    ):
        out = fn(params, to_global(batch, mesh, micro=None))
        total, tokens = total + float(out["nll_sum"]), tokens + float(out["tokens"])
    mean = total / max(tokens, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def train_offline(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `cfg.kind` (sft, reward or dpo: learning from a fixed data set) as configured; returns
    metrics and the export path."""
    maybe_initialize_distributed(cfg)
    t = cfg.train
    if t.batch_size % t.grad_accum_steps:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of grad_accum_steps")
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
    data = prepare_data(cfg.data, tokenizer, kind=cfg.kind, log=say)
    tasks = task_prompts(cfg, tokenizer) if cfg.kind in ("sft", "dpo") else []
    train_ex = [Indexed(i, p) for i, p in enumerate(data.train)]
    eval_ex = [Indexed(i, p) for i, p in enumerate(data.eval)]
    pad_id = tokenizer.pad_token_id

    lora = lora_spec(cfg)
    model = from_pretrained(
        model_dir, head="score" if cfg.kind == "reward" else "lm", lora=lora,
        quantize_base=cfg.lora.quantize_base, init_score_head=cfg.kind == "reward", seed=t.seed,
        **model_kwargs(cfg, mesh, rules),
    )  # fmt: skip
    if cfg.model.adapter:
        load_adapter(model, cfg.model.adapter)
    built_with = {"attention": model.config.effective_attention, "scan_layers": model.config.scan_layers}
    objective = _objective(cfg)
    needs_ref = cfg.kind == "dpo" and objective.needs_reference
    steps_per_epoch = len(train_ex) // t.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(train_ex)} training examples are fewer than one batch (train.batch_size={t.batch_size})",
            field="train_files",
        )
    total_steps = t.max_steps or t.num_epochs * steps_per_epoch
    o = cfg.optim
    schedule = make_schedule(
        o.learning_rate,
        total_steps,
        warmup_steps=o.warmup_steps,
        kind=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
    )
    optimizer = optimizer_from_config(cfg, schedule)
    same_step_ref = needs_ref and cfg.dpo.reference == "same_step"
    trained = lora_trainable(model.head_type) if lora is not None else None
    graphdef, state = create_state(
        model, optimizer, mesh, seed=t.seed, with_reference=same_step_ref,
        reference_dtype=cfg.model.frozen_dtype, trainable=trained,
    )  # fmt: skip
    del model
    fingerprint = base_fingerprint(model_dir) if lora is not None else None

    train_ref = eval_ref = None
    if cfg.kind == "dpo":  # log-probs of the initial policy = the reference
        if needs_ref and not same_step_ref:
            everything = all_params(state)
            train_ref = _reference_logps(graphdef, everything, train_ex, cfg, pad_id, mesh, model_dir, say)
        if needs_ref and eval_ex:
            eval_ref = compute_pair_logps(graphdef, all_params(state), eval_ex, cfg, pad_id, mesh)

    batches = BatchIterator(
        train_ex, _collate_fn(cfg, pad_id, train_ref), global_batch_size=t.batch_size, seed=cfg.data.seed,
        shuffle=True, drop_last=True, length_fn=_length(cfg), shard_index=jax.process_index(),
        num_shards=jax.process_count(),
    )  # fmt: skip
    shardings = state_shardings(state)
    step_fn = make_train_step(graphdef, objective, optimizer, schedule, shardings, mesh)
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), keep=t.keep_checkpoints)
    step = 0
    if t.resume and checkpointer.latest_step() is not None:
        saved = state.replace(frozen=None)  # a LoRA checkpoint holds the adapters, not the base
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved)
        step, restored, extra = checkpointer.restore(abstract_state=abstract)
        check_base(extra, fingerprint, checkpointer.directory, cfg)
        state = restored.replace(frozen=state.frozen)
        batches.restore(extra["data"])
        say(f"resumed from step {step}")

    logger = MetricsLogger(t.output_dir, total_steps=total_steps, tensorboard=t.tensorboard, start_step=step)

    def do_eval() -> dict[str, float]:
        return evaluate(cfg.kind, graphdef, all_params(state), eval_ex, cfg, pad_id, mesh, eval_ref)

    eval_before = None
    if eval_ex and step == 0:  # at step 0 the DPO policy is the reference: reuse its log-probs
        eval_before = dpo_eval_metrics(eval_ref, eval_ref, cfg) if eval_ref is not None else do_eval()
    task_before = None
    if tasks and step == 0:
        before = nnx.merge(graphdef, all_params(state))
        task_before = run_task_eval(before, tokenizer, tasks, cfg, mesh, "before")
        eval_before = {**(eval_before or {}), **task_before.summary()}
        say(format_task_report(task_before, None))
    if eval_before:
        logger.log(step, eval_before, split="eval")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(all_params(state)))
    peak = device_peak_flops()
    crash_after = int(os.environ.get(_CRASH_ENV, "0"))
    iterator = iter(batches)

    def train_step() -> dict[str, float]:
        nonlocal state
        batch_np = next(iterator)
        tokens = float((batch_np["input_ids"] != pad_id).sum() * jax.process_count())
        start = time.perf_counter()
        state, metrics = step_fn(state, to_global(batch_np, mesh, micro=t.grad_accum_steps))
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        seconds = time.perf_counter() - start
        metrics["tokens_per_second"] = tokens / seconds
        metrics["step_seconds"] = seconds
        if peak:
            metrics["mfu"] = mfu(metrics["tokens_per_second"], n_params, peak_flops=peak * jax.device_count())
        metrics["compilations"] = step_fn.num_compilations()
        return metrics

    def snapshot() -> tuple[Any, dict[str, Any]]:
        extra = {"data": batches.state(), "config": config_to_dict(cfg), "base_fingerprint": fingerprint}
        return state.replace(frozen=None), extra

    def after_step(step: int, saved: bool) -> None:
        if saved and crash_after and step >= crash_after:  # test hook: die right after a checkpoint
            checkpointer.wait()
            os._exit(17)
        if t.eval_every and step % t.eval_every == 0 and step < total_steps and eval_ex:
            logger.log(step, do_eval(), split="eval")

    try:
        loop = run_loop(
            train_step, snapshot, checkpointer, logger, step=step, total_steps=total_steps,
            log_every=t.log_every, save_every=t.save_every, say=say, after_step=after_step,
            on_nonfinite=t.on_nonfinite,
        )  # fmt: skip
    except BaseException:  # a stop (non-finite step, error, Ctrl-C): flush the metrics written so far
        logger.close()
        raise
    finally:  # and finish pending checkpoints
        checkpointer.close()
    step, history, preempted = loop.step, loop.history, loop.preempted
    eval_after = None if preempted or not eval_ex else do_eval()
    task_after = None
    if tasks and not preempted:
        after = nnx.merge(graphdef, all_params(state))
        task_after = run_task_eval(after, tokenizer, tasks, cfg, mesh, "after")
        eval_after = {**(eval_after or {}), **task_after.summary()}
        say(format_task_report(task_before, task_after))
    if eval_after:
        logger.log(step, eval_after, split="eval")
    export_dir = None
    if t.export and not preempted:
        export_dir = export_model(nnx.merge(graphdef, all_params(state)), cfg, tokenizer, say)
    summary = {"steps": step, "eval_before": eval_before, "eval_after": eval_after, "export_dir": export_dir,
               "preempted": preempted, "data": data.report, "model": built_with}  # fmt: skip
    if t.on_nonfinite == "skip" and history:
        summary["nonfinite_skipped"] = int(history[-1].get("nonfinite_skipped", 0))
    if jax.process_index() == 0:
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    return TrainResult(step, history, eval_before, eval_after, export_dir, preempted, task_before, task_after)
