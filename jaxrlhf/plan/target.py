"""The devices a plan compiles for: a TPU slice from libtpu's topology, GPUs from XLA's CUDA plugin
and a target description, or N fake CPU devices.

No TPU is needed: `jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)`
returns the devices of a slice described by libtpu (the TPU runtime's compiler, which `pip install
"jax[tpu]"` brings), and `jax.jit(...).lower(...).compile()` on a `Mesh` over them runs the real TPU
compiler. Nothing is executed; the compiled program only yields its memory analysis and HLO.

Chip figures are the public per-chip numbers (Google Cloud's TPU pages; NVIDIA's data sheets), dense
bf16, and the links' one-way bandwidth per direction as in "How to Scale Your Model" (jax-ml, 2025).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

GB = 1e9


class PlanError(ValueError):
    """A plan that cannot be made as asked (no libtpu, an unknown topology): one line for the user."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gb: float  # HBM per chip
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # ICI / NVLink, one way, bytes/s per link
    clock_hz: float  # TensorCore clock: the compiler's `estimated_cycles` are in these cycles


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 275e12, 1.2e12, 4.5e10, 1.05e9),
    "v5e": Chip("v5e", 16.0, 197e12, 8.1e11, 4.5e10, 1.5e9),
    "v5p": Chip("v5p", 95.0, 459e12, 2.76e12, 9.0e10, 1.75e9),
    "v6e": Chip("v6e", 32.0, 918e12, 1.64e12, 9.0e10, 1.75e9),
    "h100": Chip("h100", 80.0, 989e12, 3.35e12, 4.5e11, 1.83e9),
    "h200": Chip("h200", 141.0, 989e12, 4.8e12, 4.5e11, 1.83e9),
    "cpu": Chip("cpu", 95.0, 1e12, 1e11, 1e10, 1e9),  # fake host devices: memory only
}
# the generation names libtpu's topologies use (`v5e:2x2`, `v5p:4x4x4`, `v6e:4x4`, `v4:2x2x1`)
TPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e", "v6": "v6e"}
INSTALL = 'pip install "jax[tpu]=={version}"'
INSTALL_GPU = 'pip install "jax-cuda12-plugin=={version}"'
# XLA's GPU target descriptions (openxla/xla, xla/backends/gpu/target_config/specs): the compiler's
# view of a GPU it cannot see; shipped in jaxrlhf/plan/gpu/
GPU_SPECS = {"h100": "h100.txtpb", "h200": "h200.txtpb"}


@dataclasses.dataclass
class Target:
    """What a plan compiles for: devices to build the mesh on, and the chip they are."""

    platform: str  # tpu, gpu or cpu
    name: str  # the topology (`v5p:4x4x4`, `h100:8`) or `cpu:N`
    devices: list[Any]
    chip: Chip

    @property
    def count(self) -> int:
        return len(self.devices)


def gpu_target(topology: str) -> Target:
    """`h100:8` (8 GPUs on one host) or `h200:2x8` (2 hosts of 8): devices of XLA's GPU compiler,
    from the CUDA plugin and a target description, without a GPU. The plugin is the compiler (its
    PTX assembler built in); no CUDA libraries, driver or GPU are needed."""
    name, _, shape = topology.strip().lower().partition(":")
    if name not in GPU_SPECS or not re.fullmatch(r"\d+(x\d+)?", shape):
        raise PlanError(
            f"unknown GPU topology {topology!r}: expected h100:N or h200:N (N GPUs on one host) or "
            f"h100:HxN (H hosts of N GPUs)"
        )
    hosts, _, per_host = shape.rpartition("x")
    import jax

    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise PlanError("planning for GPU needs XLA's CUDA plugin (the GPU compiler; no GPU needed): "
                        + INSTALL_GPU.format(version=jax.__version__))  # fmt: skip
    from jax.experimental import topologies

    spec_path = os.path.join(os.path.dirname(__file__), "gpu", GPU_SPECS[name])
    with open(spec_path, encoding="utf-8") as f:
        config = f.read()
    try:
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology=f"1x{hosts or 1}x{per_host}"
        )
    except Exception as e:  # the plugin's own message, first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"XLA's GPU compiler cannot describe {topology!r}: {first}") from None
    return Target("gpu", topology.strip(), list(desc.devices), CHIPS[name])


def quiet_libtpu() -> None:
    """libtpu looks for the TPU VM it runs on (metadata server, worker hostnames) and logs warnings
    when there is none, and lets one process at a time load it (a lock file in /tmp); a
    compile-only plan needs none of it (jax's own multi-process tests allow several loads too)."""
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # fmt: skip
        os.environ.setdefault(key, value)


def chip_of(topology: str) -> Chip:
    """`v5p:4x4x4` -> the v5p chip; a PlanError naming the known generations otherwise."""
    generation = topology.split(":")[0].strip().lower()
    if generation not in TPU_NAMES or not re.fullmatch(r"[\w]+:\d+(x\d+){1,2}", topology.strip()):
        raise PlanError(
            f"unknown TPU topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of "
            f"v4, v5e, v5p, v6e (e.g. v5p:4x4x4 = 64 v5p chips, v5e:16x16 = 256 v5e chips)"
        )
    return CHIPS[TPU_NAMES[generation]]


def tpu_target(topology: str) -> Target:
    """The devices of a TPU slice, from libtpu's compiler (no TPU needed)."""
    chip = chip_of(topology)
    if importlib.util.find_spec("libtpu") is None:
        import jax

        raise PlanError(
            "planning for TPU needs libtpu, the TPU compiler: "
            + INSTALL.format(version=jax.__version__)
            + " (no TPU needed)"
        )
    quiet_libtpu()
    from jax.experimental import topologies

    generation, dims = topology.strip().split(":")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation.lower()}:{dims}")
    except Exception as e:  # libtpu's own message, first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"libtpu cannot describe topology {topology!r}: {first}") from None
    return Target("tpu", topology.strip(), list(desc.devices), chip)


def set_host_devices(count: int) -> None:
    """Ask XLA for `count` host (CPU) devices: only possible before jax starts its backends (XLA
    reads the flag when it creates the CPU client, not when jax is imported)."""
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):
        raise RuntimeError("set the host device count before jax's backends start (any jax.devices())")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def cpu_target(count: int) -> Target:
    """`count` fake host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax)."""
    import jax

    devices = jax.devices("cpu")
    if len(devices) < count:
        raise PlanError(
            f"{count} CPU devices asked for, {len(devices)} available: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax is imported"
        )
    return Target("cpu", f"cpu:{count}", devices[:count], CHIPS["cpu"])


def resolve(platform: str, topology: str | None, devices: int | None) -> Target:
    if platform == "tpu":
        if not topology:
            raise PlanError("--platform tpu needs --topology, e.g. v5p:4x4x4 (64 chips) or v5e:2x2")
        return tpu_target(topology)
    if platform == "gpu":
        if not topology:
            raise PlanError("--platform gpu needs --topology, e.g. h100:8 (8 H100s) or h200:2x8")
        return gpu_target(topology)
    if platform == "cpu":
        return cpu_target(devices or 8)
    raise PlanError(f"unknown platform {platform!r}: expected tpu, gpu or cpu")
