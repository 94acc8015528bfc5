"""Task accuracy: greedy replies to held-out prompts, judged by the checker of each row's family.

`load_task_prompts` reads the prompts of data files whose rows carry `family` and `answer` columns
(the shipped demo data does); `evaluate_tasks` answers them with the compiled KV-cache sampler
(greedy, so the numbers are reproducible) and returns accuracy overall and by family, every reply,
and a few replies per family picked by a fixed rule: the first `samples_per_family` rows of each
family in file order, whatever their outcome. `jaxrlhf eval` and the trainers (before and after
training) call the same code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.data import DataError, left_pad, load_rows
from jaxrlhf.evaluation.checkers import CHECKERS, check
from jaxrlhf.generation import generate
from jaxrlhf.parallel import host_array

SCHEMA = "jaxrlhf.task_eval/1"


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    file: str
    row: int  # where the row is: its line of a JSON Lines / CSV file, else its 1-based row
    family: str
    answer: str
    prompt: str  # the user's message (or the text prompt), for display
    ids: np.ndarray  # prompt token ids, chat template and generation prompt applied


def _prompt_text(prompt: Any, tokenizer: Any) -> tuple[str, str]:
    """(text fed to the model, text shown) of a `prompt` cell: a conversation or a string."""
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return text, str(prompt[-1].get("content", ""))
    if isinstance(prompt, str) and prompt.strip():
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), prompt
        return prompt, prompt
    raise ValueError("expected a non-empty string or a list of messages")


def has_task_columns(files: Sequence[str]) -> bool:
    """Whether every file has `family` and `answer` columns (so its prompts can be checked)."""
    if not files:
        return False
    for file in files:
        rows = load_rows(file)
        columns = set(rows.parts[0].column_names) if rows.parts else set()
        if not {"family", "answer"} <= columns:
            return False
    return True


def load_task_prompts(files: Sequence[str], tokenizer: Any, *, max_prompt_length: int | None = None) -> list[
    TaskPrompt
]:
    """Prompts of `files` with their family and answer. A row without them, or of a family with no
    checker, raises `DataError` naming the file, row and field."""
    out: list[TaskPrompt] = []
    for file in files:
        rows = load_rows(file)
        for i in range(len(rows)):
            row = rows[i]
            where = rows.locate(i)
            for field in ("family", "answer", "prompt"):
                if row.get(field) is None:
                    raise DataError("missing (task accuracy needs family and answer)", field=field).located(
                        *where)  # fmt: skip
            family, answer = str(row["family"]), str(row["answer"])
            if family not in CHECKERS:
                known = ", ".join(sorted(CHECKERS))
                raise DataError(f"no checker for family {family!r} (known: {known})", field="family").located(
                    *where)  # fmt: skip
            try:
                text, shown = _prompt_text(row["prompt"], tokenizer)
            except Exception as e:
                raise DataError(f"cannot render the prompt ({e})", field="prompt").located(*where) from e
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
            if max_prompt_length:
                ids = ids[-max_prompt_length:]
            out.append(TaskPrompt(where.file, where.number, family, answer, shown, ids))
    return out


@dataclasses.dataclass
class TaskEvalResult:
    accuracy: float
    correct: int
    total: int
    families: dict[str, dict[str, float]]  # family -> {"accuracy", "correct", "total"}
    samples: dict[str, list[dict[str, Any]]]  # family -> the first replies of that family
    rows: list[dict[str, Any]]  # every prompt: file, row, family, prompt, answer, reply, correct
    max_new_tokens: int

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"schema": SCHEMA, **extra, **dataclasses.asdict(self)}

    def summary(self) -> dict[str, float]:
        """Flat metrics (`task/accuracy`, `task/<family>`) for metrics.jsonl and summary.json."""
        out = {"task/accuracy": self.accuracy}
        out.update({f"task/{f}": v["accuracy"] for f, v in self.families.items()})
        return out


def _place(x: np.ndarray, mesh: Any) -> Any:
    """A numpy batch (the same on every process) as an array jit can take next to sharded parameters."""
    if mesh is None or jax.process_count() == 1:
        return x
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


def generate_greedy(
    model: Any, tokenizer: Any, prompt_ids: Sequence[np.ndarray], *, max_new_tokens: int,
    batch_size: int = 64, mesh: Any = None,
) -> list[str]:  # fmt: skip
    """Greedy replies (decoded, special tokens dropped, stripped) to token-id prompts, in order.
    Every batch is padded to `batch_size` rows and the prompt width to a multiple of 16, so a whole
    evaluation compiles once or twice."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    width = -(-max(len(p) for p in prompt_ids) // 16) * 16
    batch_size = min(batch_size, len(prompt_ids))
    replies: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[start : start + batch_size])
        ids, mask = left_pad(chunk, tokenizer.pad_token_id, width=width, batch_size=batch_size)
        out = generate(
            model, _place(ids, mesh), _place(mask, mesh), max_new_tokens=max_new_tokens,
            eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, temperature=0.0,
        )  # fmt: skip
        tokens, done = host_array(out.tokens), host_array(out.completion_mask)
        for row, m in zip(tokens[: len(chunk)], done[: len(chunk)], strict=True):
            replies.append(tokenizer.decode(row[m == 1], skip_special_tokens=True).strip())
    return replies


