"""The project's own step functions lowered on abstract inputs: what a run would compile, unrun.

Steps (`PlanSpec.step`):
  sft            `make_train_step` + `SFTObjective`
  reward         `make_train_step` + `RewardObjective` (score head, packed pairs); with
                 `PlanSpec.slots`, `GroupedRewardObjective` on packed prompt groups
  dpo            `make_train_step` + `DPOObjective`, precomputed reference log-probs (policy only)
  dpo_same_step  the same with a frozen reference in the state (`TrainState.ref_params`)
  ppo            `PPOEngine._update_fn` (policy + critic, clipped losses, one jit)
  score          `PPOEngine._score_fn`: the rollout scoring pass (reference, critic, reward model)
  generate       `sampling._generate`: the KV-cache sampler of the rollout (prompt P, N new tokens)
  grpo           `GRPOEngine._update_fn`: `batch` prompts x `num_generations` completions
  grpo_generate  the sampler on the `batch x num_generations` prompt rows of a GRPO rollout

Engines are built with `__new__` (no `__init__`, which loads and allocates) and given the attributes
their compiled functions read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.plan.shapes import (
    _cast,
    _rows,
    _scalar,
    abstract_opt_state,
    abstract_params,
    dpo_batch,
    group_batch,
    nbytes,
    sft_batch,
)
from jaxrlhf.train.algorithms.grpo import GRPOConfig
from jaxrlhf.train.algorithms.ppo import PPOConfig
from jaxrlhf.train.objectives import DPOObjective, GroupedRewardObjective, RewardObjective, SFTObjective
from jaxrlhf.train.step import TrainState, make_optimizer, make_schedule, make_train_step, state_shardings

STEPS = ("sft", "reward", "dpo", "dpo_same_step", "ppo", "score", "generate", "grpo", "grpo_generate")
TRAIN_STEPS = ("sft", "reward", "dpo", "dpo_same_step")
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")


@dataclasses.dataclass
class PlanSpec:
    """One run shape to compile: a model, a step, a mesh and the settings that change memory."""

    model: str  # a label (the short name or the path)
    hf: dict[str, Any]  # the model's config.json
    step: str
    mesh: dict[str, int]  # {"data", "fsdp", "tensor"} sizes
    remat: str = "full"
    batch: int = 64  # rows per optimizer step (DPO / reward: pairs; grouped reward, PPO / GRPO: prompts)
    seq: int = 2048  # tokens per row (DPO: one packed pair; PPO / sampler: prompt + completion)
    accum: int = 1  # micro-batches (train steps) or num_mini_batches (ppo, grpo)
    target_len: int | None = None  # DPO completion positions per row (default: seq)
    prompt_len: int | None = None  # PPO / GRPO / sampler prompt tokens (default: seq / 2)
    frozen_dtype: str = "float32"  # model.frozen_dtype: references and reward models
    scan: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None
    quantize: str = "none"
    attention: str = "auto"
    dtype: str = "bfloat16"  # model.dtype: compute
    param_dtype: str = "float32"  # model.param_dtype: master weights (and Adam's moments follow them)
    num_generations: int = 8  # GRPO completions per prompt
    grpo_beta: float = 0.0  # GRPO's KL weight: > 0 keeps a reference
    epochs: int | None = None  # passes over a rollout: ppo.num_ppo_epochs (4), grpo.num_iterations (1)
    slots: int = 0  # reward.group_by_prompt: completions per row (0: one pair per row)
    comparisons: int = 0  # reward.group_by_prompt: comparisons per row

    @property
    def prompt(self) -> int:
        return self.prompt_len or self.seq // 2

    @property
    def passes(self) -> int:
        return self.epochs or (4 if self.step == "ppo" else 1)

    @property
    def rows(self) -> int:
        """Sequences in the step: GRPO's batch counts prompts, each sampled num_generations times."""
        return self.batch * self.num_generations if self.step.startswith("grpo") else self.batch


def _optimizer() -> Any:
    return make_optimizer(make_schedule(1e-6, 1000, warmup_steps=10))


