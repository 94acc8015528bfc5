"""Typed experiment configuration: pydantic models loaded from YAML plus ``key=value`` overrides.

A config file is a YAML mapping with the top-level ``kind`` and one section per `Section` model:
the common ones below (``model``, ``data``, ``optim``, ``mesh``, ``train``, ``task_eval``,
``reward_eval``, ``lora``) and one per training method, which its module in `jaxrlhf.train.algorithms` owns
(``dpo``, ``reward``, ``sft``, ``ppo``, ``grpo``, ``kto``, ``online_dpo``), e.g. ``kind: dpo``
and ``optim: {learning_rate: 5.0e-7}``; overrides are dotted ``key=value`` strings applied on top
of it (``dpo.loss_type=ipo data.buckets=[256,512]``). Precedence: defaults < YAML file <
overrides (later ones win).

An override's text is parsed with ``yaml.safe_load``; pydantic (lax mode) then checks and converts
every value, except that bools are never numbers, an int takes an integral ``1e3``, ``X | None``
takes the text ``None`` and a ``str`` field an override's raw text (``model.path=007``). Any error
is a one-line `ConfigError` naming the dotted key (unknown keys: with the closest valid one).

A field's help is the docstring under it; docs/configuration.md is generated from them::

    python -c "from jaxrlhf.train import config_markdown as m; print(m(), end='')" \\
        > docs/configuration.md

`ExperimentConfig` is built by `experiment_class` (in the registry, `jaxrlhf.train.algorithms`) from
the common sections and the methods' sections; loading, errors and docs work for any such class.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from jaxrlhf.models.config import ATTENTION_BACKENDS, MOE_DISPATCHES, REMAT_POLICIES

__all__ = [
    "AXES", "ConfigError", "DataConfig", "ExperimentBase", "LoRAConfig", "MeshConfig", "ModelConfig",
    "OptimConfig", "RewardEvalConfig", "Section", "TaskEvalConfig", "TrainConfig", "config_from_dict",
    "config_markdown", "config_to_dict", "experiment_class", "fail", "load_config",
]  # fmt: skip

AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")  # mesh axes, as in jaxrlhf.parallel
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "trackio")  # train.report_to (jaxrlhf.train.trackers)
class ConfigError(ValueError):
    """A config file or override is invalid: unknown key, wrong type, bad choice or bad value."""


def fail(msg: str) -> PydanticCustomError:
    """A failed value check, reported as ``key msg, got value``."""
    return PydanticCustomError("config_check", "{msg}", {"msg": msg})


# --------------------------------------------------------------------------------------------------
# Sections


class Section(BaseModel):
    """Base of the config models: unknown keys are errors, assignments are validated, and an invalid
    value raises `ConfigError` naming its dotted key (``section.field``)."""

    # A field's help is the docstring under it (its `description`); `config_to_dict` keeps inf/nan floats.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, ser_json_inf_nan="constants"
    )

    SECTION: ClassVar[str] = ""  # its key in config files (set by `experiment_class`), for messages
    KINDS: ClassVar[tuple[str, ...]] = ()  # a method section: the kinds it configures (() = its name)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self._error(e, data) from None

    # Validating a nested section must not go through __init__ (its errors would lose the outer key):
    # the marker tells pydantic this __init__ adds nothing to validation (as pydantic's RootModel does).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:  # validate_assignment
            raise self._error(e, {name: value}) from None

    @classmethod
    def _error(cls, e: ValidationError, data: Any) -> ConfigError:
        return ConfigError(_message(e.errors()[0], cls, data, f"{cls.SECTION}." if cls.SECTION else ""))

    @field_validator("*", mode="before")
    @classmethod
    def _lenient(cls, value: Any, info: ValidationInfo) -> Any:
        """What YAML text needs beyond pydantic's lax mode, and no bools taken as numbers."""
        kinds = _members(cls.model_fields[info.field_name or ""].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("bool_not_number", "a bool is not a number")
        if isinstance(value, str) and value in ("None", "none") and type(None) in kinds:
            return None
        if isinstance(value, str) and int in kinds and str not in kinds:
            try:  # `1e3`: PyYAML reads an exponent without a dot as a string
                number = float(value)
            except ValueError:
                return value
            return int(number) if number.is_integer() else value
        return value

    def replace(self, **changes: Any) -> Self:
        """A validated copy with `changes` (what `dataclasses.replace` did for the old dataclasses)."""
        return type(self)(**{**dict(self), **changes})


class ModelConfig(Section):
    """The policy / reward model to train."""

    path: str = "demo"
    """Hugging Face checkpoint directory or hub id; "demo" is the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id (None: same as `path`)."""
    dtype: Literal[DTYPES] = "float32"
    """Computation dtype of activations."""
    param_dtype: Literal[DTYPES] = "float32"
    """Storage dtype of the parameters."""
    remat: bool | str = "auto"
    """What the backward pass keeps of each decoder layer (jax.checkpoint policies): "auto" (dots_saveable
    with scanned layers, none unrolled: each as fast as the other), "none" (everything), "full" (the layer
    input only: recompute the layer), "dots_saveable" (matmul outputs), "dots_with_no_batch_dims_saveable"
    (matmuls with weights, not attention scores), "offload_dots" (those, in pinned host memory). true/false
    mean full/none. See docs/scaling.md."""
    scan_layers: bool | str = "auto"
    """Stack the decoder layers' parameters [L, ...] and run them with one lax.scan: tracing and compiling no
    longer grow with depth (checkpoints stay per-layer Hugging Face tensors). "auto": on for GPU/TPU; on CPU
    only with an explicit remat policy other than none (see docs/benchmarks.md)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to load onto `path`:
    training continues from it (its rank, alpha and target modules replace the `lora` section's) or, with
    train.max_steps=0, it is only evaluated."""
    attention: Literal[ATTENTION_BACKENDS] = "auto"
    """Attention implementation: "xla" (einsums; the reference), "splash" (Pallas TPU kernel), "cudnn" (fused
    GPU kernel; bfloat16/float16 compute), "auto" (splash on TPU, cudnn on GPU where the dtype allows, xla
    otherwise). Every backend keeps the packed DPO/reward row's shared prompt. See docs/attention.md."""
    router_aux_loss_coef: float | None = Field(None, ge=0)
    """Mixture-of-experts models: weight of the router's load-balancing loss added to every trainer's loss
    (TRL's name). None: the checkpoint's router_aux_loss_coef when its output_router_logits is true, else 0
    (what transformers and TRL do). See docs/models.md."""
    moe_dispatch: Literal[MOE_DISPATCHES] = "auto"
    """Mixture-of-experts models: how the experts run: ragged (tokens sorted by expert, grouped matmuls with
    jax.lax.ragged_dot), dense (every expert on every token), auto (ragged on TPU/GPU, dense on CPU, where
    ragged_dot has no grouped kernel). Same numbers either way."""
    frozen_dtype: Literal[DTYPES] | None = None
    """Storage dtype of the frozen models (DPO's same-step reference; PPO's reference and reward model):
    bfloat16 halves their memory. None: `param_dtype`."""
    frozen_layers: int = Field(0, ge=0)
    """Train only above the first N decoder layers: the embeddings (and a tied LM head) and layers 0..N-1 get
    no gradient, no optimizer state and no update, and the backward pass stops above them (cheaper steps). PPO
    runs the frozen part once per rollout for the policy, reference, critic and reward model when they share
    it (a reward model trained with the same N from the same base). 0: train everything."""

    @field_validator("remat")
    @classmethod
    def _remat(cls, v: bool | str) -> bool | str:
        if isinstance(v, bool) or v in REMAT_POLICIES:
            return v
        raise fail(f"must be true, false or one of {', '.join(REMAT_POLICIES)}")

    @field_validator("scan_layers")
    @classmethod
    def _scan(cls, v: bool | str) -> bool | str:
        if isinstance(v, bool) or v == "auto":
            return v
        raise fail('must be true, false or "auto"')

    @property
    def use_scan(self) -> bool:
        """`scan_layers` resolved: "auto" is on for GPU/TPU, and on CPU when a remat policy other
        than "none" is set (unrolled, XLA:CPU schedules the recomputation early and remat saves
        nothing: measured in docs/benchmarks.md)."""
        if self.scan_layers == "auto":
            import jax

            return jax.default_backend() != "cpu" or self.remat not in (False, "none", "auto")
        return bool(self.scan_layers)


class DataConfig(Section):
    """Training / evaluation data and how it is tokenized and batched."""

    train_files: str | list[str] = ""
    """Training data (required for training): a file, directory or hub dataset id, or a list of files."""
    eval_files: str | list[str] | None = None
    """Evaluation data; None: hold out `eval_fraction` of the training data."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Without `eval_files`: fraction of the training rows held out for evaluation (split by `seed`); 0
    disables evaluation."""
    max_length: int = Field(1024, ge=2)
    """Maximum tokens per sequence."""
    max_prompt_length: int = Field(512, gt=0)
    """Maximum prompt tokens (must be < `max_length`)."""
    truncation_mode: Literal["keep_end", "drop"] = "keep_end"
    """A too-long prompt keeps its last tokens ("keep_end") or its example is dropped ("drop")."""
    skip_invalid: bool = False
    """Skip (and count) malformed rows instead of failing on the first one."""
    drop_degenerate: bool = False
    """Drop rows whose completion is empty or whose chosen equals rejected (always counted in the data report;
    kept and trained on when false)."""
    min_score_gap: float = Field(0.0, ge=0.0)
    """Ranked rows (`prompt`, `completions`, `scores`): two completions make a pair only when their scores
    differ by more than this (0: any two unequal scores)."""
    buckets: list[int] | None = None
    """Padded sequence lengths (each batch is padded to the smallest bucket that fits); None: 64, 96, 128,
    192, 256, 384, 512, then multiples of 256."""
    seed: int = 0
    """Seed of the shuffling and of the held-out evaluation split."""
    add_bos: bool = True
    """Put the tokenizer's BOS token in front of each prompt that does not start with it (offline methods)."""
    append_eos: bool = True
    """End each completion with EOS (TRL's rule). False for completions that are continuations cut at a
    length, as sampled rollouts are: a reward model then learns to score text where PPO's rollouts end."""

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be < "
                f"data.max_length ({self.max_length})"
            )
        if self.buckets is not None and (not self.buckets or any(b <= 0 for b in self.buckets)):
            raise ConfigError("data.buckets must be a non-empty list of positive lengths")
        return self

    @property
    def train_file_list(self) -> list[str]:
        return [self.train_files] if isinstance(self.train_files, str) else list(self.train_files)


