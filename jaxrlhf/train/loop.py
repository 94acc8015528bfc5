"""The step loop every trainer shares: run steps, log them, checkpoint every `save_every` steps, save
and stop when the job is preempted (SIGTERM), and save once more at the end.

A step whose metrics carry `nonfinite > 0` (its loss or gradient norm was NaN/inf; the compiled step
then left the parameters and optimizer state as they were) either stops the run (`on_nonfinite="stop"`:
the state is saved as that step's checkpoint -- its update not applied -- and `NonFiniteError` names
the step) or is counted and trained past (`"skip"`: `nonfinite_skipped` in the metrics).

The trainer keeps its own state; `run_loop` sees it through two callables: `train_step()` advances
it by one step and returns that step's metrics, `snapshot()` returns `(state, extra)` to checkpoint
(`extra`: JSON-able host state such as the data iterator position).

Metrics may be JAX arrays still being computed: they are fetched together every `log_every` steps
(and at the first and last step), so the host does not wait for each step before dispatching the
next. Only `nonfinite` is read every step when `on_nonfinite="stop"` (the run must stop at that step).
`window(steps, seconds)` adds metrics measured over the steps since the last log (throughput).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxrlhf.train.checkpoint import Checkpointer, NonFiniteError, PreemptionGuard
from jaxrlhf.train.metrics import MetricsLogger


@dataclasses.dataclass
class LoopResult:
    step: int  # the last completed step
    history: list[dict[str, float]]  # {"step": ..., **metrics} per step run here
    preempted: bool  # stopped early by a signal, after saving


def run_loop(
    train_step: Callable[[], dict[str, float]],
    snapshot: Callable[[], tuple[Any, dict[str, Any]]],
    checkpointer: Checkpointer,
    logger: MetricsLogger,
    *,
    step: int,
    total_steps: int,
    log_every: int,
    save_every: int,
    say: Callable[[str], None],
    after_step: Callable[[int, bool], None] | None = None,
    on_nonfinite: str = "stop",
    window: Callable[[int, float], dict[str, float]] | None = None,
) -> LoopResult:
    """Steps `step + 1 .. total_steps`. `after_step(step, saved)` runs after each step's bookkeeping
    (evaluation, test hooks). A final checkpoint is written unless the run was preempted, in which case
    the checkpoint of the step it stopped at is already on disk."""
    history: list[dict[str, Any]] = []
    preempted = False
    skipped = 0
    fetched = 0  # history[:fetched] holds Python floats
    window_start, window_steps = time.perf_counter(), 0

    def fetch() -> None:  # one transfer for every step since the last fetch; skipped steps counted
        nonlocal fetched, skipped
        pending = jax.device_get(history[fetched:])
        for i, entry in enumerate(pending):
            entry = {k: float(v) for k, v in entry.items()}
            if entry.pop("nonfinite", 0.0) > 0:
                skipped += 1
                say(f"step {int(entry['step'])}: non-finite loss or gradient norm, update skipped "
                    f"({skipped} so far)")  # fmt: skip
            if on_nonfinite == "skip":
                entry["nonfinite_skipped"] = float(skipped)
            history[fetched + i] = entry
        fetched = len(history)

    with PreemptionGuard() as guard:
        while step < total_steps:
            metrics = dict(train_step())
            step += 1
            window_steps += 1
            nonfinite = metrics.pop("nonfinite", 0.0)
            if on_nonfinite == "stop" and float(nonfinite) > 0:
                checkpointer.save(step, *snapshot(), force=True)
                checkpointer.wait()
                loss, norm = (float(metrics.get(k, float("nan"))) for k in ("loss", "grad_norm"))
                raise NonFiniteError(
                    f"step {step}: the loss ({loss:.4g}) or gradient norm "
                    f"({norm:.4g}) is not finite; stopped "
                    f"(train.on_nonfinite=stop). Its update was not applied: checkpoint {step} in "
                    f"{checkpointer.directory} holds the parameters after step {step - 1}; "
                    "train.on_nonfinite=skip trains past such steps"
                )
            if on_nonfinite == "skip":
                metrics["nonfinite"] = nonfinite  # counted when fetched
            history.append({"step": step, **metrics})
            if step % log_every == 0 or step == 1 or step == total_steps:
                fetch()
                if window is not None:
                    history[-1].update(window(window_steps, time.perf_counter() - window_start))
                    window_start, window_steps = time.perf_counter(), 0
                logger.log(step, {k: v for k, v in history[-1].items() if k != "step"})
            else:
                logger.progress(step)
            if guard.should_stop(step):  # all processes agree on the step
                checkpointer.save(step, *snapshot(), force=True)
                checkpointer.wait()
                say(f"preempted: checkpoint saved at step {step}; rerun with train.resume=true")
                preempted = True
                break
            saved = bool(save_every) and step % save_every == 0
            if saved:
                checkpointer.save(step, *snapshot())
            if after_step is not None:
                after_step(step, saved)
    fetch()
    if not preempted:
        checkpointer.save(step, *snapshot(), force=True)
    return LoopResult(step, history, preempted)
