"""Normalise preference rows to `PreferenceExample(prompt, chosen, rejected, margin)`.

Each row is read on its own; its format follows from its fields:

* **standard** -- ``prompt``, ``chosen`` and ``rejected`` are strings (or, pre-tokenized,
  lists of token ids).
* **conversational** -- ``prompt`` is a list of ``{"role", "content"}`` messages and
  ``chosen`` / ``rejected`` are lists of messages starting with an assistant message. They
  are rendered with ``tokenizer.apply_chat_template``: the prompt with
  ``add_generation_prompt=True``, each completion as the rendering of prompt + completion
  minus the prompt's rendering, which must be a prefix of it (else the row is bad).
  Whitespace the template writes after the completion's final EOS token is dropped, so
  the completion ends with EOS.
* **implicit prompt** -- no ``prompt`` (missing or null; a text ``prompt`` next to
  conversations counts as none, as in ``ultrafeedback_binarized`` where it repeats the
  conversations' first user turn). ``chosen`` and ``rejected`` are
  full texts, token-id lists or conversations, and their shared beginning is the prompt:
  for conversations the common leading messages, for token ids the common leading ids,
  for strings the longest common prefix backed off to the start of its last whitespace run
  (``"Q: hi\\n\\nA: Hello"`` / ``"Q: hi\\n\\nA: Hey"`` -> ``"Q: hi\\n\\nA:"`` +
  ``" Hello"`` / ``" Hey"``), so a completion starts at a word boundary. At least one
  message, id or character stays in each completion.
* **ranked** -- ``prompt``, ``completions`` and ``scores``: all the pairs of a prompt's scored
  completions (`jaxrlhf.data.ranked`).
* **margin** -- an optional number (or numeric string; null or ``""`` means none), e.g.
  for reward models.

A bad row -- missing field, wrong type, empty prompt, a chat template that cannot be split --
raises `DataError` naming file, row (or line) and field; with ``skip_invalid=True`` it is skipped
and counted in `ParseStats`. *Degenerate* rows are well formed but teach nothing useful: a
completion that is empty (blank text, or messages with blank content) or a chosen answer equal to
the rejected one. They are counted (``ParseStats.empty_completion`` / ``identical``) and logged,
and with ``drop_degenerate=True`` dropped (``ParseStats.dropped_degenerate``); never silently kept.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxrlhf.data.loading import DataError, Rows
from jaxrlhf.data.ranked import is_ranked, ranked_pairs

logger = logging.getLogger(__name__)

Text = str | list[int]
Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: text (or token ids) of the prompt and both completions."""

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None


@dataclass
class ParseStats:
    """What `parse_preferences` saw: rows read, kept, skipped (with their errors), degenerate rows
    (an empty completion, chosen == rejected) and how many of those were dropped."""

    rows: int = 0
    kept: int = 0
    skipped: int = 0
    empty_completion: int = 0
    identical: int = 0
    dropped_degenerate: int = 0
    errors: list[DataError] = field(default_factory=list)


def parse_preferences(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any = None,
    *,
    skip_invalid: bool = False,
    drop_degenerate: bool = False,
    source: str | None = None,
    min_score_gap: float = 0.0,
) -> tuple[list[PreferenceExample], ParseStats]:
    """Normalise every row; ``tokenizer`` (with a chat template) is needed for conversations. A
    ranked row (`jaxrlhf.data.ranked`) gives one example per pair of its completions whose scores
    differ by more than ``min_score_gap``; degenerate counts and ``kept`` count those pairs.

    Errors are located through ``rows.locate`` for `Rows` from `load_rows` (line of a JSON Lines /
    CSV file, else 1-based row), else as ``source, row i + 1``.
    """
    stats = ParseStats()
    examples = []
    for index, row in enumerate(rows):
        stats.rows += 1
        try:
            pair_rows = ranked_pairs(row, min_score_gap) if is_ranked(row) else [row]
            parsed = [(pair_row, parse_row(pair_row, tokenizer)) for pair_row in pair_rows]
        except DataError as err:
            where = rows.locate(index) if isinstance(rows, Rows) else (source, index + 1, "row")
            located = err.located(*where)
            if not skip_invalid:
                raise located from None
            stats.skipped += 1
            stats.errors.append(located)
            continue
        for pair_row, example in parsed:
            empty = has_empty_completion(pair_row, example)
            identical = example.chosen == example.rejected
            stats.empty_completion += empty
            stats.identical += identical
            if (empty or identical) and drop_degenerate:
                stats.dropped_degenerate += 1
                continue
            stats.kept += 1
            examples.append(example)
    if stats.skipped:
        logger.warning("skipped %d of %d preference rows", stats.skipped, stats.rows)
    if stats.empty_completion or stats.identical:
        logger.warning(
            "%d preference rows have an empty completion, %d have chosen == rejected (%s)",
            stats.empty_completion, stats.identical,
            "dropped" if drop_degenerate else "kept; data.drop_degenerate=true drops them",
        )  # fmt: skip
    return examples, stats


