"""The project's own steps compiled by the TPU compiler (libtpu, no TPU), and `jaxrlhf plan`.

A tiny model's DPO step with splash attention (Mosaic), scanned layers and an `fsdp x tensor` mesh
compiles for `v5e:2x2`, and its memory analysis is checked against the bytes of its sharded inputs
and the arithmetic of docs/scaling.md; the FLOPs counted from its HLO against the model FLOPs by
formula; the rollout sampler and the GRPO update compile too. `jaxrlhf plan` prints a verdict and
writes its JSON; a missing libtpu and an unknown topology are one-line errors with exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf.plan import planner
from jaxrlhf.plan.arithmetic import Dims, attention_flops, model_flops
from jaxrlhf.plan.models import LLAMA31_8B
from jaxrlhf.plan.run import overrides_for
from jaxrlhf.plan.steps import PlanSpec
from jaxrlhf.plan.target import tpu_target

TINY: dict[str, Any] = {
    **LLAMA31_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024,
}  # fmt: skip
MESH = {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def v5e() -> Any:
    return tpu_target("v5e:2x2")


@pytest.fixture(scope="module")
def dpo_row(v5e: Any) -> dict[str, Any]:
    return planner.compile_plan(PlanSpec("tiny", TINY, "dpo_same_step", MESH, batch=8, seq=256), v5e)


def test_dpo_step_compiles_with_splash_scan_and_fsdp_x_tensor(dpo_row: dict[str, Any]) -> None:
    row = dpo_row
    assert row["attention_backend"] == "splash" and row["scanned"] and row["kernel_calls"] > 0
    inputs = row["inputs"]
    # the compiler's arguments are exactly the per-device bytes of what was passed at its sharding
    passed = inputs["params"] + inputs["opt_state"] + inputs["batch"] + inputs["reference"]
    assert row["argument"] == pytest.approx(passed, rel=0.02)
    # ... which is a quarter of the whole state (split over fsdp x tensor), the batch aside
    assert row["argument"] - inputs["batch"] == pytest.approx(inputs["state_unsharded"] / 4, rel=0.05)
    assert row["alias"] >= 0.99 * (inputs["params"] + inputs["opt_state"])  # the state is donated
    est = row["estimate"]
    assert row["argument"] == pytest.approx(est["args"], rel=0.10)
    # the arithmetic (docs/scaling.md) bounds the peak: at least the inputs and one chunk of float32
    # logits are live at once; at most everything it counts (XLA:TPU fuses more of one layer's
    # working set away than the formula assumes: 14.4 against 30.1 MB here)
    assert est["args"] + est["logits"] / 2 <= row["total"] <= est["total"], (row["total"], est)
    assert row["fits"] and row["hbm"] == 16e9


def test_dpo_step_flops_and_time_against_the_arithmetic(dpo_row: dict[str, Any]) -> None:
    """The HLO's matmul FLOPs are the model FLOPs of a same-step DPO step with full remat (the
    layers' forward once more; attention runs inside splash and is not in the HLO's dots)."""
    row, d = dpo_row, Dims(V=1024, D=256, F=512, L=2, N=4, K=2, H=64)
    tokens = row["batch"] * row["seq"]
    attention = attention_flops(d, "dpo_same_step", tokens, row["seq"], "none") / 4
    model = model_flops(d, "dpo_same_step", tokens, row["seq"]) / 4
    layers = 2 * tokens * d.L * (d.layer_params - 2 * d.D) / 4  # one forward of the layers' matmuls
    expected = model - attention + layers
    assert row["flops"] == pytest.approx(expected, rel=0.05)
    assert row["model_flops"] == pytest.approx(4 * model)
    assert row["step_s"] == pytest.approx(max(row["compute_s"], row["ici_s"]))
    assert row["step_s"] >= row["flops"] / 197e12  # never faster than v5e's peak
    assert 0 < row["mfu"] < 1 and 0 < row["hfu"] < 1
    assert row["collective_bytes"]["all-gather"] > 0


def test_rollout_sampler_and_grpo_update_compile_for_tpu(v5e: Any) -> None:
    gen = planner.compile_plan(PlanSpec("tiny", TINY, "grpo_generate", MESH, batch=2, seq=192,
                                        prompt_len=64, num_generations=4), v5e)  # fmt: skip
    assert (gen["prompt_len"], gen["seq"]) == (64, 192)
    assert 128 in [n for _, n in gen["loops"]] and not gen["unknown_loops"]  # 128 decode steps
    assert gen["attention_backend"] == "splash" and gen["kernel_calls"] > 0  # the prefill
    update = planner.compile_plan(PlanSpec("tiny", TINY, "grpo", MESH, batch=2, seq=192, prompt_len=64,
                                           num_generations=4, accum=2), v5e)  # fmt: skip
    assert sorted(n for _, n in update["loops"] if n in (1, 2))[-1] == 2  # the 2 minibatches
    assert update["alias"] >= 0.99 * (update["inputs"]["params"] + update["inputs"]["opt_state"])


def test_candidates_and_overrides() -> None:
    """What `jaxrlhf plan` tries when a step does not fit, nearest first, and how it says so."""
    target = dataclasses.make_dataclass("T", [("count", int), ("name", str)])(64, "v5p:4x4x4")
    spec = PlanSpec("8b", LLAMA31_8B, "dpo_same_step", {"data": 1, "fsdp": 64, "tensor": 1}, remat="none")
    found = [(c.remat, c.accum, c.frozen_dtype, c.mesh["tensor"]) for c in planner.candidates(spec, target)]
    assert found[:3] == [
        ("dots_saveable", 1, "float32", 1), ("dots_with_no_batch_dims_saveable", 1, "float32", 1),
        ("full", 1, "float32", 1),
    ]  # fmt: skip
    assert ("full", 2, "float32", 1) not in found  # 64 pairs on 64 devices: no room for micro-batches
    assert ("none", 1, "bfloat16", 1) in found and ("none", 1, "float32", 8) in found
    mesh = {"data": 1, "fsdp": 8, "tensor": 8}
    row = {"remat": "full", "accum": 1, "frozen_dtype": "bfloat16", "mesh_sizes": mesh}
    assert overrides_for(spec, row) == ["model.remat=full", "model.frozen_dtype=bfloat16", "mesh.fsdp=8",
                                        "mesh.tensor=8"]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "overrides", "steps"),
    [
        ("dpo", [], ["dpo_same_step"]),
        ("dpo", ["dpo.reference=precompute"], ["dpo"]),
        ("kto", [], ["dpo_same_step"]),  # KTO's rows are DPO's packed rows: prompt, completion, KL one
        ("kto", ["kto.precompute_ref_log_probs=true"], ["dpo"]),
        ("rloo", ["grpo.reward_funcs=[a:b]", "grpo.num_generations=4"], ["grpo", "grpo_generate"]),
        ("online_dpo", ["online_dpo.reward_funcs=[a:b]"], ["grpo", "grpo_generate"]),
    ],
)
def test_each_method_says_which_steps_its_run_compiles(
    kind: str, overrides: list[str], steps: list[str]
) -> None:
    """`jaxrlhf plan` asks the method (no compile here): the steps and, for the group methods, G."""
    from jaxrlhf.plan.run import specs_from_config
    from jaxrlhf.train import load_config

    target = dataclasses.make_dataclass("T", [("count", int)])(8)
    cfg = load_config(None, ["data.max_length=128", "data.max_prompt_length=64", *overrides], kind=kind)
    specs = specs_from_config(cfg, target, TINY)
    assert [s.step for s in specs] == steps
    if kind == "online_dpo":
        assert specs[0].num_generations == 2 and specs[0].seq == 64 + cfg.online_dpo.max_new_tokens
    if kind == "rloo":
        assert specs[0].num_generations == 4


@pytest.fixture
def run_config(tmp_path: Any) -> str:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))  # shapes only: no weights, no tokenizer
    config = {
        "kind": "dpo",
        "model": {"path": str(model), "remat": "full", "dtype": "bfloat16"},
        "data": {"train_files": "unused.jsonl", "max_length": 128, "max_prompt_length": 64},
        "train": {"batch_size": 8},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_plan_cli_prints_a_verdict_and_writes_json(run_config: str, tmp_path: Any, capsys: Any) -> None:
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--config", run_config, "--topology", "v5e:2x2", "--json", str(out),
                     "train.batch_size=4"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "verdict: fits on v5e:2x2" in printed and "estimated by the TPU compiler" in printed
    result = json.loads(out.read_text())
    assert result["fits"] and result["devices"] == 4 and result["chip"]["name"] == "v5e"
    (row,) = result["rows"]
    # the run's own settings: a packed pair row is prompt + chosen + rejected, the mesh's -1 resolved
    assert (row["step"], row["batch"], row["seq"], row["target_len"]) == ("dpo_same_step", 4, 192, 128)
    assert row["mesh_sizes"] == {"data": 1, "fsdp": 2, "tensor": 2} and row["remat"] == "full"
    assert row["mfu"] > 0 and row["attention_backend"] == "splash"


def test_plan_cli_one_line_errors(run_config: str, monkeypatch: Any, capsys: Any) -> None:
    code = cli.main(["plan", "--config", run_config, "--topology", "v9:2x2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown TPU topology 'v9:2x2'" in err
    code = cli.main(["plan", "--config", run_config, "--topology", "v5e:3x3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "libtpu cannot describe topology 'v5e:3x3'" in err
    code = cli.main(["plan", "--config", run_config, "--topology", "v5e:2x2", "mesh.fsdp=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "the slice has 4" in err
    real = importlib.util.find_spec
    no_libtpu = lambda name, *a: None if name == "libtpu" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", no_libtpu)
    code = cli.main(["plan", "--config", run_config, "--topology", "v5e:2x2"])
    err = capsys.readouterr().err.strip()
    import jax

    assert code == 2 and len(err.splitlines()) == 1
    assert f'pip install "jax[tpu]=={jax.__version__}"' in err and err.startswith("error: ")
    assert os.environ.get("JAX_PLATFORMS") == "cpu"  # the plan never starts a TPU runtime


def test_plan_for_gpus_without_a_gpu(run_config: str, tmp_path: Any) -> None:
    """`--platform gpu`: XLA's CUDA plugin compiles the run for 4 H100s from their target description
    (no GPU, no CUDA libraries). The plugin lives in .venv/gpu-plugin (Makefile), outside the venv's
    packages, so only this child process loads it. cuDNN attention cannot compile without the cuDNN
    library: the plan falls back to XLA attention and says so. No time estimate on GPU."""
    import subprocess
    import sys

    from helpers.scripts import ROOT

    plugin = os.path.join(ROOT, ".venv", "gpu-plugin")
    assert os.path.isdir(os.path.join(plugin, "jax_plugins")), "no XLA CUDA plugin: run `make install`"
    out = tmp_path / "gpu.json"
    path = os.pathsep.join([plugin, os.environ["PYTHONPATH"]])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "jaxrlhf", "plan", "--platform", "gpu", "--topology", "h100:4",
         "--config", run_config, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: fits on h100:4" in done.stdout and "planned with xla attention" in done.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["chip"]["name"] == "h100" and row["platform"] == "gpu" and row["attention_backend"] == "xla"
    inputs = row["inputs"]
    passed = inputs["params"] + inputs["opt_state"] + inputs["batch"] + inputs["reference"]
    assert row["argument"] == pytest.approx(passed, rel=0.02)
    assert row["flops"] > 0 and "step_s" not in row and row["collective_bytes"]


def test_plan_that_does_not_fit(run_config: str, tmp_path: Any, capsys: Any) -> None:
    """XLA:TPU refuses to compile a program whose temporaries exceed the chip's HBM
    (RESOURCE_EXHAUSTED): that is the verdict, with the bytes it asked for, and exit code 1."""
    out = tmp_path / "oom.json"
    overrides = ["train.batch_size=1024", "data.max_length=4096", "model.remat=none"]
    args = ["plan", "--config", run_config, "--topology", "v5e:2x2", "--no-search", "--json", str(out)]
    code = cli.main([*args, *overrides])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "DOES NOT FIT -- the TPU compiler needs" in printed
    assert "verdict: does not fit on v5e:2x2" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert "RESOURCE_EXHAUSTED" in row["oom"] and not row["fits"]
    assert row["temp"] > 16e9 and row["total"] > row["hbm"] and "step_s" not in row


def test_out_of_memory_message() -> None:
    message = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
               "memory required for HLO temporaries (297.47G) exceeds available HBM (15.75G).\n")  # fmt: skip
    parts = {"params": 1.0, "opt_state": 2.0, "batch": 3.0, "state_unsharded": 9.0}
    row = planner.out_of_memory(message, parts)
    assert row["temp"] == 297.47 * 2**30 and row["argument"] == 6.0 and row["oom"].startswith("jax.errors")


def test_grouped_reward_model_is_planned_on_its_group_rows(tmp_path: Any, v5e: Any) -> None:
    """`reward.group_by_prompt`: the plan reads the training rows for the largest prompt group and
    compiles `GroupedRewardObjective` on rows of a prompt and all its completions."""
    from jaxrlhf.plan.run import specs_from_config
    from jaxrlhf.train import load_config

    data = tmp_path / "ranked.jsonl"
    rows = [{"prompt": "A", "completions": ["a", "b", "c", "d", "e"], "scores": [0, 1, 2, 3, 3]},
            {"prompt": "B", "chosen": "x", "rejected": "y"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"data.train_files={data}", "data.max_length=96", "data.max_prompt_length=32",
                 "train.batch_size=4", "reward.group_by_prompt=true"]  # fmt: skip
    target = dataclasses.make_dataclass("T", [("count", int)])(4)
    (spec,) = specs_from_config(load_config(None, overrides, kind="reward"), target, TINY)
    # 5 completions, 9 comparisons (d and e tie) rounded up to 16; a row: the prompt + 5 completions
    assert (spec.step, spec.slots, spec.comparisons, spec.seq) == ("reward", 5, 16, 32 + 5 * 64)
    row = planner.compile_plan(dataclasses.replace(spec, mesh=MESH), v5e)
    assert row["fits"] and row["slots"] == 5
    # the compiled batch is the group rows' arrays, 2 rows per device (batch 4 over fsdp 2)
    per_row = 3 * 4 * spec.seq + 4 * 5 + 4 * 4 * 16 + 4
    assert row["inputs"]["batch"] == 2 * per_row
    (plain,) = specs_from_config(load_config(None, overrides[:-1], kind="reward"), target, TINY)
    assert (plain.slots, plain.seq) == (0, 96 + 64)
