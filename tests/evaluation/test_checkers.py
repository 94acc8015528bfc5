"""The answer checkers: every shipped pair (chosen passes, rejected fails) and each family's rules on
replies written by hand, including the ways a model's free-form reply differs from the data."""

from __future__ import annotations

import json
import os

import pytest

from jaxrlhf.evaluation import CHECKERS, check, list_items, numbers_in, task_reward

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")


def _rows(split):
    with open(os.path.join(ASSETS, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", ["train", "test", "train_policy"])
def test_every_shipped_pair_chosen_passes_and_rejected_fails(split):
    rows = _rows(split)
    assert {r["family"] for r in rows} == set(CHECKERS)  # every family, in every file
    wrong = []
    for line, r in enumerate(rows, start=1):
        chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        if not check(r["family"], chosen, r["answer"]) or check(r["family"], rejected, r["answer"]):
            wrong.append((line, r["family"], r["answer"], chosen, rejected))
    assert not wrong, wrong


def test_numbers_in_reads_numerals_and_number_words():
    assert numbers_in("1,000 and 2.5 and -3, then 42.") == [1000.0, 2.5, -3.0, 42.0]
    assert numbers_in("twenty-one apples, one hundred and eight pears, seven") == [21.0, 108.0, 7.0]
    assert numbers_in("two thousand three hundred") == [2300.0]
    assert numbers_in("no numbers here, and nothing else") == []
    assert numbers_in("x2 and v1.5 are names") == []  # digits inside words are not numbers


@pytest.mark.parametrize(
    "reply, ok",
    [
        ("9 x 15 = 135, so the answer is 135.", True),
        ("The answer is 135", True),
        ("one hundred and thirty-five", True),
        ("9 x 15 = 135. Check: 135 / 9 = 15", False),  # the last number decides
        ("135.0", True),
        ("1,350", False),
        ("I cannot compute that.", False),
    ],
)
def test_number_families_take_the_last_number(reply, ok):
    for family in ("arithmetic", "word_problem", "unit_convert"):
        assert check(family, reply, "135") is ok


@pytest.mark.parametrize(
    "reply, answer, ok",
    [
        ("No, 7 + 40 is 47.", "no", True),
        ("no", "no", True),
        ("The answer is yes.", "yes", True),
        ("Yes. No wait.", "no", False),  # the first yes/no counts
        ("Yesterday it rained, no doubt.", "no", True),  # "Yesterday" is not "yes"
        ("I don't know.", "yes", False),
        ("Not really.", "no", False),
    ],
)
def test_yes_no_takes_the_first_standalone_answer(reply, answer, ok):
    assert check("yes_no_check", reply, answer) is ok


@pytest.mark.parametrize(
    "reply, answer, ok",
    [
        ("The capital of Australia is Canberra.", "Canberra", True),
        ("canberra", "Canberra", True),
        ("Canberran politics", "Canberra", False),  # whole words only
        ("A week has 7 days.", "seven", True),  # digits and number words are the same
        ("There are seven days.", "7", True),
        ("Water freezes at 0 degrees.", "0", True),
        ("The freezing point is -18.0 degrees.", "0", False),  # "18.0" is one numeral
        ("Plants absorb carbon dioxide.", "carbon dioxide", True),
        ("Plants absorb carbon and oxygen.", "carbon dioxide", False),
    ],
)
def test_fact_needs_the_answer_as_whole_words(reply, answer, ok):
    assert check("fact", reply, answer) is ok


@pytest.mark.parametrize(
    "reply, answer, ok",
    [
        ("RIPE LEMONS ARE YELLOW.", "upper:Yellow", True),
        ("YELLOW!", "upper:Yellow", True),
        ("Ripe lemons are yellow.", "upper:Yellow", False),
        ("ripe lemons are yellow.", "lower:Yellow", True),
        ("ripe lemons are green.", "lower:Yellow", False),  # right case, wrong answer
        ("dogs bark.", "lower:Dog", True),  # the word may be plural
        ("123 ...", "lower:Dog", False),  # no letters at all
    ],
)
def test_letter_case_checks_case_and_word(reply, answer, ok):
    assert check("letter_case", reply, answer) is ok


@pytest.mark.parametrize(
    "reply, answer, ok",
    [
        ("Honey.", "word:Honey", True),
        ("honey", "word:Honey", True),
        ("Bees make honey.", "word:Honey", False),
        ("Nectar.", "word:Honey", False),
        ("Bees make honey.", "sentence:Honey", True),
        ("Honey.", "sentence:Honey", False),
        ("Bees make wax.", "sentence:Honey", False),
    ],
)
def test_one_word_checks_the_form_and_the_word(reply, answer, ok):
    assert check("one_word", reply, answer) is ok


def test_list_items_reads_inline_and_bulleted_lists():
    assert list_items("Red, blue, green.") == ["Red", "blue", "green"]
    assert list_items("Here are three colors: red, blue, and green.") == ["red", "blue", "green"]
    assert list_items("1. Monday\n2. Tuesday\n3. Wednesday") == ["Monday", "Tuesday", "Wednesday"]
    assert list_items("- oak\n- pine") == ["oak", "pine"]
    assert list_items("Tea or coffee") == ["Tea", "coffee"]


@pytest.mark.parametrize(
    "reply, ok",
    [
        ("Red, blue, green.", True),
        ("Red, blue, and green.", True),
        ("1. red\n2. blue\n3. green", True),
        ("Red, blue.", False),
        ("Red, blue, green, pink.", False),
        ("Red, red, blue.", False),  # items must differ
        ("The first is red, the second one is blue, and the third is surely green.", False),  # not a list
    ],
)
def test_list_count_counts_distinct_short_items(reply, ok):
    assert check("list_count", reply, "3") is ok


def test_unknown_family_and_malformed_answer_are_errors():
    with pytest.raises(ValueError, match="unknown task family 'poetry'"):
        check("poetry", "x", "y")
    with pytest.raises(ValueError, match="expected '<upper|lower>:<word>'"):
        check("letter_case", "X", "upper")


def test_task_reward_is_trl_shaped():
    rewards = task_reward(
        ["p1", "p2", "p3"], ["Yes.", "12", "anything"], family=["yes_no_check", "arithmetic", "poetry"],
        answer=["no", "12", "x"], completion_ids=[[1], [2], [3]],
    )  # fmt: skip
    assert rewards == [0.0, 1.0, None]
