"""Tool-use traces for the SFT warm start of the multi-turn demo (docs/tools.md), made from the GRPO
demo's training prompts (`../grpo_demo/train.jsonl`; the held-out `test.jsonl` is never read):

    python jaxrlhf/assets/tools_demo/make_data.py      # writes traces.jsonl next to this file

Each of the first `--per-family` arithmetic and word-problem prompts becomes one conversation: the
user's question, an assistant turn that calls the calculator on the question's two numbers with the
operation that gives the answer, the tool's result, and the answer. Deterministic (no sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def expression(question: str, answer: str) -> str:
    """`"a + b"`, `"a - b"` or `"b - a"` of the question's two numbers, the first that gives the answer
    ("4 less than 10" is 10 - 4)."""
    a, b = (int(x) for x in re.findall(r"\d+", question.split("Answer with")[0])[:2])
    for expr, value in ((f"{a} + {b}", a + b), (f"{a} - {b}", a - b), (f"{b} - {a}", b - a)):
        if str(value) == answer:
            return expr
    raise ValueError(f"no + or - of {a} and {b} gives {answer}: {question!r}")


def trace(row: dict) -> dict:
    question = row["prompt"][-1]["content"]
    arguments = {"expression": expression(question, row["answer"])}
    call = json.dumps({"name": "calculator", "arguments": arguments})
    return {"messages": [
        *row["prompt"],
        {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        {"role": "tool", "content": row["answer"]},
        {"role": "assistant", "content": row["answer"]},
    ]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-family", type=int, default=96)
    ap.add_argument("--out", default=os.path.join(HERE, "traces.jsonl"))
    args = ap.parse_args()
    with open(os.path.join(HERE, "..", "grpo_demo", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    picked = []
    for family in ("arithmetic", "word_problem"):
        picked += [r for r in rows if r["family"] == family][: args.per_family]
    with open(args.out, "w") as f:
        f.writelines(json.dumps(trace(r)) + "\n" for r in picked)
    print(f"{len(picked)} traces -> {args.out}")


if __name__ == "__main__":
    main()
