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
    "content of a wrong type": (  # absent / null content is the template's to render (TRL's rule)
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, chosen=[{"role": "assistant", "content": 4}]),
        "chosen",
        "message 0: expected 'content' to be a string or a list of parts, got int",
    ),
    "completion from the user": (
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, chosen=[{"role": "user", "content": "Hello."}]),
        "chosen",
        "a completion must start with an assistant message, got role 'user'",
    ),
    "empty messages": (MESSAGES_GOOD, dict(MESSAGES_GOOD, rejected=[]), "rejected", "empty"),
    "a role the template does not know": (  # ChatML renders any role: it would be trained on
        MESSAGES_GOOD,
        dict(MESSAGES_GOOD, prompt=[{"role": "wizard", "content": "Hi"}]),
        "prompt",
        "message 0: role 'wizard' is not one the chat template knows (system, developer, user, "
        "assistant, tool, or a role the template names)",
    ),
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


def test_unreadable_file(tmp_path, capfd):
    """A JSON syntax error is located by line and column (the reader gives a block's row), and the
    reader's own log line is not printed above ours."""
    path = tmp_path / "broken.jsonl"
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    path.write_text(good * 2 + '{"prompt": "a", "chosen": "b" "rejected": "c"}\n' + good)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == f"{path}, line 3: invalid JSON: Expecting ',' delimiter (column 31)"
    assert (info.value.file, info.value.row, info.value.unit) == (str(path), 3, "line")
    assert "Failed to load JSON" not in capfd.readouterr().err
    array = tmp_path / "rows.json"  # one JSON document: its line and column
    array.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a" "b"}\n]\n')
    with pytest.raises(DataError, match=r"rows.json, line 3: invalid JSON: Expecting ',' delimiter"):
        load_rows(array)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text(good + "[1, 2]\n")
    with pytest.raises(DataError, match=r"scalar.jsonl, line 2: expected a JSON object per line, got list"):
        load_rows(scalar)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_and_binary_files(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_text("\n  \n")
    with pytest.raises(DataError) as info:
        load_rows(empty)
    assert str(info.value) == f"{empty}: the file is empty: no rows"
    binary = tmp_path / f"model{suffix}"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)))
    with pytest.raises(DataError) as info:
        load_rows(binary)
    assert str(info.value) == f"{binary}: not a text file (a NUL byte at byte 6): is it binary?"
    latin = tmp_path / f"latin{suffix}"
    latin.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 16\): is it binary\?"):
        load_rows(latin)


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


def test_unknown_roles_in_sft_and_prompt_rows(tmp_path, write_rows, tokenizer):
    """SFT conversations and online prompts check roles as preference rows do; a role the template
    names (Llama 3.1's `ipython`) is accepted."""
    from jaxrlhf.train.algorithms.sft import parse_sft_rows
    from jaxrlhf.train.online import load_prompt_rows

    hi, wizard = {"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Zap"}
    reply = {"role": "assistant", "content": "Hello."}
    path = write_rows(tmp_path / "sft.jsonl", [{"messages": [hi, wizard, reply]}])
    with pytest.raises(DataError, match=r"sft.jsonl, line 1, field 'messages': message 1: role 'wizard'"):
        parse_sft_rows(load_rows(path), tokenizer, skip_invalid=False, drop_degenerate=False, source="")
    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": [hi]}, {"prompt": [hi, wizard]}])
    with pytest.raises(DataError, match=r"prompts.jsonl, line 2, field 'prompt': message 1: role 'wizard'"):
        load_prompt_rows([str(path)], tokenizer, max_prompt_length=32)
    from jaxrlhf.data import check_roles

    llama_like = type("T", (), {"chat_template": "{% if message['role'] == 'ipython' %}{% endif %}"})()
    check_roles([{"role": "ipython", "content": "42"}], llama_like, "prompt")  # named by the template
    with pytest.raises(DataError, match="role 'ipython' is not"):
        check_roles([{"role": "ipython", "content": "42"}], tokenizer, "prompt")