class OptimConfig(Section):
    """AdamW optimizer, learning-rate schedule and gradient clipping."""

    learning_rate: float = Field(1e-5, ge=0)
    """Peak learning rate (typical: SFT 1e-5 to 2e-5, reward 1e-5, DPO 5e-7 to 1e-6)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, from `learning_rate` to `learning_rate * min_lr_ratio` at the last step."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled (AdamW) weight decay."""
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    """Adam beta1."""
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    """Adam beta2."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; None: no clipping."""
    head_learning_rate: float | None = Field(None, ge=0)
    """Peak learning rate of the score head (reward models, PPO critics), on the same schedule; a fresh head
    learns faster with a larger one. None: `learning_rate`."""

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        if self.head_learning_rate and self.learning_rate == 0:
            raise ConfigError("optim.head_learning_rate needs optim.learning_rate > 0")
        return self

    @property
    def head_lr_scale(self) -> float | None:
        """`head_learning_rate / learning_rate` (what `make_optimizer` takes), or None."""
        if self.head_learning_rate is None or self.learning_rate == 0:
            return None
        return self.head_learning_rate / self.learning_rate


class MeshConfig(Section):
    """Device mesh (axes data, fsdp, expert, tensor) and multi-host set-up."""

    data: int = -1
    """Data-parallel axis size; -1: all remaining devices."""
    fsdp: int = 1
    """FSDP (ZeRO-3) axis size: parameters and batch split."""
    tensor: int = 1
    """Tensor-parallel axis size (heads / MLP width split)."""
    expert: int = 1
    """Expert-parallel axis size (mixture-of-experts models): the experts are split over it, and the batch too
    (like data) everywhere else."""
    rules: list[tuple[str, tuple[str | None, ...]]] | None = None
    """Partition rules tried before the defaults: a list of [regex over the parameter path, [mesh axis or null
    per dimension]], e.g. [['lm_head/kernel$', [fsdp, null]]]."""
    coordinator_address: str | None = None
    """Multi-host: `host:port` of process 0 for `jax.distributed.initialize`."""
    num_processes: int | None = Field(None, gt=0)
    """Multi-host: number of processes."""
    process_id: int | None = Field(None, ge=0)
    """Multi-host: index of this process."""

    @field_validator("data", "fsdp", "tensor", "expert")
    @classmethod
    def _axis_size(cls, v: int) -> int:
        if v == -1 or v >= 1:
            return v
        raise fail("must be >= 1, or -1 for 'all remaining devices'")

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        sizes = {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one mesh axis may be -1, got {sizes}")
        for i, (pattern, spec) in enumerate(self.rules or ()):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"mesh.rules[{i}]: invalid regex {pattern!r} ({e})") from None
            bad = [a for a in spec if a is not None and a not in AXES]
            if bad:
                raise ConfigError(
                    f"mesh.rules[{i}]: unknown mesh axis {bad[0]!r}; expected one of {AXES} or null"
                )
        if self.process_id is not None and self.num_processes is not None:
            if self.process_id >= self.num_processes:
                raise ConfigError(
                    f"mesh.process_id ({self.process_id}) must be < mesh.num_processes ({self.num_processes})"
                )
        return self


