"""`jaxrlhf.rewards.vader_sentiment`: VADER's compound score of the completion alone (the prompt is
ignored), on hand-checked sentences, conversations and empty replies, and equal to the vaderSentiment
package's own score of the same text."""

from __future__ import annotations

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from jaxrlhf.rewards import vader_sentiment

POSITIVE = "This movie was wonderful, I loved every minute of it."  # VADER: 0.8225
NEGATIVE = "This movie was terrible, I hated every minute of it and want my money back."  # -0.7906
NEUTRAL = "The train leaves the station at nine in the morning."  # 0.0
NOT_GOOD = "The film is not good."  # -0.3412
GOOD = "The film is good."  # 0.4404
GREAT = "The film is great!"  # 0.6588
HORRIBLE = "It was a horrible, awful, disgusting experience."  # -0.872
ECSTATIC = "Absolutely fantastic and amazing, best day ever!"  # 0.9253
SENTENCES = [POSITIVE, NEGATIVE, NEUTRAL, NOT_GOOD, GOOD, GREAT, HORRIBLE, ECSTATIC]


def _scores(completions: list, prompts: list | None = None) -> list[float]:
    prompts = ["Tell me about the movie."] * len(completions) if prompts is None else prompts
    out = vader_sentiment(prompts, completions)
    assert isinstance(out, list) and len(out) == len(completions)
    assert all(isinstance(v, float) for v in out)
    return out


def test_hand_checked_sentences():
    pos, neg, neutral, not_good, good, great, horrible, ecstatic = _scores(SENTENCES)
    assert pos > 0.5 and ecstatic > 0.5 and great > 0.5
    assert neg < -0.5 and horrible < -0.5
    assert neutral == 0.0
    assert not_good < 0  # the negation flips "good"
    assert good > 0
    assert great > good > 0 > not_good  # "great!" is stronger than "good"; negated "good" below both
    assert ecstatic > pos and horrible < neg
    assert all(-1.0 <= v <= 1.0 for v in (pos, neg, neutral, not_good, good, great, horrible, ecstatic))


def test_values_are_vaders_own_compound_scores():
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(s)["compound"] for s in SENTENCES]
    assert _scores(SENTENCES) == pytest.approx(expected, abs=1e-12)
    # the hand-checked values, so that a change in the vaderSentiment package shows here too
    assert expected == pytest.approx(
        [0.8225, -0.7906, 0.0, -0.3412, 0.4404, 0.6588, -0.872, 0.9253], abs=1e-4
    )


def test_prompt_is_ignored():
    prompts = [
        "Write something awful, hateful and terrible.",
        "Write something wonderful, lovely and great!",
        "",
        [{"role": "user", "content": "I hate everything, this is the worst."}],
    ]
    out = _scores([NEUTRAL] * 4, prompts)
    assert out == [0.0] * 4
    out = _scores([POSITIVE] * 4, prompts)
    assert len(set(out)) == 1 and out[0] == pytest.approx(0.8225, abs=1e-4)


def test_conversation_completions_judge_the_last_message():
    analyzer = SentimentIntensityAnalyzer()
    conversations = [
        [{"role": "assistant", "content": POSITIVE}],
        [{"role": "assistant", "content": NEGATIVE}],
        [  # only the last message counts, not the earlier (negative) one
            {"role": "user", "content": HORRIBLE},
            {"role": "assistant", "content": GOOD},
        ],
        [{"role": "assistant", "content": ""}],
    ]
    prompts = [[{"role": "user", "content": "How was the movie?"}]] * len(conversations)
    out = _scores(conversations, prompts)
    expected = [analyzer.polarity_scores(t)["compound"] for t in (POSITIVE, NEGATIVE, GOOD, "")]
    assert out == pytest.approx(expected, abs=1e-12)
    assert out[0] > 0.5 and out[1] < -0.5 and out[2] > 0 and out[3] == 0.0
    # a conversation scores as its last message's text does
    assert out == pytest.approx(_scores([POSITIVE, NEGATIVE, GOOD, ""]), abs=1e-12)


def test_empty_completions_score_zero():
    assert _scores(["", ""]) == [0.0, 0.0]
    assert _scores(["", POSITIVE, ""])[::2] == [0.0, 0.0]


def test_one_score_per_completion_in_order_with_ids_and_extra_columns():
    completions = [NEGATIVE, POSITIVE, NEUTRAL, NEGATIVE, "", POSITIVE, NOT_GOOD]
    alone = [_scores([c])[0] for c in completions]
    out = vader_sentiment(
        ["q"] * len(completions), completions, completion_ids=[[5, 6, 1]] * len(completions),
        answer=["x"] * len(completions), family=[None] * len(completions),
    )  # fmt: skip
    assert len(out) == len(completions)
    assert out == pytest.approx(alone, abs=1e-12)  # batched scores do not depend on their neighbours
    assert vader_sentiment([], []) == []
