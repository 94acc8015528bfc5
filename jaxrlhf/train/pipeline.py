"""From config to tokenized train/eval examples: resolve files, parse, split, tokenize, log counts.

Preference kinds (DPO, reward) produce `TokenizedPair`s for the packed layout; SFT produces
`TokenizedPair`s too, with the completion as `chosen` and no `rejected` (collated as sequences).
Every dropped or skipped row is counted and reported; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxrlhf.data import (
    DataError,
    PreferenceExample,
    TokenizedPair,
    load_rows,
    parse_preferences,
    tokenize_pairs,
)
from jaxrlhf.train.config import DataConfig

ASSET_PREFIX = "asset:"


def resolve_data_path(path: str) -> str:
    """`asset:dpo_demo/train.jsonl` names a file shipped inside the package (works after pip install)."""
    if path.startswith(ASSET_PREFIX):
        return str(importlib.resources.files("jaxrlhf.assets").joinpath(path[len(ASSET_PREFIX) :]))
    return path


def resolve_data_files(spec: str | list[str] | None) -> list[str]:
    """`data.train_files` / `data.eval_files` (one path or a list) as paths, assets resolved."""
    if spec is None:
        return []
    return [resolve_data_path(s) for s in ([spec] if isinstance(spec, str) else spec)]


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices `(train, eval)`: `fraction` of `n` rows (at least one) held out, chosen by `seed`;
    both in the original order."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, int(round(fraction * n)))
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())


@dataclasses.dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    report: dict[str, int]


def _parse_sft(
    rows: Any, tokenizer: Any, *, skip_invalid: bool, drop_degenerate: bool, source: str
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """SFT rows: `prompt`/`completion` strings, a `messages` conversation (the last assistant message
    is the completion), or a conversational preference row (its `chosen` answer is the completion).
    Returned as PreferenceExample with `rejected` empty, and counts of skipped rows and of rows with
    an empty completion (dropped with `drop_degenerate`)."""
    out: list[PreferenceExample] = []
    counts = {"skipped": 0, "empty_completion": 0, "dropped_degenerate": 0}
    for i in range(len(rows)):
        row = rows[i]
        where = rows.locate(i) if hasattr(rows, "locate") else (source, i + 1, "row")
        try:
            if isinstance(row.get("prompt"), list) and isinstance(row.get("chosen"), list):
                row = {"messages": row["prompt"] + row["chosen"]}  # a conversational preference row
            if "messages" in row and row["messages"] is not None:
                msgs = row["messages"]
                if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                    raise DataError(
                        "expected a list of messages ending with an assistant turn", field="messages"
                    )
                prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(msgs, tokenize=False)
                if not full.startswith(prompt):
                    raise DataError(
                        "the chat template does not render the prompt as a prefix", field="messages"
                    )
                completion = full[len(prompt) :]
                if tokenizer.eos_token and completion.rstrip().endswith(tokenizer.eos_token):
                    completion = completion.rstrip()
                empty = not str(msgs[-1].get("content") or "").strip()
            else:
                for field in ("prompt", "completion"):
                    if field not in row:
                        raise DataError(f"missing column {field!r} (or give 'messages')", field=field)
                    if not isinstance(row[field], str):
                        raise DataError(f"expected a string, got {type(row[field]).__name__}", field=field)
                prompt, completion = row["prompt"], row["completion"]
                empty = not completion.strip()
        except DataError as e:
            e = e.located(*where) if hasattr(e, "located") else e
            if not skip_invalid:
                raise e from None
            counts["skipped"] += 1
            continue
        counts["empty_completion"] += empty
        if empty and drop_degenerate:
            counts["dropped_degenerate"] += 1
            continue
        out.append(PreferenceExample(prompt, completion, "", None))
    return out, counts


def prepare_data(
    cfg: DataConfig, tokenizer: Any, *, kind: str, log: Callable[[str], None] = print
) -> PreparedData:
    """Load, parse, split and tokenize the train (and eval) data of `cfg` for `kind`."""
    report: dict[str, int] = {}

    def load(files: list[str], split: str) -> list[PreferenceExample]:
        examples: list[PreferenceExample] = []
        for file in files:
            rows = load_rows(file)
            if kind == "sft":
                parsed, counts = _parse_sft(
                    rows, tokenizer, skip_invalid=cfg.skip_invalid, drop_degenerate=cfg.drop_degenerate,
                    source=file,
                )  # fmt: skip
            else:
                parsed, stats = parse_preferences(
                    rows, tokenizer, skip_invalid=cfg.skip_invalid, drop_degenerate=cfg.drop_degenerate,
                    source=file,
                )  # fmt: skip
                counts = {"skipped": stats.skipped, "empty_completion": stats.empty_completion,
                          "chosen_equals_rejected": stats.identical,
                          "dropped_degenerate": stats.dropped_degenerate}  # fmt: skip
            for name, n in counts.items():
                key = f"{split}/rows_{'skipped_invalid' if name == 'skipped' else name}"
                report[key] = report.get(key, 0) + n
            examples.extend(parsed)
        degenerate = report.get(f"{split}/rows_empty_completion", 0) + report.get(
            f"{split}/rows_chosen_equals_rejected", 0)  # fmt: skip
        if degenerate and not cfg.drop_degenerate:
            log(f"data: {split} has {degenerate} degenerate rows (empty completion or chosen == rejected); "
                "they are trained on: set data.drop_degenerate=true to drop them")  # fmt: skip
        return examples

    train_files = resolve_data_files(cfg.train_files)
    if not train_files:
        raise DataError("no training files given (data.train_files)", field="train_files")
    train = load(train_files, "train")
    eval_ = load(resolve_data_files(cfg.eval_files), "eval") if cfg.eval_files else []
    if not cfg.eval_files and cfg.eval_fraction > 0:
        train_idx, eval_idx = held_out_split(len(train), cfg.eval_fraction, cfg.seed)
        train, eval_ = [train[i] for i in train_idx], [train[i] for i in eval_idx]

    def tokenize(examples: list[PreferenceExample], split: str) -> list[TokenizedPair]:
        if not examples:
            return []
        pairs, stats = tokenize_pairs(
            examples, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode,
        )  # fmt: skip
        for field in ("dropped_long_prompt", "dropped_no_room", "dropped_empty", "truncated_prompt",
                      "truncated_completion"):  # fmt: skip
            report[f"{split}/{field}"] = int(getattr(stats, field, 0))
        report[f"{split}/examples"] = len(pairs)
        return pairs

    if kind == "sft":  # tokenize_pairs needs a rejected completion: give a placeholder, then drop it
        train = [dataclasses.replace(e, rejected=e.chosen) for e in train]
        eval_ = [dataclasses.replace(e, rejected=e.chosen) for e in eval_]
    data = PreparedData(tokenize(train, "train"), tokenize(eval_, "eval"), report)
    if kind == "sft":
        empty = np.zeros((0,), np.int32)
        data.train = [dataclasses.replace(p, rejected_ids=empty) for p in data.train]
        data.eval = [dataclasses.replace(p, rejected_ids=empty) for p in data.eval]
    log("data: " + ", ".join(f"{k}={v}" for k, v in sorted(report.items()) if v or k.endswith("examples")))
    if not data.train:
        raise DataError("no training examples left after parsing and truncation", field="train_files")
    return data


def fingerprint(*parts: Any) -> str:
    """sha256 over strings, bytes and numpy arrays (for cache keys)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + str(part.shape).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    arrays = []
    for p in pairs:
        arrays += [p.prompt_ids, p.chosen_ids, p.rejected_ids]
    return fingerprint(len(pairs), *arrays)


def checkpoint_fingerprint(directory: str) -> str:
    """Identity of a model checkpoint: its config and the size/mtime of its weight files."""
    parts: list[Any] = []
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith(".safetensors") or name.endswith(".index.json"):
            st = os.stat(os.path.join(directory, name))
            parts.append((name, st.st_size, st.st_mtime_ns))
    with open(os.path.join(directory, "config.json"), "rb") as f:
        parts.append(f.read())
    return fingerprint(*parts)
