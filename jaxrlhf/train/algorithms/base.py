"""The algorithm interface: what a training method owns, and what the runner asks of it.

A method is one `Algorithm` subclass in its own module of `jaxrlhf.train.algorithms`. It owns its
config section, its data (parsing, collate), its objective or engine and its metrics; the runner
(`jaxrlhf.train.run`) owns everything the methods share: distributed start-up, the mesh, the
tokenizer, resume, the step loop with logging, checkpoints and preemption, evaluation before / every
`train.eval_every` steps / after (held-out metrics and task accuracy), the export and `summary.json`.

The runner calls `Algorithm.build(ctx)` once and drives the `Learner` it returns:

    runner                      Learner (built by the method)
    ------                      -----------------------------
    resume      <-- state, batches, restore_extra
    eval before <-- held_out("before"), policy_model()
    loop        <-- step(global_batch) -> metrics; micro_batches; tokens(host_batch)
    checkpoint  <-- state, batches, save_extra()
    eval after  <-- held_out("after"), show_samples, policy_model()

`Context` gives every method the same model loading, optimizer and step count, so set-up is
written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import optax

from jaxrlhf.data import BatchIterator, DataError
from jaxrlhf.models import from_pretrained
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.peft_io import load_adapter
from jaxrlhf.train.common import lora_spec, model_directory, model_kwargs, optimizer_from_config
from jaxrlhf.train.step import make_schedule

if TYPE_CHECKING:
    from jaxrlhf.train.algorithms import ExperimentConfig
    from jaxrlhf.train.config import Section

Print = Callable[[str], None]


@dataclasses.dataclass
class Context:
    """What the runner has set up before the method builds its learner."""

    cfg: ExperimentConfig
    mesh: Any
    rules: Any
    model_dir: str  # the policy's checkpoint directory (checked)
    tokenizer: Any
    say: Print

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_ids(self) -> list[int]:
        return sorted({int(self.tokenizer.eos_token_id)})

    def load_model(
        self, path: str | None = None, *, head: str = "lm", init_score_head: bool = False, lora: bool = True
    ) -> CausalLM:
        """A trained model from `path` (default `model.path`), with the run's LoRA / QLoRA when
        `lora` (adapters freshly initialised), sharded on the mesh."""
        cfg = self.cfg
        spec = lora_spec(cfg) if lora else None
        quant = {"lora": spec, "quantize_base": cfg.lora.quantize_base} if spec is not None else {}
        directory = self.model_dir if path is None else model_directory(path)
        return from_pretrained(
            directory, head=head, init_score_head=init_score_head, seed=cfg.train.seed, **quant,
            **model_kwargs(cfg, self.mesh, self.rules),
        )  # fmt: skip

    def load_policy(self, *, head: str = "lm", init_score_head: bool = False) -> CausalLM:
        """The model of `model.path` with the run's LoRA / QLoRA and the weights of `model.adapter`."""
        model = self.load_model(head=head, init_score_head=init_score_head)
        if self.cfg.model.adapter:
            load_adapter(model, self.cfg.model.adapter)
        return model

    def tool_rollout(self, section: Any, max_tokens: int) -> Any:
        """The multi-turn rollout of an online method's section (`tool_use.ToolSettings`) when it
        allows more than one turn, else None; `max_tokens` is its completion budget."""
        if section.max_turns == 1:
            return None
        from jaxrlhf.train.algorithms.tool_use import ToolRollout  # the online methods' module

        return ToolRollout(self.tokenizer, section, max_tokens=max_tokens, eos_ids=self.eos_ids,
                           pad_id=self.pad_id)  # fmt: skip

    def load_frozen(self, path: str, *, head: str = "score") -> CausalLM:
        """A frozen model (a reward model) in `model.frozen_dtype`, sharded like the policy."""
        kw = model_kwargs(self.cfg, self.mesh, self.rules)
        if self.cfg.model.frozen_dtype:
            kw["param_dtype"] = self.cfg.model.frozen_dtype
        return from_pretrained(model_directory(path), head=head, **kw)

    def total_steps(self, num_examples: int) -> int:
        """`train.max_steps`, or `train.num_epochs` passes over `num_examples` in whole batches."""
        t = self.cfg.train
        per_epoch = num_examples // t.batch_size
        if per_epoch == 0:
            raise DataError(f"{num_examples} training examples are fewer than one batch "
                            f"(train.batch_size={t.batch_size})", field="train_files")  # fmt: skip
        return t.max_steps or t.num_epochs * per_epoch

    def optimizer(self, num_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """AdamW of `optim` on its schedule over `num_updates` optimizer updates."""
        o = self.cfg.optim
        schedule = make_schedule(
            o.learning_rate, num_updates, warmup_steps=o.warmup_steps, kind=o.schedule,
            min_lr_ratio=o.min_lr_ratio,
        )  # fmt: skip
        return optimizer_from_config(self.cfg, schedule), schedule


class Learner:
    """A built method, as the runner drives it. Subclasses set `batches` and `total_steps`, and
    implement `state` (get and set: the pytree checkpointed), `step` and `policy_model`."""

    batches: BatchIterator  # this host's share of the training batches; its position is checkpointed
    total_steps: int
    micro_batches: int | None = None  # a leading micro-batch axis of the global batch (offline steps)
    num_params: int = 0  # for MFU (0: not reported)

    @property
    def state(self) -> Any:
        raise NotImplementedError

    @state.setter
    def state(self, value: Any) -> None:
        raise NotImplementedError

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training step on a global batch; metrics as JAX or Python scalars (fetched by the
        runner every `train.log_every` steps). `nonfinite > 0`: the update was skipped."""
        raise NotImplementedError

    def policy_model(self) -> CausalLM:
        """The trained model as it is now (for task accuracy and the export)."""
        raise NotImplementedError

    def tokens(self, batch: dict[str, Any]) -> float:
        """Tokens a host batch trains on, over all processes (for tokens per second); 0: not reported."""
        return 0.0

    def completion_table(self, rows: int | None) -> tuple[list[str], list[list[Any]]] | None:
        """(columns, rows) of the last rollout's prompts, completions and rewards, the first `rows`
        of them (None: all); None: the method samples nothing. Called on every process."""
        return None

    def held_out(self, stage: str) -> dict[str, float] | None:
        """Held-out metrics at `stage` ("before", "step<N>", "after"); None: no held-out data."""
        return None

    def save_extra(self) -> dict[str, Any]:
        """JSON-able host state that exact resume needs besides `state` and the data position."""
        return {}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        pass

    def show_samples(self, step: int, say: Print) -> None:
        """Print a few of the last step's samples (online methods), after the first and last step."""

    def summary(self) -> dict[str, Any]:
        """Extra entries of `summary.json`."""
        return {}


class Algorithm:
    """A training method: `kind` in the config and `jaxrlhf train KIND` on the command line."""

    name: ClassVar[str]  # the kind
    help: ClassVar[str]  # one line, for the CLI and the docs
    section: ClassVar[str | None] = None  # the config section the method reads (it may share one)
    config_class: ClassVar[type[Section] | None] = None  # that section's class, when it owns it
    measures_tasks: ClassVar[bool] = True  # task accuracy when the eval data has checkable answers

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Cross-field config checks of this method (raise `ConfigError` naming the keys)."""

    def build(self, ctx: Context) -> Learner:
        raise NotImplementedError

    def plan_steps(self) -> tuple[str, ...]:
        """The steps of `jaxrlhf.plan.steps` a run of this method compiles (`jaxrlhf plan`); ()
        for a method the planner does not cover."""
        return ()
