"""Checkpointer (orbax) save/restore, pruning, resharding, interrupted saves; PreemptionGuard."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.procs import cpu_env

from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard

REPO = Path(__file__).resolve().parents[2]


def make_state():
    """Parameters, an AdamW state after one update, counters and PRNG keys (typed and raw)."""
    params = {
        "w": jax.random.normal(jax.random.key(0), (8, 4)),
        "b": jnp.arange(4, dtype=jnp.bfloat16),
    }
    opt = optax.adamw(1e-3, weight_decay=0.1)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(7),
        "rng": jax.random.key(42),
        "rngs": jax.random.split(jax.random.key(1, impl="rbg"), 3),
        "raw_key": jax.random.PRNGKey(3),
    }
    return state, opt


def as_numpy(tree):
    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", str(x.dtype), np.asarray(jax.random.key_data(x)))
        return (str(x.dtype), np.asarray(x))

    return jax.tree.map(leaf, tree)


def assert_matches(tree, expected):
    """`tree` (arrays) equals `expected` (an `as_numpy` snapshot): structure, dtypes, key impls, values."""
    got = as_numpy(tree)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_save_restore_exact(tmp_path):
    state, opt = make_state()
    expected = as_numpy(state)
    abstract = abstract_of(state)
    extra = {"data": {"epoch": np.int64(2), "index": 5}, "config": {"kind": "dpo", "rules": ("a", [None])}}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, extra)
    # The arrays are on the host once save() returns: the caller may donate / delete them.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]

    step, restored, got_extra = ckpt.restore(abstract_state=abstract)
    assert step == 7
    assert got_extra == {"data": {"epoch": 2, "index": 5}, "config": {"kind": "dpo", "rules": ["a", [None]]}}
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    assert_matches(restored, expected)
    assert restored["rng"].dtype == jax.random.key(0).dtype
    assert str(jax.random.key_impl(restored["rngs"])) == "rbg" and restored["rngs"].shape == (3,)
    assert restored["raw_key"].dtype == jnp.uint32 and restored["params"]["b"].dtype == jnp.bfloat16
    # The restored state is usable: keys draw the same numbers, the optimizer state updates.
    np.testing.assert_array_equal(
        jax.random.normal(restored["rng"], (3,)), jax.random.normal(jax.random.key(42), (3,))
    )
    grads = jax.tree.map(jnp.ones_like, restored["params"])
    updates, _ = opt.update(grads, restored["opt_state"], restored["params"])
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert ckpt.restore_extra() == got_extra
    ckpt.close()


def test_restore_from_concrete_arrays_and_missing_steps(tmp_path):
    state, _ = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(abstract_state=state)
        ckpt.save(1, state, {})
        step, restored, extra = ckpt.restore(abstract_state=state)  # concrete arrays as the target
        assert step == 1 and extra == {}
        assert_matches(restored, as_numpy(state))
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            ckpt.restore(2, abstract_state=state)
        with pytest.raises(TypeError, match="extra must be JSON-able"):
            ckpt.save(3, state, {"bad": object()})


def test_keep_last_n_and_same_step(tmp_path):
    state = {"x": jnp.zeros(3), "step": jnp.int32(0)}
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in range(1, 6):
        assert ckpt.save(step, {"x": jnp.full(3, step, jnp.float32), "step": jnp.int32(step)}, {"s": step})
    assert not ckpt.save(5, state, {})  # already saved: a no-op, also when forced
    assert not ckpt.save(5, state, {}, force=True)
    with pytest.warns(UserWarning, match="newer step 5"):
        assert not ckpt.save(3, state, {})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
    ckpt.close()
    reopened = Checkpointer(tmp_path, keep=2)
    step, restored, extra = reopened.restore(abstract_state=abstract_of(state))
    assert step == 5 and extra == {"s": 5} and np.all(np.asarray(restored["x"]) == 5)
    reopened.close()


def test_leftover_tmp_dir_is_not_latest(tmp_path):
    """A save cut short leaves `<step>.orbax-checkpoint-tmp*`: never listed, removed on open."""
    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {"s": 5})
    # An interrupted save of a later step, with most of its files already written.
    shutil.copytree(tmp_path / "5", tmp_path / "9.orbax-checkpoint-tmp")
    (tmp_path / "9.orbax-checkpoint-tmp" / "commit_success.txt").unlink(missing_ok=True)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 5 and ckpt.all_steps() == [5]
    step, restored, extra = ckpt.restore(abstract_state=abstract_of(state))
    assert step == 5 and extra == {"s": 5}
    # orbax deletes leftovers in the background, finishing before the next save starts.
    ckpt.save(6, state, {"s": 6})
    assert not (tmp_path / "9.orbax-checkpoint-tmp").exists()
    ckpt.save(9, state, {"s": 9})  # the step can be saved for real afterwards
    ckpt.close()
    assert Checkpointer(tmp_path).all_steps() == [5, 6, 9]


def run_python(code: str, *, devices: int = 1, **kwargs) -> subprocess.Popen:
    env = cpu_env(devices, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 60.0) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == text:
            return lines
    proc.kill()
    raise AssertionError(f"no {text!r} from the subprocess:\n{''.join(lines)}")


def test_kill_during_save_never_leaves_a_bad_latest(tmp_path):
    """SIGKILL while step 2 is being written (as soon as orbax's temporary directory of step 2
    appears; the 128 MiB write takes far longer than one poll): step 1 stays the latest, restores
    whole, and the leftovers of step 2 are removed by the next Checkpointer."""
    proc = run_python(
        f"""
        import time, jax.numpy as jnp
        from jaxrlhf.train.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(1, {{"x": jnp.full((16,), 1.0)}}, {{"s": 1}})
        ckpt.wait()
        print("saved 1", flush=True)
        ckpt.save(2, {{"x": jnp.full((32 * 1024 * 1024,), 2.0)}}, {{"s": 2}})  # 128 MiB
        print("saving 2", flush=True)
        time.sleep(60)
        """
    )
    wait_for_line(proc, "saved 1")

    def temporary_2():
        return [p.name for p in tmp_path.iterdir() if p.name.startswith("2.orbax-checkpoint-tmp")]

    deadline = time.time() + 60
    while not temporary_2():
        if (tmp_path / "2").exists() or proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no temporary directory of step 2 seen: {sorted(os.listdir(tmp_path))}")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # the interrupted path is the one exercised: step 2 never completed, its leftovers are there
    assert not (tmp_path / "2").exists(), "step 2 finished before the kill"
    assert temporary_2(), sorted(os.listdir(tmp_path))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    step, restored, extra = ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((16,), jnp.float32)})
    assert step == 1 and extra == {"s": 1} and float(restored["x"][-1]) == 1.0
    ckpt.save(3, {"x": jnp.zeros(2)}, {})
    ckpt.close()
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit())
    assert on_disk == ["1", "3"]  # the leftovers of step 2 removed


def test_restore_onto_another_sharding(tmp_path):
    """Saved from an 8-device (data) mesh; restored on (fsdp=2, tensor=4) and on 2 devices."""
    proc = run_python(
        f"""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxrlhf.train.checkpoint import Checkpointer
        assert jax.device_count() == 8
        devices = np.array(jax.devices())
        mesh8 = Mesh(devices, ("data",))
        params = {{"w": jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)}}
        opt = optax.adamw(1e-2)
        put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh8, spec))
        params = put(params, P("data"))
        state = {{
            "params": params,
            "opt": jax.jit(opt.init)(params),
            "keys": put(jax.random.split(jax.random.key(5), 8), P("data")),
        }}
        ref = jax.tree.map(
            lambda x: np.asarray(jax.random.key_data(x)) if x.dtype == state["keys"].dtype else np.asarray(x),
            state,
        )
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(3, state, {{"mesh": "data=8"}})
        ckpt.wait()

        def check(mesh, spec, key_spec):
            def target(x):
                s = spec if x.ndim == 2 else P()
                if x.dtype == state["keys"].dtype:
                    s = key_spec
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))
            abstract = jax.tree.map(target, jax.eval_shape(lambda: state))
            step, got, extra = ckpt.restore(abstract_state=abstract)
            assert step == 3 and extra == {{"mesh": "data=8"}}
            for a, x, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(got), jax.tree.leaves(ref)):
                # (JAX writes a key array's replicated dims as P(None,) where P() was asked.)
                assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)
                assert x.sharding.mesh == a.sharding.mesh
                assert x.dtype == a.dtype
                v = np.asarray(jax.random.key_data(x)) if x.dtype == state["keys"].dtype else np.asarray(x)
                np.testing.assert_array_equal(v, r)

        check(Mesh(devices.reshape(2, 4), ("fsdp", "tensor")), P("fsdp", "tensor"), P("tensor"))
        check(Mesh(devices[:2], ("data",)), P(None, "data"), P())
        ckpt.close()
        print("OK", flush=True)
        """,
        devices=8,
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "OK" in out, out


def test_preemption_guard_in_process():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGTERM) != previous
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert guard.requested and guard.signal_received == signal.SIGTERM
        assert guard.should_stop(2) and guard.should_stop(3)
    assert signal.getsignal(signal.SIGTERM) == previous

    previous_int = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert guard.should_stop(1)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts as usual
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) == previous_int

    with PreemptionGuard() as guard:  # SIGINT is left alone by default; request() works without signals
        assert signal.getsignal(signal.SIGINT) == previous_int
        guard.request()
        assert guard.should_stop(0)


def test_preemption_guard_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = run_python(
        f"""
        import time, jax, jax.numpy as jnp
        from jaxrlhf.train.checkpoint import Checkpointer, PreemptionGuard
        ckpt = Checkpointer({str(tmp_path)!r}, keep=2)
        state = {{"w": jnp.zeros(4), "rng": jax.random.key(0)}}
        train_step = jax.jit(lambda s: {{"w": s["w"] + 1, "rng": jax.random.split(s["rng"])[0]}})
        step = 0
        with PreemptionGuard() as guard:
            while True:
                state = train_step(state)
                step += 1
                if step == 3:
                    print("ready", flush=True)
                if guard.should_stop(step):
                    ckpt.save(step, state, {{"step": step, "preempted": True}}, force=True)
                    ckpt.wait()
                    print("saved", step, flush=True)
                    break
                if step % 50 == 0:
                    ckpt.save(step, state, {{"step": step}})
                time.sleep(0.002)
        ckpt.close()
        """
    )
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    saved = int(out.split("saved ")[-1].split()[0])
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == saved >= 3
    abstract = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32),
        "rng": jax.eval_shape(lambda: jax.random.key(0)),
    }
    step, state, extra = ckpt.restore(abstract_state=abstract)
    assert extra == {"step": saved, "preempted": True}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, saved, np.float32))
    key = jax.random.key(0)
    for _ in range(saved):
        key = jax.random.split(key)[0]
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(key))
    ckpt.close()
