"""`run_loop`: which steps are logged and saved, the final save, and the save-and-stop on SIGTERM."""

from __future__ import annotations

import os
import signal

from jaxrlhf.train.loop import run_loop


class FakeCheckpointer:
    def __init__(self):
        self.saves: list[tuple[int, object, dict, bool]] = []
        self.waits = 0

    def save(self, step, state, extra=None, *, force=False):
        self.saves.append((step, state, extra, force))
        return True

    def wait(self):
        self.waits += 1


class FakeLogger:
    def __init__(self):
        self.logged: list[int] = []
        self.progressed: list[int] = []

    def log(self, step, metrics, split="train"):
        self.logged.append(step)

    def progress(self, step):
        self.progressed.append(step)


def _run(total, *, start=0, kill_at=None, save_every=3, log_every=4):
    state = {"n": start}
    seen_after: list[tuple[int, bool]] = []

    def train_step():
        state["n"] += 1
        if state["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard turns it into a request
        return {"loss": float(state["n"])}

    ckpt, logger = FakeCheckpointer(), FakeLogger()
    result = run_loop(
        train_step, lambda: (state["n"], {"data": state["n"]}), ckpt, logger, step=start, total_steps=total,
        log_every=log_every, save_every=save_every, say=lambda msg: None,
        after_step=lambda step, saved: seen_after.append((step, saved)),
    )  # fmt: skip
    return result, ckpt, logger, seen_after


def test_saves_every_n_and_at_the_end_logs_first_every_n_and_last():
    result, ckpt, logger, seen_after = _run(7)
    assert (result.step, result.preempted) == (7, False)
    assert [h["step"] for h in result.history] == list(range(1, 8))
    assert [(s, st, e["data"], f) for s, st, e, f in ckpt.saves] == [
        (3, 3, 3, False), (6, 6, 6, False), (7, 7, 7, True),
    ]  # fmt: skip
    assert logger.logged == [1, 4, 7] and logger.progressed == [2, 3, 5, 6]
    assert seen_after == [(1, False), (2, False), (3, True), (4, False), (5, False), (6, True), (7, False)]


def test_resumed_loop_continues_from_its_step():
    result, ckpt, _, _ = _run(5, start=3)
    assert [h["step"] for h in result.history] == [4, 5]
    assert [s for s, *_ in ckpt.saves] == [5]


def test_sigterm_saves_the_current_step_and_stops():
    before = signal.getsignal(signal.SIGTERM)
    result, ckpt, _, seen_after = _run(10, kill_at=4)
    assert (result.step, result.preempted) == (4, True)
    assert [(s, f) for s, _, _, f in ckpt.saves] == [(3, False), (4, True)]  # no extra final save
    assert ckpt.waits == 1  # the preemption save is complete before the loop returns
    assert seen_after[-1] == (3, True)  # a preempted step skips after_step (no eval before exiting)
    assert signal.getsignal(signal.SIGTERM) == before  # the guard restored the previous handler
