"""A NaN/inf loss never reaches the parameters: the compiled step keeps the old state, then the run
stops naming the step (`train.on_nonfinite=stop`, the unchanged state saved as that step's checkpoint)
or trains past it (`skip`, counted); `Checkpointer.save` refuses to write NaN.

The DPO runs are real (a tiny random llama, in-process `train`); a NaN is injected into one batch's
precomputed reference log-probs (`ref_chosen`), which makes that step's loss and gradients NaN."""

from __future__ import annotations

import itertools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.train.checkpoint import Checkpointer, NonFiniteError
from jaxrlhf.train.loop import run_loop

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "jaxrlhf", "assets", "dpo_demo")
POISONED_STEP = 3


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    with open(os.path.join(ASSETS, "train.jsonl")) as f:
        lines = f.read().splitlines()[:16]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def poison(monkeypatch, tmp_path):
    """Training batch number POISONED_STEP gets NaN reference log-probs (evaluation and reference
    batches -- collated without reference log-probs -- are untouched)."""
    import jaxrlhf.train.algorithms.dpo as dpo

    monkeypatch.setenv("JAXRLHF_CACHE_DIR", str(tmp_path / "cache"))  # the reference log-prob cache
    real = dpo.with_reference
    poisoned: list[int] = []

    def with_reference(collate, ref):
        inner = real(collate, ref)
        calls = itertools.count(1)

        def wrapped(items, **kw):
            batch = inner(items, **kw)
            if next(calls) == POISONED_STEP:
                batch["ref_chosen"] = np.full_like(batch["ref_chosen"], np.nan)
                poisoned.append(POISONED_STEP)
            return batch

        return wrapped

    monkeypatch.setattr(dpo, "with_reference", with_reference)
    return poisoned


def _overrides(tiny_dir, train_file, out, **extra):
    base = {
        "model.path": tiny_dir, "data.train_files": train_file, "data.max_length": 64,
        "data.max_prompt_length": 32, "optim.learning_rate": 1e-2, "train.batch_size": 4,
        "train.grad_accum_steps": 2, "train.max_steps": 5, "train.save_every": 1,
        "train.keep_checkpoints": 10, "train.log_every": 1, "train.output_dir": out,
        "train.tensorboard": False, "train.export": False, "train.resume": False,
        "dpo.reference": "precompute",
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _checkpoint(out, step) -> dict:
    """The saved state of checkpoint `step` as numpy arrays (read without a target structure)."""
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sharding info not provided": read as saved
        state = ocp.PyTreeCheckpointer().restore(os.path.join(out, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, state)


def _same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and la
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def _all_finite(tree) -> bool:
    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))


def _steps(out) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit())


def test_stop_names_the_step_and_saves_the_state_before_it(mini_dir, train_file, tmp_path, poison, capsys):
    """Through `jaxrlhf train dpo` (the CLI's `main`, in this process): exit code 2, one line naming
    step 3; checkpoint 3 holds exactly the parameters and optimizer state of checkpoint 2; no
    checkpoint holds NaN; no later step ran."""
    from jaxrlhf.cli import main

    out = str(tmp_path / "run")
    code = main(["train", "dpo", *_overrides(mini_dir, train_file, out)])
    err = capsys.readouterr().err
    assert poison == [POISONED_STEP]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"error: step {POISONED_STEP}: the loss (nan)"), last
    assert f"checkpoint {POISONED_STEP} in {out}" in last and "train.on_nonfinite=skip" in last
    assert _steps(out) == [1, 2, 3]
    states = {step: _checkpoint(out, step) for step in (1, 2, 3)}
    assert all(_all_finite(s) for s in states.values())
    assert _same_bits(states[3]["params"], states[2]["params"])
    assert _same_bits(states[3]["opt_state"], states[2]["opt_state"])
    assert not _same_bits(states[2]["params"], states[1]["params"])  # steps 1-2 did train
    with open(os.path.join(out, "metrics.jsonl")) as f:  # flushed on the way out
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2]


