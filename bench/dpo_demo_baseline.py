"""Baseline preference accuracy of the untrained demo model on the shipped DPO demo data.

For each pair, the total log-probability that SmolLM2-135M-Instruct (pure PyTorch transformers,
float32) assigns to the chosen and to the rejected completion, completion tokens only. Rendering
follows jaxrlhf's conversational rows: prompt = chat template with ``add_generation_prompt=True``;
completion = rendering of prompt + completion minus that prefix, whitespace after the final EOS
dropped (so it ends with ``<|im_end|>``). Prompt and completion are tokenized separately, without
special tokens. Prints the fraction of pairs where chosen already wins, the mean log-prob margin,
and both per task family (families recovered from ``bench/make_dpo_demo_data.py``).

    python bench/dpo_demo_baseline.py                 # held-out split
    python bench/dpo_demo_baseline.py --split train

About half a minute on 2 CPU cores for the 64 held-out pairs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "..", "jaxrlhf", "assets", "dpo_demo")


def _families() -> dict[str, str]:
    generator = os.path.join(HERE, "make_dpo_demo_data.py")
    spec = importlib.util.spec_from_file_location("make_dpo_demo_data", generator)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {p: fam for rows in mod.build().values() for fam, (p, _, _) in rows}


def _encode(tok, prompt_msgs, completion_msgs) -> tuple[list[int], list[int]]:
    pre = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    assert full.startswith(pre), (pre, full)
    completion = full[len(pre) :].rstrip()
    return (
        tok(pre, add_special_tokens=False)["input_ids"],
        tok(completion, add_special_tokens=False)["input_ids"],
    )


@torch.no_grad()
def completion_logprobs(
    model, seqs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> list[float]:
    """Sum of log p(completion token | prefix) for each (prompt_ids, completion_ids)."""
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        L = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), L), dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.float32)
        for b, (p, c) in enumerate(chunk):
            n = len(p) + len(c)
            ids[b, :n] = torch.tensor(p + c)
            attn[b, :n] = 1
            mask[b, len(p) : n] = 1.0
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out += (logp * mask[:, 1:]).sum(-1).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    path = demo_model_path()
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with open(os.path.join(DATA_DIR, f"{args.split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    families = _families()

    seqs = []
    for r in rows:
        seqs.append(_encode(tok, r["prompt"], r["chosen"]))
        seqs.append(_encode(tok, r["prompt"], r["rejected"]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad_id = min(pad_id, model.config.vocab_size - 1)  # padded positions are masked anyway
    t1 = time.perf_counter()
    lp = completion_logprobs(model, seqs, pad_id, args.batch_size)
    t2 = time.perf_counter()

    per_family: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for i, r in enumerate(rows):
        margin = lp[2 * i] - lp[2 * i + 1]
        per_family[families[r["prompt"][0]["content"]]].append((margin > 0, margin))
    everything = [x for v in per_family.values() for x in v]

    def line(name: str, v: list[tuple[bool, float]]) -> str:
        acc = sum(w for w, _ in v) / len(v)
        return f"{name:14s} {len(v):4d}  {acc:6.1%}  {sum(m for _, m in v) / len(v):+8.2f}"

    print(f"{args.split}: chosen log-prob > rejected log-prob (completion tokens, summed)")
    print(f"{'family':14s} {'pairs':>4s}  {'acc':>6s}  {'margin':>8s}")
    for fam in sorted(per_family):
        print(line(fam, per_family[fam]))
    print(line("ALL", everything))
    print(f"(load {t1 - t0:.1f}s, scoring {len(seqs)} sequences {t2 - t1:.1f}s)")


if __name__ == "__main__":
    main()
