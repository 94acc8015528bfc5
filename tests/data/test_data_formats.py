"""Each preference format, read from each file type with `load_rows` and `parse_preferences`."""

from __future__ import annotations

import pytest

from jaxrlhf.data import PreferenceExample, load_rows, parse_preferences

STANDARD = [
    {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "Hello there!", "chosen": " Hello, how are you?", "rejected": " Go away."},
]
USER_Q = [{"role": "user", "content": "What is two plus two?"}]
CONVERSATIONAL = [
    {
        "prompt": USER_Q,
        "chosen": [{"role": "assistant", "content": "Four."}],
        "rejected": [{"role": "assistant", "content": "Five."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello there!"},
        ],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
]
RENDERED_Q = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
RENDERED_CONVERSATIONAL = [
    PreferenceExample(RENDERED_Q, "Four.<|im_end|>", "Five.<|im_end|>"),
    PreferenceExample(
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
        "Hello.<|im_end|>",
        "Go away.<|im_end|>",
    ),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_standard(tmp_path, write_rows, suffix):
    path = write_rows(tmp_path / f"train{suffix}", STANDARD)
    examples, stats = parse_preferences(load_rows(path))
    assert examples == [PreferenceExample(**row) for row in STANDARD]
    assert (stats.rows, stats.kept, stats.skipped, stats.identical) == (2, 2, 0, 0)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_conversational(tmp_path, write_rows, tokenizer, suffix):
    path = write_rows(tmp_path / f"train{suffix}", CONVERSATIONAL)
    examples, _ = parse_preferences(load_rows(path), tokenizer)
    assert examples == RENDERED_CONVERSATIONAL


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_implicit_prompt_strings(tmp_path, write_rows, suffix):
    rows = [
        # The shared prefix "Human: hi\n\nAssistant: He" is backed off to before its last space.
        {
            "chosen": "Human: hi\n\nAssistant: Hello there",
            "rejected": "Human: hi\n\nAssistant: Hey",
        },
        # A shared prefix ending in whitespace is cut before that whitespace run.
        {"chosen": "Q: why?\n\nA", "rejected": "Q: why?\n\nB"},
    ]
    examples, _ = parse_preferences(load_rows(write_rows(tmp_path / f"t{suffix}", rows)))
    assert examples == [
        PreferenceExample("Human: hi\n\nAssistant:", " Hello there", " Hey"),
        PreferenceExample("Q: why?", "\n\nA", "\n\nB"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_implicit_prompt_conversations(tmp_path, write_rows, tokenizer, suffix):
    rows = [
        {
            "chosen": USER_Q + [{"role": "assistant", "content": "Four."}],
            "rejected": USER_Q + [{"role": "assistant", "content": "Five."}],
        }
    ]
    examples, _ = parse_preferences(load_rows(write_rows(tmp_path / f"t{suffix}", rows)), tokenizer)
    assert examples == RENDERED_CONVERSATIONAL[:1]


def test_text_prompt_beside_full_conversations_is_ignored(tokenizer):
    """ultrafeedback_binarized style: the prompt text repeats the conversations' user turn."""
    row = {
        "prompt": "What is two plus two?",
        "chosen": USER_Q + [{"role": "assistant", "content": "Four."}],
        "rejected": USER_Q + [{"role": "assistant", "content": "Five."}],
    }
    assert parse_preferences([row], tokenizer)[0] == RENDERED_CONVERSATIONAL[:1]


def test_multi_turn_completion_keeps_later_turns(tokenizer):
    chosen = [
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    rows = [{"prompt": USER_Q, "chosen": chosen, "rejected": chosen[:1]}]
    (example,), _ = parse_preferences(rows, tokenizer)
    assert example.chosen == (
        "Four.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_margin(tmp_path, write_rows, suffix):
    rows = [dict(STANDARD[0], margin=1.5), dict(STANDARD[1], margin=-2.0)]
    examples, _ = parse_preferences(load_rows(write_rows(tmp_path / f"t{suffix}", rows)))
    assert [example.margin for example in examples] == [1.5, -2.0]


def test_margin_optional_per_row(tmp_path, write_rows):
    rows = [dict(STANDARD[0], margin=3), STANDARD[1]]
    examples, _ = parse_preferences(load_rows(write_rows(tmp_path / "t.jsonl", rows)))
    assert [example.margin for example in examples] == [3.0, None]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_pre_tokenized(tmp_path, write_rows, suffix):
    rows = [
        {"prompt": [5, 6], "chosen": [7, 2], "rejected": [8]},
        {"chosen": [5, 6, 7, 2], "rejected": [5, 6, 8]},  # implicit: shared ids [5, 6]
    ]
    examples, _ = parse_preferences(load_rows(write_rows(tmp_path / f"t{suffix}", rows)))
    assert examples == [
        PreferenceExample([5, 6], [7, 2], [8]),
        PreferenceExample([5, 6], [7, 2], [8]),
    ]


def test_directory_split_files(tmp_path, write_rows):
    write_rows(tmp_path / "prefs" / "train-0.jsonl", STANDARD[:1])
    write_rows(tmp_path / "prefs" / "train-1.jsonl", STANDARD[1:])
    write_rows(tmp_path / "prefs" / "test-0.jsonl", [dict(STANDARD[0], prompt="Held out")])
    rows = load_rows(tmp_path / "prefs")
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in STANDARD]
    assert tuple(rows.locate(1)) == (str(tmp_path / "prefs" / "train-1.jsonl"), 1, "line")
    assert [row["prompt"] for row in load_rows(tmp_path / "prefs", split="test")] == ["Held out"]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(STANDARD)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("someorg/prefs", split="test", data_files={"test": "x.parquet"})
    assert calls == [("someorg/prefs", {"split": "test", "data_files": {"test": "x.parquet"}})]
    assert tuple(rows.locate(1)) == ("someorg/prefs", 2, "row")
    assert len(parse_preferences(rows)[0]) == 2


def test_implicit_conversations_split_at_the_first_difference(tokenizer):
    shared = USER_Q + [
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Sure?"},
    ]
    row = {
        "chosen": shared + [{"role": "assistant", "content": "Yes."}],
        "rejected": shared + [{"role": "assistant", "content": "No."}],
    }
    (example,), _ = parse_preferences([row], tokenizer)
    assert example.prompt == tokenizer.apply_chat_template(
        shared, tokenize=False, add_generation_prompt=True
    )
    assert (example.chosen, example.rejected) == ("Yes.<|im_end|>", "No.<|im_end|>")


def test_identical_implicit_rows_keep_their_last_part():
    rows = [
        {"chosen": "Q: hi A: same", "rejected": "Q: hi A: same"},
        {"chosen": [5, 6, 7], "rejected": [5, 6, 7]},
    ]
    examples, stats = parse_preferences(rows)
    assert examples == [
        PreferenceExample("Q: hi A:", " same", " same"),
        PreferenceExample([5, 6], [7], [7]),
    ]
    assert stats.identical == 2


def test_compressed_file_and_rows_access(tmp_path):
    import gzip
    import json

    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in STANDARD)
    rows = load_rows(path)
    assert len(rows) == 2 and rows[-1] == STANDARD[1] and tuple(rows.locate(1)) == (str(path), 2, "line")
    assert rows.dataset.column_names == ["prompt", "chosen", "rejected"]


def test_save_to_disk_directories(tmp_path):
    """`Dataset.save_to_disk` (its rows are "train") and `DatasetDict.save_to_disk` (by split, sliced)."""
    import datasets

    from jaxrlhf.data import DataError

    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "one"))
    rows = load_rows(tmp_path / "one")
    assert [rows[i] for i in range(len(rows))] == STANDARD
    assert parse_preferences(rows)[0][0] == PreferenceExample(*STANDARD[0].values())
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(STANDARD * 5),
                                 "test": datasets.Dataset.from_list(STANDARD[:1])})  # fmt: skip
    both.save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(tmp_path / "dict")) == 10 and len(load_rows(tmp_path / "dict", split="test")) == 1
    assert [load_rows(tmp_path / "dict", split=s)[0]["prompt"] for s in ("train[1:3]", "train[-2:]")] == [
        STANDARD[1]["prompt"], STANDARD[0]["prompt"]]  # fmt: skip
    assert len(load_rows(tmp_path / "dict", split="train[:50%]")) == 5
    with pytest.raises(DataError, match=r"dict: no split 'validation' \(splits: test, train\)"):
        load_rows(tmp_path / "dict", split="validation")