def test_skip_leaves_the_state_unchanged_and_trains_on(mini_dir, train_file, tmp_path, poison):
    from jaxrlhf.train import load_config, train

    out = str(tmp_path / "run")
    result = train(load_config(None, _overrides(mini_dir, train_file, out, **{"train.on_nonfinite": "skip"}),
                               kind="dpo"))  # fmt: skip
    assert poison == [POISONED_STEP]
    assert result.steps == 5 and _steps(out) == [1, 2, 3, 4, 5]
    history = {m["step"]: m for m in result.train_metrics}
    assert [history[s]["nonfinite_skipped"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert np.isnan(history[POISONED_STEP]["loss"])
    assert all(np.isfinite(history[s]["loss"]) and np.isfinite(history[s]["grad_norm"]) for s in (1, 2, 4, 5))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["nonfinite_skipped"] == 1 and summary["data"]["train/rows_empty_completion"] == 0
    states = {step: _checkpoint(out, step) for step in range(1, 6)}
    assert all(_all_finite(s) for s in states.values())
    assert _same_bits(states[3]["params"], states[2]["params"])  # bit-exact: the update was not applied
    assert _same_bits(states[3]["opt_state"], states[2]["opt_state"])  # nor Adam's moments and count
    for step in (2, 4, 5):  # the other steps moved the parameters
        assert not _same_bits(states[step]["params"], states[step - 1]["params"]), step


# ---- Checkpointer and run_loop on their own ----------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_checkpointer_refuses_non_finite_states(tmp_path, bad, dtype):
    good = {"params": {"w": jnp.ones((3, 4), dtype), "b": jnp.zeros((4,), jnp.float32)}, "step": jnp.int32(2),
            "rng": jax.random.key(0)}  # fmt: skip
    bad_state = {**good, "params": {**good["params"], "w": good["params"]["w"].at[1, 2].set(bad)}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(1, good, {"note": "finite"})
        ckpt.wait()
        with pytest.raises(NonFiniteError, match=r"not saving step 2: the state holds NaN or infinite"):
            ckpt.save(2, bad_state, {"note": "bad"})
        ckpt.wait()
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]  # nothing of step 2 on disk, not even a tmp dir


class _FakeCheckpointer:
    directory = "/ckpt"

    def __init__(self):
        self.saves: list[tuple[int, object, bool]] = []

    def save(self, step, state, extra=None, *, force=False):
        self.saves.append((step, state, force))
        return True

    def wait(self):
        pass


class _FakeLogger:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, step, metrics, split="train"):
        self.logged.append((step, dict(metrics)))

    def progress(self, step):
        pass


def _loop(on_nonfinite: str, bad_steps=(3,), total=5):
    n = {"step": 0}

    def train_step():
        n["step"] += 1
        bad = n["step"] in bad_steps
        return {"loss": float("nan") if bad else 1.0, "grad_norm": 1.0, "nonfinite": float(bad)}

    ckpt, logger, said = _FakeCheckpointer(), _FakeLogger(), []
    result = run_loop(
        train_step, lambda: (f"state@{n['step']}", {}), ckpt, logger, step=0, total_steps=total, log_every=1,
        save_every=0, say=said.append, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    return result, ckpt, logger, said


def test_run_loop_stop_raises_naming_the_step():
    message = r"^step 3: the loss \(nan\) or gradient norm \(1\) is not finite"
    with pytest.raises(NonFiniteError, match=message):
        _loop("stop")


def test_run_loop_stop_saves_that_step_and_runs_nothing_after():
    ckpt = _FakeCheckpointer()
    calls = []

    def train_step():
        calls.append(1)
        return {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite": 1.0} if len(calls) == 2 else {
            "loss": 1.0, "grad_norm": 1.0, "nonfinite": 0.0}  # fmt: skip

    with pytest.raises(NonFiniteError, match="/ckpt holds the parameters after step 1"):
        run_loop(train_step, lambda: ("state", {}), ckpt, _FakeLogger(), step=0, total_steps=5, log_every=1,
                 save_every=0, say=lambda m: None, on_nonfinite="stop")  # fmt: skip
    assert len(calls) == 2 and ckpt.saves == [(2, "state", True)]


def test_run_loop_skip_counts_and_goes_on():
    result, ckpt, logger, said = _loop("skip", bad_steps=(2, 4))
    assert result.step == 5 and [h["nonfinite_skipped"] for h in result.history] == [0, 1, 1, 2, 2]
    assert all("nonfinite" not in h for h in result.history)  # popped: a counter, not a metric
    assert [s for s, _, _ in ckpt.saves] == [5]  # only the final save
    assert said == [
        "step 2: non-finite loss or gradient norm, update skipped (1 so far)",
        "step 4: non-finite loss or gradient norm, update skipped (2 so far)",
    ]
    assert logger.logged[-1][1]["nonfinite_skipped"] == 2


# ---- PPO: a NaN reward changes nothing --------------------------------------------------------------


def test_ppo_nan_reward_leaves_policy_and_critic_unchanged(tmp_path):
    """One NaN score makes the whole rollout's whitened advantages NaN: every minibatch update of that
    PPO step is skipped (policy and critic bit-exact, `nonfinite` reported); the next step with
    finite rewards trains as usual."""
    from helpers.tiny_hf import make_hf_model

    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train.config import PPOConfig
    from jaxrlhf.train.ppo import PPOEngine
    from jaxrlhf.train.step import make_optimizer, make_schedule

    path = str(tmp_path / "llama")
    make_hf_model("llama").save_pretrained(path)
    mesh = make_mesh(devices=jax.devices()[:1])
    cfg = PPOConfig(response_length=4, num_ppo_epochs=1, num_mini_batches=2)
    engine = PPOEngine(
        from_pretrained(path, mesh=mesh),
        from_pretrained(path, head="score", init_score_head=True, mesh=mesh),
        None, cfg, make_optimizer(make_schedule(1e-3, 10, kind="constant")), mesh, eos_token_ids=[1],
        pad_token_id=0, seed=0,
    )  # fmt: skip
    prompts = np.random.default_rng(0).integers(3, 96, (4, 5)).astype(np.int32)
    mask = np.ones_like(prompts)

    def reward(bad: bool):
        def score(ids, response_mask):
            scores = response_mask.sum(1).astype(np.float32) / response_mask.shape[1]
            if bad:
                scores[1] = np.nan
            return scores

        return score

    def snapshot():
        return jax.tree.map(np.asarray, {"params": engine.state.params, "opt_state": engine.state.opt_state})

    before = snapshot()
    metrics = engine.step(prompts, mask, reward(bad=True))
    assert metrics["nonfinite"] == 1.0
    after_bad = snapshot()
    assert _same_bits(after_bad["params"], before["params"])
    assert _same_bits(after_bad["opt_state"], before["opt_state"])
    metrics = engine.step(prompts, mask, reward(bad=False))
    assert metrics["nonfinite"] == 0.0 and np.isfinite(metrics["loss/policy_avg"])
    after_good = snapshot()
    for part in ("policy", "critic"):
        assert not _same_bits(after_good["params"][part], before["params"][part]), part
    assert _all_finite(after_good)
