"""The PPO training loop: `train_ppo(cfg) -> TrainResult` (`jaxrlhf train ppo --config ...`).

Prompts come from the `prompt` column of the training files (strings, or conversations rendered with
the chat template and a generation prompt). Each step is one `PPOEngine.step`: a rollout of
`train.batch_size` prompts, scoring, advantages and `ppo.num_ppo_epochs` x minibatch updates. Same
engine as the other trainers: mesh, orbax checkpoints with exact resume, SIGTERM save, JSONL /
TensorBoard metrics, and the trained policy exported with `save_pretrained`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import BatchIterator
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.models.lora import base_fingerprint
from jaxrlhf.models.peft_io import load_adapter
from jaxrlhf.parallel import host_array
from jaxrlhf.train.common import (
    TrainResult,
    lora_spec,
    maybe_initialize_distributed,
    mesh_and_rules,
    model_directory,
    model_kwargs,
    optimizer_from_config,
    task_prompts,
    to_global,
    tokenizer_directory,
)
from jaxrlhf.train.config import ConfigError, ExperimentConfig
from jaxrlhf.train.online import decode_rollout, load_prompts, prompt_batches, run_online
from jaxrlhf.train.pipeline import held_out_split, resolve_data_files
from jaxrlhf.train.ppo import PPOEngine, ScoreFn
from jaxrlhf.train.step import make_schedule


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
    kw = model_kwargs(cfg, mesh, rules)
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
    pad_id, buckets = tokenizer.pad_token_id, cfg.data.buckets
    batches = prompt_batches(prompts, pad_id, buckets, t.batch_size, seed=cfg.data.seed)

    def held_out() -> dict[str, float] | None:
        if not eval_prompts:
            return None
        rows = prompt_batches(eval_prompts, pad_id, buckets, t.batch_size, train=False)
        return evaluate_policy(engine, rows, mesh, score_fn, seed=t.seed)

    def restore_kl(extra: dict[str, Any]) -> None:
        engine.kl_coef = float(extra["kl_coef"])

    def show_samples(step: int, say: Callable[[str], None]) -> None:
        r = engine.last_rollout  # gathered on every process (a collective), printed by process 0
        ids, response_mask, scores = host_array(r.ids), host_array(r.response_mask), host_array(r.scores)
        prompts, completions = decode_rollout(ids, response_mask, tokenizer)
        say(f"step {step} samples (score with the missing-EOS rule | prompt end | response):")
        for i in range(min(3, len(completions))):
            say(f"  {scores[i]:+.2f} | ...{prompts[i].strip()[-60:]!r} | {completions[i]!r}")

    return run_online(
        cfg, engine, batches, lambda b: engine.step(b["prompt_ids"], b["prompt_mask"], score_fn),
        tokenizer=tokenizer, tasks=tasks, mesh=mesh, total_steps=total_steps, fingerprint=fingerprint,
        say=say, show_samples=show_samples, held_out=held_out,
        save_extra=lambda: {"kl_coef": engine.kl_coef}, restore_extra=restore_kl,
    )  # fmt: skip
