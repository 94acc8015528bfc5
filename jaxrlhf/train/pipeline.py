"""From config to tokenized train/eval examples: resolve files, parse, split, tokenize, log counts.

The preference methods' examples are `TokenizedPair`s for the packed layout: preference pairs (DPO,
reward), KTO's completion and its mismatched KL completion (`algorithms/kto.py`); SFT tokenizes its
rows itself (`jaxrlhf.data.sft`: token ids with a loss mask); the method gives the row parser.
Every dropped or skipped row is counted and reported; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
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
    train: list[Any]  # TokenizedPair (or a method's own: SFT's SFTTokens)
    eval: list[Any]
    report: dict[str, int]


Parser = Callable[..., tuple[list[PreferenceExample], dict[str, int]]]


def parse_preference_rows(
    rows: Any, tokenizer: Any, *, skip_invalid: bool, drop_degenerate: bool, source: str,
    min_score_gap: float = 0.0,
) -> tuple[list[PreferenceExample], dict[str, int]]:  # fmt: skip
    """Preference rows (explicit or implicit prompt, text or conversations, ranked) -> examples, and
    the counts of skipped and degenerate rows (`parse_preferences`)."""
    parsed, stats = parse_preferences(
        rows, tokenizer, skip_invalid=skip_invalid, drop_degenerate=drop_degenerate, source=source,
        min_score_gap=min_score_gap,
    )  # fmt: skip
    counts = {"skipped": stats.skipped, "empty_completion": stats.empty_completion,
              "chosen_equals_rejected": stats.identical,
              "dropped_degenerate": stats.dropped_degenerate}  # fmt: skip
    return parsed, counts


def prepare_data(
    cfg: DataConfig, tokenizer: Any, *, parse: Parser | None = None,
    log: Callable[[str], None] = print,
    pair_up: Callable[[list[PreferenceExample]], list[PreferenceExample]] | None = None,
    tokenize: Callable[[list[Any], Any], tuple[list[Any], Any]] | None = None,
) -> PreparedData:
    """Load, parse (`parse(rows, tokenizer, skip_invalid=, drop_degenerate=, source=)`: a method's
    row format; default `parse_preference_rows`), split and tokenize the train (and eval) data of
    `cfg`. `pair_up`: a method's rewrite of each split's examples before tokenization (KTO's
    mismatched completions).
    `tokenize(examples, tokenizer) -> (items, stats)`: a method's own tokenization (SFT's
    `tokenize_sft`); default `tokenize_pairs` with `cfg`'s limits."""
    report: dict[str, int] = {}
    if parse is None:
        parse = functools.partial(parse_preference_rows, min_score_gap=cfg.min_score_gap)

    def load(files: list[str], split: str) -> list[PreferenceExample]:
        examples: list[PreferenceExample] = []
        for file in files:
            rows = load_rows(file)
            parsed, counts = parse(rows, tokenizer, skip_invalid=cfg.skip_invalid,
                                   drop_degenerate=cfg.drop_degenerate, source=file)  # fmt: skip
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

    def tokenize_split(examples: list[Any], split: str) -> list[Any]:
        if not examples:
            return []
        if pair_up is not None:
            examples = pair_up(examples)
        if tokenize is not None:
            pairs, stats = tokenize(examples, tokenizer)
        else:
            pairs, stats = tokenize_pairs(
                examples, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                truncation_mode=cfg.truncation_mode, add_bos=cfg.add_bos, append_eos=cfg.append_eos,
            )  # fmt: skip
        for field in ("dropped_long_prompt", "dropped_no_room", "dropped_empty", "truncated_prompt",
                      "truncated_completion"):  # fmt: skip
            report[f"{split}/{field}"] = int(getattr(stats, field, 0))
        report[f"{split}/examples"] = len(pairs)
        return pairs

    data = PreparedData(tokenize_split(train, "train"), tokenize_split(eval_, "eval"), report)
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
