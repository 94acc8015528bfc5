"""bench/bench_grpo_vs_trl.py --tiny: one warm-up and one timed GRPO step of jaxrlhf and of TRL's
GRPOTrainer on a tiny random model, so the comparison script cannot rot (its numbers are not checked:
only that both sides ran the same, equal-length work)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_grpo_vs_trl.py")


def test_bench_grpo_vs_trl_tiny(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "grpo.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    jax, trl = results["jax"], results["trl"]
    n = jax["settings"]["max_completion_length"]
    for r in (jax, trl):
        assert len(r["all"]) == 2  # warm-up + 1 timed step
        for step in r["all"]:
            assert step["completion_length"] == n  # fixed-length completions on both sides
            assert step["optimizer_steps"] == 1
            assert step["generation"] > 0 and step["update"] > 0 and step["scoring"] >= 0
            assert step["generation"] + step["scoring"] + step["update"] <= step["total"] + 1e-6
    assert jax["same_prompt_ids"]
    assert jax["speedup_vs_trl"]["total"] > 0
    assert "| jaxrlhf |" in proc.stdout and "| TRL " in proc.stdout
