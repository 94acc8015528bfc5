"""Training checkpoints (orbax) and graceful preemption.

`Checkpointer` saves a pytree of (possibly sharded) JAX arrays -- parameters, optax state, step
counters, typed PRNG keys -- together with a JSON-able ``extra`` dict (data-iterator position, the
config) under ``{directory}/{step}/``. Saves are asynchronous (the arrays are copied to host memory
before `save` returns, so the caller may donate or overwrite them right away; the writing goes on in
the background) and atomic: orbax writes ``{step}.orbax-checkpoint-tmp`` and renames it when
complete, so a save cut short (killed process) is never listed; its leftovers are deleted once the
next `Checkpointer` opens the directory (in the background, at the latest before its first save).
Only the last ``keep`` checkpoints are kept. `restore` reads a step into the shardings of an
abstract state, which may differ from the ones saved with (another mesh, another number of devices).

`PreemptionGuard` turns SIGTERM (what schedulers send before evicting a job; optionally SIGINT) into
a flag the training loop polls once per step. The intended loop::

    checkpointer = Checkpointer(f"{output_dir}/checkpoints", keep=cfg.train.keep_checkpoints)
    if (step := checkpointer.latest_step()) is not None:
        step, state, extra = checkpointer.restore(abstract_state=abstract_state)
        batches.restore(extra["data"])
    with PreemptionGuard() as guard:
        while step < total_steps:
            state, metrics = train_step(state, next(batches))
            step += 1
            extra = {"data": batches.state(), "config": config_to_dict(cfg)}
            if guard.should_stop(step):
                checkpointer.save(step, state, extra, force=True)
                checkpointer.wait()
                break
            if step % save_every == 0:
                checkpointer.save(step, state, extra)
    checkpointer.close()  # waits for the last save

On several hosts every process runs the same loop (saves are collective). `should_stop` then returns
the same answer on all of them: JAX's preemption sync point when the JAX distributed runtime has its
preemption service (it watches SIGTERM itself), else an all-gather of the local flags.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NonFiniteError", "PreemptionGuard", "all_finite"]

_FORMAT = 1
_ITEMS = ("state", "extra", "meta")


# --------------------------------------------------------------------------------------------------
# Typed PRNG keys: stored as their key data (uint32) plus the impl name, wrapped back on restore.


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _split_keys(state: Any) -> tuple[Any, dict[str, str]]:
    """`state` with every typed PRNG key array replaced by its key data, and {path: impl name}."""
    impls: dict[str, str] = {}

    def leaf(path: Any, x: Any) -> Any:
        if isinstance(x, jax.Array) and _is_key(x):
            impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map_with_path(leaf, state), impls


def _abstract(x: Any) -> Any:
    """A `jax.ShapeDtypeStruct` for an array leaf (keeping its sharding); other leaves pass through."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _key_data_abstract(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    # Key data has extra trailing dimensions; a NamedSharding's spec leaves them unsplit as is.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))


def _wrap_key(path: str, data: jax.Array, want: jax.ShapeDtypeStruct, impls: Mapping[str, str]) -> Any:
    impl: Any = impls.get(path)
    if impl is None:  # not saved as a typed key: take the impl of the requested dtype
        impl = getattr(want.dtype, "_impl", None)
        if impl is None:
            raise ValueError(f"checkpoint has no PRNG key implementation recorded for {path}")
    key = jax.random.wrap_key_data(data, impl=impl)
    if key.dtype != want.dtype:
        raise ValueError(f"{path}: checkpoint holds a {key.dtype} key, the abstract state wants {want.dtype}")
    return key


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray) or (isinstance(x, jax.Array) and x.is_fully_addressable):
        return np.asarray(x).tolist()
    raise TypeError(f"extra must be JSON-able; got a {type(x).__name__}: {x!r}")


