"""Two processes joined by jax.distributed on CPU (2 devices each) train DPO with the same losses as
one process: each host feeds only its share of every global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from helpers.procs import cpu_env
from helpers.runs import overrides, ppo_cli_args

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxrlhf.train import load_config, train
    overrides = sys.argv[1:]
    for kind in ("dpo", "kto"):  # one interpreter (and one jax.distributed start) for both methods
        out = [o + "/" + kind if o.startswith("train.output_dir=") else o for o in overrides]
        result = train(load_config(None, out, kind=kind))
        assert jax.process_count() == int({n}), jax.process_count()
        print("LOSSES_" + kind, [round(m["loss"], 7) for m in result.train_metrics])
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(commands: list[list[str]], env: dict[str, str]) -> list[str]:
    """Start every command at once (they join one jax.distributed run), wait, and return each one's
    stdout + stderr; a failing process fails the test with its stderr."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]  # fmt: skip
    logs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        logs.append(out + err)
    return logs


def _mesh_args(n: int, i: int, port: int) -> list[str]:
    if n == 1:
        return []
    return [f"mesh.coordinator_address=127.0.0.1:{port}", f"mesh.num_processes={n}", f"mesh.process_id={i}"]


def _run(n: int, overrides: list[str], devices_per_process: int) -> list[str]:
    port = _free_port()
    worker = WORKER.format(n=n)
    return _launch(
        [[sys.executable, "-c", worker, *overrides, *_mesh_args(n, i, port)] for i in range(n)],
        cpu_env(devices_per_process),
    )


def _tagged(out: str, tag: str):
    return json.loads(next(line for line in out.splitlines() if line.startswith(tag))[len(tag) :])


def test_two_processes_match_one(tiny_dir, data_files, tmp_path):
    """DPO, and KTO on the same pairs unpaired (its KL estimate over the global micro-batch), each
    process feeding only its share of every global batch."""
    common = {
        "train.max_steps": 3,
        "train.save_every": 0,
        "train.grad_accum_steps": 1,
        "optim.warmup_steps": 0,  # two full updates in three steps: the losses move well past 1e-3
        "dpo.reference": "same_step",
        "mesh.fsdp": 2,
    }
    one = _run(1, overrides(tiny_dir, data_files, str(tmp_path / "one"), **common), 4)
    two = _run(2, overrides(tiny_dir, data_files, str(tmp_path / "two"), **common), 2)
    for kind in ("dpo", "kto"):
        ref = _tagged(one[0], f"LOSSES_{kind}")
        assert len(ref) == 3 and abs(ref[2] - ref[0]) > 1e-3, kind  # the losses move: not trivially ln 2
        for out in two:  # every process reports the same global losses as the single process
            got = _tagged(out, f"LOSSES_{kind}")
            assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-5, (kind, got, ref)