class TrainConfig(Section):
    """Training loop: batch size, length, evaluation, logging and checkpointing."""

    batch_size: int = Field(8, gt=0)
    """Global batch per optimizer step, over all devices and hosts (pairs for dpo/reward, sequences for sft);
    split into `grad_accum_steps` micro-batches."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step (must divide `batch_size`)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; None: `num_epochs` passes over the data."""
    num_epochs: int = Field(1, gt=0)
    """Passes over the training data (without `max_steps`)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the end, when there is eval data)."""
    log_every: int = Field(10, gt=0)
    """Log training metrics every N steps; in between they stay on the device (one transfer per log, no
    wait for each step)."""
    prefetch: bool = True
    """Prepare the next batch (collate and transfer) on a background thread while the device runs the
    current step; false: after it, on the main thread."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end and on preemption)."""
    keep_checkpoints: int = Field(3, gt=0)
    """Keep the last N checkpoints."""
    output_dir: str = "runs/default"
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, export/."""
    seed: int = 0
    """Seed of parameter initialisation (new heads) and of dropout / sampling."""
    resume: bool = True
    """Continue from the latest checkpoint in `output_dir` when there is one."""
    tensorboard: bool = True
    """Write TensorBoard event files to output_dir/tensorboard (false: `tensorboard` is left out of
    `report_to`)."""
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (TRL's `report_to`): any of tensorboard, wandb, trackio; `none` or `[]` for
    none. metrics.jsonl is always written. wandb and trackio are imported only when named (`pip install
    'jaxrlhf[trackers]'`); `WANDB_MODE=offline` keeps a W&B run on disk (jaxrlhf.train.trackers)."""
    project: str | None = None
    """The W&B / Trackio project; None: $WANDB_PROJECT / $TRACKIO_PROJECT, else "jaxrlhf"."""
    run_name: str | None = None
    """The run's name in the trackers; None: the last part of `output_dir`."""
    log_completions: bool = False
    """Online methods (ppo, grpo, rloo, online_dpo): every `log_every` steps, a table of the rollout's
    prompts, completions and rewards to output_dir/completions.jsonl and to every tracker (TRL's
    `log_completions`)."""
    num_completions_to_print: int | None = Field(None, gt=0)
    """Rows of each completions table (the first N of the rollout); None: all of them."""
    export: bool = True
    """At the end, save the model in Hugging Face format (`save_pretrained`) to output_dir/export."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN/inf: stop the run naming the step (the parameters of the step
    before are kept; no checkpoint of bad values is written), or skip that update (parameters and optimizer
    state unchanged; counted as `nonfinite_skipped`)."""

    @property
    def trackers(self) -> list[str]:
        """`report_to`, less `tensorboard` when `tensorboard` is false."""
        return [n for n in self.report_to if self.tensorboard or n != "tensorboard"]

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: Any) -> Any:
        if v is None or v == "none" or v == ["none"]:
            return []
        names = [v] if isinstance(v, str) else v
        if isinstance(names, list) and any(n not in TRACKERS for n in names):
            raise fail(f"takes {', '.join(TRACKERS)} or none")
        return names

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.grad_accum_steps ({self.grad_accum_steps})"
            )
        return self


