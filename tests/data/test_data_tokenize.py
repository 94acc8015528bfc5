"""Tokenization: BOS/EOS rules, truncation policy and drop counting."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jaxrlhf.data import PreferenceExample, parse_preferences, tokenize_pairs

EOS, BOS = 2, 1


def _ids(pair):
    return pair.prompt_ids.tolist(), pair.chosen_ids.tolist(), pair.rejected_ids.tolist()


def test_text_pairs(tokenizer):
    example = PreferenceExample("Hello there!", " Hello.", " Go away.", margin=0.5)
    (pair,), stats = tokenize_pairs([example], tokenizer)
    encode = tokenizer.encode
    assert _ids(pair) == (
        encode("Hello there!", add_special_tokens=False),
        encode(" Hello.", add_special_tokens=False) + [tokenizer.eos_token_id],
        encode(" Go away.", add_special_tokens=False) + [tokenizer.eos_token_id],
    )
    assert pair.prompt_ids.dtype == np.int32 and pair.margin == 0.5
    assert tokenizer.eos_token_id not in pair.prompt_ids
    assert (stats.pairs, stats.kept, stats.dropped) == (1, 1, 0)


def test_chat_rendered_completion_keeps_a_single_eos(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    examples, _ = parse_preferences([row], tokenizer)
    (pair,), _ = tokenize_pairs(examples, tokenizer)
    eos = tokenizer.eos_token_id
    assert pair.chosen_ids[-1] == eos and (pair.chosen_ids == eos).sum() == 1
    assert tokenizer.decode(pair.chosen_ids) == "Hello.<|im_end|>"
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")


def test_bos_is_added_once():
    stub = SimpleNamespace(eos_token_id=EOS, bos_token_id=BOS)
    examples = [
        PreferenceExample([5, 6], [7], [8, EOS]),
        PreferenceExample([BOS, 5], [7], [8]),
    ]
    pairs, _ = tokenize_pairs(examples, stub)
    assert [_ids(pair) for pair in pairs] == [
        ([BOS, 5, 6], [7, EOS], [8, EOS]),
        ([BOS, 5], [7, EOS], [8, EOS]),
    ]
    (pair, _), _ = tokenize_pairs(examples, stub, add_bos=False)
    assert _ids(pair)[0] == [5, 6]


PROMPT = list(range(10, 20))  # 10 tokens
LONG = PreferenceExample(PROMPT, [30, 31, 32, 33, 34], [40, 41])  # C = 6, R = 3 with EOS
SHORT = PreferenceExample([10, 11], [30], [40])  # P = 2, C = R = 2 with EOS


def _tokenize(examples, **limits):
    return tokenize_pairs(examples, SimpleNamespace(eos_token_id=EOS, bos_token_id=None), **limits)


def test_keep_end_truncates_prompt_left_then_completions_right():
    (long, short), stats = _tokenize([LONG, SHORT], max_length=8, max_prompt_length=4)
    assert _ids(long) == ([16, 17, 18, 19], [30, 31, 32, 33], [40, 41, EOS])
    assert _ids(short) == ([10, 11], [30, EOS], [40, EOS])
    assert (stats.truncated_prompt, stats.truncated_completion, stats.dropped) == (1, 1, 0)
    assert long.packed_length == 4 + 4 + 3


def test_drop_mode_drops_long_prompts_and_counts_them():
    pairs, stats = _tokenize(
        [LONG, SHORT, LONG], max_length=8, max_prompt_length=4, truncation_mode="drop"
    )
    assert [_ids(pair) for pair in pairs] == [([10, 11], [30, EOS], [40, EOS])]
    assert (stats.pairs, stats.kept, stats.dropped_long_prompt, stats.dropped) == (3, 1, 2, 2)


def test_drop_mode_still_cuts_completions_to_max_length():
    (pair,), stats = _tokenize([LONG], max_length=12, max_prompt_length=10, truncation_mode="drop")
    assert _ids(pair) == (PROMPT, [30, 31], [40, 41])
    assert stats.truncated_completion == 1 and stats.truncated_prompt == 0


def test_prompt_without_room_is_dropped():
    pairs, stats = _tokenize([LONG, SHORT], max_length=10)
    assert len(pairs) == 1 and stats.dropped_no_room == 1


def test_no_limits_means_no_truncation():
    (pair,), stats = _tokenize([LONG])
    assert _ids(pair) == (PROMPT, [30, 31, 32, 33, 34, EOS], [40, 41, EOS])
    assert stats.truncated_prompt == stats.truncated_completion == 0


def test_empty_prompt_is_dropped():
    pairs, stats = _tokenize([PreferenceExample([], [7], [8]), SHORT], max_length=8)
    assert len(pairs) == 1 and stats.dropped_empty == 1 and stats.dropped_no_room == 0


def test_many_pairs_in_chunks(tokenizer):
    examples = [PreferenceExample(f"Hello {i}", " yes", " no") for i in range(25)]
    pairs, stats = tokenize_pairs(examples, tokenizer, chunk_size=4)
    single = [tokenize_pairs([example], tokenizer)[0][0] for example in examples]
    assert [_ids(p) for p in pairs] == [_ids(p) for p in single] and stats.kept == 25


def test_each_distinct_text_is_tokenized_once(tokenizer):
    """A ranked row's completions recur in many pairs: each string goes to the tokenizer once per
    chunk, and the ids equal tokenizing every pair on its own (mixed with token-id pairs)."""
    texts = [" good", " bad", " fine", " odd"]
    examples = [PreferenceExample("P:", a, b) for a in texts for b in texts if a != b]
    examples.append(PreferenceExample([5, 6], [7], [8]))
    seen = []

    class Counting:
        eos_token_id, bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id

        def __call__(self, strings, **kw):
            seen.extend(strings)
            return tokenizer(strings, **kw)

    pairs, stats = tokenize_pairs(examples, Counting())
    single = [tokenize_pairs([example], tokenizer)[0][0] for example in examples]
    assert [_ids(p) for p in pairs] == [_ids(p) for p in single] and stats.kept == 13
    assert sorted(seen) == sorted(["P:", *texts])
    pairs[0].chosen_ids[0] = -1  # no two pairs share an array
    assert all(p.chosen_ids[0] != -1 for p in pairs[1:])


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_length": 8, "max_prompt_length": 8}, "must be < max_length"),
        ({"max_length": 1}, "max_length must be >= 2"),
        ({"max_prompt_length": 0}, "max_prompt_length must be >= 1"),
        ({"truncation_mode": "keep_start"}, "truncation_mode"),
    ],
)
def test_bad_limits(limits, message):
    with pytest.raises(ValueError, match=message):
        _tokenize([SHORT], **limits)


def test_tokenizer_without_eos():
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_pairs([SHORT], SimpleNamespace(eos_token_id=None, bos_token_id=None))


def test_append_eos_false_keeps_completions_as_sampled():
    """`append_eos=False` (`data.append_eos`): continuations cut at a length stay without EOS, the
    way a PPO rollout that did not stop is scored; an EOS already there is kept."""
    stub = SimpleNamespace(eos_token_id=EOS, bos_token_id=BOS)
    examples = [PreferenceExample([5, 6], [7, 8], [9]), PreferenceExample([5], [7, EOS], [9])]
    pairs, _ = tokenize_pairs(examples, stub, add_bos=False, append_eos=False)
    assert [_ids(p) for p in pairs] == [([5, 6], [7, 8], [9]), ([5], [7, EOS], [9])]
    no_eos = SimpleNamespace(eos_token_id=None, bos_token_id=None)  # no EOS needed when none is added
    (pair, _), _ = tokenize_pairs(examples, no_eos, append_eos=False)
    assert _ids(pair) == ([5, 6], [7, 8], [9])
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_pairs(examples, no_eos)


def test_data_options_reach_the_tokenizer(tokenizer, tmp_path):
    """`data.add_bos` / `data.append_eos` in a config are what `prepare_data` tokenizes with."""
    import copy
    import json

    from jaxrlhf.train.config import DataConfig
    from jaxrlhf.train.pipeline import prepare_data

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "The film was", "chosen": " great", "rejected": " dull"}) + "\n")
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    tokenizer = copy.deepcopy(tokenizer)  # the fixture is shared: give a copy a BOS to add or not
    tokenizer.bos_token = "<|im_start|>"
    for add_bos, append_eos in ((True, True), (False, False)):
        cfg = DataConfig(train_files=str(path), max_length=32, max_prompt_length=16, add_bos=add_bos,
                         append_eos=append_eos)  # fmt: skip
        (pair,) = prepare_data(cfg, tokenizer, log=lambda _: None).train
        bos = [tokenizer.bos_token_id] if add_bos else []
        eos = [tokenizer.eos_token_id] if append_eos else []
        assert _ids(pair) == (bos + encode("The film was"), encode(" great") + eos, encode(" dull") + eos)
