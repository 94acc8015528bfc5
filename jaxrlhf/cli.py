"""Command line: `jaxrlhf demo` (the main job).

`demo` loads the embedded SmolLM2-135M-Instruct with our Flax model and prints chat replies that it
generates (greedy decoding). The training commands arrive with the training engine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for writing clear Python code.",
)


def run_demo(prompts: Sequence[str], max_new_tokens: int) -> None:
    import numpy as np

    from jaxrlhf.generation import greedy_generate
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    start = time.perf_counter()
    path = demo_model_path()
    print(f"demo model: {path} ({time.perf_counter() - start:.1f}s to locate/convert)")
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="chat with the embedded demo model through our Flax model")
    demo.add_argument("--prompt", action="append", help="a user message (repeatable)")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args.prompt or DEFAULT_PROMPTS, args.max_new_tokens)


if __name__ == "__main__":
    main()