class TaskEvalConfig(Section):
    """Task accuracy before and after training: greedy replies to the held-out prompts, judged by
    the checker of each row's `family` (jaxrlhf.evaluation). Runs when every eval file has `family`
    and `answer` columns (the shipped demo data does); sft, dpo and ppo."""

    enabled: bool = True
    """Evaluate task accuracy when the eval data has checkers."""
    max_new_tokens: int = Field(48, gt=0)
    """Reply length limit (greedy decoding)."""
    batch_size: int = Field(64, gt=0)
    """Prompts per generation batch."""
    samples_per_family: int = Field(2, ge=0)
    """Replies shown per family: the first N rows of each family."""


class RewardEvalConfig(Section):
    """The held-out reward and KL of the policy before training, every `train.eval_every` steps and after
    it: `samples_per_prompt` continuations of each held-out prompt (the `prompt` column of `prompt_files`,
    each distinct prompt once) sampled at `temperature`, scored by `reward_funcs`, and their summed log-ratio
    to `reference` (jaxrlhf.evaluation.reward_kl; docs/sentiment.md). Every method but reward models; off
    while `reward_funcs` is empty."""

    reward_funcs: list[str] = Field(default_factory=list)
    """Reward functions (`module:function`, TRL's signature), e.g. `jaxrlhf.rewards:vader_sentiment`."""
    reward_weights: list[float] | None = None
    """Weights of `reward_funcs` in the reported reward (None: all 1)."""
    prompt_files: str | list[str] | None = None
    """The held-out prompts (their `prompt` column); None: `data.eval_files`."""
    reference: str | None = None
    """The model the KL is measured to; None: `model.path`."""
    samples_per_prompt: int = Field(2, gt=0)
    """Continuations sampled per held-out prompt."""
    max_new_tokens: int = Field(24, gt=0)
    """Continuation length limit."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; both models' log-probs use it too (KL between the sampled distributions)."""
    num_prompts: int | None = Field(None, gt=0)
    """Use the first N distinct held-out prompts (None: all)."""
    batch_size: int = Field(64, gt=0)
    """Sequences per generation batch."""
    seed: int = 0
    """Sampling seed: the same at every evaluation, so evaluations differ by the policy only."""
    num_shown: int = Field(3, ge=0)
    """Continuations printed before and after training: the first sample of the first N prompts."""

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_eval.reward_weights has {len(self.reward_weights)} entries for "
                              f"{len(self.reward_funcs)} reward_eval.reward_funcs")  # fmt: skip
        return self