class NonFiniteError(RuntimeError):
    """A loss, gradient norm or parameter is NaN or infinite."""


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one compiled reduction; on several
    processes every process must call it)."""
    leaves = [
        x for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
    ]  # fmt: skip
    return bool(_all_finite(leaves)) if leaves else True


# --------------------------------------------------------------------------------------------------


class Checkpointer:
    """Step-numbered checkpoints of a training state plus JSON ``extra`` in `directory` (orbax).

    `keep`: how many of the most recent checkpoints to keep (None: all). `async_save`: write in a
    background thread (`wait` / `close` block until done). All processes of a multi-host job must
    call `save` / `restore` together.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int | None = 3, async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None: keep all), got {keep}")
        path = os.fspath(directory)
        if "://" not in path:  # orbax wants absolute local paths
            path = os.path.abspath(os.path.expanduser(path))
        self.directory = path
        self.keep = keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            # Leftovers of interrupted saves (`<step>.orbax-checkpoint-tmp*`) are deleted in the
            # background from opening on; orbax waits for that before the first save.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(path, item_names=_ITEMS, options=options)

    # ---- queries

    def latest_step(self) -> int | None:
        """The newest step saved (or being saved by this object), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all kept checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    # ---- save

    def save(
        self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False
    ) -> bool:
        """Start saving `state` (a pytree of arrays) and `extra` (JSON-able) as `step`.

        Returns whether a save was started: False when `step` is already saved, or -- without
        `force` -- not newer than the latest checkpoint. A state with a NaN or infinite float raises
        `NonFiniteError` instead: a bad checkpoint is never written. The arrays are copied to host memory
        before this returns; call `wait` to block until the files are written.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if not all_finite(state):
            raise NonFiniteError(
                f"{self.directory}: not saving step {step}: the state holds NaN or infinite values "
                f"(the checkpoints kept are of earlier steps)"
            )
        extra_json = json.loads(json.dumps(dict(extra or {}), default=_json_default))
        raw_state, impls = _split_keys(state)
        meta = {"format": _FORMAT, "prng_keys": impls}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(raw_state),
            extra=ocp.args.JsonSave(extra_json),
            meta=ocp.args.JsonSave(meta),
        )
        saved = bool(self._manager.save(step, args=args, force=force))
        if not saved and not force and (latest := self._manager.latest_step()) is not None and latest > step:
            warnings.warn(
                f"checkpoint of step {step} skipped: {self.directory} already has the newer step {latest} "
                "(pass force=True to save it anyway)",
                stacklevel=2,
            )
        return saved

    def wait(self) -> None:
        """Block until every started save is on disk (raises the error of a failed save)."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    # ---- restore

    def _step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif int(step) not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})"
            )
        return int(step)

    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[int, Any, dict[str, Any]]:
        """Read checkpoint `step` (None: the latest) as ``(step, state, extra)``.

        `abstract_state` has the structure of the saved state, with `jax.ShapeDtypeStruct` leaves
        carrying the target ``.sharding`` (e.g. ``jax.eval_shape`` of the init function plus the
        shardings of the current mesh); concrete arrays are accepted too (their shape, dtype and
        sharding are used). Typed PRNG keys come back as typed keys.
        """
        step = self._step(step)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        impls: dict[str, str] = dict((meta or {}).get("prng_keys", {}))
        abstract = jax.tree.map(_abstract, abstract_state)
        wanted_keys: dict[str, jax.ShapeDtypeStruct] = {}

        def to_raw(path: Any, x: Any) -> Any:
            if isinstance(x, jax.ShapeDtypeStruct) and _is_key(x):
                wanted_keys[jax.tree_util.keystr(path)] = x
                return _key_data_abstract(x)
            return x

        raw_abstract = jax.tree_util.tree_map_with_path(to_raw, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(raw_abstract),
                extra=ocp.args.JsonRestore(),
            ),
        )

        def from_raw(path: Any, x: Any) -> Any:
            name = jax.tree_util.keystr(path)
            return _wrap_key(name, x, wanted_keys[name], impls) if name in wanted_keys else x

        state = jax.tree_util.tree_map_with_path(from_raw, restored["state"])
        return step, state, dict(restored["extra"] or {})

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """Only the ``extra`` dict of checkpoint `step` (None: the latest)."""
        step = self._step(step)
        return dict(
            self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        )

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Context manager turning SIGTERM (and with ``sigint=True`` the first Ctrl-C) into a stop flag.

    Inside the ``with`` block a signal sets `requested` instead of killing the process; the loop
    calls `should_stop(step)` once per step and, when it says True, saves and leaves (see the
    module docstring). A second Ctrl-C raises `KeyboardInterrupt` as usual. The previous handlers
    are restored on exit. A signal whose current handler was not installed from Python (e.g. the
    JAX distributed runtime's preemption notifier for SIGTERM) is left alone.

    With several processes all must call `should_stop` at the same steps; it agrees through JAX's
    preemption sync point (``jax.experimental.multihost_utils.reached_preemption_sync_point``) when
    available, plus -- every `sync_every` steps -- an all-gather of the local flags (one tiny
    cross-host collective). On one process it just reads the local flag.
    """

    def __init__(self, *, sigint: bool = False, signals: Iterable[int] | None = None, sync_every: int = 1):
        if signals is None:
            signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
        self.signals = tuple(signals)
        self.sync_every = max(1, int(sync_every))
        self.requested = False
        self.signal_received: int | None = None
        self._stop = False
        self._previous: dict[int, Any] = {}
        self._jax_sync = True

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        if not self.requested:
            name = signal.Signals(signum).name
            sys.stderr.write(f"\n{name} received: will checkpoint and stop at the end of this step\n")
        self.requested = True
        self.signal_received = signum

    def request(self) -> None:
        """Ask for a stop as a signal would (e.g. on a wall-clock limit)."""
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionGuard outside the main thread installs no signal handlers", stacklevel=2)
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is None:  # a handler set outside Python: leave it
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; once True, stays True. Same answer on all hosts."""
        if self._stop:
            return True
        if jax.process_count() == 1:
            stop = self.requested
        else:
            stop = self._jax_sync and self._reached_sync_point(step)
            if not stop and step % self.sync_every == 0:
                from jax.experimental import multihost_utils

                flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
                stop = bool(np.any(flags))
        if stop:
            self._stop = self.requested = True
        return stop

    def _reached_sync_point(self, step: int) -> bool:
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # no preemption service in this runtime
            self._jax_sync = False
            return False
