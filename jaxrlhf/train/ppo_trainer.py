"""The PPO training loop: `train_ppo(cfg) -> TrainResult` (`jaxrlhf train ppo --config ...`).

Prompts come from the `prompt` column of the training files (strings, or conversations rendered with
the chat template and a generation prompt). Each step is one `PPOEngine.step`: a rollout of
`train.batch_size` prompts, scoring, advantages and `ppo.num_ppo_epochs` x minibatch updates. Same
engine as the other trainers: mesh, orbax checkpoints with exact resume, SIGTERM save, JSONL /
TensorBoard metrics, and the trained policy exported with `save_pretrained`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import BatchIterator, DataError, bucket_length, left_pad, load_rows
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
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.metrics import MetricsLogger
from jaxrlhf.train.pipeline import held_out_split, resolve_data_files
from jaxrlhf.train.ppo import PPOEngine, ScoreFn
from jaxrlhf.train.step import make_schedule


def load_prompts(files: list[str], tokenizer: Any, *, max_prompt_length: int) -> list[np.ndarray]:
    """Token ids of every row's `prompt` (conversations get the chat template and a generation
    prompt), truncated from the left to `max_prompt_length`. Bad rows raise `DataError`."""
    return [ids for ids, _ in load_prompt_rows(files, tokenizer, max_prompt_length=max_prompt_length)]


def load_prompt_rows(
    files: list[str], tokenizer: Any, *, max_prompt_length: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """`load_prompts`, each with the row's other columns (what GRPO reward functions receive)."""
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


