"""Two processes joined by jax.distributed on CPU (2 devices each) train DPO with the same losses as
one process: each host feeds only its share of every global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from test_trainer import _overrides, data_files, tiny_dir  # noqa: F401  (fixtures)

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxrlhf.train import load_config
    from jaxrlhf.train.trainer import train
    overrides = sys.argv[1:]
    result = train(load_config(None, overrides, kind="dpo"))
    assert jax.process_count() == int({n}), jax.process_count()
    print("LOSSES", [round(m["loss"], 7) for m in result.train_metrics])
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(n: int, overrides: list[str], devices_per_process: int) -> list[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}  # fmt: skip
    port = _free_port()
    procs = []
    for i in range(n):
        extra = [] if n == 1 else [f"mesh.coordinator_address=127.0.0.1:{port}", f"mesh.num_processes={n}",
                                   f"mesh.process_id={i}"]  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER.format(n=n), *overrides, *extra], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append(out)
    return outs


def _losses(out: str) -> list[float]:
    line = next(line for line in out.splitlines() if line.startswith("LOSSES"))
    return json.loads(line[len("LOSSES") :])


def test_two_processes_match_one(tiny_dir, data_files, tmp_path):  # noqa: F811
    common = {
        "train.max_steps": 3,
        "train.save_every": 0,
        "train.grad_accum_steps": 1,
        "dpo.reference": "same_step",
        "mesh.fsdp": 2,
    }
    one = _run(1, _overrides(tiny_dir, data_files, str(tmp_path / "one"), **common), devices_per_process=4)
    two = _run(2, _overrides(tiny_dir, data_files, str(tmp_path / "two"), **common), devices_per_process=2)
    ref = _losses(one[0])
    assert len(ref) == 3 and abs(ref[2] - ref[0]) > 1e-3  # the losses move: not trivially ln 2
    for out in two:  # every process reports the same global losses as the single process
        got = _losses(out)
        assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-5, (got, ref)
