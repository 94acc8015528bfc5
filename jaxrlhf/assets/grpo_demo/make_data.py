"""Generate the shipped GRPO demo prompts: ``jaxrlhf/assets/grpo_demo/{train,test}.jsonl``.

Verifiable-reward prompts for online RL on SmolLM2-135M-Instruct: small arithmetic and one-step word
problems whose answer is a whole number. Each row is
``{"prompt": [{"role": "user", "content": ...}], "family": ..., "answer": "<number>"}``; the checker
of both families (`jaxrlhf.evaluation.checkers.check_number`) takes the reply's last number.

    python jaxrlhf/assets/grpo_demo/make_data.py              # rewrite both files
    python jaxrlhf/assets/grpo_demo/make_data.py --out DIR    # write them into DIR instead

Deterministic (one seeded ``random.Random``): the output is byte-identical across runs. The held-out
problems of a family are drawn first, and no training problem of that family has the same operation
and operands as a held-out one (not even in other words or another story); within a split no
question repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable

SEED = 20250317
N_TRAIN = 200  # per family
N_TEST = 32  # per family
OUT_DIR = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = "Answer with the number only."

Key = tuple[str, int, int]  # (operation, a, b)
Problem = tuple[Key, str, int]  # (key, question, answer)
Maker = Callable[[random.Random], Problem]

# ------------------------------------------------------------------------------------ arithmetic

_ADD = ["What is {a} plus {b}?", "What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}.",
        "What is the sum of {a} and {b}?", "How much is {a} plus {b}?"]  # fmt: skip
_SUB = ["What is {a} minus {b}?", "What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}.",
        "What is {b} less than {a}?", "How much is {a} take away {b}?"]  # fmt: skip


def _operands(rng: random.Random) -> tuple[str, int, int, int]:
    """(op, a, b, result), half each: ``a + b`` with a, b in 2..12, or ``a - b`` with a in 5..15 and
    b in 2..9, b < a."""
    if rng.random() < 0.5:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return "+", a, b, a + b
    a = rng.randint(5, 15)
    b = rng.randint(2, min(9, a - 1))
    return "-", a, b, a - b


def arithmetic(rng: random.Random) -> Problem:
    """A bare sum or difference (`_operands`) in one of six phrasings per operation."""
    op, a, b, result = _operands(rng)
    return (op, a, b), rng.choice(_ADD if op == "+" else _SUB).format(a=a, b=b), result


# ---------------------------------------------------------------------------------- word problems

_NAMES = ["Tom", "Mia", "Leo", "Ana", "Sam", "Zoe", "Ben", "Lily", "Omar", "Ella", "Noah", "Ruth", "Ivan",
          "Kira", "Max", "Nina"]  # fmt: skip
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards", "balloons",
          "coins", "stamps", "toy cars"]  # fmt: skip
_GAIN = ["{n} has {a} {x}. {p} gets {b} more. How many {x} does {n} have now?",
         "{n} had {a} {x} and found {b} more. How many {x} does {n} have now?",
         "There are {a} {x} in a box. {n} puts in {b} more. How many {x} are in the box now?",
         "{n} has {a} {x} and {m} has {b} {x}. How many {x} do they have together?"]  # fmt: skip
_LOSS = ["{n} has {a} {x}. {p} gives {b} to a friend. How many {x} does {n} have left?",
         "{n} had {a} {x} and lost {b}. How many {x} are left?",
         "There are {a} {x} on a table. {n} takes {b} away. How many {x} are still on the table?",
         "{n} had {a} {x} and used {b} of them. How many {x} does {n} have left?"]  # fmt: skip
_PRONOUN = {"Tom": "He", "Leo": "He", "Sam": "He", "Ben": "He", "Omar": "He", "Noah": "He", "Ivan": "He",
            "Max": "He"}  # everyone else: "She"  # fmt: skip


def word_problem(rng: random.Random) -> Problem:
    """A one-step story over the same operands (`_operands`): someone gains b or loses b."""
    op, a, b, result = _operands(rng)
    n, m = rng.sample(_NAMES, 2)
    template = rng.choice(_GAIN if op == "+" else _LOSS)
    text = template.format(n=n, m=m, p=_PRONOUN.get(n, "She"), x=rng.choice(_ITEMS), a=a, b=b)
    return (op, a, b), text, result


FAMILIES = {"arithmetic": arithmetic, "word_problem": word_problem}

# -------------------------------------------------------------------------------------- assembly


def _draw(rng: random.Random, make: Maker, n: int, banned: set[Key]) -> list[Problem]:
    """`n` problems with distinct questions whose keys are not in `banned`."""
    out: list[Problem] = []
    questions: set[str] = set()
    while len(out) < n:
        problem = make(rng)
        if problem[0] not in banned and problem[1] not in questions:
            questions.add(problem[1])
            out.append(problem)
    return out


def _row(family: str, question: str, answer: int) -> dict[str, object]:
    return {"prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "family": family,
            "answer": str(answer)}  # fmt: skip


def build() -> dict[str, list[dict[str, object]]]:
    """{"train": rows, "test": rows}: families interleaved, held-out problems drawn first."""
    rng = random.Random(SEED)
    splits: dict[str, list[list[dict[str, object]]]] = {"test": [], "train": []}
    for family, make in FAMILIES.items():
        test = _draw(rng, make, N_TEST, set())
        train = _draw(rng, make, N_TRAIN, {key for key, _, _ in test})
        splits["test"].append([_row(family, q, a) for _, q, a in test])
        splits["train"].append([_row(family, q, a) for _, q, a in train])
    out = {split: [r for group in zip(*parts, strict=True) for r in group] for split, parts in splits.items()}
    prompts = {split: {json.dumps(r["prompt"]) for r in rows} for split, rows in out.items()}
    assert not prompts["test"] & prompts["train"]
    return out


def write(out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, rows in build().items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT_DIR, help="directory for train.jsonl and test.jsonl")
    for path in write(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