def test_sharegpt_rows_read_as_chatml(tokenizer):
    """`from` / `value` messages (and `conversations`) as TRL's `maybe_convert_to_chatml` reads them,
    ShareGPT's `human` / `gpt` speakers as `user` / `assistant`."""
    from jaxrlhf.data import to_chatml

    share = {"prompt": [{"from": "human", "value": "What is two plus two?"}],
             "chosen": [{"from": "gpt", "value": "Four."}],
             "rejected": [{"from": "gpt", "value": "Five."}]}  # fmt: skip
    assert parse_preferences([share], tokenizer)[0] == RENDERED_CONVERSATIONAL[:1]
    row = to_chatml({"conversations": [{"from": "system", "value": "Hi", "weight": 0}], "id": 3})
    assert row == {"messages": [{"role": "system", "content": "Hi", "weight": 0}], "id": 3}


def test_tools_and_template_kwargs_reach_the_template(tokenizer):
    """Preference rows pass `tools` (a list, or the list as a JSON string) and `chat_template_kwargs`
    to the chat template, as TRL does; a null content (a tool-call turn) or a list of parts is the
    template's to render, any other content type is a bad row."""
    from jaxrlhf.data import DataError

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% if tools %}TOOLS {{ tools | map(attribute='name') | join(',') }};{% endif %}"
                         "{% if style is defined %}STYLE {{ style }};{% endif %}"
                         + tokenizer.chat_template)  # fmt: skip
    row = {**CONVERSATIONAL[0], "tools": '[{"name": "add"}]', "chat_template_kwargs": {"style": "terse"}}
    (example,), _ = parse_preferences([row], tok)
    assert example.prompt == "TOOLS add;STYLE terse;" + RENDERED_Q
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}
    (example,), _ = parse_preferences([{**CONVERSATIONAL[0], "chosen": [call]}], tok)
    assert example.chosen.endswith("<|im_end|>")
    with pytest.raises(DataError, match="field 'tools': not JSON"):
        parse_preferences([{**row, "tools": "[{"}], tok)
    with pytest.raises(DataError, match="expected 'content' to be a string or a list of parts, got int"):
        parse_preferences([{**CONVERSATIONAL[0], "chosen": [{"role": "assistant", "content": 4}]}], tok)


def test_prompt_rows_take_sharegpt_tools_and_template_kwargs(tmp_path, write_rows, tokenizer):
    """The online methods' prompt rows: ShareGPT messages, `tools` and `chat_template_kwargs` as in
    SFT and preference rows; the other columns (for the reward functions) keep their values."""
    from jaxrlhf.train.online import load_prompt_rows

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% if tools %}TOOLS;{% endif %}{% if style is defined %}STYLE;{% endif %}" + (
        tokenizer.chat_template)  # fmt: skip
    rows = [{"prompt": [{"from": "human", "value": "What is two plus two?"}], "answer": "4"},
            {"prompt": USER_Q, "tools": [{"name": "add"}], "chat_template_kwargs": {"style": 1}}]  # fmt: skip
    path = write_rows(tmp_path / "prompts.jsonl", rows)
    (ids0, extra0), (ids1, _) = load_prompt_rows([str(path)], tok, max_prompt_length=64)
    assert tok.decode(ids0) == RENDERED_Q and extra0["answer"] == "4"
    assert tok.decode(ids1) == "TOOLS;STYLE;" + RENDERED_Q
