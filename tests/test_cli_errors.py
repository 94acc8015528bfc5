"""Bad user input through the command line: a missing, pickle-only, unsupported or truncated
checkpoint, a bad data row, a bad config value -- each is one line `error: ...` on stderr naming the
bad path (or line / key), exit code 2, never a traceback, and found before anything heavy runs.

Each command meets a bad checkpoint in a real process (`python -m jaxrlhf ...`; every bad kind is
used, the subprocesses run concurrently from one module fixture and the tests read the results), and
every command x bad-checkpoint pair goes through `jaxrlhf.cli.main` in this process (the same code
path, without paying a Python + jax start-up for each of them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "jaxrlhf" / "assets" / "dpo_demo"
BAD_MODELS = ("missing", "pytorch_bin_only", "unknown_model_type", "truncated_safetensors")
COMMANDS = ("sft", "reward", "dpo", "ppo", "ppo_reward_model", "eval", "chat")
SUBPROCESS_CASES = {  # command -> the bad checkpoint it meets in a real process (every kind is used)
    "sft": "truncated_safetensors",
    "reward": "unknown_model_type",
    "dpo": "pytorch_bin_only",
    "ppo": "missing",
    "ppo_reward_model": "truncated_safetensors",
    "eval": "missing",
    "chat": "truncated_safetensors",
}
EXPECTED = {  # what the one line says about each bad checkpoint, besides its path
    "missing": "no such checkpoint directory",
    "pytorch_bin_only": "config.json",
    "unknown_model_type": "'falcon'",
    "truncated_safetensors": "model.safetensors",
}
WORKERS = 2  # concurrent processes (a 2-core machine)


def _bad_checkpoints(root: Path, good: Path) -> dict[str, Path]:
    bad = {name: root / name for name in BAD_MODELS}  # "missing" is never created
    bad["pytorch_bin_only"].mkdir()
    (bad["pytorch_bin_only"] / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle, never read")
    shutil.copytree(good, bad["unknown_model_type"])
    config = json.loads((good / "config.json").read_text())
    (bad["unknown_model_type"] / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    shutil.copytree(good, bad["truncated_safetensors"])
    weights = bad["truncated_safetensors"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut short: the header is intact
    return bad


def _data(root: Path) -> tuple[Path, Path, int]:
    """A small preference file, and a copy with blank lines and a row without `chosen` (its line)."""
    lines = (ASSETS / "train.jsonl").read_text().splitlines()[:8]
    good = root / "train.jsonl"
    good.write_text("\n".join(lines) + "\n")
    rows = [json.loads(line) for line in lines]
    del rows[4]["chosen"]
    text = [json.dumps(r) for r in rows]
    bad = root / "bad_row.jsonl"
    bad.write_text("\n".join(text[:2]) + "\n\n\n" + "\n".join(text[2:]) + "\n")  # row 4 is on line 7
    return good, bad, 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mini_dir):
    root = tmp_path_factory.mktemp("cli_errors")
    good = Path(mini_dir)  # a real tiny llama with SmolLM2's tokenizer (what the trainers and chat accept)
    train_file, bad_row_file, bad_line = _data(root)
    config = root / "tiny.yaml"
    config.write_text(
        f"data: {{train_files: {train_file}, max_length: 64, max_prompt_length: 32}}\n"
        "train: {batch_size: 4, max_steps: 1, tensorboard: false, export: false}\n"
    )
    return {"root": root, "good": good, "bad": _bad_checkpoints(root, good), "config": config,
            "train_file": train_file, "bad_row_file": bad_row_file, "bad_line": bad_line}  # fmt: skip


def _argv(setup, command: str, model: str, out: str, data: Path | None = None) -> list[str]:
    """The command line of `command` with a bad `model`; `data` replaces the (good) data file."""
    data = data or setup["train_file"]
    train = ["--config", str(setup["config"]), f"train.output_dir={out}", f"data.train_files={data}"]
    if command == "eval":
        return ["eval", "--model", model, "--data", str(data), "--output", f"{out}.json"]
    if command == "chat":
        return ["chat", "--model", model, "--prompt", "Hi"]
    if command == "ppo":
        reward = "ppo.reward_fn=helpers.ppo_rewards:digit_fraction"  # tests/ is on PYTHONPATH (conftest.py)
        return ["train", "ppo", *train, f"model.path={model}", reward]
    if command == "ppo_reward_model":  # a good policy, a bad reward model
        return ["train", "ppo", *train, f"model.path={setup['good']}", f"ppo.reward_model={model}"]
    return ["train", command, *train, f"model.path={model}"]


def _run(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxrlhf", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(setup):
    """Every command line of this file, run once (concurrently): name -> (process, seconds)."""
    root, bad = setup["root"], setup["bad"]
    runs = {
        command: _argv(setup, command, str(bad[kind]), str(root / f"out-{command}-{kind}"))
        for command, kind in SUBPROCESS_CASES.items()
    }
    runs["bad_row"] = _argv(setup, "dpo", str(setup["good"]), str(root / "out-bad-row"),
                            data=setup["bad_row_file"])  # fmt: skip
    runs["bad_config_value"] = _argv(setup, "dpo", str(setup["good"]), str(root / "out-cfg")) + [
        "train.on_nonfinite=sometimes"
    ]
    runs["demo"] = ["demo", f"model.path={bad['missing']}", f"train.output_dir={root / 'out-demo'}"]
    with ThreadPoolExecutor(WORKERS) as pool:
        done = dict(zip(runs, pool.map(_run, runs.values()), strict=True))
    return done


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return _assert_error_line(proc.stderr, *needles)


def _assert_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    err = stderr.strip()
    assert "\n" not in err and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _assert_nothing_written(out: Path) -> None:
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_checkpoint_in_a_process(results, setup, command):
    kind = SUBPROCESS_CASES[command]
    proc, _ = results[command]
    _assert_one_line_error(proc, str(setup["bad"][kind]), EXPECTED[kind])
    if command not in ("eval", "chat"):
        _assert_nothing_written(setup["root"] / f"out-{command}-{kind}")


@pytest.mark.parametrize("kind", BAD_MODELS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_bad_checkpoint_with_every_command(setup, capsys, command, kind):
    from jaxrlhf.cli import main

    out = setup["root"] / f"in-process-{command}-{kind}"
    missing_data = setup["root"] / "no_such_data.jsonl"  # the model is checked first: never reached
    code = main(_argv(setup, command, str(setup["bad"][kind]), str(out), data=missing_data))
    captured = capsys.readouterr()
    assert code == 2, (captured.out[-2000:], captured.err[-2000:])
    err = _assert_error_line(captured.err, str(setup["bad"][kind]), EXPECTED[kind])
    assert "no_such_data" not in err
    if command not in ("eval", "chat"):
        _assert_nothing_written(out)


def test_bad_data_row_names_its_line(results, setup):
    proc, _ = results["bad_row"]
    where = f"{setup['bad_row_file']}, line {setup['bad_line']}, field 'chosen': missing"
    _assert_one_line_error(proc, where)  # the progress bars of `datasets` are off: one line


def test_bad_config_value_names_the_key(results):
    proc, _ = results["bad_config_value"]
    _assert_one_line_error(proc, "train.on_nonfinite", "sometimes")


def test_demo_with_a_missing_model_fails_fast(results, setup):
    """The 135M demo: the model path is checked before the data, the reference log-probs or anything
    else heavy -- the run fails within seconds (Python and jax start-up)."""
    proc, seconds = results["demo"]
    _assert_one_line_error(proc, str(setup["bad"]["missing"]))
    assert "data:" not in proc.stdout  # no data was read
    assert seconds < 60, seconds


PPO_AND_DATA_MISTAKES = {  # overrides -> what the one line names
    "reward_fn_module": (["ppo.reward_fn=no_such_module:f"], "cannot import module 'no_such_module'"),
    "reward_fn_name": (["ppo.reward_fn=json:nope"], "module 'json' has no function 'nope'"),
    "reward_fn_form": (["ppo.reward_fn=ppo_rewards"], "expected 'module:function'"),
    "no_reward": (["ppo.reward_fn=null"], "exactly one of ppo.reward_model and ppo.reward_fn"),
    "mini_batches": (["ppo.num_mini_batches=3"], "multiple of ppo.num_mini_batches (3)"),
}


@pytest.mark.parametrize("case", sorted(PPO_AND_DATA_MISTAKES))
def test_ppo_config_mistakes_are_one_line(setup, capsys, case):
    from jaxrlhf.cli import main

    overrides, needle = PPO_AND_DATA_MISTAKES[case]
    argv = _argv(setup, "ppo", str(setup["good"]), str(setup["root"] / f"ppo-{case}")) + overrides
    assert main(argv) == 2
    _assert_error_line(capsys.readouterr().err, needle)


def test_too_little_data_is_one_line(setup, capsys):
    from jaxrlhf.cli import main

    argv = _argv(setup, "dpo", str(setup["good"]), str(setup["root"] / "small")) + ["train.batch_size=64"]
    assert main(argv) == 2
    _assert_error_line(capsys.readouterr().err, "8 training examples are fewer than one batch")
