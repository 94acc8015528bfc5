"""The GRPO reward functions (`jaxrlhf.rewards`) on hand-written replies, and the shipped GRPO demo
prompts (`jaxrlhf/assets/grpo_demo`): every row's answer is accepted and a wrong number is not, the
held-out file is disjoint from training, and the generator reproduces both files byte for byte."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys

import pytest

from jaxrlhf.rewards import accuracy_reward, format_reward

ASSETS = str(importlib.resources.files("jaxrlhf.assets").joinpath("grpo_demo"))
INSTRUCTION = "Answer with the number only."


def _rows(split: str) -> list[dict]:
    with open(os.path.join(ASSETS, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _acc(completions: list, family: list, answer: list) -> list[float | None]:
    return accuracy_reward(["q"] * len(completions), completions, [[1]] * len(completions),
                           family=family, answer=answer)  # fmt: skip


def test_accuracy_reward_on_hand_written_replies():
    replies = ["12", "7 + 5 = 12.", "The answer is twelve.", "13", "12 + 1 = 13", "I don't know.", ""]
    assert _acc(replies, ["arithmetic"] * 7, ["12"] * 7) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    story = "Tom has 5 apples and gets 3 more, so he has 5 + 3 = 8 apples."
    assert _acc([story, "5 + 3 = 9"], ["word_problem"] * 2, ["8", "8"]) == [1.0, 0.0]


def test_accuracy_reward_none_for_a_family_without_checker_and_extra_columns_ignored():
    out = accuracy_reward(
        ["a", "b", "c"], ["12", "12", "12"], [[1], [1], [1]], family=["arithmetic", "poetry", None],
        answer=["12", "12", "12"], prompt_id=[0, 1, 2], trainer_state=None,
    )  # fmt: skip
    assert out == [1.0, None, None]


def test_rewards_accept_conversational_completions():
    conv = [[{"role": "assistant", "content": text}] for text in ("7 + 5 = 12", "Twelve apples")]
    assert _acc(conv, ["arithmetic"] * 2, ["12", "12"]) == [1.0, 1.0]
    assert format_reward(["q", "q"], conv, [[1], [1]]) == [1.0, 0.0]


def test_accuracy_reward_needs_one_column_entry_per_completion():
    with pytest.raises(ValueError):
        _acc(["12", "12"], ["arithmetic"], ["12"])


@pytest.mark.parametrize(
    ("reply", "reward"),
    [
        ("12", 1.0), (" 12.\n", 1.0), ("7 + 5 = 12", 1.0), ("The sum of 7 and 5 is 12.", 1.0), ("-3", 1.0),
        ("1,000", 1.0), ("2.5!", 1.0),
        ("13", 1.0),  # format only: a wrong number in the right form passes
        ("The answer is twelve.", 0.0), ("12 apples", 0.0), ("12 is the answer.", 0.0), ("", 0.0),
        ("abc12", 0.0),
        ("To find out how many apples Tom has we add the two numbers, 5 + 3 = 8", 0.0),  # 18 words
    ],
)  # fmt: skip
def test_format_reward_rule(reply, reward):
    assert format_reward(["q"], [reply], [[1]]) == [reward]


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_rows_format_and_answers(split):
    rows = _rows(split)
    assert len(rows) == {"train": 400, "test": 64}[split]
    assert {r["family"] for r in rows} == {"arithmetic", "word_problem"}
    for r in rows:
        assert set(r) == {"prompt", "family", "answer"}
        assert len(r["prompt"]) == 1 and set(r["prompt"][0]) == {"role", "content"}
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].endswith(INSTRUCTION)
        assert isinstance(r["answer"], str) and r["answer"] == str(int(r["answer"])) and int(r["answer"]) >= 0
    n = len(rows)
    family, answer = [r["family"] for r in rows], [r["answer"] for r in rows]
    prompts = [r["prompt"][0]["content"] for r in rows]
    assert _acc([a for a in answer], family, answer) == [1.0] * n
    assert _acc([f"The answer is {a}." for a in answer], family, answer) == [1.0] * n
    assert _acc([str(int(a) + 1) for a in answer], family, answer) == [0.0] * n
    assert _acc([f"{a} - 1 = {int(a) - 1}" for a in answer], family, answer) == [0.0] * n
    assert format_reward(prompts, answer, [[1]] * n) == [1.0] * n
    assert len(set(prompts)) == n  # no question repeats within a file


def test_shipped_files_are_disjoint():
    train = {r["prompt"][0]["content"] for r in _rows("train")}
    test = {r["prompt"][0]["content"] for r in _rows("test")}
    assert not train & test


def test_make_data_reproduces_the_shipped_files(tmp_path):
    script = os.path.join(ASSETS, "make_data.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "test"):
        with open(os.path.join(ASSETS, f"{split}.jsonl"), "rb") as f:
            shipped = f.read()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == shipped, f"{split}.jsonl is stale: run {script}"
