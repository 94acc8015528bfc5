"""Command line: `jaxrlhf train sft|reward|dpo --config FILE [key=value ...]` and `jaxrlhf chat`.

`train` runs a trainer from a YAML config (see docs/configuration.md) with dotted `key=value`
overrides; `chat` loads a model (default: the embedded SmolLM2-135M-Instruct) with our Flax model and
prints the replies it generates (greedy decoding).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for writing clear Python code.",
)


def run_chat(prompts: Sequence[str], max_new_tokens: int, model_path: str = "demo") -> None:
    import numpy as np

    from jaxrlhf.generation import greedy_generate
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.train.trainer import model_directory

    start = time.perf_counter()
    path = model_directory(model_path)
    print(f"model: {path} ({time.perf_counter() - start:.1f}s to locate/convert)")
    start = time.perf_counter()
    model, tok = from_pretrained(path), load_tokenizer(path)
    print(f"loaded Flax NNX model in {time.perf_counter() - start:.1f}s")
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding: every prompt ends where generation starts
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    start = time.perf_counter()
    tokens, done_mask = greedy_generate(
        model,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    tokens, done_mask = np.asarray(tokens), np.asarray(done_mask)
    seconds = time.perf_counter() - start
    for prompt, row, m in zip(prompts, tokens, done_mask, strict=True):
        reply = tok.decode(row[m == 1], skip_special_tokens=True).strip()
        print(f"\nuser: {prompt}\nassistant: {reply}")
    print(f"\n{int(done_mask.sum())} tokens generated in {seconds:.1f}s (compilation included)")


def run_train(kind: str, config: str | None, overrides: Sequence[str]) -> int:
    from jaxrlhf.data import DataError
    from jaxrlhf.train.config import ConfigError, load_config
    from jaxrlhf.train.trainer import train

    try:
        cfg = load_config(config, overrides, kind=kind)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.eval_before or result.eval_after:
        print(format_eval(result.eval_before, result.eval_after))
    return 0


def format_eval(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    """A before/after table of held-out metrics."""
    keys = sorted(set(before or {}) | set(after or {}))
    lines = [f"{'held-out metric':<34}{'before':>12}{'after':>12}"]
    for k in keys:
        b = f"{before[k]:.4f}" if before and k in before else "-"
        a = f"{after[k]:.4f}" if after and k in after else "-"
        lines.append(f"{k:<34}{b:>12}{a:>12}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("kind", choices=("sft", "reward", "dpo"))
    tr.add_argument("--config", help="YAML config (configs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-5")
    chat = sub.add_parser("chat", help="chat with a model through our Flax implementation")
    chat.add_argument("--model", default="demo", help="checkpoint directory or hub id (default: demo model)")
    chat.add_argument("--prompt", action="append", help="a user message (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        bad = [x for x in extra if "=" not in x]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
        return run_train(args.kind, args.config, [*args.overrides, *extra])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    run_chat(args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