def _blank(value: Any) -> bool:
    """An empty completion: blank text, or messages whose contents are all blank."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return all(not str(m.get("content") or "").strip() for m in value)
    return False


def has_empty_completion(row: Mapping[str, Any], example: PreferenceExample) -> bool:
    """Whether the chosen or rejected completion of `row` (as written, or as split off an implicit
    prompt) is empty."""
    row = to_chatml(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if _kind(chosen, "chosen") == "messages" and not isinstance(row.get("prompt"), list):
        _, chosen, rejected = _split_implicit(chosen, rejected, "messages")  # as parse_row split them
    parts = [chosen, rejected, example.chosen, example.rejected]
    return any(_blank(p) for p in parts[:2]) or any(isinstance(p, str) and _blank(p) for p in parts[2:])


MESSAGE_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")
SHAREGPT_SPEAKERS = {"human": "user", "gpt": "assistant"}


def to_chatml(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row whose messages are ShareGPT's (`from` / `value`, the conversation under
    `conversations`) with ChatML's (`role` / `content`, under `messages`), as TRL's
    `maybe_convert_to_chatml`; ShareGPT's speakers `human` and `gpt` become `user` and `assistant`
    (TRL keeps them as roles, which ChatML templates render verbatim and others refuse)."""
    out = dict(row)
    for key in MESSAGE_FIELDS:
        value = out.get(key)
        if isinstance(value, list) and any(isinstance(m, Mapping) and ("from" in m or "value" in m)
                                           for m in value):  # fmt: skip
            out[key] = [_chatml_message(m) if isinstance(m, Mapping) else m for m in value]
    if "conversations" in out and out.get("messages") is None:
        out["messages"] = out.pop("conversations")
    return out


def _chatml_message(message: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if k not in ("from", "value")}
    if "from" in message:
        out["role"] = SHAREGPT_SPEAKERS.get(message["from"], message["from"])
    if "value" in message:
        out["content"] = message["value"]
    return out


def template_kwargs(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a row gives its chat template, as TRL passes it: the `tools` column (a list of JSON
    schemas, or that list as a JSON string) and the `chat_template_kwargs` column's entries."""
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise DataError(f"expected an object, got {_describe(kwargs)}", field="chat_template_kwargs")
    out = dict(kwargs)
    tools = row.get("tools")
    if isinstance(tools, str):
        import json

        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON: {e.msg} (column {e.colno})", field="tools") from None
    if tools is not None:
        if not isinstance(tools, list):
            raise DataError(f"expected a list of tool schemas, got {_describe(tools)}", field="tools")
        out["tools"] = tools
    return out


def parse_row(row: Mapping[str, Any], tokenizer: Any = None) -> PreferenceExample:
    """Normalise one row; a bad one raises `DataError` naming the field (not yet the row)."""
    if not isinstance(row, Mapping):
        raise DataError(f"expected a row of named fields, got {_describe(row)}")
    row = to_chatml(row)
    chosen = _required(row, "chosen")
    rejected = _required(row, "rejected")
    margin = _margin(row.get("margin"))
    prompt = row.get("prompt")
    kind = _kind(chosen, "chosen")
    _expect_kind(rejected, "rejected", kind, like="chosen")
    if kind == "messages" and isinstance(prompt, str):
        prompt = None  # a text copy of a prompt the conversations hold (ultrafeedback_binarized)
    if prompt is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, kind)
    else:
        _expect_kind(prompt, "prompt", kind, like="chosen")
    if kind == "messages":
        _check_completion_messages(chosen, "chosen")
        _check_completion_messages(rejected, "rejected")
        prompt, chosen, rejected = _render(prompt, chosen, rejected, tokenizer, template_kwargs(row))
    _check_not_empty(prompt, "prompt")
    return PreferenceExample(prompt, chosen, rejected, margin)


# ---- fields and their kinds: "text", "ids", "messages" --------------------------------------


