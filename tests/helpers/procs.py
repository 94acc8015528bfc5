"""Child processes of the suite: the environment for a JAX process on simulated CPU devices."""

from __future__ import annotations

import os
import re


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment for a child JAX process on `devices` simulated CPU devices: the device
    count joins the XLA flags the suite already sets (tests/conftest.py), it does not replace them."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}