def load_score_fn(spec: str, tokenizer: Any) -> ScoreFn:
    """`module:function` taking `(prompts: list[str], completions: list[str]) -> scores`, wrapped to
    take token ids."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"ppo.reward_fn: expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"ppo.reward_fn: cannot import module {module!r} ({e})") from e
    except AttributeError:
        raise ConfigError(f"ppo.reward_fn: module {module!r} has no function {name!r}") from None

    def score(ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        return np.asarray(fn(*decode_rollout(ids, response_mask, tokenizer)), np.float32)

    return score


def _collate_prompts(pad_id: int, buckets: Any) -> Callable[..., dict[str, np.ndarray]]:
    def collate(rows: list[np.ndarray], *, batch_size: int, min_length: int) -> dict[str, np.ndarray]:
        width = bucket_length(max([min_length, *(len(r) for r in rows)]), buckets)
        ids, mask = left_pad(rows, pad_id, width=width, batch_size=batch_size)
        return {"prompt_ids": ids, "prompt_mask": mask}

    return collate


def _train_and_eval_prompts(cfg: ExperimentConfig, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """Training prompts, and held-out ones: `data.eval_files`, or `data.eval_fraction` of the
    training prompts (chosen by `data.seed`), or none."""
    d = cfg.data
    length = d.max_prompt_length
    prompts = load_prompts(resolve_data_files(d.train_files), tokenizer, max_prompt_length=length)
    if d.eval_files:
        return prompts, load_prompts(resolve_data_files(d.eval_files), tokenizer, max_prompt_length=length)
    if d.eval_fraction > 0:
        train_idx, eval_idx = held_out_split(len(prompts), d.eval_fraction, d.seed)
        return [prompts[i] for i in train_idx], [prompts[i] for i in eval_idx]
    return prompts, []


def evaluate_policy(
    engine: PPOEngine, batches: BatchIterator, mesh: Any, score_fn: ScoreFn | None, *, seed: int
) -> dict[str, float]:
    """Means over the held-out prompts of `PPOEngine.evaluate` (a fixed sampling seed per batch):
    the score, the summed KL to the reference, `score - kl_coef * kl`, response length and the
    fraction of responses that stop. Padding rows of the last batch are left out."""
    per_row: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        rows = to_global(batch, mesh, micro=None)
        out = engine.evaluate(rows["prompt_ids"], rows["prompt_mask"], score_fn, seed=seed * 100_003 + i)
        real = host_array(rows["prompt_mask"]).sum(axis=1) > 0
        for k, v in out.items():
            per_row.setdefault(k, []).append(v[real])
    v = {k: np.concatenate(x) for k, x in per_row.items()}
    return {
        "objective/scores": float(v["scores"].mean()),
        "objective/kl": float(v["kl"].mean()),
        "objective/rlhf_reward": float((v["scores"] - engine.kl_coef * v["kl"]).mean()),
        "val/response_length": float(v["length"].mean()),
        "val/eos_fraction": float(v["eos"].mean()),
        "prompts": float(len(v["scores"])),
    }


def train_ppo(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """RLHF with PPO as configured (`kind: ppo`)."""
    maybe_initialize_distributed(cfg)
    t, p = cfg.train, cfg.ppo
    if (p.reward_model is None) == (p.reward_fn is None):
        raise ConfigError("ppo: give exactly one of ppo.reward_model and ppo.reward_fn")
    if t.batch_size % p.num_mini_batches:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of ppo.num_mini_batches "
            f"({p.num_mini_batches})"
        )
    mesh, rules = mesh_and_rules(cfg)
    say = log or (lambda msg: print(msg, flush=True))
    policy_dir = model_directory(cfg.model.path)  # bad checkpoints fail here, before any data is read
    reward_dir = model_directory(p.reward_model) if p.reward_model is not None else None
    tokenizer = load_tokenizer(tokenizer_directory(cfg, policy_dir))
    score_fn = load_score_fn(p.reward_fn, tokenizer) if p.reward_fn else None  # a typo fails here, early
    prompts, eval_prompts = _train_and_eval_prompts(cfg, tokenizer)
    tasks = task_prompts(cfg, tokenizer)
    say(
        f"ppo: {len(prompts)} prompts ({len(eval_prompts)} held out), {jax.device_count()} devices, "
        f"mesh {dict(mesh.shape)}"
    )
    kw = dict(
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        mesh=mesh,
        rules=rules,
        remat=cfg.model.remat,
        scan_layers=cfg.model.use_scan,
        frozen_layers=cfg.model.frozen_layers,
        attention=cfg.model.attention,
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        moe_dispatch=cfg.model.moe_dispatch,
    )
    lora = lora_spec(cfg)  # LoRA: policy adapters, the base as the reference (and the critic's base)
    quant = {"lora": lora, "quantize_base": cfg.lora.quantize_base}
    policy = from_pretrained(policy_dir, **kw, **quant)
    if cfg.model.adapter:
        load_adapter(policy, cfg.model.adapter)
    reward_model = None
    if reward_dir is not None:
        frozen = {"param_dtype": cfg.model.frozen_dtype} if cfg.model.frozen_dtype else {}
        reward_model = from_pretrained(reward_dir, head="score", **{**kw, **frozen})
    critic_kw = {**kw, **quant} if lora is not None and cfg.lora.critic else kw
    critic_from = "reward_model" if p.critic_init == "reward_model" and reward_dir is not None else "policy"
    if critic_from == "reward_model":
        critic = from_pretrained(reward_dir, head="score", **critic_kw)
    else:
        critic = from_pretrained(policy_dir, head="score", init_score_head=True, seed=t.seed, **critic_kw)
    total_steps = t.max_steps or t.num_epochs * (len(prompts) // t.batch_size)
    o = cfg.optim
    schedule = make_schedule(
        o.learning_rate,
        total_steps * p.num_ppo_epochs * p.num_mini_batches,
        warmup_steps=o.warmup_steps,
        kind=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
    )
    optimizer = optimizer_from_config(cfg, schedule)
    eos_ids = sorted({int(tokenizer.eos_token_id)})
    engine = PPOEngine(
        policy,
        critic,
        reward_model,
        p,
        optimizer,
        mesh,
        eos_token_ids=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        seed=t.seed,
        frozen_dtype=cfg.model.frozen_dtype,
        critic_frozen_from=critic_from,
    )
    del policy, critic, reward_model
    fingerprint = base_fingerprint(policy_dir) if lora is not None else None
    collate = _collate_prompts(tokenizer.pad_token_id, cfg.data.buckets)
    batches = BatchIterator(
        prompts,
        collate,
        global_batch_size=t.batch_size,
        seed=cfg.data.seed,
        drop_last=True,
        length_fn=len,  # the prompt width every host pads to: the longest prompt of the global batch
        shard_index=jax.process_index(),
        num_shards=jax.process_count(),
    )
    os.makedirs(t.output_dir, exist_ok=True)
    fresh_start(t.output_dir, t.resume)
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), keep=t.keep_checkpoints)

    def snapshot() -> tuple[Any, dict[str, Any]]:  # the engine state, and what exact resume needs
        extra = {"data": batches.state(), "kl_coef": engine.kl_coef, "config": config_to_dict(cfg),
                 "base_fingerprint": fingerprint}  # fmt: skip
        return engine.state, extra

    step = 0
    if t.resume and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), engine.state
        )
        step, engine.state, extra = checkpointer.restore(abstract_state=abstract)
        check_base(extra, fingerprint, checkpointer.directory, cfg)
        batches.restore(extra["data"])
        engine.kl_coef = float(extra["kl_coef"])
        say(f"resumed from step {step}")
    logger = MetricsLogger(t.output_dir, total_steps=total_steps, tensorboard=t.tensorboard, start_step=step)
    iterator = iter(batches)

    def do_eval() -> dict[str, float] | None:
        if not eval_prompts:
            return None
        held_out = BatchIterator(
            eval_prompts, collate, global_batch_size=t.batch_size, shuffle=False, drop_last=False,
            num_epochs=1, length_fn=len, shard_index=jax.process_index(), num_shards=jax.process_count(),
        )  # fmt: skip
        return evaluate_policy(engine, held_out, mesh, score_fn, seed=t.seed)

    eval_before = do_eval() if step == 0 else None
    task_before = None
    if tasks and step == 0:
        task_before = run_task_eval(engine.policy_model(), tokenizer, tasks, cfg, mesh, "before")
        eval_before = {**(eval_before or {}), **task_before.summary()}
        logger.print(format_task_report(task_before, None))
    if eval_before:
        logger.log(step, eval_before, split="eval")

    def train_step() -> dict[str, float]:
        batch = to_global(next(iterator), mesh, micro=None)  # this host's rows -> the global batch
        return engine.step(batch["prompt_ids"], batch["prompt_mask"], score_fn)

    def after_step(step: int, saved: bool) -> None:
        if t.eval_every and step % t.eval_every == 0 and step < total_steps:
            metrics = do_eval()
            if metrics:
                logger.log(step, metrics, split="eval")
        if step in (1, total_steps):  # what the scores mean, at the start and the end
            show_samples(step)

    def show_samples(step: int) -> None:
        r = engine.last_rollout  # gathered on every process (a collective), printed by process 0
        ids, response_mask, scores = host_array(r.ids), host_array(r.response_mask), host_array(r.scores)
        prompts, completions = decode_rollout(ids, response_mask, tokenizer)
        logger.print(f"step {step} samples (score with the missing-EOS rule | prompt end | response):")
        for i in range(min(3, len(completions))):
            logger.print(f"  {scores[i]:+.2f} | ...{prompts[i].strip()[-60:]!r} | {completions[i]!r}")

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
    eval_after = None if preempted else do_eval()
    task_after = None
    if tasks and not preempted:
        task_after = run_task_eval(engine.policy_model(), tokenizer, tasks, cfg, mesh, "after")
        eval_after = {**(eval_after or {}), **task_after.summary()}
        logger.print(format_task_report(task_before, task_after))
    if eval_after:
        logger.log(step, eval_after, split="eval")
    export_dir = None
    if t.export and not preempted:
        export_dir = export_model(engine.policy_model(), cfg, tokenizer, logger.print)
    summary = {
        "steps": step,
        "preempted": preempted,
        "export_dir": export_dir,
        "first": history[0] if history else None,
        "last": history[-1] if history else None,
        "eval_before": eval_before,
        "eval_after": eval_after,
    }
    if jax.process_index() == 0:
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    return TrainResult(step, history, eval_before, eval_after, export_dir, preempted, task_before, task_after)
