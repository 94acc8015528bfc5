"""Environments for CLI runs of multi-turn RL on tiny random models (importable in subprocesses:
tests/ is on PYTHONPATH), which never write a real `<tool_call>`: every finished turn is a call."""

from __future__ import annotations

from jaxrlhf.tools import ToolCall


class EveryTurnIsACall:
    """Each turn that ends with EOS is one call; the answer names the row and the turn, so episodes
    differ by row and by how many turns they took."""

    tools = ()

    def reset(self, row):
        self.answer, self.turn = row.get("answer"), 0

    def parse_calls(self, text):
        return [ToolCall("next", {"text": text[:10]})] if text.strip() else []

    def step(self, calls):
        self.turn += 1
        return [f"turn {self.turn}: {self.answer}" for _ in calls]
