"""Bad files and bad rows give a `DataError` naming file, line (JSON Lines) or 1-based row, and field;
or are skipped."""

from __future__ import annotations

import logging
import pickle

import pytest
from transformers import AutoTokenizer

from jaxrlhf.data import DataError, load_rows, parse_preferences

GOOD = {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."}
MESSAGES_GOOD = {
    "prompt": [{"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}
ANY_TEXT = "expected a string, a list of messages or a list of token ids"

BAD_ROWS = {  # case: (good row on line 1, bad row on line 2, field, message after "field 'x': ")
    "missing column": (GOOD, {"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    "null value": (GOOD, dict(GOOD, chosen=None), "chosen", "missing"),
    "int completion": (GOOD, dict(GOOD, chosen=3), "chosen", f"{ANY_TEXT}, got int"),
    "dict completion": (GOOD, dict(GOOD, rejected={"a": 1}), "rejected", f"{ANY_TEXT}, got dict"),
    "mixed list": (
        GOOD,
        dict(GOOD, chosen=[1, "a"]),
        "chosen",
        f"{ANY_TEXT}, got a list of int and str",
    ),
    "empty prompt": (GOOD, dict(GOOD, prompt=""), "prompt", "empty"),
    "prompt kind": (
        GOOD,
        dict(GOOD, prompt=[1, 2]),
        "prompt",
        "expected a string like 'chosen', got a list of int",
    ),
    "prompt text beside assistant-only conversations": (
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, prompt="Hi"),
        "prompt",
        "chosen and rejected share no leading messages to use as the prompt",
    ),
    "rejected kind": (
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, rejected="Go away."),
        "rejected",
        "expected messages like 'chosen', got str",
    ),
    "message without content": (
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, chosen=[{"role": "assistant"}]),
        "chosen",
        "message 0: expected 'content' to be a string, got null",
    ),
    "completion from the user": (
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, chosen=[{"role": "user", "content": "Hello."}]),
        "chosen",
        "a completion must start with an assistant message, got role 'user'",
    ),
    "empty messages": (MESSAGES_GOOD, dict(MESSAGES_GOOD, rejected=[]), "rejected", "empty"),
    "margin text": (GOOD, dict(GOOD, margin="lots"), "margin", "expected a number, got 'lots'"),
    "margin bool": (GOOD, dict(GOOD, margin=True), "margin", "expected a number, got bool"),
    "margin nan": (GOOD, dict(GOOD, margin="nan"), "margin", "expected a finite number, got 'nan'"),
    "no shared prompt": (
        {"chosen": "Q: a", "rejected": "Q: b"},
        {"chosen": "Yes.", "rejected": "No."},
        "prompt",
        "chosen and rejected share no leading text to use as the prompt",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_row_and_field(tmp_path, write_rows, tokenizer, case):
    good, bad, field, message = BAD_ROWS[case]
    path = write_rows(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError) as info:
        parse_preferences(load_rows(path), tokenizer)
    err = info.value
    assert (err.file, err.row, err.unit, err.field) == (str(path), 2, "line", field)
    assert str(err) == f"{path}, line 2, field '{field}': {message}"

    examples, stats = parse_preferences(load_rows(path), tokenizer, skip_invalid=True)
    assert len(examples) == 1
    assert (stats.rows, stats.kept, stats.skipped) == (2, 1, 1)
    assert [str(e) for e in stats.errors] == [str(err)]


def test_message_format_of_the_brief(tmp_path, write_rows, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl", [GOOD] * 17 + [dict(GOOD, chosen=7)])
    with pytest.raises(DataError) as info:
        parse_preferences(load_rows("data/train.jsonl"))
    assert str(info.value) == f"data/train.jsonl, line 18, field 'chosen': {ANY_TEXT}, got int"


def test_skip_invalid_counts(tmp_path, write_rows):
    rows = [GOOD, dict(GOOD, chosen=3), GOOD, {"prompt": "p"}, dict(GOOD, margin="x"), GOOD]
    examples, stats = parse_preferences(
        load_rows(write_rows(tmp_path / "t.jsonl", rows)), skip_invalid=True
    )
    assert len(examples) == 3
    assert (stats.rows, stats.kept, stats.skipped) == (6, 3, 3)
    assert [(e.row, e.unit, e.field) for e in stats.errors] == [
        (2, "line", "chosen"), (4, "line", "chosen"), (5, "line", "margin"),
    ]  # fmt: skip


def test_empty_completion_is_not_an_error(tmp_path, write_rows):
    """A blank completion is well formed (degenerate, counted), not a bad row; an empty list is."""
    rows = [GOOD, dict(GOOD, chosen=""), dict(GOOD, rejected="  \n"), GOOD]
    examples, stats = parse_preferences(load_rows(write_rows(tmp_path / "t.jsonl", rows)))
    assert len(examples) == 4 and (stats.kept, stats.skipped, stats.empty_completion) == (4, 0, 2)
    with pytest.raises(DataError, match=r"t2\.jsonl, line 1, field 'chosen': empty$"):
        parse_preferences(load_rows(write_rows(tmp_path / "t2.jsonl", [dict(GOOD, chosen=[])])))


def test_row_in_second_file_of_directory(tmp_path, write_rows):
    write_rows(tmp_path / "d" / "train-0.jsonl", [GOOD, GOOD])
    write_rows(tmp_path / "d" / "train-1.jsonl", [GOOD, dict(GOOD, rejected=5)])
    with pytest.raises(DataError, match=r"train-1\.jsonl, line 2, field 'rejected'"):
        parse_preferences(load_rows(tmp_path / "d"))


def test_identical_pairs_are_kept_and_counted(caplog):
    rows = [GOOD, dict(GOOD, rejected=GOOD["chosen"])]
    with caplog.at_level(logging.WARNING):
        examples, stats = parse_preferences(rows, source="mem")
    assert len(examples) == 2 and stats.identical == 1
    assert "0 preference rows have an empty completion, 1 have chosen == rejected" in caplog.text


def test_rows_without_a_file_use_source():
    with pytest.raises(DataError, match=r"^mem, row 2, field 'chosen': empty$"):
        parse_preferences([GOOD, dict(GOOD, chosen=[])], source="mem")


def test_template_that_does_not_extend_the_prompt(tmp_path, write_rows, tokenizer_dir):
    thinking = AutoTokenizer.from_pretrained(tokenizer_dir)
    thinking.chat_template = thinking.chat_template.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>{% endif %}"
    )
    path = write_rows(tmp_path / "t.jsonl", [MESSAGES_GOOD])
    with pytest.raises(DataError, match="line 1, field 'chosen': the chat template's rendering"):
        parse_preferences(load_rows(path), thinking)


def test_template_that_raises(tmp_path, write_rows, tokenizer_dir):
    strict = AutoTokenizer.from_pretrained(tokenizer_dir)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        + strict.chat_template
    )
    row = dict(MESSAGES_GOOD, prompt=[{"role": "system", "content": "x"}])
    with pytest.raises(DataError, match="mem, row 1, field 'prompt': chat template failed: no system"):
        parse_preferences([row], strict, source="mem")


def test_conversations_without_tokenizer_is_not_a_row_error():
    with pytest.raises(ValueError, match="need a tokenizer") as info:
        parse_preferences([MESSAGES_GOOD], skip_invalid=True)
    assert not isinstance(info.value, DataError)


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / "nope.jsonl")
    assert info.value.file == str(tmp_path / "nope.jsonl")
    assert str(info.value) == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    with pytest.raises(DataError, match="^data/missing.parquet: no such file"):
        load_rows("data/missing.parquet")


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(DataError, match=f"^{path}: cannot read json file") as info:
        load_rows(path)
    assert info.value.file == str(path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(path)


def test_missing_split_in_directory(tmp_path, write_rows):
    write_rows(tmp_path / "d" / "train.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"no files for split 'test' \(splits found: train\)"):
        load_rows(tmp_path / "d", split="test")


def test_data_error_pickles():
    err = DataError("empty", file="a.jsonl", row=3, field="chosen", unit="line")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.file, copy.row, copy.unit, copy.field) == ("a.jsonl", 3, "line", "chosen")
    assert str(copy) == str(err) == "a.jsonl, line 3, field 'chosen': empty"
    assert isinstance(copy, ValueError)
