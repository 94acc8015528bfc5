"""Typed experiment configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

A config file is a YAML mapping with one section per dataclass below (``model``, ``data``, ``optim``,
``mesh``, ``train``, ``dpo``, ``reward``, ``sft``, ``ppo``, ``task_eval``) plus the top-level ``kind``::

    kind: dpo
    model: {path: HuggingFaceTB/SmolLM2-135M-Instruct, dtype: bfloat16}
    data: {train_files: data/prefs.jsonl, max_length: 1024}
    optim: {learning_rate: 5.0e-7, warmup_steps: 10}
    dpo: {beta: 0.1, loss_type: sigmoid}

and command-line overrides are dotted ``key=value`` strings applied on top of it, e.g.
``optim.learning_rate=1e-5 dpo.loss_type=ipo train.max_steps=10 data.buckets=[256,512]``.

Precedence: dataclass defaults < YAML file < overrides (later overrides win). Every value is parsed
with ``yaml.safe_load`` (an override's text) and then checked and coerced against the field's type:

* ``float`` accepts ints and numeric strings (PyYAML reads ``1e-5`` without a dot as a *string*);
* ``int`` accepts integral floats/strings (``1e3``), never bools; ``bool`` accepts true/false
  (and yes/no/on/off, 0/1);
* ``str`` takes an override's raw text as is (``model.path=007`` stays ``"007"``);
* ``X | None`` accepts ``null``, ``~`` or ``None``; lists and tuples are checked element-wise;
* fields with ``choices`` (Literal-like) must take one of them.

An unknown key, at any level, or a wrongly typed value raises `ConfigError` naming the key (with
the closest valid key as a suggestion), the expected type and the value. Each field's meaning is in
its ``help`` metadata; ``docs/configuration.md`` is generated from it (`config_markdown`)::

    python -c "from jaxrlhf.train.config import config_markdown as m; print(m(), end='')" \\
        > docs/configuration.md

`config_to_dict` / `config_from_dict` round-trip a config through JSON-able dicts (checkpoints store
the config that way).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import yaml

from jaxrlhf.models.config import ATTENTION_BACKENDS, MOE_DISPATCHES

__all__ = [
    "AXES",
    "DPO_LOSS_TYPES",
    "KINDS",
    "LOSS_TYPES",
    "ConfigError",
    "DataConfig",
    "DPOConfig",
    "GRPOConfig",
    "ExperimentConfig",
    "LoRAConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "RewardConfig",
    "SFTConfig",
    "TaskEvalConfig",
    "TrainConfig",
    "config_from_dict",
    "config_markdown",
    "config_to_dict",
    "load_config",
]

KINDS: tuple[str, ...] = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")
AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")  # mesh axes, as in jaxrlhf.parallel
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# The loss types of `jaxrlhf.losses.dpo_loss` (kept in sync by tests/train/test_config.py).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "aot",
    "aot_unpaired",
    "discopop",
    "sigmoid_norm",
)
# Everything `dpo.loss_type` accepts: the DPO family plus the reference-free SimPO and ORPO.
LOSS_TYPES: tuple[str, ...] = DPO_LOSS_TYPES + ("simpo", "orpo")


class ConfigError(ValueError):
    """A config file or override is invalid: unknown key, wrong type, bad choice or bad value."""


# --------------------------------------------------------------------------------------------------
# Field helpers


def _field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple[Any, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field documented by ``help``; ``choices`` restricts its value (Literal-like) and
    ``check(value)`` returns an error message (or None) for values of the right type."""
    metadata = {"help": help, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def _scan_check(v: Any) -> str | None:
    return None if isinstance(v, bool) or v == "auto" else 'must be true, false or "auto"'


def _remat_check(v: Any) -> str | None:
    from jaxrlhf.models.config import REMAT_POLICIES

    if isinstance(v, bool) or v in REMAT_POLICIES:
        return None
    return f"must be true, false or one of {', '.join(REMAT_POLICIES)}"


def _non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def _in_range(lo: float, hi: float, *, hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}"

    return check


def _mesh_size(v: int) -> str | None:
    return None if v == -1 or v >= 1 else "must be >= 1, or -1 for 'all remaining devices'"


# --------------------------------------------------------------------------------------------------
# Sections


class _Section:
    """Base of the config dataclasses: construction checks choices, ranges and cross-field rules."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _validate_fields(self, f"{self.SECTION}." if self.SECTION else "")


@dataclass(kw_only=True)
class ModelConfig(_Section):
    """The policy / reward model to train."""

    SECTION: ClassVar[str] = "model"

    path: str = _field(
        "demo",
        help='Hugging Face checkpoint directory or hub id; "demo" is the embedded SmolLM2-135M-Instruct.',
    )
    tokenizer: str | None = _field(None, help="Tokenizer directory or hub id (None: same as `path`).")
    dtype: str = _field("float32", choices=DTYPES, help="Computation dtype of activations.")
    param_dtype: str = _field("float32", choices=DTYPES, help="Storage dtype of the parameters.")
    remat: bool | str = _field(
        "auto",
        check=_remat_check,
        help="What the backward pass keeps of each decoder layer (jax.checkpoint policies): "
        '"auto" (dots_saveable with scanned layers, none unrolled: each as fast as the other), '
        '"none" (everything), "full" (the layer input only: recompute the layer), '
        '"dots_saveable" (matmul outputs), "dots_with_no_batch_dims_saveable" (matmuls with '
        'weights, not attention scores), "offload_dots" (those, in pinned host memory). '
        "true/false mean full/none. See docs/scaling.md.",
    )
    scan_layers: bool | str = _field(
        "auto",
        check=_scan_check,
        help="Stack the decoder layers' parameters [L, ...] and run them with one lax.scan: tracing "
        "and compiling no longer grow with depth (checkpoints stay per-layer Hugging Face tensors). "
        '"auto": on for GPU/TPU; on CPU only with an explicit remat policy other than none '
        "(see docs/benchmarks.md).",
    )
    adapter: str | None = _field(
        None,
        help="A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to load "
        "onto `path`: training continues from it (its rank, alpha and target modules replace the "
        "`lora` section's) or, with train.max_steps=0, it is only evaluated.",
    )
    attention: str = _field(
        "auto",
        choices=ATTENTION_BACKENDS,
        help='Attention implementation: "xla" (einsums; the reference), "splash" (Pallas TPU '
        'kernel), "cudnn" (fused GPU kernel; bfloat16/float16 compute), "auto" (splash on TPU, '
        "cudnn on GPU where the dtype allows, xla otherwise). Every backend keeps the packed "
        "DPO/reward row's shared prompt. See docs/attention.md.",
    )
    router_aux_loss_coef: float | None = _field(
        None,
        check=lambda v: None if v is None else _non_negative(v),
        help="Mixture-of-experts models: weight of the router's load-balancing loss added to every "
        "trainer's loss (TRL's name). None: the checkpoint's router_aux_loss_coef when its "
        "output_router_logits is true, else 0 (what transformers and TRL do). See docs/models.md.",
    )
    moe_dispatch: str = _field(
        "auto",
        choices=MOE_DISPATCHES,
        help="Mixture-of-experts models: how the experts run: ragged (tokens sorted by expert, "
        "grouped matmuls with jax.lax.ragged_dot), dense (every expert on every token), auto (ragged "
        "on TPU/GPU, dense on CPU, where ragged_dot has no grouped kernel). Same numbers either way.",
    )
    frozen_dtype: str | None = _field(
        None,
        choices=DTYPES,
        help="Storage dtype of the frozen models (DPO's same-step reference; PPO's reference and "
        "reward model): bfloat16 halves their memory. None: `param_dtype`.",
    )
    frozen_layers: int = _field(
        0,
        check=_non_negative,
        help="Train only above the first N decoder layers: the embeddings (and a tied LM head) and "
        "layers 0..N-1 get no gradient, no optimizer state and no update, and the backward pass "
        "stops above them (cheaper steps). 0: train everything.",
    )

    @property
    def use_scan(self) -> bool:
        """`scan_layers` resolved: "auto" is on for GPU/TPU, and on CPU when a remat policy other
        than "none" is set (unrolled, XLA:CPU schedules the recomputation early and remat saves
        nothing: measured in docs/benchmarks.md)."""
        if self.scan_layers == "auto":
            import jax

            return jax.default_backend() != "cpu" or self.remat not in (False, "none", "auto")
        return bool(self.scan_layers)


@dataclass(kw_only=True)
class DataConfig(_Section):
    """Training / evaluation data and how it is tokenized and batched."""

    SECTION: ClassVar[str] = "data"

    train_files: str | list[str] = _field(
        "",
        help="Training data (required for training): a file, directory or hub dataset id, or a list "
        "of files.",
    )
    eval_files: str | list[str] | None = _field(
        None, help="Evaluation data; None: hold out `eval_fraction` of the training data."
    )
    eval_fraction: float = _field(
        0.0,
        check=_in_range(0.0, 1.0, hi_open=True),
        help="Without `eval_files`: fraction of the training rows held out for evaluation (split "
        "by `seed`); 0 disables evaluation.",
    )
    max_length: int = _field(
        1024, check=lambda v: None if v >= 2 else "must be >= 2", help="Maximum tokens per sequence."
    )
    max_prompt_length: int = _field(
        512, check=_positive, help="Maximum prompt tokens (must be < `max_length`)."
    )
    truncation_mode: str = _field(
        "keep_end",
        choices=("keep_end", "drop"),
        help='A too-long prompt keeps its last tokens ("keep_end") or its example is dropped ("drop").',
    )
    skip_invalid: bool = _field(
        False, help="Skip (and count) malformed rows instead of failing on the first one."
    )
    drop_degenerate: bool = _field(
        False,
        help="Drop rows whose completion is empty or whose chosen equals rejected (always counted in "
        "the data report; kept and trained on when false).",
    )
    buckets: list[int] | None = _field(
        None,
        help="Padded sequence lengths (each batch is padded to the smallest bucket that fits); "
        "None: 64, 96, 128, 192, 256, 384, 512, then multiples of 256.",
    )
    seed: int = _field(0, help="Seed of the shuffling and of the held-out evaluation split.")

    def validate(self, prefix: str) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"{prefix}max_prompt_length ({self.max_prompt_length}) must be < "
                f"{prefix}max_length ({self.max_length})"
            )
        if self.buckets is not None:
            if not self.buckets or any(b <= 0 for b in self.buckets):
                raise ConfigError(f"{prefix}buckets must be a non-empty list of positive lengths")

    @property
    def train_file_list(self) -> list[str]:
        return [self.train_files] if isinstance(self.train_files, str) else list(self.train_files)


@dataclass(kw_only=True)
class OptimConfig(_Section):
    """AdamW optimizer, learning-rate schedule and gradient clipping."""

    SECTION: ClassVar[str] = "optim"

    learning_rate: float = _field(
        1e-5,
        check=_non_negative,
        help="Peak learning rate (typical: SFT 1e-5 to 2e-5, reward 1e-5, DPO 5e-7 to 1e-6).",
    )
    schedule: str = _field(
        "cosine",
        choices=("cosine", "linear", "constant"),
        help="Decay after warm-up, from `learning_rate` to `learning_rate * min_lr_ratio` at the last step.",
    )
    warmup_steps: int = _field(0, check=_non_negative, help="Linear warm-up steps from 0.")
    min_lr_ratio: float = _field(
        0.0, check=_in_range(0.0, 1.0), help="Final learning rate as a fraction of the peak."
    )
    weight_decay: float = _field(0.0, check=_non_negative, help="Decoupled (AdamW) weight decay.")
    b1: float = _field(0.9, check=_in_range(0.0, 1.0, hi_open=True), help="Adam beta1.")
    b2: float = _field(0.999, check=_in_range(0.0, 1.0, hi_open=True), help="Adam beta2.")
    eps: float = _field(1e-8, check=_positive, help="Adam epsilon.")
    max_grad_norm: float | None = _field(
        1.0, check=_positive, help="Clip the global gradient norm to this value; None: no clipping."
    )
    head_learning_rate: float | None = _field(
        None,
        check=_non_negative,
        help="Peak learning rate of the score head (reward models, PPO critics), on the same schedule; "
        "a fresh head learns faster with a larger one. None: `learning_rate`.",
    )

    def validate(self, prefix: str) -> None:
        if self.head_learning_rate is not None and self.learning_rate == 0 and self.head_learning_rate:
            raise ConfigError(f"{prefix}head_learning_rate needs {prefix}learning_rate > 0")

    @property
    def head_lr_scale(self) -> float | None:
        """`head_learning_rate / learning_rate` (what `make_optimizer` takes), or None."""
        if self.head_learning_rate is None or self.learning_rate == 0:
            return None
        return self.head_learning_rate / self.learning_rate


@dataclass(kw_only=True)
class MeshConfig(_Section):
    """Device mesh (axes data, fsdp, expert, tensor) and multi-host set-up."""

    SECTION: ClassVar[str] = "mesh"

    data: int = _field(-1, check=_mesh_size, help="Data-parallel axis size; -1: all remaining devices.")
    fsdp: int = _field(1, check=_mesh_size, help="FSDP (ZeRO-3) axis size: parameters and batch split.")
    tensor: int = _field(1, check=_mesh_size, help="Tensor-parallel axis size (heads / MLP width split).")
    expert: int = _field(
        1, check=_mesh_size,
        help="Expert-parallel axis size (mixture-of-experts models): the experts are split over it, and "
        "the batch too (like data) everywhere else.",
    )  # fmt: skip
    rules: list[tuple[str, tuple[str | None, ...]]] | None = _field(
        None,
        help="Partition rules tried before the defaults: a list of [regex over the parameter path, "
        "[mesh axis or null per dimension]], e.g. [['lm_head/kernel$', [fsdp, null]]].",
    )
    coordinator_address: str | None = _field(
        None, help="Multi-host: `host:port` of process 0 for `jax.distributed.initialize`."
    )
    num_processes: int | None = _field(None, check=_positive, help="Multi-host: number of processes.")
    process_id: int | None = _field(None, check=_non_negative, help="Multi-host: index of this process.")

    def validate(self, prefix: str) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"{prefix.rstrip('.')}: at most one mesh axis may be -1, got {sizes}")
        for i, (pattern, spec) in enumerate(self.rules or ()):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{prefix}rules[{i}]: invalid regex {pattern!r} ({e})") from None
            bad = [a for a in spec if a is not None and a not in AXES]
            if bad:
                raise ConfigError(
                    f"{prefix}rules[{i}]: unknown mesh axis {bad[0]!r}; expected one of {AXES} or null"
                )
        if self.process_id is not None and self.num_processes is not None:
            if self.process_id >= self.num_processes:
                raise ConfigError(
                    f"{prefix}process_id ({self.process_id}) must be < {prefix}num_processes "
                    f"({self.num_processes})"
                )


@dataclass(kw_only=True)
class TrainConfig(_Section):
    """Training loop: batch size, length, evaluation, logging and checkpointing."""

    SECTION: ClassVar[str] = "train"

    batch_size: int = _field(
        8,
        check=_positive,
        help="Global batch per optimizer step, over all devices and hosts (pairs for dpo/reward, "
        "sequences for sft); split into `grad_accum_steps` micro-batches.",
    )
    grad_accum_steps: int = _field(
        1, check=_positive, help="Micro-batches per optimizer step (must divide `batch_size`)."
    )
    max_steps: int | None = _field(
        None, check=_positive, help="Optimizer steps to run; None: `num_epochs` passes over the data."
    )
    num_epochs: int = _field(1, check=_positive, help="Passes over the training data (without `max_steps`).")
    eval_every: int = _field(
        0, check=_non_negative, help="Evaluate every N steps (0: only at the end, when there is eval data)."
    )
    log_every: int = _field(10, check=_positive, help="Log training metrics every N steps.")
    save_every: int = _field(
        0, check=_non_negative, help="Checkpoint every N steps (0: only at the end and on preemption)."
    )
    keep_checkpoints: int = _field(3, check=_positive, help="Keep the last N checkpoints.")
    output_dir: str = _field(
        "runs/default", help="Run directory: checkpoints/, metrics.jsonl, tensorboard/, export/."
    )
    seed: int = _field(0, help="Seed of parameter initialisation (new heads) and of dropout / sampling.")
    resume: bool = _field(True, help="Continue from the latest checkpoint in `output_dir` when there is one.")
    tensorboard: bool = _field(True, help="Write TensorBoard event files to output_dir/tensorboard.")
    export: bool = _field(
        True,
        help="At the end, save the model in Hugging Face format (`save_pretrained`) to output_dir/export.",
    )
    on_nonfinite: str = _field(
        "stop",
        choices=("stop", "skip"),
        help="A step whose loss or gradient norm is NaN/inf: stop the run naming the step (the "
        "parameters of the step before are kept; no checkpoint of bad values is written), or skip "
        "that update (parameters and optimizer state unchanged; counted as `nonfinite_skipped`).",
    )

    def validate(self, prefix: str) -> None:
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"{prefix}batch_size ({self.batch_size}) must be a multiple of "
                f"{prefix}grad_accum_steps ({self.grad_accum_steps})"
            )


@dataclass(kw_only=True)
class TaskEvalConfig(_Section):
    """Task accuracy before and after training: greedy replies to the held-out prompts, judged by
    the checker of each row's `family` (jaxrlhf.evaluation). Runs when every eval file has `family`
    and `answer` columns (the shipped demo data does); sft, dpo and ppo."""

    SECTION: ClassVar[str] = "task_eval"

    enabled: bool = _field(True, help="Evaluate task accuracy when the eval data has checkers.")
    max_new_tokens: int = _field(48, check=_positive, help="Reply length limit (greedy decoding).")
    batch_size: int = _field(64, check=_positive, help="Prompts per generation batch.")
    samples_per_family: int = _field(
        2, check=_non_negative, help="Replies shown per family: the first N rows of each family."
    )


@dataclass(kw_only=True)
class DPOConfig(_Section):
    """Preference optimisation (kind: dpo): DPO and its variants, SimPO, ORPO."""

    SECTION: ClassVar[str] = "dpo"

    beta: float = _field(
        0.1,
        check=_positive,
        help="Inverse temperature of the implicit reward (DPO family, typ. 0.1; SimPO typ. 2.0) "
        "or the odds-ratio weight (ORPO).",
    )
    loss_type: str = _field(
        "sigmoid",
        choices=LOSS_TYPES,
        help="One of the 14 `dpo_loss` types, or `simpo` / `orpo` (reference-free).",
    )
    label_smoothing: float = _field(
        0.0,
        check=_in_range(0.0, 0.5),
        help="Assumed label-noise rate (cDPO / robust / SimPO); only some loss types use it.",
    )
    reference_free: bool = _field(
        False, help="Use an implicit uniform reference model (no reference log-probs)."
    )
    reference: str = _field(
        "same_step",
        choices=("same_step", "precompute"),
        help='Reference log-probs computed with each batch ("same_step") or once over the '
        'data before training ("precompute").',
    )
    simpo_gamma: float = _field(0.5, help="SimPO target reward margin gamma.")
    rpo_alpha: float | None = _field(
        None,
        check=_non_negative,
        help="RPO (Pang et al. 2024, arXiv:2404.19733; TRL's name): add `rpo_alpha` x the token-mean "
        "negative log-likelihood of the chosen completions to the loss (the paper uses 1.0); None: off.",
    )
    discopop_tau: float = _field(0.05, check=_positive, help="DiscoPOP temperature tau.")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses reference-model log-probs."""
        return not self.reference_free and self.loss_type not in ("simpo", "orpo")


@dataclass(kw_only=True)
class RewardConfig(_Section):
    """Reward-model training (kind: reward): Bradley-Terry loss."""

    SECTION: ClassVar[str] = "reward"

    center_rewards_coefficient: float | None = _field(
        None,
        check=_non_negative,
        help="Weight of the mean-squared reward penalty that keeps rewards centred (e.g. 0.01); None: off.",
    )
    use_margin: bool = _field(
        True, help="Subtract the dataset's `margin` column (0 where absent) inside the loss."
    )


@dataclass(kw_only=True)
class SFTConfig(_Section):
    """Supervised fine-tuning (kind: sft)."""

    SECTION: ClassVar[str] = "sft"

    completion_only: bool = _field(
        True, help="Train on completion tokens only (prompt tokens masked out of the loss)."
    )


@dataclass(kw_only=True)
class PPOConfig(_Section):
    """RLHF with PPO (kind: ppo): rollouts, rewards, KL penalty, GAE and the clipped updates.

    `train.batch_size` is the number of prompts per rollout; each rollout is followed by
    `num_ppo_epochs` passes over it in `num_mini_batches` minibatches.
    """

    SECTION: ClassVar[str] = "ppo"

    reward_model: str | None = _field(
        None, help="Reward model checkpoint (a `*ForSequenceClassification` export); or give `reward_fn`."
    )
    reward_fn: str | None = _field(
        None,
        help="`module:function` computing `f(prompts, completions) -> scores` on the host "
        "(verifiable rewards); used instead of `reward_model`.",
    )
    critic_init: str = _field(
        "reward_model",
        choices=("reward_model", "policy"),
        help="Initialise the critic from the reward model (TRL's choice) or from the policy "
        "with a fresh score head.",
    )
    response_length: int = _field(48, check=_positive, help="Maximum new tokens per response.")
    temperature: float = _field(
        0.7, check=_positive, help="Sampling temperature; also divides the logits when training."
    )
    top_k: int = _field(0, check=_non_negative, help="Sample from the top-k tokens only (0: off).")
    top_p: float = _field(1.0, check=_in_range(0.0, 1.0), help="Nucleus sampling mass (1: off).")
    rescore_policy: bool = _field(
        False,
        help="Recompute the rollout's policy log-probs with a full forward instead of taking the "
        "sampler's (one forward more; for when sampling and training numerics differ, e.g. bf16).",
    )
    kl_coef: float = _field(
        0.05, check=_non_negative, help="(Initial) coefficient of the per-token KL penalty."
    )
    kl_estimator: str = _field("k1", choices=("k1", "k3"), help="Per-token KL estimator (Schulman 2020).")
    target_kl: float | None = _field(
        None,
        check=_positive,
        help="Adaptive KL controller target (Ziegler et al. 2019); None: fixed `kl_coef`.",
    )
    kl_horizon: int = _field(10000, check=_positive, help="Horizon of the adaptive KL controller.")
    missing_eos_penalty: float | None = _field(
        1.0,
        check=_non_negative,
        help="Subtracted from the score of responses without an EOS token (TRL's rule); None: off.",
    )
    missing_eos_score: float | None = _field(
        None,
        help="Score given to responses without an EOS token, replacing the reward model's: "
        "it never saw a response cut off mid-sentence, so its score there means "
        "nothing and the policy may learn to never stop. Exclusive with `missing_eos_penalty`.",
    )
    whiten_rewards: bool = _field(False, help="Whiten the per-token rewards of each rollout.")
    gamma: float = _field(1.0, check=_in_range(0.0, 1.0), help="GAE discount.")
    lam: float = _field(0.95, check=_in_range(0.0, 1.0), help="GAE lambda.")
    cliprange: float = _field(0.2, check=_positive, help="Policy ratio clip epsilon.")
    cliprange_value: float = _field(0.2, check=_positive, help="Value clip around the rollout's values.")
    vf_coef: float = _field(0.1, check=_non_negative, help="Weight of the value loss.")
    num_ppo_epochs: int = _field(4, check=_positive, help="Passes over each rollout.")
    num_mini_batches: int = _field(1, check=_positive, help="Minibatches per pass (must divide the rollout).")

    def validate(self, prefix: str) -> None:
        if self.missing_eos_penalty is not None and self.missing_eos_score is not None:
            raise ConfigError(
                f"{prefix}missing_eos_penalty and {prefix}missing_eos_score are exclusive: set one to null"
            )


def _reward_funcs(v: Any) -> str | None:
    names = [v] if isinstance(v, str) else list(v)
    bad = [n for n in names if not isinstance(n, str) or not all(n.partition(":")[::2]) or n.count(":") != 1]
    return f"expected 'module:function' names, got {bad}" if bad else None


@dataclass(kw_only=True)
class GRPOConfig(_Section):
    """Critic-free online RL (kind: grpo or rloo): `num_generations` samples per prompt, advantages
    from each prompt's group of rewards, and the clipped surrogate of `jaxrlhf.losses.grpo_loss`.

    `train.batch_size` is the number of prompts per rollout (so `batch_size * num_generations`
    completions); each rollout is followed by `num_iterations` passes over it in
    `num_mini_batches` minibatches. Names follow TRL's `GRPOConfig`.
    """

    SECTION: ClassVar[str] = "grpo"

    reward_funcs: list[str] = _field(
        factory=list, check=_reward_funcs,
        help="Reward functions, `module:function`, each `f(prompts, completions, completion_ids, "
        "**columns) -> list[float | None]` (the prompt rows' other columns passed by name; None = "
        "does not apply). E.g. `jaxrlhf.rewards:accuracy_reward`.",
    )  # fmt: skip
    reward_model: str | None = _field(
        None, help="A trained reward model (a `*ForSequenceClassification` export) scoring each "
        "completion at its last token: one more reward, after the functions.",
    )  # fmt: skip
    reward_weights: list[float] | None = _field(
        None, help="Weights of the rewards (functions, then the reward model) in the summed reward; "
        "None: all 1.",
    )  # fmt: skip
    num_generations: int = _field(8, check=_positive, help="Completions sampled per prompt (G >= 2).")
    num_iterations: int = _field(
        1, check=_positive, help="Passes over each rollout (TRL's num_iterations, mu); the sampler's "
        "log-probs are the old policy.",
    )  # fmt: skip
    num_mini_batches: int = _field(
        1, check=_positive, help="Optimizer steps per pass, each on whole groups (must divide "
        "train.batch_size)."
    )
    max_completion_length: int = _field(64, check=_positive, help="Maximum new tokens per completion.")
    temperature: float = _field(1.0, check=_positive, help="Sampling temperature (also divides the "
                                "training logits).")  # fmt: skip
    top_k: int = _field(0, check=_non_negative, help="Sample from the top-k tokens only (0: off).")
    top_p: float = _field(1.0, check=_in_range(0.0, 1.0), help="Nucleus sampling mass (1: off).")
    beta: float = _field(
        0.0, check=_non_negative, help="Weight of the k3 KL to the reference; 0: no reference model "
        "is kept (with LoRA the reference is the base anyway).",
    )  # fmt: skip
    epsilon: float = _field(0.2, check=_positive, help="Lower (and default upper) ratio clip.")
    epsilon_high: float | None = _field(None, check=_positive, help="Upper ratio clip (DAPO's "
                                        "clip-higher); None: epsilon.")  # fmt: skip
    loss_type: str = _field("dapo", choices=("grpo", "bnpo", "dr_grpo", "dapo"),
                            help="How per-token losses are averaged (docs/losses.md).")  # fmt: skip
    importance_sampling_level: str = _field(
        "token", choices=("token", "sequence"), help="Per-token ratios, or GSPO's per-sequence ratio."
    )
    scale_rewards: str = _field(
        "group", choices=("group", "batch", "none"),
        help="Divide the advantages by the group's reward std (GRPO), the batch's, or nothing "
        "(Dr. GRPO; TRL's RLOO default).",
    )  # fmt: skip
    mask_truncated_completions: bool = _field(
        False, help="Leave completions that never reached EOS out of the loss (DAPO)."
    )
    rescore_policy: bool = _field(
        False, help="Recompute the old log-probs with a full forward instead of taking the sampler's."
    )
    pack_groups: bool = _field(
        True, help="Train on one packed row per prompt (the prompt once, then its G completions, "
        "each attending to the prompt and itself): Lp + G N tokens instead of G (Lp + N); same numbers.",
    )  # fmt: skip

    @property
    def response_length(self) -> int:  # the sampler's name
        return self.max_completion_length

    def validate(self, prefix: str) -> None:
        n = len(self.reward_funcs) + (self.reward_model is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ConfigError(
                f"{prefix}reward_weights has {len(self.reward_weights)} weights for {n} rewards "
                "(reward_funcs, then reward_model)"
            )


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "dpo": DPOConfig,
    "reward": RewardConfig,
    "sft": SFTConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "task_eval": TaskEvalConfig,
}


def _lora_targets(v: Any) -> str | None:
    from jaxrlhf.models.lora import LORA_TARGETS

    names = [v] if isinstance(v, str) else list(v)
    bad = [n for n in names if n not in LORA_TARGETS and n != "all-linear"]
    if bad or not names:
        return f"must be 'all-linear' or a list of {', '.join(LORA_TARGETS)}"
    return None


@dataclass(kw_only=True)
class LoRAConfig(_Section):
    """Low-rank adapters (PEFT's LoRA) instead of full fine-tuning; `rank: 0` turns them off."""

    SECTION: ClassVar[str] = "lora"

    rank: int = _field(0, check=_non_negative, help="Adapter rank r; 0 = full fine-tuning (no adapters).")
    alpha: float = _field(16.0, check=_positive, help="Scale numerator: the update is (x A) B * alpha / r.")
    dropout: float = _field(
        0.0, check=_in_range(0.0, 1.0, hi_open=True),
        help="Dropout on the adapters' input (PEFT's lora_dropout), in train steps only (never when "
        "sampling, scoring or evaluating); masks follow train.seed and the step, so resume is exact.",
    )  # fmt: skip
    target_modules: str | list[str] = _field(
        "all-linear",
        check=_lora_targets,
        help="PEFT module names to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        'down_proj), or "all-linear" for all seven.',
    )

    critic: bool = _field(
        True,
        help="PPO: the critic gets its own adapters and a trained score head over a frozen base shared "
        "with the policy (critic_init: policy) or the reward model (critic_init: reward_model); "
        "false: the whole critic is fine-tuned.",
    )
    quantize_base: str = _field(
        "none",
        choices=("none", "int8", "nf4"),
        help="QLoRA: store the frozen base's projection kernels as int8 (per-column absmax) or nf4 "
        "(4-bit NormalFloat, absmax per 64 inputs) and dequantize them on the fly.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def spec(self) -> Any:
        """The model's `LoRASpec` (None when off)."""
        from jaxrlhf.models.lora import LoRASpec

        if not self.enabled:
            return None
        return LoRASpec.build(self.rank, self.alpha, self.target_modules, self.dropout)


_SECTIONS["lora"] = LoRAConfig  # documented with the others (defined after them)


@dataclass(kw_only=True)
class ExperimentConfig(_Section):
    """A whole run: what to train (`kind`) and one section per concern."""

    kind: str = _field("sft", choices=KINDS, help="What to train: sft, reward, dpo, ppo, grpo or rloo.")
    model: ModelConfig = _field(factory=ModelConfig, help="See the `model` section.")
    data: DataConfig = _field(factory=DataConfig, help="See the `data` section.")
    optim: OptimConfig = _field(factory=OptimConfig, help="See the `optim` section.")
    mesh: MeshConfig = _field(factory=MeshConfig, help="See the `mesh` section.")
    train: TrainConfig = _field(factory=TrainConfig, help="See the `train` section.")
    dpo: DPOConfig = _field(factory=DPOConfig, help="See the `dpo` section.")
    reward: RewardConfig = _field(factory=RewardConfig, help="See the `reward` section.")
    sft: SFTConfig = _field(factory=SFTConfig, help="See the `sft` section.")
    ppo: PPOConfig = _field(factory=PPOConfig, help="See the `ppo` section.")
    grpo: GRPOConfig = _field(factory=GRPOConfig, help="See the `grpo` section (kinds grpo and rloo).")
    task_eval: TaskEvalConfig = _field(factory=TaskEvalConfig, help="See the `task_eval` section.")
    lora: LoRAConfig = _field(factory=LoRAConfig, help="See the `lora` section.")

    def validate(self, prefix: str) -> None:
        lora = self.lora.enabled or self.model.adapter is not None
        if self.lora.quantize_base != "none" and not lora:
            raise ConfigError("lora.quantize_base needs adapters: set lora.rank > 0 (or model.adapter)")
        if self.kind in ("grpo", "rloo"):
            g = self.grpo
            if not g.reward_funcs and g.reward_model is None:
                raise ConfigError("grpo: give grpo.reward_funcs and/or grpo.reward_model")
            if self.kind == "rloo" and g.num_generations < 2:
                raise ConfigError("grpo.num_generations must be >= 2 for rloo (a leave-one-out baseline)")
            if self.train.batch_size % g.num_mini_batches:  # minibatches of whole groups
                raise ConfigError(
                    f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                    f"grpo.num_mini_batches ({g.num_mini_batches})"
                )
        if lora and self.model.frozen_layers:
            raise ConfigError("lora.rank > 0 already freezes the base: leave model.frozen_layers at 0")


def _validate_fields(obj: Any, prefix: str) -> None:
    """Choices and checks of `obj`'s own fields, then its `validate` method (dotted-key errors)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not one of {_choice_list(choices)}{_hint(value, choices)}"
            )
        check = f.metadata.get("check")
        if check is not None and value is not None and (msg := check(value)):
            raise ConfigError(f"{key} {msg}, got {value!r}")
        if dataclasses.is_dataclass(value):
            _validate_fields(value, f"{key}.")
    if hasattr(obj, "validate"):
        obj.validate(prefix)


# --------------------------------------------------------------------------------------------------
# Type checking and coercion


class _Mismatch(Exception):
    """The value does not fit the type (turned into a ConfigError naming the key at the top)."""


@dataclass(frozen=True)
class _Override:
    """An override's value: the YAML-parsed value and the raw text (used for `str` fields)."""

    value: Any
    raw: str


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of dataclass `cls` (ClassVars left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against / converted to `tp`; raises ConfigError naming `key`."""
    raw = None
    if isinstance(value, _Override):
        value, raw = value.value, value.raw
    try:
        return _convert(value, tp, key, raw)
    except _Mismatch:
        shown = raw if raw is not None else value
        raise ConfigError(
            f"{key}: expected {_type_name(tp)}, got {shown!r} ({type(value).__name__})"
        ) from None


def _convert(value: Any, tp: Any, key: str, raw: str | None) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, f"{key}.")
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value in ("None", "none"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, key, None) for v in value]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key, None) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_convert(v, a, key, None) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _Mismatch from None
            if math.isnan(out):
                raise _Mismatch
            return out
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and isinstance(value, int | float) and not isinstance(value, bool):
            return raw  # `model.path=123`: the text as typed
        raise _Mismatch
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


# Common names from other trainers, mapped to ours (used for suggestions only).
_ALIASES = {
    "lr": "learning_rate",
    "warmup": "warmup_steps",
    "steps": "max_steps",
    "epochs": "num_epochs",
    "clip": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "max_norm": "max_grad_norm",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "batch_size",
    "model_name_or_path": "path",
    "dataset": "train_files",
    "loss": "loss_type",
}


def _suggest(bad_key: str) -> str | None:
    """The valid dotted key closest to `bad_key`."""
    keys = _all_keys() + list(_SECTIONS)
    parent, _, leaf = bad_key.rpartition(".")
    if parent in _all_keys():  # `train.batch_size.x`: the parent is a value, not a section
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


def _unknown_key(key: str) -> ConfigError:
    suggestion = _suggest(key)
    if suggestion:
        hint = f"; did you mean {suggestion!r}?"
    else:
        parent = key.rpartition(".")[0]
        valid = [k for k in _all_keys() + list(_SECTIONS) if k.rpartition(".")[0] == parent]
        hint = f"; valid keys{f' of {parent!r}' if parent else ''}: {', '.join(valid)}" if valid else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _check_choice(cls: type, name: str, value: Any, key: str) -> None:
    choices = _fields(cls)[name].metadata.get("choices")
    if isinstance(value, _Override):
        value = value.value
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {_choice_list(choices)}{_hint(value, choices)}")


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hint(value: Any, choices: Sequence[Any]) -> str:
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _choice_list(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `cls` from `data`; unknown keys and type errors raise ConfigError."""
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if not isinstance(name, str) or name not in hints:
            raise _unknown_key(f"{prefix}{name}")
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def _check_tree(cls: type, data: Mapping[str, Any], prefix: str = "") -> None:
    """Keys and value types of `data` against dataclass `cls`, without the cross-field checks
    (a later override may still fix those)."""
    hints = _hints(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise _unknown_key(key)
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            _check_tree(tp, value, f"{key}.")
        else:
            _check_choice(cls, name, _coerce(value, tp, key), key)


# --------------------------------------------------------------------------------------------------
# Loading


def _apply_override(data: dict[str, Any], text: str) -> None:
    """Set `key=value` (dotted key checked against the schema) in the nested dict `data`."""
    body = text[2:] if text.startswith("--") else text
    key, sep, raw = body.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.learning_rate=1e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    cls: Any = ExperimentConfig
    node = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise ConfigError(f"override {text!r}: {_unknown_key(dotted)}")
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
                existing = node.get(part)
                merged = dict(existing) if isinstance(existing, Mapping) else {}
                merged.update(value)
                node[part] = merged
            else:
                try:  # fail early, naming the override
                    _check_choice(cls, part, _coerce(_Override(value, raw.strip()), tp, dotted), dotted)
                except ConfigError as e:
                    raise ConfigError(f"override {text!r}: {e}") from None
                node[part] = _Override(value, raw.strip())
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = dict(child) if isinstance(child, Mapping) else {}
                node[part] = child
            node, cls = child, tp


def load_config(
    path: str | None, overrides: Sequence[str] = (), *, kind: str | None = None
) -> ExperimentConfig:
    """The `ExperimentConfig` of YAML file `path` (None: defaults only) with `overrides` applied.

    `kind` (e.g. from the CLI sub-command) sets the experiment kind; a file or override saying a
    different kind is an error. Raises `ConfigError` on any invalid input.
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        data = _deep_copy(loaded)
    # Unknown keys and type errors of the file, reported with its name before overrides apply.
    try:
        _check_tree(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        _apply_override(data, text)
    if kind is not None:
        if kind not in KINDS:
            raise ConfigError(f"kind: {kind!r} is not one of {_choice_list(KINDS)}{_hint(kind, KINDS)}")
        found = data.get("kind")
        if isinstance(found, _Override):
            found = found.value
        same_section = {found, kind} <= {"grpo", "rloo"}  # one `grpo` section serves both estimators
        if found is not None and found != kind and not same_section:
            raise ConfigError(f"kind: the config says {found!r} but {kind!r} was requested")
        data["kind"] = kind
    return _build(ExperimentConfig, data)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A JSON-able nested dict of `cfg` (tuples become lists); `config_from_dict` inverts it."""
    return _jsonable(cfg)


def config_from_dict(d: Mapping[str, Any]) -> ExperimentConfig:
    """The `ExperimentConfig` of a dict from `config_to_dict` (or a YAML-like mapping); missing keys
    take their defaults, unknown keys and bad values raise `ConfigError`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a mapping of sections, got {type(d).__name__}")
    return _build(ExperimentConfig, d)


# --------------------------------------------------------------------------------------------------
# Documentation


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_default(f: dataclasses.Field) -> str:
    value = f.default
    if value is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "*(section)*"
    if value == "" and f.name == "train_files":
        return "*(required)*"
    return f"`{_md_cell(json.dumps(value))}`"


def config_markdown() -> str:
    """The Markdown reference of every config key (the content of docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from jaxrlhf/train/config.py by config_markdown(); do not edit. -->",
        "",
        "A run is configured by a YAML file with the sections below, plus `section.key=value`",
        "overrides on the command line (parsed as YAML, then checked against the key's type):",
        "",
        "```",
        "jaxrlhf dpo config.yaml optim.learning_rate=1e-6 dpo.loss_type=ipo train.max_steps=10",
        "```",
        "",
        "Unknown keys and wrongly typed values are errors (the closest valid key is suggested).",
        "`X | None` keys take `null` (or `None`); lists are written `[a, b]`.",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    top = dataclasses.fields(ExperimentConfig)[0]
    lines.append(_md_row("kind", _hints(ExperimentConfig)["kind"], top))
    for section, cls in _SECTIONS.items():
        lines += ["", f"## `{section}`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(_md_row(f"{section}.{f.name}", hints[f.name], f))
    return "\n".join(lines) + "\n"


def _md_row(key: str, tp: Any, f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    type_text = " \\| ".join(f'`"{c}"`' for c in choices) if choices else f"`{_md_cell(_type_name(tp))}`"
    return f"| `{key}` | {type_text} | {_md_default(f)} | {_md_cell(f.metadata['help'])} |"
