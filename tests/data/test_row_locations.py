"""Where a bad row is, as the user finds it: the line of a JSON Lines / CSV file (blank lines, the CSV
header and multi-line cells counted), the 1-based row of JSON arrays and parquet files. And degenerate
rows (an empty completion, chosen == rejected): counted, kept or dropped, never errors."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from jaxrlhf.data import DataError, Location, load_rows, parse_preferences
from jaxrlhf.train.algorithms.sft import prepare_sft_data
from jaxrlhf.train.config import DataConfig
from jaxrlhf.train.pipeline import prepare_data

GOOD = {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."}
NO_CHOSEN = {"prompt": "Hello there!", "rejected": " Go away."}


def _jsonl(rows: list[dict | None]) -> str:
    """JSON Lines text; None is a blank line."""
    return "".join("\n" if row is None else json.dumps(row) + "\n" for row in rows)


def _error(path) -> DataError:
    with pytest.raises(DataError) as info:
        parse_preferences(load_rows(path))
    return info.value


def test_jsonl_blank_lines_count(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(_jsonl([GOOD, None, GOOD, NO_CHOSEN, None, GOOD]))  # the bad row is on line 4
    err = _error(path)
    assert (err.file, err.row, err.unit, err.field) == (str(path), 4, "line", "chosen")
    assert str(err) == f"{path}, line 4, field 'chosen': missing"
    rows = load_rows(path)
    assert len(rows) == 4
    assert [tuple(rows.locate(i)) for i in range(4)] == [(str(path), n, "line") for n in (1, 3, 4, 6)]
    assert rows.locate(2) == Location(str(path), 4, "line") and str(rows.locate(2)) == f"{path}, line 4"


def test_jsonl_whitespace_lines_and_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    text = _jsonl([None, GOOD]) + "  \t\n" + _jsonl([GOOD, None, NO_CHOSEN])  # bad row: line 6
    path.write_bytes(text.replace("\n", "\r\n").encode())
    assert str(_error(path)) == f"{path}, line 6, field 'chosen': missing"


def test_skipped_rows_report_their_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(_jsonl([None, NO_CHOSEN, GOOD, None, None, dict(GOOD, margin="x"), GOOD]))
    examples, stats = parse_preferences(load_rows(path), skip_invalid=True)
    assert len(examples) == 2 and stats.skipped == 2
    assert [(e.row, e.unit, e.field) for e in stats.errors] == [(2, "line", "chosen"), (6, "line", "margin")]


def test_gzipped_jsonl_counts_lines_of_the_decompressed_text(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(_jsonl([None, GOOD, None, None, NO_CHOSEN]))
    assert str(_error(path)) == f"{path}, line 5, field 'chosen': missing"


def test_csv_header_is_line_one(tmp_path):
    path = tmp_path / "train.csv"
    pd.DataFrame([dict(GOOD, margin=""), dict(GOOD, margin="1.5"), dict(GOOD, margin="lots")]).to_csv(
        path, index=False
    )
    assert str(_error(path)) == f"{path}, line 4, field 'margin': expected a number, got 'lots'"


def test_csv_multi_line_cell_shifts_the_line(tmp_path):
    path = tmp_path / "train.csv"
    rows = [dict(GOOD, prompt="first\nsecond\nthird", margin=""), dict(GOOD, margin="lots")]
    pd.DataFrame(rows).to_csv(path, index=False)
    assert path.read_text().count("\n") == 5  # header, a row over 3 lines, the bad row
    err = _error(path)
    assert (err.row, err.unit, err.field) == (5, "line", "margin")
    assert [tuple(load_rows(path).locate(i))[1:] for i in range(2)] == [(2, "line"), (5, "line")]


def test_csv_blank_lines_and_compression(tmp_path):
    text = 'prompt,chosen,rejected,margin\n\n"a\n\nb", A., B.,\n\n" Q", A., B.,lots\n'  # bad: line 7
    plain = tmp_path / "train.csv"
    plain.write_text(text)
    assert str(_error(plain)) == f"{plain}, line 7, field 'margin': expected a number, got 'lots'"
    packed = tmp_path / "train.csv.gz"
    with gzip.open(packed, "wt") as f:
        f.write(text)
    assert str(_error(packed)) == f"{packed}, line 7, field 'margin': expected a number, got 'lots'"


def test_json_array_reports_rows(tmp_path):
    path = tmp_path / "train.json"
    # one row per line after a "[" line: line numbers would be off by one, rows are not
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in [GOOD, GOOD, NO_CHOSEN]) + "\n]\n")
    err = _error(path)
    assert (err.row, err.unit) == (3, "row")
    assert str(err) == f"{path}, row 3, field 'chosen': missing"


def test_parquet_reports_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame([GOOD, GOOD, GOOD, dict(GOOD, chosen=None)]).to_parquet(path)
    assert str(_error(path)) == f"{path}, row 4, field 'chosen': missing"
    assert tuple(load_rows(path).locate(0)) == (str(path), 1, "row")


def test_second_file_of_a_directory_counts_its_own_lines(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train-0.jsonl").write_text(_jsonl([GOOD, None, GOOD]))
    (tmp_path / "d" / "train-1.jsonl").write_text(_jsonl([None, None, NO_CHOSEN]))
    err = _error(tmp_path / "d")
    assert err.file.endswith("train-1.jsonl") and (err.row, err.unit) == (3, "line")


# ---- degenerate rows ------------------------------------------------------------------------------

ASSISTANT = [{"role": "assistant", "content": "Hello."}]
USER = [{"role": "user", "content": "Hi"}]
DEGENERATE = [  # (row, empty completion, chosen == rejected)
    (dict(GOOD, chosen=""), True, False),
    (dict(GOOD, rejected="  \n"), True, False),
    (dict(GOOD, rejected=GOOD["chosen"]), False, True),
    (dict(GOOD, chosen="", rejected=""), True, True),  # both: counted twice, dropped once
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": " "}], "rejected": ASSISTANT}, True, False),
    # an implicit prompt: the completion is what follows the shared user turn
    ({"chosen": USER + [{"role": "assistant", "content": ""}], "rejected": USER + ASSISTANT}, True, False),
    ({"prompt": "Hi", "chosen": USER + ASSISTANT, "rejected": USER + ASSISTANT}, False, True),
]
MESSAGES_GOOD = {"prompt": USER, "chosen": ASSISTANT, "rejected": [{"role": "assistant", "content": "No."}]}


def _degenerate_file(tmp_path):
    rows = [GOOD, MESSAGES_GOOD, *(row for row, _, _ in DEGENERATE), NO_CHOSEN, GOOD]
    path = tmp_path / "train.jsonl"
    path.write_text(_jsonl(rows))
    return path


@pytest.mark.parametrize("drop", [False, True])
def test_degenerate_rows_are_counted_and_dropped_on_request(tmp_path, tokenizer, drop):
    path = _degenerate_file(tmp_path)
    empty = sum(e for _, e, _ in DEGENERATE)
    identical = sum(i for _, _, i in DEGENERATE)
    with pytest.raises(DataError, match=r"line 10, field 'chosen': missing"):  # still an error
        parse_preferences(load_rows(path), tokenizer, drop_degenerate=drop)
    examples, stats = parse_preferences(load_rows(path), tokenizer, skip_invalid=True, drop_degenerate=drop)
    assert (stats.rows, stats.skipped, stats.empty_completion, stats.identical) == (11, 1, empty, identical)
    assert [(e.row, e.field) for e in stats.errors] == [(10, "chosen")]  # degenerate rows are not errors
    if drop:
        assert (stats.kept, stats.dropped_degenerate, len(examples)) == (3, len(DEGENERATE), 3)
        assert all(e.chosen.strip() and e.rejected.strip() and e.chosen != e.rejected for e in examples)
    else:
        assert (stats.kept, stats.dropped_degenerate, len(examples)) == (10, 0, 10)


@pytest.mark.parametrize("drop", [False, True])
def test_degenerate_rows_in_the_data_report(tmp_path, tokenizer, drop):
    path = _degenerate_file(tmp_path)
    cfg = DataConfig(train_files=str(path), skip_invalid=True, drop_degenerate=drop, max_length=64,
                     max_prompt_length=32)  # fmt: skip
    logged: list[str] = []
    data = prepare_data(cfg, tokenizer, log=logged.append)
    report = data.report
    assert report["train/rows_skipped_invalid"] == 1
    assert report["train/rows_empty_completion"] == sum(e for _, e, _ in DEGENERATE)
    assert report["train/rows_chosen_equals_rejected"] == sum(i for _, _, i in DEGENERATE)
    assert report["train/rows_dropped_degenerate"] == (len(DEGENERATE) if drop else 0)
    assert len(data.train) == (3 if drop else 10)
    assert any("drop_degenerate=true" in line for line in logged) != drop  # the hint, when kept


@pytest.mark.parametrize("drop", [False, True])
def test_sft_empty_completions(tmp_path, tokenizer, drop):
    rows = [
        {"prompt": "Q: hi", "completion": " Hello."},
        {"prompt": "Q: hi", "completion": " "},
        {"messages": USER + [{"role": "assistant", "content": ""}]},
        {"messages": USER + ASSISTANT},
        {"prompt": "Q: hi"},  # invalid: skipped
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text(_jsonl(rows))
    cfg = DataConfig(train_files=str(path), skip_invalid=True, drop_degenerate=drop, max_length=64,
                     max_prompt_length=32)  # fmt: skip
    data = prepare_sft_data(cfg, tokenizer, log=lambda msg: None)
    assert data.report["train/rows_skipped_invalid"] == 1
    assert data.report["train/rows_empty_completion"] == 2
    assert data.report["train/rows_dropped_degenerate"] == (2 if drop else 0)
    assert len(data.train) == (2 if drop else 4)
    with pytest.raises(DataError, match=r"sft\.jsonl, line 5, field 'completion': "):
        prepare_sft_data(DataConfig(train_files=str(path), max_length=64, max_prompt_length=32), tokenizer,
                         log=lambda msg: None)  # fmt: skip