def _required(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise DataError("missing", field=name)
    return value


def _kind(value: Any, name: str) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value:
        if all(isinstance(item, Mapping) for item in value):
            _check_messages(value, name)
            return "messages"
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return "ids"
    if isinstance(value, list) and not value:
        raise DataError("empty", field=name)
    raise DataError(
        f"expected a string, a list of messages or a list of token ids, got {_describe(value)}",
        field=name,
    )


def _expect_kind(value: Any, name: str, kind: str, *, like: str) -> None:
    if _kind(value, name) != kind:
        wanted = {"text": "a string", "ids": "a list of token ids", "messages": "messages"}[kind]
        raise DataError(f"expected {wanted} like {like!r}, got {_describe(value)}", field=name)


def _check_messages(messages: list[Mapping[str, Any]], name: str) -> None:
    """A `role` string each; `content` a string, a list of parts, or absent / null (an assistant
    turn of only `tool_calls`), as TRL takes them: rendering them is the template's business."""
    for number, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            got = _describe(message.get("role"))
            raise DataError(f"message {number}: expected 'role' to be a string, got {got}", field=name)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise DataError(
                f"message {number}: expected 'content' to be a string or a list of parts, got "
                f"{_describe(content)}", field=name,
            )  # fmt: skip


def _check_completion_messages(messages: Messages, name: str) -> None:
    role = messages[0]["role"]
    if role != "assistant":
        raise DataError(
            f"a completion must start with an assistant message, got role {role!r}", field=name
        )


def _check_not_empty(value: Text, name: str) -> None:
    if len(value) == 0:
        raise DataError("empty", field=name)


def _margin(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DataError(f"expected a number, got {_describe(value)}", field="margin")
    try:
        margin = float(value)
    except ValueError:
        raise DataError(f"expected a number, got {value!r}", field="margin") from None
    if not math.isfinite(margin):
        raise DataError(f"expected a finite number, got {value!r}", field="margin")
    return margin


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a list of {' and '.join(kinds)}" if kinds else "an empty list"
    return type(value).__name__


# ---- implicit prompts ----------------------------------------------------------------------


def _split_implicit(chosen: Any, rejected: Any, kind: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full texts / id lists / conversations."""
    if kind == "text":
        cut = _text_cut(os.path.commonprefix([chosen, rejected]))
    else:
        shared = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            shared += 1
        cut = min(shared, len(chosen) - 1, len(rejected) - 1)
    if cut <= 0:
        unit = {"text": "text", "ids": "token ids", "messages": "messages"}[kind]
        raise DataError(
            f"chosen and rejected share no leading {unit} to use as the prompt", field="prompt"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _text_cut(common: str) -> int:
    """Where to split a shared string prefix: the start of its last whitespace run."""
    cut = len(common)
    while cut > 0 and not common[cut - 1].isspace():
        cut -= 1
    while cut > 0 and common[cut - 1].isspace():
        cut -= 1
    return cut


# ---- chat templates ------------------------------------------------------------------------


def _render(
    prompt: Messages, chosen: Messages, rejected: Messages, tokenizer: Any, kwargs: Mapping[str, Any]
) -> tuple[str, str, str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational preference rows need a tokenizer with a chat_template")
    prompt_text = render_messages(tokenizer, prompt, "prompt", add_generation_prompt=True, **kwargs)
    return (
        prompt_text,
        _completion_text(tokenizer, prompt, chosen, prompt_text, "chosen", kwargs),
        _completion_text(tokenizer, prompt, rejected, prompt_text, "rejected", kwargs),
    )


def _completion_text(
    tokenizer: Any, prompt: Messages, completion: Messages, prompt_text: str, name: str,
    kwargs: Mapping[str, Any],
) -> str:  # fmt: skip
    full = render_messages(tokenizer, prompt + completion, name, add_generation_prompt=False, **kwargs)
    if not full.startswith(prompt_text):
        raise DataError(
            "the chat template's rendering of prompt + completion does not start with its "
            "rendering of the prompt (add_generation_prompt=True), so the completion cannot "
            "be split off",
            field=name,
        )
    return trim_after_eos(full[len(prompt_text) :], getattr(tokenizer, "eos_token", None))


def trim_after_eos(text: str, eos: str | None) -> str:
    """`text` without the whitespace a chat template writes after its final EOS (the model stops at
    EOS, so that line break is never generated)."""
    stripped = text.rstrip()
    return stripped if eos and stripped.endswith(eos) else text


STANDARD_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_roles(messages: Sequence[Mapping[str, Any]], tokenizer: Any, name: str) -> None:
    """Every message's role is a standard one (`STANDARD_ROLES`) or one the chat template names
    (e.g. Llama 3.1's "ipython"): a template such as ChatML renders any role, so an unknown role
    would otherwise be trained on silently."""
    known = _template_roles(getattr(tokenizer, "chat_template", None) or "")
    for number, message in enumerate(messages):
        role = message.get("role")
        if role not in STANDARD_ROLES and role not in known:
            raise DataError(
                f"message {number}: role {role!r} is not one the chat template knows "
                f"({', '.join(STANDARD_ROLES)}, or a role the template names)", field=name,
            )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _template_roles(template: str) -> frozenset[str]:
    """Quoted words of a chat template that it compares a role with (`role == 'ipython'`)."""
    return frozenset(re.findall(r"""role['"]?\]?\s*(?:==|!=)\s*['"]([A-Za-z_]+)['"]""", template))


def render_messages(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], name: str, *, add_generation_prompt: bool,
    **kwargs: Any,
) -> str:  # fmt: skip
    """The chat template's rendering of `messages` (roles checked; `kwargs`: `tools`,
    `continue_final_message`, a row's `chat_template_kwargs`); a template error is a `DataError`
    naming the field `name`."""
    check_roles(messages, tokenizer, name)
    try:
        text = tokenizer.apply_chat_template(
            [dict(message) for message in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except Exception as err:  # the template's own checks, e.g. alternating roles
        raise DataError(f"chat template failed: {err}", field=name) from err
    return text