class LoRAConfig(Section):
    """Low-rank adapters (PEFT's LoRA) instead of full fine-tuning; `rank: 0` turns them off."""

    rank: int = Field(0, ge=0)
    """Adapter rank r; 0 = full fine-tuning (no adapters)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is (x A) B * alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input (PEFT's lora_dropout), in train steps only (never when sampling, scoring
    or evaluating); masks follow train.seed and the step, so resume is exact."""
    target_modules: str | list[str] = "all-linear"
    """PEFT module names to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or
    "all-linear" for all seven."""

    critic: bool = True
    """PPO: the critic gets its own adapters and a trained score head over a frozen base shared with the
    policy (critic_init: policy) or the reward model (critic_init: reward_model); false: the whole critic is
    fine-tuned."""
    quantize_base: Literal["none", "int8", "nf4"] = "none"
    """QLoRA: store the frozen base's projection kernels as int8 (per-column absmax) or nf4 (4-bit
    NormalFloat, absmax per 64 inputs) and dequantize them on the fly."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        from jaxrlhf.models.lora import LORA_TARGETS  # imports jax: only when checked

        names = [v] if isinstance(v, str) else v
        if not names or any(n not in LORA_TARGETS and n != "all-linear" for n in names):
            raise fail(f"must be 'all-linear' or a list of {', '.join(LORA_TARGETS)}")
        return v

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def spec(self) -> Any:
        """The model's `LoRASpec` (None when off)."""
        from jaxrlhf.models.lora import LoRASpec

        if not self.enabled:
            return None
        return LoRASpec.build(self.rank, self.alpha, self.target_modules, self.dropout)


# --------------------------------------------------------------------------------------------------
# The whole run


class ExperimentBase(Section):
    """A whole run: what to train (`kind`) and one section per concern. The base of the classes
    `experiment_class` builds; its cross-section rules are the common ones below plus the chosen
    kind's own (`CHECKS`: the methods' `Algorithm.check`)."""

    METHODS: ClassVar[dict[str, type[Section]]] = {}  # method section name -> its model
    CHECKS: ClassVar[dict[str, Callable[[Any], None]]] = {}  # kind -> its cross-section rules
    LATEST: ClassVar[type[ExperimentBase] | None] = None  # the last class built (for a lone section's errors)

    @classmethod
    def method_section(cls, kind: Any) -> str | None:
        """The name of the method section configuring runs of `kind` (e.g. "grpo" for rloo)."""
        return next((n for n, s in cls.METHODS.items() if kind in (s.KINDS or (n,))), None)

    @model_validator(mode="after")
    def _cross_check(self) -> Self:
        cfg: Any = self  # the sections are fields of the subclass
        lora = cfg.lora.enabled or cfg.model.adapter is not None
        if cfg.lora.quantize_base != "none" and not lora:
            raise ConfigError("lora.quantize_base needs adapters: set lora.rank > 0 (or model.adapter)")
        if (check := self.CHECKS.get(cfg.kind)) is not None:
            check(cfg)
        if lora and cfg.model.frozen_layers:
            raise ConfigError("lora.rank > 0 already freezes the base: leave model.frozen_layers at 0")
        return self


# The common sections, before and after the method sections (their order in files and docs).
COMMON_HEAD: dict[str, type[Section]] = dict(
    model=ModelConfig, data=DataConfig, optim=OptimConfig, mesh=MeshConfig, train=TrainConfig
)
COMMON_TAIL: dict[str, type[Section]] = dict(
    task_eval=TaskEvalConfig, reward_eval=RewardEvalConfig, lora=LoRAConfig
)


