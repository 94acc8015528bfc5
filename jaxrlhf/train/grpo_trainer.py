"""The GRPO / RLOO training loop: `train_grpo(cfg) -> TrainResult` (`jaxrlhf train grpo|rloo`).

Prompts come from the `prompt` column of the training files; every other column of a row (e.g.
`answer`, `family`) is passed to the reward functions by name, one entry per completion. Each step is
one `GRPOEngine.step` on `train.batch_size` prompts x `grpo.num_generations` completions. Same
engine as the other trainers: mesh, LoRA, orbax checkpoints with exact resume, SIGTERM save, JSONL /
TensorBoard metrics, task accuracy on held-out prompts with checkable answers, and the export.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import DataError
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
    tokenizer_directory,
)
from jaxrlhf.train.config import ConfigError, ExperimentConfig
from jaxrlhf.train.grpo import GRPOEngine, RewardFn
from jaxrlhf.train.online import decode_rollout, load_prompt_rows, prompt_batches, run_online
from jaxrlhf.train.pipeline import resolve_data_files
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
    kw = model_kwargs(cfg, mesh, rules)
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
    batches = prompt_batches([ids for ids, _ in rows], tokenizer.pad_token_id, cfg.data.buckets, t.batch_size,
                             seed=cfg.data.seed)  # fmt: skip

    def train_step(batch: dict[str, jax.Array]) -> dict[str, float]:
        index = host_array(batch["index"])  # the global batch's rows: their reward-function columns
        fn = reward_table(funcs, tokenizer, columns, g.num_generations, index) if funcs else None
        return engine.step(batch["prompt_ids"], batch["prompt_mask"], fn, [n for n, _ in funcs])

    def show_samples(step: int, say: Callable[[str], None]) -> None:
        r = engine.last_rollout.flat()  # gathered on every process (a collective), printed by process 0
        ids, rewards, completion_mask = (host_array(r[k]) for k in ("ids", "rewards", "completion_mask"))
        prompts, completions = decode_rollout(ids, completion_mask, tokenizer)
        say(f"step {step} samples (reward | prompt end | completion):")
        for i in range(0, min(3 * g.num_generations, len(completions)), g.num_generations):
            say(f"  {rewards[i]:+.2f} | ...{prompts[i].strip()[-60:]!r} | {completions[i]!r}")

    return run_online(
        cfg, engine, batches, train_step, tokenizer=tokenizer, tasks=tasks, mesh=mesh,
        total_steps=total_steps, fingerprint=fingerprint, say=say, show_samples=show_samples,
    )  # fmt: skip
