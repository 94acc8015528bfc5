"""Tools and environments for multi-turn RL (`grpo.tools`, `grpo.environment`; docs/tools.md).

A **tool** is a plain Python function with type hints and a Google-style docstring: its JSON schema
(what the chat template shows the model) comes from `transformers.utils.get_json_schema`. The policy
calls tools in the Hermes / Qwen format that most tool-trained chat templates use::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    </tool_call>

An **environment** answers one episode's tool calls: `reset(row)` at the start (the prompt row's
columns, e.g. its `answer`), then `step(calls) -> list of tool-message contents`, one per call. The
default, `ToolEnvironment`, runs each call's function; a function that raises, runs past
`timeout` seconds or returns something that is not text becomes an error message to the model, never
an exception in the run. Users implement `Environment` in a few lines (a scripted game, a
sandbox), or name functions only.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Environment",
    "ToolCall",
    "ToolEnvironment",
    "calculator",
    "parse_tool_calls",
    "tool_schema",
]

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's `name` and its `arguments`; `error` when the call could not be read
    (then name and arguments are whatever could be recovered)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` of an assistant turn, in order.
    A call whose body is not such JSON is returned with `error` set (the model is told so)."""
    calls = []
    for body in _CALL.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"the tool call is not valid JSON ({e.msg})"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall("", {}, 'a tool call needs {"name": ..., "arguments": {...}}'))
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(value["name"], {}, "the arguments must be a JSON object"))
            continue
        calls.append(ToolCall(value["name"], arguments))
    return calls


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of `fn` (from its type hints and docstring), as chat templates take it."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


class Environment(Protocol):
    """What a multi-turn rollout talks to: one instance per episode (a `grpo.environment` factory is
    called once per completion). An environment may also define `parse_calls(text) ->
    list[ToolCall]`, the calls of one assistant turn in its own format (e.g. every reply an action
    of a text game); without it, turns are parsed as Hermes `<tool_call>` blocks
    (`parse_tool_calls`)."""

    tools: Sequence[Callable[..., Any]]  # shown to the model (their schemas go to the chat template)

    def reset(self, row: Mapping[str, Any]) -> None:
        """Start an episode for a prompt row (its columns other than `prompt`)."""

    def step(self, calls: Sequence[ToolCall]) -> list[str]:
        """The tool message content answering each call of one assistant turn."""


class ToolEnvironment:
    """Runs each call's function by name (`tools`), with a time limit per call. Errors -- an unknown
    tool, bad arguments, an exception, a timeout, a result that is not text -- come back as the tool
    message `"Error: ..."`."""

    def __init__(self, tools: Sequence[Callable[..., Any]], *, timeout: float = 5.0, max_chars: int = 2000):
        self.tools = list(tools)
        self.by_name = {fn.__name__: fn for fn in self.tools}
        self.timeout, self.max_chars = timeout, max_chars

    def reset(self, row: Mapping[str, Any]) -> None:
        pass

    def step(self, calls: Sequence[ToolCall]) -> list[str]:
        return [self.call(c) for c in calls]

    def call(self, call: ToolCall) -> str:
        if call.error is not None:
            return f"Error: {call.error}"
        fn = self.by_name.get(call.name)
        if fn is None:
            return f"Error: no tool named {call.name!r} (tools: {', '.join(sorted(self.by_name))})"
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"Error: bad arguments for {call.name}: {e}"
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = fn(**call.arguments)
            except Exception as e:  # noqa: BLE001 -- the tool's own failure is the model's to read
                outcome["error"] = e

        # a daemon thread: a call that hangs is abandoned and cannot keep the process from exiting
        thread = threading.Thread(target=run, daemon=True, name=f"tool-{call.name}")
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            return f"Error: {call.name} did not return within {self.timeout:g} s"
        error = outcome.get("error")
        if error is not None:
            return f"Error: {call.name} raised {type(error).__name__}: {error}"
        result = outcome["value"]
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            result = repr(result)
        if not isinstance(result, str):
            return f"Error: {call.name} returned {type(result).__name__}, not text"
        return result[: self.max_chars]


_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}  # fmt: skip


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(12 + 3) * 4".
    """

    def value(node: ast.AST) -> float:
        number = isinstance(node, ast.Constant) and isinstance(node.value, int | float)
        if number and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    result = value(ast.parse(expression.strip(), mode="eval").body)  # no names, calls or attributes
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)
