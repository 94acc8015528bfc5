"""Metrics logging (JSON lines, TensorBoard, a tqdm progress bar) and MFU helpers.

`MetricsLogger.log(step, metrics, split=...)` writes one line per call to ``{output_dir}/metrics.jsonl``::

    {"step": 100, "split": "train", "time": 1732521600.5, "loss": 0.61, "learning_rate": 1e-06}

(``time`` is Unix wall-clock seconds; a non-finite value is written as ``null`` to keep the file strict
JSON), the same scalars as ``{split}/{name}`` to the trackers of `report_to` (TensorBoard event files
in ``{output_dir}/tensorboard`` by default; Weights & Biases, Trackio: `jaxrlhf.train.trackers`), and
moves the progress bar to ``step`` with a few key metrics in its postfix. Only process 0 writes
anything (all processes may call it).

MFU (model FLOPs utilisation) uses the usual ``6 * N`` FLOPs per trained token (forward 2N + backward
4N, attention ignored; Kaplan et al. 2020): ``mfu = 6 * N * tokens_per_second / peak_flops``.
`device_peak_flops` gives a rough dense bf16 peak per device from its ``device_kind``:

========================================  ==================
device_kind contains                      peak (FLOP/s)
========================================  ==================
TPU v2 (per core)                         22.5e12
TPU v3 (per core)                         61.5e12
TPU v4                                    275e12
TPU v5 lite (v5e)                         197e12
TPU v5 / v5p                              459e12
TPU v6 lite (v6e, Trillium)               918e12
TPU7x (Ironwood)                          2307e12
NVIDIA GB200 / B200                       2250e12
NVIDIA B100                               1750e12
NVIDIA H100 PCIe                          756e12
NVIDIA H100 NVL                           835e12
NVIDIA H100 (SXM) / H800 / H200 / GH200   989e12
NVIDIA H20                                148e12
NVIDIA A100 / A800                        312e12
NVIDIA L40S                               362e12
NVIDIA L40                                181e12
NVIDIA L4                                 121e12
NVIDIA A10 (A10G: 70e12)                  125e12
NVIDIA RTX 4090                           165e12
NVIDIA V100 (fp16)                        125e12
NVIDIA T4 (fp16)                          65e12
CPU and anything else                     None
========================================  ==================

These are datasheet numbers without sparsity; real attainable peaks are lower.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrlhf.train.trackers import make_trackers

__all__ = ["MetricsLogger", "device_peak_flops", "mfu", "PEAK_FLOPS"]

# (lower-case substring of device_kind, dense bf16 FLOP/s per device); the first match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v2", 22.5e12),
    ("tpu v3", 61.5e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v6", 918e12),
    ("tpu7x", 2307e12),
    ("tpu v7", 2307e12),
    ("gb200", 2250e12),
    ("b200", 2250e12),
    ("b100", 1750e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h20", 148e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("h800", 989e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("rtx 4090", 165e12),
    ("v100", 125e12),
    ("t4", 65e12),
)

# Metrics shown in the progress bar's postfix, in this order, when present.
DEFAULT_POSTFIX = (
    "loss",
    "learning_rate",
    "lr",
    "rewards/accuracies",
    "accuracy",
    "grad_norm",
    "tokens_per_second",
    "mfu",
)


def _match(kind: str, key: str) -> bool:
    """`key` occurs in `kind` as whole words ("h20" does not match "h200", nor "l4" "l40")."""
    start = kind.find(key)
    while start != -1:
        end = start + len(key)
        if (start == 0 or not kind[start - 1].isalnum()) and (end == len(kind) or not kind[end].isalnum()):
            return True
        start = kind.find(key, start + 1)
    return False


def device_peak_flops(device: Any = None) -> float | None:
    """Rough dense bf16 peak FLOP/s of one `device` (default: ``jax.devices()[0]``) from the table in
    the module docstring; None for CPUs and unknown kinds."""
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", "") == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, flops in PEAK_FLOPS:
        if _match(kind, key):
            return flops
    return None


def _num_params(params: Any) -> int:
    if isinstance(params, int | float):
        return int(params)
    import jax

    return sum(int(math.prod(getattr(x, "shape", ()))) for x in jax.tree.leaves(params))


def mfu(
    tokens_per_second: float,
    params: Any,
    *,
    peak_flops: float | None,
    flops_per_token_per_param: float = 6.0,
) -> float | None:
    """Model FLOPs utilisation: ``6 * N * tokens_per_second / peak_flops``.

    `params`: the parameter count ``N`` or a pytree of arrays (their sizes are summed).
    `peak_flops`: the peak of *all* devices that processed those tokens (e.g.
    ``device_peak_flops() * jax.device_count()``); None gives None. Pass
    ``flops_per_token_per_param=8`` to also count a forward-only reference model (DPO).
    """
    if peak_flops is None or peak_flops <= 0:
        return None
    return flops_per_token_per_param * _num_params(params) * float(tokens_per_second) / peak_flops


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a scalar number, got {value!r}") from None


def _format(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl``, TensorBoard and a tqdm progress bar (process 0 only).

    `total_steps`: the last step, for the bar's ETA (None: no ETA). `start_step`: the step training
    starts (or resumes) from. `process_index`: this process (default ``jax.process_index()``).
    `postfix_keys`: the metrics shown in the bar (default `DEFAULT_POSTFIX`). `report_to`: the
    trackers (`jaxrlhf.train.trackers.TRACKERS`; None: TensorBoard when `tensorboard`), opened with
    `project`, `run_name` and the run's `config`. Use as a context manager or call `close`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        total_steps: int | None,
        tensorboard: bool = True,
        console: bool = True,
        process_index: int | None = None,
        start_step: int = 0,
        postfix_keys: Sequence[str] = DEFAULT_POSTFIX,
        report_to: Sequence[str] | None = None,
        project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.output_dir = os.fspath(output_dir)
        self.enabled = process_index == 0
        self.postfix_keys = tuple(postfix_keys)
        self._file = None
        self._trackers: list[Any] = []
        self._bar = None
        self._last_step = start_step
        if not self.enabled:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        self.jsonl_path = os.path.join(self.output_dir, "metrics.jsonl")
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        names = ["tensorboard"] if report_to is None else list(report_to)
        if not tensorboard and "tensorboard" in names:
            names.remove("tensorboard")
        try:
            self._trackers = make_trackers(names, self.output_dir, project=project, run_name=run_name,
                                           config=config)  # fmt: skip
        except BaseException:
            self.close()
            raise
        if console:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Record `metrics` (scalars: Python, NumPy or JAX) of `split` at `step`."""
        if not self.enabled:
            return
        step = int(step)
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        record: dict[str, Any] = {"step": step, "split": split, "time": time.time()}
        for name, value in values.items():
            if name in ("step", "split", "time"):
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = value if math.isfinite(value) else None
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tracker in self._trackers:
            tracker.log(step, {f"{split}/{name}": value for name, value in values.items()})
        if self._bar is not None:
            shown = {k: _format(values[k]) for k in self.postfix_keys if k in values}
            if split == "train":
                if shown:
                    self._bar.set_postfix(shown, refresh=False)
                self.progress(step)
            else:
                body = " ".join(f"{k}={_format(v)}" for k, v in values.items())
                self.print(f"step {step} {split}: {body}")

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table (e.g. prompts, completions and rewards) at `step`: one JSON line per row in
        ``{output_dir}/{name}.jsonl`` (with ``step``) and a table in every tracker."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, f"{name}.jsonl"), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": int(step), **dict(zip(columns, row, strict=True))}) + "\n")
        for tracker in self._trackers:
            tracker.log_table(int(step), name, columns, rows)

    def progress(self, step: int) -> None:
        """Move the progress bar to `step` without logging anything."""
        if self._bar is not None and step > self._last_step:
            self._bar.update(step - self._last_step)
            self._last_step = step

    def print(self, msg: str) -> None:
        """Print `msg` (process 0 only) without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(str(msg))
        else:
            print(msg, flush=True)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        for tracker in self._trackers:
            tracker.flush()

    def close(self) -> None:
        """Flush and close the file, the trackers and the bar (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