def lower_train(spec: PlanSpec, cfg: ModelConfig, mesh: Mesh) -> tuple[Any, dict[str, float]]:
    schedule = make_schedule(1e-6, 1000, warmup_steps=10)
    optimizer = make_optimizer(schedule)
    lora = cfg.lora is not None
    head = "score" if spec.step == "reward" else "lm"
    graphdef, params, *frozen = abstract_params(cfg, head, mesh, split_trainable=lora)
    same_step = spec.step == "dpo_same_step"
    state = TrainState(
        step=_scalar(mesh, (), jnp.int32),
        params=params,
        opt_state=abstract_opt_state(optimizer, params),
        rng=_scalar(mesh, (2,), jnp.uint32),
        # model.frozen_dtype: the same-step reference may be stored narrower than the policy; with
        # LoRA the reference is the frozen base with the adapters off (no copy)
        ref_params=_cast(params, spec.frozen_dtype) if same_step and not lora else None,
        frozen=frozen[0] if lora else None,
        base_reference=lora and same_step,
    )
    a, b = spec.accum, spec.batch // spec.accum
    objective: Any
    if spec.step == "sft":
        objective, batch = SFTObjective(), sft_batch(mesh, a, b, spec.seq)
    elif spec.step == "reward" and spec.slots:
        objective = GroupedRewardObjective()
        batch = group_batch(mesh, a, b, spec.seq, spec.slots, spec.comparisons)
    elif spec.step == "reward":
        objective = RewardObjective()
        batch = dpo_batch(mesh, a, b, spec.seq, spec.target_len or spec.seq, precomputed=False)
    else:
        objective = DPOObjective()
        batch = dpo_batch(mesh, a, b, spec.seq, spec.target_len or spec.seq, precomputed=spec.step == "dpo")
    run = make_train_step(graphdef, objective, optimizer, schedule, state_shardings(state), mesh)
    parts = {
        "params": nbytes(params),
        "opt_state": nbytes(state.opt_state),
        "batch": nbytes(batch),
        "state_unsharded": nbytes((state.params, state.opt_state, state.ref_params), unsharded=True),
    }
    if state.frozen is not None:
        parts["frozen_base"] = nbytes(state.frozen)
    if state.ref_params is not None:
        parts["reference"] = nbytes(state.ref_params)
    return run.lower(state, batch), parts


def _ppo_engine(cfg: ModelConfig, mesh: Mesh, spec: PlanSpec, minibatches: int) -> tuple[Any, dict]:
    """A `PPOEngine` with what `_update_fn` / `_score_fn` read, and abstract parameters."""
    from jaxrlhf.train.ppo import PPOEngine

    engine = PPOEngine.__new__(PPOEngine)
    engine.cfg = PPOConfig(num_mini_batches=minibatches, num_ppo_epochs=spec.passes)
    engine.optimizer, engine.mesh = _optimizer(), mesh
    engine.eos = np.asarray([0, 1], np.int32)
    engine.policy_def, policy = abstract_params(cfg, "lm", mesh)
    engine.critic_def, critic = abstract_params(cfg, "score", mesh)
    frozen = jnp.dtype(spec.frozen_dtype)
    engine.rm_def, rm = abstract_params(cfg, "score", mesh, frozen)
    _, ref = abstract_params(cfg, "lm", mesh, frozen)
    return engine, {"params": {"policy": policy, "critic": critic}, "ref": ref, "rm": rm}


def lower_sampler(spec: PlanSpec, cfg: ModelConfig, mesh: Mesh) -> tuple[Any, dict[str, float]]:
    """The rollout sampler on the policy: `rows` prompts of P tokens, N new tokens, KV cache [B, P+N]."""
    from jaxrlhf.generation.sampling import _generate

    policy_def, policy = abstract_params(cfg, "lm", mesh)
    b, p = spec.rows, spec.prompt
    row = lambda shape, dtype: _rows(mesh, shape, dtype, micro=False)  # noqa: E731
    prompts, prompt_mask = row((b, p), jnp.int32), row((b, p), jnp.int32)
    lowered = _generate.lower(
        policy_def, policy, prompts, prompt_mask, _scalar(mesh, (2,), jnp.int32),
        _scalar(mesh, (), jnp.int32), _scalar(mesh, (2,), jnp.uint32), max_new_tokens=spec.seq - p,
        temperature=1.0, top_k=0, top_p=1.0,
    )  # fmt: skip
    # what the RL engine keeps on the device beside the sampler: Adam state (and PPO's other models)
    opt = nbytes(abstract_opt_state(_optimizer(), policy))
    resident = opt
    if spec.step == "generate":  # PPO: the critic (+ its Adam state), the reference and reward model
        frozen = jnp.dtype(spec.frozen_dtype).itemsize / 4
        critic = nbytes(abstract_params(cfg, "score", mesh)[1])
        resident += 3 * critic + frozen * (nbytes(policy) + critic)
    return lowered, {"params": nbytes(policy), "batch": nbytes((prompts, prompt_mask)), "resident": resident}


