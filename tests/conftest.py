"""Shared test set-up: quiet transformers, deterministic CPU JAX, one XLA compilation cache per run."""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on CPU. libtpu (the TPU compiler, a test dependency for tests/plan) would otherwise
# look for a TPU at every backend start and log its warnings to every CLI test's stderr; the TPU
# plans take their devices from a topology description, not from a runtime.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny-model programs again: a resumed run, the second process of a CLI
# test, the same trainer in another test file. JAX's persistent compilation cache lets every later
# compile of an identical program load the executable instead (tests/train/test_trainer.py: 265 s
# -> 180 s). The environment carries it to pytest-xdist workers, CLI subprocesses and notebook
# kernels alike. A run gets a fresh directory unless JAX_COMPILATION_CACHE_DIR is set (set it to keep
# the cache between runs).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxrlhf-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# The tiny test models take far longer to compile than to run: without LLVM's optimisation of XLA:CPU's
# kernels (-O0) a sample of trainer, engine and sampler tests ran 1.33x faster (201 s -> 152 s; the
# 135M demo model runs slower so, but only a few tests run it). Every process of the run inherits the
# flag; a value already in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# The shared test code is the package tests/helpers (`import helpers.tiny_hf`): pytest finds it through
# `pythonpath` in pyproject.toml; the processes tests start (CLI runs, `python -c` scripts) through
# PYTHONPATH, which gets tests/ first (once: xdist workers run this file again).
_TESTS = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _TESTS:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402

pytest.register_assert_rewrite("helpers")  # asserts in shared helpers report their values too
pytest_plugins = ["helpers.fixtures"]

# Tiers, assigned here and nowhere else. `make test-fast` runs `-m "not slow and not demo_model"`:
# losses against their references, models against transformers, data, config, objectives, engines and
# loop units, in-process. `slow` marks what is left out of it: whole files, or single tests by name
# (`file::test`, every parametrization), each with why. `make test` (CI) runs all but `demo_model`.
SLOW: dict[str, str] = {
    # end-to-end runs: CLI subprocesses, several processes, notebooks, benchmark scripts
    "test_notebooks.py": "five Jupyter kernels, each running a notebook",
    "bench/test_sentiment_frontier.py": "the sentiment data script twice, the sweep (5 CLI runs), tiny model",
    "train/test_multiprocess.py": "two jax.distributed processes (gloo) against one",
    "train/test_ppo_trainer.py": "PPO trainer runs, CLI included",
    "train/test_mesh_invariance.py": "trains on several 8-device meshes in a subprocess",
    "train/test_scan_trainers.py": "every trainer twice (scanned and unrolled), resume",
    "train/test_trainer.py": "CLI runs: crash and resume, SIGTERM, exports",
    "train/test_lora_trainers.py": "LoRA trainer runs with resume",
    "train/test_lora_ppo.py": "LoRA PPO CLI runs with resume and exports",
    "train/test_grpo_trainer.py": "GRPO / RLOO CLI runs",
    "train/test_trackers.py::test_tensorboard_wandb_and_trackio_read_back": "two GRPO CLI runs, W&B, Trackio",
    "train/test_multiturn.py::test_cli_run_with_tools": "4 runs with the calculator",
    "train/test_multiturn.py::test_tool_runs_resume_exactly_mid_run": "6 CLI runs with tools, crash + resume",
    "train/test_multiturn.py::test_multi_turn_grpo_learns_a_scripted_environment": "25 multi-turn GRPO steps",
    "train/test_kto_trainer.py::test_kto_resumes_exactly_after_a_crash": "four KTO CLI runs",
    "train/test_online_dpo.py::test_online_dpo_cli_trains_resumes_exactly_and_exports": "online DPO CLI runs",
    "train/test_model_families.py": "CLI DPO runs on Gemma 2 and Qwen3-MoE",
    "train/test_grouped_reward.py::test_ranked_rows_train_a_reward_model_grouped": "a reward-model run",
    "train/test_attention_trainers.py": "trainers twice (splash and xla)",
    "evaluation/test_trainer_task_eval.py": "trainer runs with task evaluation",
    "test_cli_errors.py": "~20 CLI subprocesses",
    "bench/test_device_bench.py": "the device benchmark script on CPU, TRL included",
    "bench/test_bench_grpo.py": "the GRPO benchmark script against TRL",
    "bench/test_memory_plan.py": "the memory plan script on 8 simulated devices",
    # the TPU compiler (libtpu) on tiny models: ~2 s per compile
    "models/test_tpu_compile.py": "17 TPU compiles of attention variants, the sampler, MoE, QLoRA",
    "plan/test_plan.py": "TPU compiles of the DPO, GRPO and sampler steps and of `jaxrlhf plan` runs",
    "plan/test_hlo_cost.py::test_loops_are_counted_by_their_trip_counts": "TPU compiles of a matmul chain",
    "plan/test_hlo_cost.py::test_nested_loops_multiply": "a TPU compile",
    "plan/test_hlo_cost.py::test_fsdp_collectives_match_the_arithmetic": "a TPU compile on 4 chips",
    # the real 135M model
    "models/test_demo_model.py": "the 135M demo model against transformers",
    "evaluation/test_task_eval.py::test_cli_eval_on_the_demo_model_is_reproducible": "135M model, twice",
    "generation/test_sampling.py::test_demo_greedy_matches_transformers_batched_chat": "135M model",
    # 8 simulated devices in a subprocess
    "models/test_scan_layers.py::test_scanned_model_on_8_devices_matches_one": "8-device subprocess",
    "models/test_attention.py::test_splash_under_shard_map_on_8_devices_matches_one": "8-device subprocess",
    "models/test_moe.py::test_expert_axis_mesh_invariance": "8-device subprocess",
    "models/test_mesh_loading.py": "8-device subprocess",
    "generation/test_sampling.py::test_sharded_model_generates_same_greedy_tokens": "8-device subprocess",
    # many compiles: the fast tier keeps a cheaper check of the same code
    "models/test_scan_layers.py::test_scanned_gradients_match_unrolled_for_every_remat_policy":
        "34 gradient compiles (fast tier: scanned logits and generation)",
    "models/test_attention.py::test_splash_model_matches_xla_model":
        "whole models' gradients per backend (fast tier: the kernel on padded and packed rows)",
    "models/test_quant.py::test_qlora_model_is_the_dequantized_base_plus_adapters":
        "QLoRA models, scanned and not (fast tier: the quantizers against numpy)",
    "train/test_mixed_precision.py": "bf16 and fp32 trainers and PPO engines side by side",
    "models/test_scan_layers.py::test_frozen_layers_with_scanning": "scanned and unrolled train steps",
    "evaluation/test_task_eval.py::test_greedy_replies_do_not_depend_on_batching": "a compile per batch",
    "train/test_grpo_engine.py::test_lora_policy_and_a_reward_model": "a LoRA policy and a reward model",
    "train/test_nonfinite.py::test_ppo_nan_reward_leaves_policy_and_critic_unchanged": "a PPO engine",
}


