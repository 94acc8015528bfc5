"""Experiment trackers behind `train.report_to` (TRL's name): TensorBoard, Weights & Biases, Trackio.

Each tracker takes the scalars `MetricsLogger` writes to ``metrics.jsonl`` (as ``{split}/{name}``
at the training step) and tables of completions (`train.log_completions`). A tracker's package is
imported only when the run names it; a missing one is a one-line `TrackerError` saying what to
install. Only process 0 opens trackers.

* ``tensorboard``: tensorboardX event files in ``{output_dir}/tensorboard`` (a table as a Markdown
  text summary).
* ``wandb``: ``wandb.init(project=, name=, dir=output_dir, config=)``; the run id is kept in
  ``{output_dir}/wandb_run_id`` so a resumed run continues the same W&B run. ``WANDB_MODE=offline``
  writes the run under ``{output_dir}/wandb`` without a network (``wandb sync`` uploads it later).
* ``trackio``: ``trackio.init(project=, name=, config=, resume="allow")``, stored locally (a SQLite
  file per project under ``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from jaxrlhf.train.config import TRACKERS, ConfigError

_INSTALL = {"tensorboard": "tensorboardX", "wandb": "wandb", "trackio": "trackio"}


class TrackerError(ConfigError):
    """A tracker named in `train.report_to` cannot be used (its package is missing)."""


Rows = Sequence[Sequence[Any]]


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...
    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Rows) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(_INSTALL[name])
    except ImportError as e:
        raise TrackerError(
            f"train.report_to names {name!r}, but {_INSTALL[name]} is not installed: "
            f"pip install {_INSTALL[name]} (or pip install 'jaxrlhf[trackers]')"
        ) from e


class TensorBoardTracker:
    def __init__(self, output_dir: str):
        self._writer = _import("tensorboard").SummaryWriter(logdir=os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step)

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Rows) -> None:
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self._writer.add_text(name, "\n".join(lines), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _RunTracker:
    """A W&B or Trackio run: both log dicts at a step, and tables as their own `Table` type."""

    _run: Any
    _table: Any

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Rows) -> None:
        self._run.log({name: self._table(columns=list(columns), data=[list(r) for r in rows])}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class WandbTracker(_RunTracker):
    def __init__(
        self, output_dir: str, *, project: str | None, run_name: str | None, config: Mapping[str, Any]
    ):
        wandb = _import("wandb")
        id_file = os.path.join(output_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:8]
        with open(id_file, "w") as f:
            f.write(run_id)
        self._table = wandb.Table
        self._run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or "jaxrlhf", name=run_name, dir=output_dir,
            config=dict(config), id=run_id, resume="allow",
        )  # fmt: skip


class TrackioTracker(_RunTracker):
    def __init__(self, *, project: str | None, run_name: str | None, config: Mapping[str, Any]):
        trackio = _import("trackio")
        self._table = trackio.Table
        self._run = trackio.init(
            project=project or os.environ.get("TRACKIO_PROJECT") or "jaxrlhf", name=run_name,
            config=dict(config), resume="allow",
        )  # fmt: skip


def check_installed(names: Sequence[str]) -> None:
    """`TrackerError` for a name that is not a tracker, or whose package does not import."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(
            f"unknown tracker(s) {unknown}: train.report_to takes {', '.join(TRACKERS)}, or none"
        )
    for name in names:
        _import(name)


def make_trackers(
    names: Sequence[str], output_dir: str, *, project: str | None = None, run_name: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Tracker]:  # fmt: skip
    """The trackers `names` (a subset of `TRACKERS`), opened for the run in `output_dir`; every
    package is checked before any tracker starts, so a missing one fails before a run is created."""
    check_installed(names)
    run_name = run_name or os.path.basename(os.path.normpath(output_dir))
    config = config or {}
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(output_dir))
        elif name == "wandb":
            out.append(WandbTracker(output_dir, project=project, run_name=run_name, config=config))
        else:
            out.append(TrackioTracker(project=project, run_name=run_name, config=config))
    return out
