"""On-policy preference pairs for the demo reward model: the demo model's own replies, labelled by the
task checkers. Writes ``jaxrlhf/assets/dpo_demo/train_policy.jsonl``.

A reward model trained only on the synthetic pairs of ``train.jsonl`` -- chosen and rejected written
in the same short style -- has never seen what the policy actually writes at the start of PPO (long,
chatty replies, often cut off), so its scores there mean nothing. As in InstructGPT, where labellers
rank the policy's own samples, this script samples the untrained demo model on training prompts (at
PPO's temperature, one reply each), lets the family's checker label each reply, and pairs it with
the synthetic answer of the other label: a wrong reply is ``rejected`` against the row's ``chosen``,
a right one is ``chosen`` against the row's ``rejected``. Deterministic: fixed prompts, a fixed
sampling seed, the compiled sampler on the CPU.

    python bench/make_policy_pairs.py            # writes the file (a few minutes on 2 CPU cores)
    python bench/make_policy_pairs.py --check    # verifies the committed file is what it would write
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from jaxrlhf.data import left_pad
from jaxrlhf.evaluation import check
from jaxrlhf.generation import generate
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.models.demo import demo_model_path

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxrlhf", "assets", "dpo_demo")
SEED = 20241202
PER_FAMILY = 40  # prompts per family: the first 40 training rows of each family (file order)
TEMPERATURE = 0.7  # configs/ppo_demo.yaml's
MAX_NEW_TOKENS = 48
BATCH = 32


def build() -> tuple[str, int]:
    """The file's text, and how many pairs have the model's reply as the chosen one."""
    with open(os.path.join(ASSETS, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    picked, count = [], {}
    for r in rows:
        if count.get(r["family"], 0) < PER_FAMILY:
            count[r["family"]] = count.get(r["family"], 0) + 1
            picked.append(r)
    path = demo_model_path()
    tok, model = load_tokenizer(path), from_pretrained(path)
    prompts = [
        tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]
        for r in picked
    ]  # fmt: skip
    width = -(-max(map(len, prompts)) // 16) * 16
    replies: list[str] = []
    for start in range(0, len(prompts), BATCH):
        ids, mask = left_pad(prompts[start : start + BATCH], tok.pad_token_id, width=width, batch_size=BATCH)
        out = generate(
            model, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[tok.eos_token_id],
            pad_token_id=tok.pad_token_id, temperature=TEMPERATURE, rng=jax.random.key(SEED + start),
        )  # fmt: skip
        tokens, done = np.asarray(out.tokens), np.asarray(out.completion_mask)
        n = len(prompts[start : start + BATCH])
        replies += [tok.decode(t[m == 1], skip_special_tokens=True).strip()
                    for t, m in zip(tokens[:n], done[:n], strict=True)]  # fmt: skip
    lines, right = [], 0
    for r, reply in zip(picked, replies, strict=True):
        if not reply:
            continue  # an empty reply makes a degenerate pair
        mine = [{"role": "assistant", "content": reply}]
        if check(r["family"], reply, r["answer"]):
            pair, right = {"chosen": mine, "rejected": r["rejected"]}, right + 1
        else:
            pair = {"chosen": r["chosen"], "rejected": mine}
        lines.append(json.dumps({"prompt": r["prompt"], **pair, "family": r["family"], "answer": r["answer"]},
                                ensure_ascii=False))  # fmt: skip
    return "\n".join(lines) + "\n", right


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the committed file instead of writing")
    args = ap.parse_args(argv)
    text, right = build()
    out = os.path.join(ASSETS, "train_policy.jsonl")
    if args.check:
        with open(out, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{out}: {'up to date' if same else 'differs from what the script writes'}")
        return 0 if same else 1
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{out}: {len(text.splitlines())} pairs ({right} with the model's own, right, reply as chosen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
