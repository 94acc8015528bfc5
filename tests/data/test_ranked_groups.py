"""Ranked rows read as all their pairs; a prompt's pairs grouped and packed into one row."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.pairs import random_pairs

from jaxrlhf.data import DataError, TokenizedPair, collate_pairs, load_rows, parse_preferences
from jaxrlhf.data.collate import packed_attention_mask
from jaxrlhf.data.groups import collate_groups, group_pairs, group_shape
from jaxrlhf.data.ranked import ranked_pairs


def test_a_ranked_row_is_every_pair_of_unequal_scores():
    row = {"prompt": "P", "completions": ["a", "b", "c", "d"], "scores": [0.6, -0.2, 0.1, 0.1], "id": 7}
    pairs = [(p["chosen"], p["rejected"]) for p in ranked_pairs(row)]
    # combinations order; the higher score chosen; c and d tie, so no pair
    assert pairs == [("a", "b"), ("a", "c"), ("a", "d"), ("c", "b"), ("d", "b")]
    assert all(p["prompt"] == "P" and p["id"] == 7 and "scores" not in p for p in ranked_pairs(row))
    assert [(p["chosen"], p["rejected"]) for p in ranked_pairs(row, min_score_gap=0.4)] == [
        ("a", "b"), ("a", "c"), ("a", "d")]  # fmt: skip


def test_ranked_rows_parse_next_to_pairs_and_count_their_pairs():
    rows = [
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"prompt": "R:", "completions": [" x", " y", " z"], "scores": [1, 3, 2]},
        {"prompt": [1, 2], "completions": [[5], [6, 7]], "scores": [0.0, 0.5]},
    ]
    examples, stats = parse_preferences(rows)
    got = [(e.prompt, e.chosen, e.rejected) for e in examples]
    assert got == [("Q:", " yes", " no"), ("R:", " y", " x"), ("R:", " z", " x"), ("R:", " y", " z"),
                   ([1, 2], [6, 7], [5])]  # fmt: skip
    assert (stats.rows, stats.kept) == (3, 5)


def test_a_file_mixing_ranked_rows_and_pairs(tmp_path):
    """Loaded through `datasets`, every row has every column (None where absent)."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "R:", "completions": [" x", " y"], "scores": [1, 3]},
            {"prompt": "Q:", "chosen": " yes", "rejected": " no"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = parse_preferences(load_rows(str(path)))
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [("R:", " y", " x"), ("Q:", " yes", " no")]


def test_ranked_conversations_render_with_the_template(tiny_dir):
    from jaxrlhf.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    row = {"prompt": [{"role": "user", "content": "hi"}], "completions": [answer("A"), answer("B")],
           "scores": [0, 1]}  # fmt: skip
    (example,), _ = parse_preferences([row], tok)
    assert example.prompt.endswith("assistant\n") and example.chosen.startswith("B")
    assert example.rejected.startswith("A")


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"completions": ["a", "b"], "scores": [1, 0]}, "prompt", "needs its prompt"),
        ({"prompt": "P", "completions": ["a"], "scores": [1]}, "completions", "at least two"),
        ({"prompt": "P", "completions": "ab", "scores": [1, 0]}, "completions", "at least two"),
        ({"prompt": "P", "completions": ["a", "b"]}, "scores", "one score per completion"),
        ({"prompt": "P", "completions": ["a", "b"], "scores": [1]}, "scores", "list of 2 numbers"),
        ({"prompt": "P", "completions": ["a", "b"], "scores": [1, "x"]}, "scores", "score 1"),
        ({"prompt": "P", "completions": ["a", "b"], "scores": [1, float("nan")]}, "scores", "finite"),
        ({"prompt": "P", "completions": ["a", "b"], "scores": [True, 0]}, "scores", "score 0"),
        ({"prompt": "P", "completions": ["a", 3], "scores": [1, 0]}, "completions", "completion 1"),
        ({"prompt": "P", "completions": ["a", [4]], "scores": [1, 0]}, "completions", "mix"),
    ],
)
def test_bad_ranked_rows_name_file_row_and_field(tmp_path, row, field, words):
    path = tmp_path / "ranked.jsonl"
    good = {"prompt": "P", "completions": ["a", "b"], "scores": [1, 0]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        parse_preferences(load_rows(str(path)))
    assert (err.value.field, err.value.row, err.value.unit) == (field, 2, "line"), str(err.value)
    assert "ranked.jsonl" in str(err.value) and words in str(err.value)
    examples, stats = parse_preferences(load_rows(str(path)), skip_invalid=True)
    assert (len(examples), stats.skipped) == (1, 1)


def _pair(prompt, chosen, rejected, margin=None):
    return TokenizedPair(np.array(prompt), np.array(chosen), np.array(rejected), margin)


def test_group_pairs_keeps_each_completion_once():
    pairs = [_pair([1, 2], [5], [6, 6], 0.5), _pair([3], [7], [8]), _pair([1, 2], [9], [6, 6]),
             _pair([1, 2], [5], [9], 1.0)]  # fmt: skip
    a, b = group_pairs(pairs)
    assert a.prompt_ids.tolist() == [1, 2] and [c.tolist() for c in a.completions] == [[5], [6, 6], [9]]
    assert a.comparisons.tolist() == [[0, 1], [2, 1], [0, 2]] and a.margins.tolist() == [0.5, 0.0, 1.0]
    assert b.comparisons.tolist() == [[0, 1]] and a.packed_length == 2 + 1 + 2 + 1


def test_group_shape_before_tokenizing_matches_the_tokenized_groups():
    """`jaxrlhf plan` sizes grouped rows from parsed text; the groups `group_pairs` makes of the same
    pairs tokenized (one id per character here) have the same largest group."""
    rows = [
        {"prompt": "R:", "completions": [" x", " yy", " z", " w"], "scores": [1, 3, 2, 2]},
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q:", "chosen": " yes", "rejected": " maybe"},
        {"prompt": "R:", "chosen": " x", "rejected": " new"},
    ]
    examples, _ = parse_preferences(rows)
    ids = lambda text: np.asarray([ord(c) for c in text], np.int32)  # noqa: E731
    groups = group_pairs([_pair(ids(e.prompt), ids(e.chosen), ids(e.rejected)) for e in examples])
    # R: 5 distinct completions; 5 ranked pairs (z and w tie) + 1 plain pair
    assert group_shape(examples) == (max(len(g.completions) for g in groups),
                                     max(len(g.comparisons) for g in groups)) == (5, 6)  # fmt: skip
    assert group_shape([]) == (0, 0)


def test_group_rows_hold_each_completion_after_the_prompt():
    """Every completion's segment holds its ids at positions P.., sees the prompt and itself only
    (the packed mask), and the comparison slots name the pairs; padding slots weigh 0."""
    pairs = random_pairs(9, seed=3)
    pairs = [TokenizedPair(pairs[i // 3].prompt_ids, p.chosen_ids, p.rejected_ids, p.margin)
             for i, p in enumerate(pairs)]  # fmt: skip  # 3 prompts x 3 pairs
    groups = group_pairs(pairs)
    batch = collate_groups(groups, pad_id=0, batch_size=4, completions=7, comparisons=5)
    assert batch["winner"].shape == (4, 5) and batch["completion_valid"].shape == (4, 7)
    assert batch["row_valid"].tolist() == [1, 1, 1, 0] and batch["comparison_weight"][3].sum() == 0
    mask = packed_attention_mask(batch["segment_ids"])
    for b, group in enumerate(groups):
        seg, ids, pos = batch["segment_ids"][b], batch["input_ids"][b], batch["positions"][b]
        P = len(group.prompt_ids)
        assert ids[:P].tolist() == group.prompt_ids.tolist() and set(seg[:P]) == {1}
        for k, comp in enumerate(group.completions):
            where = np.nonzero(seg == k + 2)[0]
            assert ids[where].tolist() == comp.tolist()
            assert pos[where].tolist() == list(range(P, P + len(comp)))
            seen = np.nonzero(mask[b, where[-1]])[0]
            assert seen.tolist() == list(range(P)) + where.tolist()
        for m, (w, _) in enumerate(group.comparisons):
            pair = pairs[3 * b + m]
            assert group.completions[batch["winner"][b, m]].tolist() == pair.chosen_ids.tolist()
            assert batch["winner"][b, m] == w
            assert group.completions[batch["loser"][b, m]].tolist() == pair.rejected_ids.tolist()
            assert batch["margin"][b, m] == np.float32(pair.margin)
        assert batch["comparison_weight"][b].tolist() == [1, 1, 1, 0, 0]


def test_a_one_pair_group_is_the_packed_pair_row():
    pairs = random_pairs(3, seed=4)
    groups = collate_groups(group_pairs(pairs), pad_id=0)
    plain = collate_pairs(pairs, pad_id=0)
    for key in ("input_ids", "positions", "segment_ids"):
        np.testing.assert_array_equal(groups[key], plain[key])


def test_groups_that_do_not_fit_their_slots_raise():
    (group,) = group_pairs([_pair([1], [2], [3]), _pair([1], [4], [3])])
    with pytest.raises(ValueError, match="3 completions and 2 comparisons"):
        collate_groups([group], pad_id=0, completions=2, comparisons=2)
