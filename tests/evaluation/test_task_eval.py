"""Task-accuracy evaluation: prompts with their family and answer, greedy replies that do not depend on
batching, accuracy by family from the checkers, the fixed sample rule, the JSON report, `jaxrlhf eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxrlhf.data import DataError
from jaxrlhf.evaluation import (
    SCHEMA,
    check,
    evaluate_tasks,
    format_task_report,
    generate_greedy,
    has_task_columns,
    load_task_prompts,
    write_task_eval,
)
from jaxrlhf.evaluation import tasks as tasks_mod
from jaxrlhf.generation import generate
from jaxrlhf.models import from_pretrained, load_tokenizer
from jaxrlhf.models.demo import demo_model_path

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")
REPORT_KEYS = {"schema", "accuracy", "correct", "total", "families", "samples", "rows", "max_new_tokens"}
ROW_KEYS = {"file", "row", "family", "prompt", "answer", "reply", "correct"}


def _held_out():
    with open(os.path.join(ASSETS, "test.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo_model_path())


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return from_pretrained(tiny_dir)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompts_keep_family_answer_and_line(tmp_path, tokenizer):
    rows = _held_out()[:3]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    prompts = load_task_prompts([str(path)], tokenizer)
    assert [p.row for p in prompts] == [1, 3, 4]  # lines of the file, the blank one counted
    assert [(p.family, p.answer) for p in prompts] == [(r["family"], r["answer"]) for r in rows]
    assert prompts[0].prompt == rows[0]["prompt"][-1]["content"]
    rendered = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompts[0].ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_rows_without_a_checker_are_named(tmp_path, tokenizer):
    rows = _held_out()[:3]
    del rows[1]["answer"]
    path = _write(tmp_path / "t.jsonl", rows)
    assert not has_task_columns([_write(tmp_path / "plain.jsonl", [{"prompt": "hi"}])])
    assert has_task_columns([path])  # the column exists (null on one row)
    with pytest.raises(DataError, match=r"t\.jsonl, line 2, field 'answer': missing"):
        load_task_prompts([path], tokenizer)
    rows = _held_out()[:2]
    rows[1]["family"] = "poetry"
    with pytest.raises(DataError, match=r"line 2, field 'family': no checker for family 'poetry'"):
        load_task_prompts([_write(tmp_path / "u.jsonl", rows)], tokenizer)


def test_accuracy_by_family_and_fixed_samples(tmp_path, tokenizer, monkeypatch):
    rows = _held_out()
    prompts = load_task_prompts([os.path.join(ASSETS, "test.jsonl")], tokenizer)
    # Plant replies: the chosen answer on even lines, the rejected one on odd lines.
    planted = [r["chosen" if i % 2 == 0 else "rejected"][-1]["content"] for i, r in enumerate(rows)]
    monkeypatch.setattr(tasks_mod, "generate_greedy", lambda *a, **k: planted)
    result = evaluate_tasks(None, tokenizer, prompts, samples_per_family=3)
    assert result.total == 64 and result.correct == 32 and result.accuracy == 0.5
    for family, stats in result.families.items():
        mine = [i for i, r in enumerate(rows) if r["family"] == family]
        assert stats["correct"] == sum(i % 2 == 0 for i in mine) and stats["total"] == len(mine)
        # the first rows of the family in file order, right or wrong
        assert [s["row"] for s in result.samples[family]] == [i + 1 for i in mine[:3]]
    assert all(r["correct"] == check(r["family"], r["reply"], r["answer"]) for r in result.rows)
    out = tmp_path / "report.json"
    write_task_eval(str(out), result, model="m")
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS | {"model"} and report["schema"] == SCHEMA
    assert set(report["rows"][0]) == ROW_KEYS
    assert result.summary()["task/accuracy"] == 0.5


def test_report_flags_families_that_lost_more_than_one_prompt(tokenizer, monkeypatch):
    rows = _held_out()
    prompts = load_task_prompts([os.path.join(ASSETS, "test.jsonl")], tokenizer)
    chosen = [r["chosen"][-1]["content"] for r in rows]
    worse = [r["rejected" if r["family"] == "fact" else "chosen"][-1]["content"] for r in rows]
    monkeypatch.setattr(tasks_mod, "generate_greedy", lambda *a, **k: chosen)
    before = evaluate_tasks(None, tokenizer, prompts)
    monkeypatch.setattr(tasks_mod, "generate_greedy", lambda *a, **k: worse)
    after = evaluate_tasks(None, tokenizer, prompts)
    text = format_task_report(before, after)
    assert "overall" in text and "1.000 (64/64)" in text and "0.875 (56/64)" in text
    assert "worse by more than one held-out prompt: fact (-8)" in text


def test_greedy_replies_do_not_depend_on_batching(tiny_model, tokenizer):
    prompts = [p.ids for p in load_task_prompts([os.path.join(ASSETS, "test.jsonl")], tokenizer)[:5]]
    batched = generate_greedy(tiny_model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert len(batched) == 5
    for ids, reply in zip(prompts, batched, strict=True):  # one prompt at a time, no padding at all
        out = generate(tiny_model, np.asarray(ids)[None], np.ones((1, len(ids)), np.int32), max_new_tokens=8,
                       eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                       temperature=0.0)  # fmt: skip
        tokens, mask = np.asarray(out.tokens[0]), np.asarray(out.completion_mask[0])
        assert reply == tokenizer.decode(tokens[mask == 1], skip_special_tokens=True).strip()
    assert generate_greedy(tiny_model, tokenizer, prompts, max_new_tokens=8, batch_size=64) == batched


def test_cli_eval_on_the_demo_model_is_reproducible(tmp_path, tokenizer):
    rows, seen = [], set()
    for r in _held_out():  # the first prompt of each family
        if r["family"] not in seen:
            seen.add(r["family"])
            rows.append(r)
    data = _write(tmp_path / "eight.jsonl", rows)
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrlhf", "eval", "--model", "demo", "--data", data, "--max-new-tokens", "24",
         "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS | {"model", "data"} and report["total"] == 8
    assert set(report["families"]) == seen and all(set(r) == ROW_KEYS for r in report["rows"])
    assert f"overall            {report['accuracy']:.3f}" in proc.stdout
    # The same greedy replies in this process (a different batch width and compilation).
    prompts = load_task_prompts([data], tokenizer)
    model = from_pretrained(demo_model_path())
    again = evaluate_tasks(model, tokenizer, prompts, max_new_tokens=24, batch_size=3)
    assert [r["reply"] for r in report["rows"]] == [r["reply"] for r in again.rows]
    assert report["correct"] == again.correct