ENGINES_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    path, n, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid)
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.train import GRPOConfig, PPOConfig
    from jaxrlhf.train.grpo import GRPOEngine
    from jaxrlhf.train.ppo import PPOEngine
    from jaxrlhf.train.step import batch_sharding, make_optimizer, make_schedule

    mesh = make_mesh(data=2)
    sharding = batch_sharding(mesh, 2, micro_axis=False)


    def local_half(ids, mask):  # each process holds its own half of the rows, as the trainers feed them
        if n == 1:
            return ids, mask
        rows = slice(pid * len(ids) // 2, (pid + 1) * len(ids) // 2)
        return (jax.make_array_from_process_local_data(sharding, ids[rows]),
                jax.make_array_from_process_local_data(sharding, mask[rows]))


    def prompts(rows):
        ids = np.random.default_rng(0).integers(3, 96, (rows, 5)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, :2] = 0  # one left-padded prompt
        return ids, mask


    # PPO with a verifiable reward called on the host
    ppo_calls = []

    def low_tokens(ids, response_mask):
        ppo_calls.append(ids.shape[0])
        response = ids[:, -response_mask.shape[1]:]
        return ((response < 48) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)

    policy = from_pretrained(path, mesh=mesh)
    critic = from_pretrained(path, head="score", init_score_head=True, mesh=mesh)
    cfg = PPOConfig(response_length=6, num_ppo_epochs=2, num_mini_batches=2, missing_eos_penalty=1.0)
    optimizer = make_optimizer(make_schedule(3e-4, 100, kind="constant"), eps=1e-5)
    engine = PPOEngine(policy, critic, None, cfg, optimizer, mesh, eos_token_ids=[1], pad_token_id=0)
    ids, mask = prompts(8)
    held_out = engine.evaluate(ids[::-1].copy(), mask[::-1].copy(), low_tokens, seed=1)  # numpy: same on all
    ids, mask = local_half(ids, mask)
    history = [engine.step(ids, mask, low_tokens) for _ in range(3)]
    keys = ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg"]
    print("PPO", json.dumps([[m[k] for k in keys] for m in history]))
    print("EVAL", json.dumps({k: v.tolist() for k, v in held_out.items()}))
    print("PPO_CALLS", json.dumps(ppo_calls))

    # GRPO with two host reward functions, the second "does not apply" on odd rows
    grpo_calls = []

    def rewards(ids, response_mask):
        grpo_calls.append(ids.shape[0])
        response = ids[:, -response_mask.shape[1]:]
        low = ((response < 48) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)
        return np.stack([low, np.where(np.arange(len(ids)) % 2, np.nan, response_mask.mean(1))], axis=1)

    cfg = GRPOConfig(num_generations=4, max_completion_length=6, num_iterations=2, num_mini_batches=2,
                     beta=0.04)
    optimizer = make_optimizer(make_schedule(1e-3, 100, kind="constant"))
    engine = GRPOEngine(from_pretrained(path, mesh=mesh), cfg, optimizer, mesh, eos_token_ids=[1],
                        pad_token_id=0, num_reward_funcs=2, reward_weights=[1.0, 0.5])
    ids, mask = local_half(*prompts(4))
    history = [engine.step(ids, mask, rewards, ["low", "len"]) for _ in range(3)]
    keys = ["reward", "loss", "kl", "clip_ratio/region_mean", "rewards/len/mean"]
    print("GRPO", json.dumps([[m[k] for k in keys] for m in history]))
    print("GRPO_CALLS", json.dumps(grpo_calls))

    # online DPO: GRPO's rollout with two completions per prompt, one DPO update
    from jaxrlhf.train.algorithms.online_dpo import OnlineDPOConfig, OnlineDPOEngine

    optimizer = make_optimizer(make_schedule(1e-3, 100, kind="constant"))
    engine = OnlineDPOEngine(from_pretrained(path, mesh=mesh), OnlineDPOConfig(max_new_tokens=6), optimizer,
                             mesh, eos_token_ids=[1], pad_token_id=0, num_reward_funcs=2)
    ids, mask = local_half(*prompts(4))
    history = [engine.step(ids, mask, rewards, ["low", "len"]) for _ in range(3)]
    keys = ["objective/scores", "loss", "objective/kl", "rewards/margins"]
    print("ODPO", json.dumps([[m[k] for k in keys] for m in history]))

    # multi-turn GRPO: every turn that ends with one of many "EOS" ids is answered by a scripted tool
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxrlhf.generation.sampling import Generation
    from jaxrlhf.parallel import host_array
    from jaxrlhf.tools import ToolCall
    from jaxrlhf.train import multiturn

    multiturn.parse_tool_calls = lambda text: [ToolCall("t")] if text else []


    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [90, 91, 92]}


    class Env:
        def reset(self, row):
            pass

        def step(self, calls):
            return ["r"] * len(calls)


    eos = list(range(1, 12))
    cfg = GRPOConfig(num_generations=4, max_completion_length=12, num_iterations=2, num_mini_batches=2)
    optimizer = make_optimizer(make_schedule(1e-3, 100, kind="constant"))
    engine = GRPOEngine(from_pretrained(path, mesh=mesh), cfg, optimizer, mesh, eos_token_ids=eos,
                        pad_token_id=0, num_reward_funcs=1)
    turns = []

    def rollout(engine, ids, m):
        rows = [r[k == 1].tolist() for r, k in zip(host_array(ids), host_array(m))]
        episodes = multiturn.run_episodes(
            engine.turn_cache(len(rows), ids.shape[1], max_tokens=12, turn_tokens=5), Tok(), rows,
            [Env() for _ in rows], eos_ids=eos, max_turns=3, max_tokens=12, turn_tokens=5,
            template=multiturn.ToolTurnTemplate("", ""))
        turns.append(sum(e.turns for e in episodes))
        arrays = multiturn.episode_arrays(episodes, 12, 0)
        replicated = NamedSharding(mesh, PartitionSpec())
        return Generation(**{k: jax.device_put(v, replicated) for k, v in arrays.items()})

    engine.rollout = rollout
    ids, mask = local_half(*prompts(4))
    low = lambda i, m: rewards(i, m)[:, :1]
    history = [engine.step(ids, mask, low, ["low"]) for _ in range(2)]
    print("MULTITURN", json.dumps([[m[k] for k in ("reward", "loss", "grad_norm")] + [t]
                                   for m, t in zip(history, turns)]))
    """
)


def test_ppo_and_grpo_engines_on_two_processes_match_one(tmp_path):
    """PPO, GRPO and online DPO on two processes (one CPU device each, each holding half of the
    prompts) reproduce one process with two devices: the rollout is gathered (GRPO: the G
    completions per prompt sampled over the global batch), the rewards scored once on process 0 and
    broadcast, and the update runs over the global batch. PPO's `evaluate` on a numpy batch (the
    same on every process) agrees too. One interpreter per process runs the three engines."""
    from helpers.tiny_hf import make_hf_model

    path = str(tmp_path / "tiny")
    make_hf_model("llama").save_pretrained(path)

    def run(n: int, devices: int) -> list[str]:
        port = str(_free_port())
        return _launch([[sys.executable, "-c", ENGINES_WORKER, path, str(n), str(i), port] for i in range(n)],
                       cpu_env(devices))  # fmt: skip

    one, two = run(1, 2)[0], run(2, 1)
    ppo, grpo, odpo = (np.asarray(_tagged(one, tag)) for tag in ("PPO", "GRPO", "ODPO"))
    # the policies move away from the reference
    assert np.all(np.isfinite(ppo)) and abs(ppo[2, 1]) > 0
    assert np.all(np.isfinite(grpo)) and abs(grpo[2, 2]) > 0
    for out in two:
        np.testing.assert_allclose(np.asarray(_tagged(out, "PPO")), ppo, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(_tagged(out, "GRPO")), grpo, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(_tagged(out, "ODPO")), odpo, rtol=1e-4, atol=1e-6)
        for k, v in _tagged(out, "EVAL").items():  # evaluation from the same numpy batch on every process
            np.testing.assert_allclose(v, _tagged(one, "EVAL")[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # each reward function ran once per call (PPO: an evaluation, then 3 steps), on process 0, on all rows
    assert _tagged(two[0], "PPO_CALLS") == [8, 8, 8, 8] and _tagged(two[1], "PPO_CALLS") == []
    assert _tagged(two[0], "GRPO_CALLS") == [16, 16, 16] and _tagged(two[1], "GRPO_CALLS") == []
    assert np.all(np.isfinite(odpo)) and abs(odpo[2, 2]) > 0  # online DPO moved the policy too
    multi = np.asarray(_tagged(one, "MULTITURN"))  # multi-turn GRPO: the same episodes and updates
    assert np.all(np.isfinite(multi)) and multi[:, 3].min() > 16  # more turns than episodes
    for out in two:
        np.testing.assert_allclose(np.asarray(_tagged(out, "MULTITURN")), multi, rtol=1e-4, atol=1e-6)


def test_ppo_cli_on_two_processes(tmp_path):
    """`jaxrlhf train ppo` on two processes: each host feeds its half of every prompt batch; process 0
    writes the metrics, the samples and the summary; both save checkpoints, export the policy, and
    resume together."""
    out = str(tmp_path / "run")
    args, env = ppo_cli_args(tmp_path, out)
    env = cpu_env(1, PYTHONPATH=env["PYTHONPATH"])  # the reward function's module is on it

    def run(extra: list[str]) -> list[str]:
        port = _free_port()
        main = ("import jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
                "from jaxrlhf.cli import main; raise SystemExit(main())")  # fmt: skip
        return _launch(
            [[sys.executable, "-c", main, "train", "ppo", *args, *extra, *_mesh_args(2, i, port)]
             for i in range(2)],
            env,
        )  # fmt: skip

    logs = run([])
    assert "step 2 samples" in logs[0] and "step 2 samples" not in logs[1]
    assert os.path.exists(os.path.join(out, "export", "model.safetensors"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["1", "2"]
    logs = run(["train.max_steps=3"])
    assert all("resumed from step 2" in log for log in logs), logs[0][-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    evals = [r for r in rows if r["split"] == "eval"]  # held-out prompts, split over the two hosts
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and all(r["prompts"] == 6 for r in evals), evals
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["steps"] == 3
