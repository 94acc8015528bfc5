"""`train.report_to` (TRL's spellings), each tracker read back from what it wrote: a GRPO run on a
tiny model logs to TensorBoard, Weights & Biases (offline: no network) and Trackio (a local SQLite
file) at once, with the completions table of `train.log_completions`; a resumed run continues the
same W&B run; a tracker whose package is missing is a one-line error naming what to install."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers.runs import REPO, grpo_cli_args, tiny_with_demo_tokenizer
from helpers.trackers import tensorboard_events, wandb_history, wandb_records

from jaxrlhf.train.config import ConfigError, TrainConfig
from jaxrlhf.train.trackers import TrackerError, make_trackers


def test_report_to_takes_trls_spellings():
    assert TrainConfig().report_to == ["tensorboard"]
    assert TrainConfig(report_to="wandb").report_to == ["wandb"]
    assert TrainConfig(report_to="none").report_to == []
    assert TrainConfig(report_to=["trackio", "tensorboard"]).report_to == ["trackio", "tensorboard"]
    with pytest.raises(ValueError, match="tensorboard"):
        TrainConfig(report_to=["mlflow"])


def test_a_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(TrackerError, match=r"'wandb', but wandb is not installed: pip install wandb") as e:
        make_trackers(["tensorboard", "wandb"], str(tmp_path))
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "tensorboard")  # checked before any tracker starts
    with pytest.raises(TrackerError, match="unknown tracker"):
        make_trackers(["mlflow"], str(tmp_path))
    # a run fails on it first: before the model (here, a path that does not exist) is looked at
    from jaxrlhf.train import load_config, train

    overrides = [f"train.output_dir={tmp_path}/run", "train.report_to=wandb", f"model.path={tmp_path}/x"]
    cfg = load_config(os.path.join(REPO, "configs", "sft_demo.yaml"), overrides)
    with pytest.raises(TrackerError, match="pip install wandb"):
        train(cfg)
    assert TrainConfig(report_to=["wandb", "tensorboard"], tensorboard=False).trackers == ["wandb"]


def test_tensorboard_wandb_and_trackio_read_back(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    tiny, out = tiny_with_demo_tokenizer(tmp_path), str(tmp_path / "run")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio")}  # fmt: skip
    common = [*grpo_cli_args(tiny, out), "train.tensorboard=true",
              "train.report_to=[tensorboard, wandb, trackio]", "train.project=tests",
              "train.run_name=tiny-grpo", "train.log_completions=true", "train.num_completions_to_print=3",
              "train.log_every=1", "task_eval.enabled=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "jaxrlhf", "train", "grpo"]
    proc = subprocess.run([*cmd, *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        train = {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}
    assert sorted(train) == [1, 2]
    with open(os.path.join(out, "completions.jsonl")) as f:
        completions = [json.loads(line) for line in f]
    assert [r["step"] for r in completions] == [1, 1, 1, 2, 2, 2]  # 3 rows at each logged step
    assert all(set(r) == {"step", "prompt", "completion", "reward"} for r in completions)

    # TensorBoard: the scalars as {split}/{name}, the table as Markdown text
    events = tensorboard_events(os.path.join(out, "tensorboard"))
    loss = [(s, round(v, 5)) for s, tag, v in events if tag == "train/loss"]
    assert loss == [(s, round(train[s]["loss"], 5)) for s in (1, 2)]
    (text, _) = [v for _, tag, v in events if tag == "completions/text_summary"]
    assert text.startswith("| prompt | completion | reward |")
    assert text.count("\n") == 4  # the header, the rule and 3 rows

    # W&B (offline): the run's name and project, its history and the completions table
    (run_dir,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    run = next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("tests", "tiny-grpo")
    history = wandb_history(run_dir)
    want_loss = {s: round(train[s]["loss"], 5) for s in (1, 2)}
    for step in (1, 2):  # every scalar of the train row, as metrics.jsonl has it
        (row,) = [h for h in history if h["_step"] == step and "train/loss" in h]
        want = {f"train/{k}": v for k, v in train[step].items() if k not in ("step", "split", "time")}
        assert {k: row[k] for k in want} == pytest.approx(want)
    assert len(want) > 20 and want["train/entropy"] > 0
    tables = [h for h in history if "completions/path" in h]  # a table is logged as a file
    shapes = [(h["_step"], h["completions/nrows"], h["completions/ncols"]) for h in tables]
    assert shapes == [(1, 3, 3), (2, 3, 3)]
    with open(os.path.join(run_dir, "files", tables[0]["completions/path"])) as f:
        table = json.load(f)
    assert table["columns"] == ["prompt", "completion", "reward"]
    want = [[r["prompt"], r["completion"], r["reward"]] for r in completions[:3]]
    assert [[p, c, pytest.approx(r)] for p, c, r in table["data"]] == want

    # Trackio: the same scalars and table in its local store (read in a process of its own: trackio
    # reads TRACKIO_DIR when it is imported)
    read = "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
    read += "print(json.dumps(S.get_logs('tests', 'tiny-grpo')))"
    proc = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    got = {r["step"]: r["train/loss"] for r in logs if "train/loss" in r}
    assert {s: round(v, 5) for s, v in got.items()} == want_loss
    rows = [r["completions"]["_value"] for r in logs if "completions" in r]
    got_rows = [[x["prompt"], x["completion"], pytest.approx(x["reward"])] for x in rows[0]]
    assert got_rows == [[r["prompt"], r["completion"], r["reward"]] for r in completions[:3]]

    # a resumed run continues the same W&B run (the id kept in output_dir/wandb_run_id)
    run_id = open(os.path.join(out, "wandb_run_id")).read()
    proc = subprocess.run([*cmd, *common, "train.max_steps=3", "train.report_to=wandb"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(d.endswith(run_id) for d in runs)
    assert [h["_step"] for h in wandb_history(runs[1]) if "train/loss" in h] == [3]