def experiment_class(
    method_sections: dict[str, type[Section]], kinds: Mapping[str, str | None],
    checks: Mapping[str, Callable[[Any], None]] = {}, name: str = "ExperimentConfig",
) -> type[ExperimentBase]:  # fmt: skip
    """A whole-run model: `kind` (a key of `kinds`, kind -> the method section it reads; default
    the first), the common sections and the `method_sections` (name -> model), each section
    defaulting to its defaults; `checks`: kind -> its cross-section rules."""
    for n, s in method_sections.items():
        s.KINDS = tuple(k for k, section in kinds.items() if section == n)
    sections = {**COMMON_HEAD, **method_sections, **COMMON_TAIL}
    for n, s in sections.items():
        s.SECTION = n
    fields: Any = {
        n: (s, Field(default_factory=s, description=f"See the `{n}` section.")) for n, s in sections.items()
    }
    names = tuple(kinds)
    kind_help = f"What to train: {', '.join(names[:-1])} or {names[-1]}."
    kind = (Literal[names], Field(names[0], description=kind_help))  # type: ignore[valid-type]
    cls = create_model(name, __base__=ExperimentBase, __module__=__name__, kind=kind, **fields)
    cls.METHODS, cls.CHECKS = dict(method_sections), dict(checks)
    ExperimentBase.LATEST = cls
    return cls




def _latest() -> type[ExperimentBase]:
    if ExperimentBase.LATEST is None:
        raise RuntimeError("no ExperimentConfig yet: import jaxrlhf.train (its registry builds it)")
    return ExperimentBase.LATEST


# --------------------------------------------------------------------------------------------------
# Types, as messages and docs name them


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _members(tp: Any) -> set[Any]:
    """The plain types a field takes: union members, Literal values' types, generics' origins."""
    if _is_union(tp):
        return set().union(*(_members(a) for a in typing.get_args(tp)))
    if typing.get_origin(tp) is Literal:
        return {type(a) for a in typing.get_args(tp)}
    return {typing.get_origin(tp) or tp}


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of the `Literal` in type `tp`, if any."""
    for arg in typing.get_args(tp) if _is_union(tp) else (tp,):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _section_type(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(sorted(t.__name__ for t in _members(tp)))
    if origin := typing.get_origin(tp):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "mapping" if _section_type(tp) else getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------------
# Errors: pydantic's, as one line naming the dotted key

_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_CHECKS = ("config_check", *_BOUNDS)  # value checks (the rest: unknown keys, types, choices)


def _bounds(field: FieldInfo) -> str:
    """The field's constraints in words: `must be > 0`, `must be in [0.0, 1.0)`."""
    c = {op: getattr(m, op) for m in field.metadata for op in _OPS if hasattr(m, op)}
    if len(c) == 1:
        ((op, bound),) = c.items()
        return f"must be {_OPS[op]} {bound}"
    lo = f"({c['gt']}" if "gt" in c else f"[{c['ge']}"
    return f"must be in {lo}, " + (f"{c['lt']})" if "lt" in c else f"{c['le']}]")


def _message(
    error: ErrorDetails,
    cls: type[BaseModel],
    data: Any,
    prefix: str = "",
    origins: dict[str, tuple[str, str]] | None = None,
) -> str:
    """Pydantic's `error` from validating `data` as `cls` (at dotted path `prefix`) in words;
    `origins` maps the keys overrides set to (override text, raw value text)."""
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # a cross-field rule: its message names its keys
        return str(ctx["error"])
    # The dotted key: the loc's field names, down to the first value field (the rest of the loc is
    # list indices and union members); `value` is that field's input.
    model, field, names, value = _section_type(cls), None, [], data
    for part in error["loc"]:
        if model is None:
            break
        names.append(str(part))
        field = model.model_fields.get(str(part))
        model = _section_type(field.annotation) if field else None
        value = value.get(part, error["input"]) if isinstance(value, Mapping) else error["input"]
    key = prefix + ".".join(names)
    text, raw = (origins or {}).get(key, (None, None))
    if error["type"] == "extra_forbidden":
        msg = str(_unknown_key(key, cls if issubclass(cls, ExperimentBase) else ExperimentBase.LATEST or cls))
    elif field is None:  # a whole-model error (unexpected: the rules raise ConfigError)
        msg = f"{key or 'config'}: {error['msg']}"
    elif error["type"] == "config_check":
        msg = f"{key} {ctx['msg']}, got {value!r}"
    elif error["type"] in _BOUNDS:
        value = float(value) if float in _members(field.annotation) else value  # as validated: -1.0
        msg = f"{key} {_bounds(field)}, got {value!r}"
    elif "error" in ctx:  # another validator's ValueError
        msg = f"{key}: {ctx['error']}"
    elif (choices := _choices(field.annotation)) and type(value) in _members(field.annotation):
        msg = f"{key}: {value!r} is not one of {_choice_list(choices)}{_hint(value, choices)}"
    else:
        shown = raw if raw is not None else value
        msg = f"{key}: expected {_type_name(field.annotation)}, got {shown!r} ({type(value).__name__})"
    return f"override {text!r}: {msg}" if text and error["type"] not in _CHECKS else msg


