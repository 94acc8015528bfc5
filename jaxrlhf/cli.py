"""Command line: `jaxrlhf train sft|reward|dpo|ppo --config FILE [key=value ...]`, `demo`, `chat`.

`train` runs a trainer from a YAML config (see docs/configuration.md) with dotted `key=value`
overrides; `demo` is the main job (DPO on the embedded demo model with held-out metrics and sample
replies before and after); `chat` loads a model (default: the embedded SmolLM2-135M-Instruct) with
our Flax model and prints the replies it generates (greedy decoding).
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


def generate_replies(model_path: str, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy chat replies of the model at `model_path` (our Flax implementation) and the seconds taken."""
    import numpy as np

    from jaxrlhf.data import left_pad
    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained, load_tokenizer

    model, tok = from_pretrained(model_path), load_tokenizer(model_path)
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    ids, mask = left_pad(rows, tok.pad_token_id)
    start = time.perf_counter()
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        temperature=0.0,
    )
    tokens, done = np.asarray(out.tokens), np.asarray(out.completion_mask)
    replies = [
        tok.decode(row[m == 1], skip_special_tokens=True).strip() for row, m in zip(tokens, done, strict=True)
    ]
    return replies, time.perf_counter() - start


def run_chat(prompts: Sequence[str], max_new_tokens: int, model_path: str = "demo") -> None:
    from jaxrlhf.train.trainer import model_directory

    path = model_directory(model_path)
    print(f"model: {path}")
    replies, seconds = generate_replies(path, prompts, max_new_tokens)
    for prompt, reply in zip(prompts, replies, strict=True):
        print(f"\nuser: {prompt}\nassistant: {reply}")
    print(f"\n({seconds:.1f}s, compilation included)")


def run_demo(config: str, overrides: Sequence[str], num_samples: int, max_new_tokens: int) -> int:
    """The main job: DPO on the embedded demo model with the shipped data, with held-out metrics and
    sample replies before and after."""
    import json

    from jaxrlhf.models.demo import demo_model_path
    from jaxrlhf.train.config import load_config
    from jaxrlhf.train.pipeline import resolve_data_path
    from jaxrlhf.train.trainer import train

    cfg = load_config(config, overrides, kind="dpo")
    eval_file = cfg.data.eval_files if isinstance(cfg.data.eval_files, str) else cfg.data.train_file_list[0]
    with open(resolve_data_path(eval_file)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [r["prompt"][-1]["content"] for r in rows[:: max(len(rows) // max(num_samples, 1), 1)]][
        :num_samples
    ]
    base = demo_model_path()
    before, _ = generate_replies(base, prompts, max_new_tokens) if prompts else ([], 0.0)
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    if result.export_dir is None:
        return 1
    after, _ = generate_replies(result.export_dir, prompts, max_new_tokens) if prompts else ([], 0.0)
    print(f"\nDPO demo: {result.steps} steps in {minutes:.1f} min (data, reference, training, evaluation)\n")
    print(format_eval(result.eval_before, result.eval_after))
    for prompt, b, a in zip(prompts, before, after, strict=True):
        print(f"\nuser:   {prompt}\nbefore: {b}\nafter:  {a}")
    return 0


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
    tr.add_argument("kind", choices=("sft", "reward", "dpo", "ppo"))
    tr.add_argument("--config", help="YAML config (configs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-5")
    demo = sub.add_parser("demo", help="the main job: DPO on the embedded demo model, before/after")
    demo.add_argument("--config", default="configs/dpo_demo.yaml")
    demo.add_argument("--samples", type=int, default=3, help="held-out prompts to answer before and after")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides")
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
    if args.command == "demo":
        return run_demo(args.config, [*args.overrides, *extra], args.samples, args.max_new_tokens)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    run_chat(args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
