"""The step loop every trainer shares: run steps, log them, checkpoint every `save_every` steps, save
and stop when the job is preempted (SIGTERM), and save once more at the end.

The trainer keeps its own state; `run_loop` sees it through two callables: `train_step()` advances
it by one step and returns that step's metrics, `snapshot()` returns `(state, extra)` to checkpoint
(`extra`: JSON-able host state such as the data iterator position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard
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
) -> LoopResult:
    """Steps `step + 1 .. total_steps`. `after_step(step, saved)` runs after each step's bookkeeping
    (evaluation, test hooks). A final checkpoint is written unless the run was preempted, in which case
    the checkpoint of the step it stopped at is already on disk."""
    history: list[dict[str, float]] = []
    preempted = False
    with PreemptionGuard() as guard:
        while step < total_steps:
            metrics = train_step()
            step += 1
            history.append({"step": step, **metrics})
            if step % log_every == 0 or step == 1 or step == total_steps:
                logger.log(step, metrics)
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
    if not preempted:
        checkpointer.save(step, *snapshot(), force=True)
    return LoopResult(step, history, preempted)