@functools.cache
def _keys(cls: type[BaseModel]) -> tuple[list[str], list[str]]:
    """The dotted value keys of whole-run model `cls`, and its section names."""
    leaves, sections = [], []
    for name, f in cls.model_fields.items():
        if sub := _section_type(f.annotation):
            sections.append(name)
            leaves += [f"{name}.{k}" for k in sub.model_fields]
        else:
            leaves.append(name)
    return leaves, sections


# Common names from other trainers, mapped to ours (used for suggestions only).
_ALIASES = {
    "lr": "learning_rate", "warmup": "warmup_steps", "steps": "max_steps", "epochs": "num_epochs",
    "clip": "max_grad_norm", "grad_clip": "max_grad_norm", "max_norm": "max_grad_norm",
    "gradient_accumulation_steps": "grad_accum_steps", "per_device_train_batch_size": "batch_size",
    "model_name_or_path": "path", "dataset": "train_files", "loss": "loss_type",
}  # fmt: skip


def _suggest(bad_key: str, cls: type[BaseModel]) -> str | None:
    """The valid dotted key closest to `bad_key`."""
    leaves, sections = _keys(cls)
    keys = leaves + sections
    parent, _, leaf = bad_key.rpartition(".")
    if parent in leaves:  # `train.batch_size.x`: the parent is a value, not a section
        return parent
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    leaf = _ALIASES.get(leaf, leaf)
    for pool in (siblings, keys):  # the right name, in this section or another (`train.learning_rate`)
        same = [k for k in pool if k.rpartition(".")[2] == leaf]
        if same:
            return same[0]
    best, best_score = None, 0.6
    for k in keys if parent else siblings:  # closest name, this section preferred on near-ties
        score = difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio()
        score += 0.05 if k in siblings else 0.0
        if score > best_score:
            best, best_score = k, score
    return best


def _unknown_key(key: str, cls: type[BaseModel]) -> ConfigError:
    suggestion = _suggest(key, cls)
    if suggestion:
        hint = f"; did you mean {suggestion!r}?"
    else:
        parent = key.rpartition(".")[0]
        valid = [k for k in sum(_keys(cls), []) if k.rpartition(".")[0] == parent]
        hint = f"; valid keys{f' of {parent!r}' if parent else ''}: {', '.join(valid)}" if valid else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _hint(value: Any, choices: Sequence[Any]) -> str:
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _choice_list(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


# --------------------------------------------------------------------------------------------------
# Loading


def _apply_override(data: dict[str, Any], text: str, cls: type[BaseModel]) -> tuple[str, str]:
    """Set `key=value` (the dotted key checked against `cls`) in the nested dict `data`; returns the
    key and the value's text."""
    key, sep, raw = (text[2:] if text.startswith("--") else text).partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.learning_rate=1e-5)")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    model: type[BaseModel] | None = cls
    node = data
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if model else None
        if field is None:
            raise ConfigError(f"override {text!r}: {_unknown_key('.'.join(parts[: i + 1]), cls)}")
        model, old = _section_type(field.annotation), node.get(part)
        if i < len(parts) - 1:  # down into a section
            node[part] = node = dict(old) if isinstance(old, Mapping) else {}
        elif model is not None and isinstance(value, Mapping):  # `optim={lr: 1}` merges
            node[part] = {**(old if isinstance(old, Mapping) else {}), **value}
        else:
            kinds = _members(field.annotation)
            if type(value) in (int, float) and str in kinds and not kinds & {bool, int, float}:
                value = raw  # a str field takes the text as typed: `model.path=007`
            node[part] = value
    return key, raw