def evaluate_tasks(
    model: Any, tokenizer: Any, prompts: Sequence[TaskPrompt], *, max_new_tokens: int = 48,
    batch_size: int = 64, samples_per_family: int = 2, mesh: Any = None,
) -> TaskEvalResult:  # fmt: skip
    """Greedy replies to `prompts`, each judged by its family's checker."""
    if not prompts:
        raise ValueError("no task prompts to evaluate")
    replies = generate_greedy(
        model, tokenizer, [p.ids for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
        mesh=mesh,
    )  # fmt: skip
    rows = [
        {"file": p.file, "row": p.row, "family": p.family, "prompt": p.prompt, "answer": p.answer,
         "reply": reply, "correct": check(p.family, reply, p.answer)}
        for p, reply in zip(prompts, replies, strict=True)
    ]  # fmt: skip
    families: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for family in sorted({r["family"] for r in rows}):
        mine = [r for r in rows if r["family"] == family]
        correct = sum(r["correct"] for r in mine)
        families[family] = {"accuracy": correct / len(mine), "correct": correct, "total": len(mine)}
        samples[family] = mine[:samples_per_family]
    correct = sum(r["correct"] for r in rows)
    return TaskEvalResult(correct / len(rows), correct, len(rows), families, samples, rows, max_new_tokens)


def write_task_eval(path: str, result: TaskEvalResult, **extra: Any) -> None:
    """The JSON report (`SCHEMA`), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result.to_json(**extra), f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def format_task_report(before: TaskEvalResult | None, after: TaskEvalResult | None) -> str:
    """A table of task accuracy (overall and by family), before and/or after, with the change in
    prompts per family; families that lost more than one prompt are flagged."""
    base = after or before
    assert base is not None
    cols = [("before", before), ("after", after)]
    cols = [(name, r) for name, r in cols if r is not None]
    head = f"{'task accuracy':<16}" + "".join(f"{name:>16}" for name, _ in cols)
    if before and after:
        head += f"{'change':>10}"
    lines = [head]

    def cell(r: TaskEvalResult, family: str | None) -> str:
        c, n = (r.correct, r.total) if family is None else (
            int(r.families[family]["correct"]), int(r.families[family]["total"]))  # fmt: skip
        return f"{c / n:.3f} ({c:>2}/{n:<2})"

    worse: list[str] = []
    for family in [None, *base.families]:
        line = f"{family or 'overall':<16}" + "".join(f"{cell(r, family):>16}" for _, r in cols)
        if before and after:
            b = before.correct if family is None else int(before.families[family]["correct"])
            a = after.correct if family is None else int(after.families[family]["correct"])
            line += f"{a - b:>+10d}"
            if family is not None and a - b < -1:
                worse.append(f"{family} ({a - b:+d})")
        lines.append(line)
    if worse:
        lines.append("worse by more than one held-out prompt: " + ", ".join(worse))
    return "\n".join(lines)


def format_samples(before: TaskEvalResult | None, after: TaskEvalResult) -> str:
    """The fixed sample replies of `after` (and the same prompts' replies of `before`), by family."""
    lines = []
    for family, rows in after.samples.items():
        for i, r in enumerate(rows):
            lines.append(f"\n[{family}] user: {r['prompt']}")
            if before is not None:
                b = before.samples[family][i]
                lines.append(f"  before ({'right' if b['correct'] else 'wrong'}): {b['reply']}")
            lines.append(f"  after  ({'right' if r['correct'] else 'wrong'}): {r['reply']}")
    return "\n".join(lines)