def lower_ppo(spec: PlanSpec, cfg: ModelConfig, mesh: Mesh) -> tuple[Any, dict[str, float]]:
    from jaxrlhf.generation.sampling import Generation
    from jaxrlhf.train.ppo import PPOState, Rollout

    engine, m = _ppo_engine(cfg, mesh, spec, spec.accum if spec.step == "ppo" else 1)
    b, length, p = spec.batch, spec.seq, spec.prompt
    n = length - p
    i32, f32 = jnp.int32, jnp.float32
    row = lambda shape, dtype: _rows(mesh, shape, dtype, micro=False)  # noqa: E731
    ids, mask = row((b, length), i32), row((b, length), i32)
    opt_state = abstract_opt_state(engine.optimizer, m["params"])
    if spec.step == "ppo":
        state = PPOState(step=_scalar(mesh, (), i32), params=m["params"], opt_state=opt_state,
                         rng=_scalar(mesh, (2,), jnp.uint32))  # fmt: skip
        rollout = Rollout(
            ids, mask, row((b, length), i32), row((b, n), i32),
            *(row((b, n), f32) for _ in range(5)), row((b,), f32), row((b, n), f32), row((b, n), f32),
        )  # fmt: skip
        update = jax.jit(engine._update_fn, static_argnames=("prompt_len",), donate_argnums=(0,))
        parts = {"params": nbytes(m["params"]), "opt_state": nbytes(opt_state), "batch": nbytes(rollout),
                 "state_unsharded": nbytes((m["params"], opt_state), unsharded=True),
                 "resident": nbytes(m["ref"]) + nbytes(m["rm"])}  # fmt: skip
        return update.lower(state, rollout, {"policy": None, "critic": None}, prompt_len=p), parts
    # score: without ppo.rescore_policy (the default) the policy is not read: its parameters stay
    # resident beside this function, with the Adam state
    gen = Generation(row((b, n), i32), row((b, n), i32), row((b, n), f32), row((b, n), f32))
    score = jax.jit(engine._score_fn, static_argnames=("prompt_len",))
    inputs = (ids, mask, gen, None, _scalar(mesh, (), f32))
    parts = {"params": nbytes(m["params"]["critic"]) + nbytes(m["ref"]) + nbytes(m["rm"]),
             "batch": nbytes(inputs),
             "resident": nbytes(opt_state) + nbytes(m["params"]["policy"])}  # fmt: skip
    frozen = {"policy": None, "critic": None}
    lowered = score.lower(m["params"], frozen, m["ref"], m["rm"], *inputs, prompt_len=p)
    return lowered, parts


def lower_grpo(spec: PlanSpec, cfg: ModelConfig, mesh: Mesh) -> tuple[Any, dict[str, float]]:
    """`GRPOEngine._update_fn` on a rollout of `batch` prompts x `num_generations` completions."""
    from jaxrlhf.train.grpo import GroupRollout, GRPOEngine
    from jaxrlhf.train.rollout import RolloutState

    p, g, lp = spec.batch, spec.num_generations, spec.prompt
    n = spec.seq - lp
    engine = GRPOEngine.__new__(GRPOEngine)
    engine.cfg = GRPOConfig(num_generations=g, max_completion_length=n, num_mini_batches=spec.accum,
                            beta=spec.grpo_beta, num_iterations=spec.passes)  # fmt: skip
    engine.optimizer, engine.mesh, engine.estimator = _optimizer(), mesh, "grpo"
    engine.policy_def, policy = abstract_params(cfg, "lm", mesh)
    engine.lora, engine.frozen, engine.ref_params = False, {"policy": None}, None
    engine.has_reference = spec.grpo_beta > 0
    params = {"policy": policy}
    opt_state = abstract_opt_state(engine.optimizer, params)
    i32, f32 = jnp.int32, jnp.float32
    row = lambda shape, dtype: _rows(mesh, shape, dtype, micro=False)  # noqa: E731
    rollout = GroupRollout(
        row((p, lp), i32), row((p, lp), i32), row((p, g, n), i32), row((p, g, n), i32), row((p, g, n), i32),
        row((p, g, n), f32), row((p, g, n), f32) if engine.has_reference else None, row((p, g), f32),
        row((p, g), f32),
    )  # fmt: skip
    state = RolloutState(step=_scalar(mesh, (), i32), params=params, opt_state=opt_state,
                         rng=_scalar(mesh, (2,), jnp.uint32))  # fmt: skip
    update = jax.jit(engine._update_fn, donate_argnums=(0,))
    parts = {"params": nbytes(params), "opt_state": nbytes(opt_state), "batch": nbytes(rollout),
             "state_unsharded": nbytes((params, opt_state), unsharded=True)}  # fmt: skip
    return update.lower(state, rollout, {"policy": None}), parts


def lower(spec: PlanSpec, cfg: ModelConfig, mesh: Mesh) -> tuple[Any, dict[str, float]]:
    """`(lowered, per-device bytes of the inputs by part)` for `spec.step`."""
    if spec.step in TRAIN_STEPS:
        return lower_train(spec, cfg, mesh)
    if spec.step in ("ppo", "score"):
        return lower_ppo(spec, cfg, mesh)
    if spec.step in ("generate", "grpo_generate"):
        return lower_sampler(spec, cfg, mesh)
    if spec.step == "grpo":
        return lower_grpo(spec, cfg, mesh)
    raise ValueError(f"unknown step {spec.step!r}: expected one of {', '.join(STEPS)}")