def pytest_configure(config):
    for key in SLOW:  # a renamed file or test must not drop out of its tier unnoticed
        file, _, test = key.partition("::")
        source = os.path.join(_TESTS, file)
        if not os.path.isfile(source) or (test and f"def {test}(" not in open(source).read()):
            raise pytest.UsageError(f"tests/conftest.py: SLOW names {key!r}, which does not exist")


# Files whose tests share an expensive module fixture: `make test` (--dist loadgroup) keeps each on one
# worker; every other test goes to whichever worker is free.
TOGETHER = ("test_cli_errors.py", "bench/test_memory_plan.py", "models/test_demo_model.py",
            "bench/test_sentiment_frontier.py", "data/test_sft_formats.py")  # the last: TRL's trainers


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    rank = {key: i for i, key in enumerate(SLOW)}
    order = {}
    for i, item in enumerate(items):
        path = os.path.relpath(str(item.path), _TESTS).replace(os.sep, "/")
        key = next((k for k in (path, f"{path}::{item.originalname}") if k in SLOW), None)
        if key is not None:
            item.add_marker(pytest.mark.slow)
        if path in TOGETHER:
            item.add_marker(pytest.mark.xdist_group(path))
        # slow tests first, in SLOW's order (about longest first), so that the two workers finish
        # together instead of one waiting on a long test picked up last
        order[item.nodeid] = (rank[key] if key is not None else len(rank), i)
    items.sort(key=lambda item: order[item.nodeid])


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """On an xdist worker under --dist loadgroup, the TOGETHER files must carry their group in the node
    id (pytest-xdist adds it; pytest 9.2 broke that silently: pytest-xdist issue #1386)."""
    if getattr(session.config.option, "loadgroup", False):
        grouped = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group")]
        lost = [nodeid for nodeid in grouped if "@" not in nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist ignored the xdist_group of {lost[0]} (pytest-xdist #1386)")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # only the process that made it (the xdist controller) removes it
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """transformers runs ~100x slower with 2 torch threads once XLA's CPU thread pool is live in the
    same process (2-core machine); one thread keeps the reference runs fast. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