def load_config(
    path: str | None,
    overrides: Sequence[str] = (),
    *,
    kind: str | None = None,
    cls: type[ExperimentBase] | None = None,
) -> Any:  # an ExperimentConfig: built at run time, its sections are not known statically
    """The `ExperimentConfig` (or whole-run model `cls`) of YAML file `path` (None: defaults only)
    with `overrides` applied.

    `kind` (e.g. from the CLI sub-command) sets the experiment kind; a file or override saying a
    different kind is an error. Raises `ConfigError` on any invalid input.
    """
    cls = cls or _latest()
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, Mapping | None):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        data = copy.deepcopy(dict(loaded or {}))
        # The file's unknown keys, types and choices are reported with its name before overrides
        # apply; value checks and cross-field rules wait for the overrides (one may fix them).
        try:
            cls.model_validate(data)
        except ValidationError as e:
            bad = [x for x in e.errors() if x["type"] not in _CHECKS and "error" not in (x.get("ctx") or {})]
            if bad:  # the file's first, in its order
                first = min(bad, key=lambda x: [*data].index(x["loc"][0]))
                raise ConfigError(f"{path}: {_message(first, cls, data)}") from None
    origins = {}
    for text in [overrides] if isinstance(overrides, str) else overrides:
        key, raw = _apply_override(data, text, cls)
        origins[key] = (text, raw)
    if kind is not None:
        kinds = _choices(cls.model_fields["kind"].annotation) or ()
        if kind not in kinds:
            raise ConfigError(f"kind: {kind!r} is not one of {_choice_list(kinds)}{_hint(kind, kinds)}")
        found, section = data.get("kind"), cls.method_section(kind)
        if found not in (None, kind) and (section is None or section != cls.method_section(found)):
            raise ConfigError(f"kind: the config says {found!r} but {kind!r} was requested")
        data["kind"] = kind  # grpo and rloo share a section: the command picks the estimator
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], cls, data, origins=origins)) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-able nested dict of `cfg` (tuples become lists); `config_from_dict` inverts it."""
    return cfg.model_dump(mode="json")


def config_from_dict(d: Mapping[str, Any], cls: type[ExperimentBase] | None = None) -> Any:
    """The `ExperimentConfig` (or `cls`) of a dict from `config_to_dict` (or a YAML-like mapping);
    missing keys take their defaults, unknown keys and bad values raise `ConfigError`."""
    cls = cls or _latest()
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a mapping of sections, got {type(d).__name__}")
    try:
        return cls.model_validate(dict(d))
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], cls, d)) from None


# --------------------------------------------------------------------------------------------------
# Documentation

_MD_HEAD = """# Configuration reference

<!-- Generated from jaxrlhf/train/config.py by config_markdown(); do not edit. -->

A run is configured by a YAML file with the sections below, plus `section.key=value`
overrides on the command line (parsed as YAML, then checked against the key's type):

```
jaxrlhf dpo config.yaml optim.learning_rate=1e-6 dpo.loss_type=ipo train.max_steps=10
```

Unknown keys and wrongly typed values are errors (the closest valid key is suggested).
`X | None` keys take `null` (or `None`); lists are written `[a, b]`.

## Top level
"""
_MD_TABLE = ["| key | type | default | description |", "| --- | --- | --- | --- |"]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_row(key: str, f: FieldInfo) -> str:
    choices = _choices(f.annotation)
    kind = " \\| ".join(f'`"{c}"`' for c in choices) if choices else f"`{_md_cell(_type_name(f.annotation))}`"
    default = f.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        shown = "*(section)*"
    elif default == "":  # an empty default means the key must be given (data.train_files)
        shown = "*(required)*"
    else:
        shown = f"`{_md_cell(json.dumps(default))}`"
    return f"| `{key}` | {kind} | {shown} | {_md_cell(f.description or '')} |"


def config_markdown(cls: type[ExperimentBase] | None = None) -> str:
    """The Markdown reference of every config key (the content of docs/configuration.md)."""
    fields = (cls or _latest()).model_fields
    sections = {n: s for n, f in fields.items() if (s := _section_type(f.annotation))}
    lines = [*_MD_HEAD.split("\n"), *_MD_TABLE]
    lines += [_md_row(n, f) for n, f in fields.items() if n not in sections]
    for name, section in sections.items():
        lines += ["", f"## `{name}`", "", inspect.cleandoc(section.__doc__ or ""), "", *_MD_TABLE]
        lines += [_md_row(f"{name}.{n}", f) for n, f in section.model_fields.items()]
    return "\n".join(lines) + "\n"


def __getattr__(name: str) -> Any:
    """`ExperimentConfig` and the methods' sections (`PPOConfig`, ...) as this module had them before
    the methods owned their sections: kept importable from here for existing code."""
    cls = ExperimentBase.LATEST
    if cls is not None:
        if name == "ExperimentConfig":
            return cls
        for section in cls.METHODS.values():
            if section.__name__ == name:
                return section
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
