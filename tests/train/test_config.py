"""Config loading: YAML + overrides, unknown-key suggestions, type errors, choices, dict round trip."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from jaxrlhf.train import (
    ConfigError,
    DPOConfig,
    ExperimentConfig,
    TrainConfig,
    config_from_dict,
    config_markdown,
    config_to_dict,
    load_config,
)
from jaxrlhf.train.algorithms.dpo import DPO_LOSS_TYPES, LOSS_TYPES

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.kind == "sft" and cfg.model.path == "demo" and cfg.optim.eps == 1e-8
    assert cfg.mesh.data == -1 and cfg.mesh.fsdp == 1 and cfg.mesh.tensor == 1


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        kind: dpo
        model: {path: some/model, dtype: bfloat16}
        data:
          train_files: [a.jsonl, b.jsonl]
          max_length: 512
          max_prompt_length: 128
        optim:
          learning_rate: 5e-7        # PyYAML reads this as a string; coerced to float
          max_grad_norm: null
        dpo: {beta: 0.2, loss_type: sigmoid}
        train: {batch_size: 16, grad_accum_steps: 4}
        """,
    )
    cfg = load_config(
        path,
        [
            "optim.learning_rate=1e-5",
            "dpo.loss_type=ipo",
            "train.max_steps=10",
            "--train.resume=false",
            "data.buckets=[128, 256, 512]",
            "mesh.rules=[['lm_head/kernel$', [fsdp, null]]]",
            "model.path=007",  # str fields keep the override's text
            "data.eval_files=None",
            "optim.warmup_steps=1e1",
            "optim.learning_rate=2e-5",  # later overrides win
        ],
    )
    assert cfg.kind == "dpo"
    assert cfg.model.path == "007" and cfg.model.dtype == "bfloat16"
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.data.train_file_list == [
        "a.jsonl",
        "b.jsonl",
    ]
    assert cfg.data.max_length == 512 and cfg.data.eval_files is None
    assert cfg.data.buckets == [128, 256, 512]
    assert cfg.optim.learning_rate == 2e-5 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.optim.max_grad_norm is None and cfg.optim.warmup_steps == 10
    assert cfg.dpo == DPOConfig(beta=0.2, loss_type="ipo")
    assert cfg.train.max_steps == 10 and cfg.train.resume is False and cfg.train.batch_size == 16
    assert cfg.mesh.rules == [("lm_head/kernel$", ("fsdp", None))]


def test_kind_argument(tmp_path):
    assert load_config(None, kind="reward").kind == "reward"
    path = write(tmp_path, "kind: dpo\n")
    assert load_config(path, kind="dpo").kind == "dpo"
    with pytest.raises(ConfigError, match="says 'dpo' but 'sft' was requested"):
        load_config(path, kind="sft")
    with pytest.raises(ConfigError, match="says 'sft' but 'dpo' was requested"):
        load_config(None, ["kind=sft"], kind="dpo")
    assert load_config(None, kind="ppo").kind == "ppo"
    with pytest.raises(ConfigError, match="kind: 'sgd' is not one of"):
        load_config(None, kind="sgd")
    # one `grpo` section serves both estimators: the command picks grpo or rloo
    grpo = write(tmp_path, "kind: grpo\ngrpo:\n  reward_funcs: [m:f]\n")
    assert load_config(grpo, kind="rloo").kind == "rloo"
    with pytest.raises(ConfigError, match="give grpo.reward_funcs"):
        load_config(None, kind="grpo")


@pytest.mark.parametrize(
    ("override", "bad", "suggestion"),
    [
        ("optim.learning_rte=1e-5", "optim.learning_rte", "optim.learning_rate"),
        ("optim.lr=1e-5", "optim.lr", "optim.learning_rate"),
        ("train.learning_rate=1e-5", "train.learning_rate", "optim.learning_rate"),  # wrong section
        ("trian.max_steps=3", "trian", "train"),
        ("dpo.bta=0.1", "dpo.bta", "dpo.beta"),
        ("train.batch_size.x=1", "train.batch_size.x", "train.batch_size"),
        ("train.warmup_step=3", "train.warmup_step", "optim.warmup_steps"),
    ],
)
def test_unknown_override_key_suggests(override, bad, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"unknown config key {bad!r}" in msg and f"did you mean {suggestion!r}" in msg
    assert override in msg


def test_unknown_nested_yaml_key_suggests(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rte: 1.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert path in msg
    assert "unknown config key 'optim.learning_rte'; did you mean 'optim.learning_rate'?" in msg

    path = write(tmp_path, "optimizer: {learning_rate: 1.0}\n", "b.yaml")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'; did you mean 'optim'"):
        load_config(path)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys of 'sft': sft.completion_only"):
        load_config(None, ["sft.zzzzzz=1"])


def test_unknown_key_in_dict():
    with pytest.raises(
        ConfigError, match="unknown config key 'reward.use_margn'; did you mean 'reward.use_margin'"
    ):
        config_from_dict({"reward": {"use_margn": True}})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=abc", "train.batch_size: expected int, got 'abc' (str)"),
        ("train.batch_size=2.5", "train.batch_size: expected int, got '2.5' (float)"),
        ("train.batch_size=true", "train.batch_size: expected int, got 'true' (bool)"),
        ("train.max_steps=ten", "train.max_steps: expected int | None, got 'ten' (str)"),
        ("train.resume=maybe", "train.resume: expected bool, got 'maybe' (str)"),
        ("optim.learning_rate=fast", "optim.learning_rate: expected float, got 'fast' (str)"),
        ("data.buckets=[128, big]", "data.buckets: expected list[int] | None, got '[128, big]' (list)"),
        ("data.train_files={a: 1}", "data.train_files: expected str | list[str], got '{a: 1}' (dict)"),
        ("mesh.rules=[[1, 2, 3]]", "mesh.rules: expected list[tuple[str, tuple[str | None, ...]]] | None"),
        ("optim=3", "optim: expected mapping, got '3' (int)"),
    ],
)
def test_type_errors_name_key_type_and_value(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_type_error_in_yaml(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: [1]\n")
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int \| None, got \[1\] \(list\)"):
        load_config(path)


def test_choices():
    for loss_type in LOSS_TYPES:
        assert load_config(None, [f"dpo.loss_type={loss_type}"]).dpo.loss_type == loss_type
    with pytest.raises(ConfigError) as info:
        load_config(None, ["dpo.loss_type=sigmod"])
    msg = str(info.value)
    assert "dpo.loss_type: 'sigmod' is not one of" in msg and "'apo_zero'" in msg
    assert "did you mean 'sigmoid'" in msg
    with pytest.raises(ConfigError, match="optim.schedule: 'cosin' is not one of .*did you mean 'cosine'"):
        load_config(None, ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match="model.dtype: 'float16' is not one of 'float32', 'bfloat16'"):
        load_config(None, ["model.dtype=float16"])
    with pytest.raises(ConfigError, match="dpo.reference"):
        config_from_dict({"dpo": {"reference": "later"}})


def test_loss_types_match_the_losses_module():
    from jaxrlhf import losses  # a plain import: an import failure fails the test

    assert set(DPO_LOSS_TYPES) == set(losses.DPO_LOSS_TYPES)
    assert len(DPO_LOSS_TYPES) == 14 and set(LOSS_TYPES) - set(DPO_LOSS_TYPES) == {"simpo", "orpo"}


def test_value_checks():
    with pytest.raises(
        ConfigError, match=r"data.max_prompt_length \(1024\) must be < data.max_length \(512\)"
    ):
        load_config(None, ["data.max_length=512", "data.max_prompt_length=1024"])
    # A later override can fix what an earlier value broke.
    cfg = load_config(None, ["data.max_prompt_length=2000", "data.max_length=4096"])
    assert cfg.data.max_prompt_length == 2000
    with pytest.raises(
        ConfigError, match="train.batch_size .10. must be a multiple of train.grad_accum_steps"
    ):
        load_config(None, ["train.batch_size=10", "train.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match="optim.learning_rate must be >= 0, got -1.0"):
        load_config(None, ["optim.learning_rate=-1"])
    with pytest.raises(ConfigError, match="mesh: at most one mesh axis may be -1"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="mesh.rules.0.: unknown mesh axis 'model'"):
        load_config(None, ["mesh.rules=[['.*', [model]]]"])
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        DPOConfig(beta=0.0)  # direct construction is checked too
    with pytest.raises(ConfigError, match="train.batch_size must be > 0"):
        TrainConfig(batch_size=0)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: {batch_size: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(write(tmp_path, "", "empty.yaml")) == ExperimentConfig()
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["train.max_steps"])


def test_round_trip_through_json():
    cfg = load_config(
        None,
        [
            "kind=dpo",
            "data.train_files=[a.jsonl]",
            "data.eval_files=b.jsonl",
            "data.buckets=[64, 128]",
            "mesh.rules=[['q_proj', [fsdp, tensor]]]",
            "reward.center_rewards_coefficient=0.01",
            "optim.max_grad_norm=None",
        ],
    )
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["mesh"]["rules"] == [["q_proj", ["fsdp", "tensor"]]]
    assert d["dpo"]["loss_type"] == "sigmoid" and d["optim"]["max_grad_norm"] is None
    assert config_from_dict(d) == cfg
    assert config_from_dict({}) == ExperimentConfig()
    assert config_from_dict({"train": {"max_steps": 3}}).train.max_steps == 3


def test_every_field_is_documented_and_docs_are_current():
    cfg = ExperimentConfig()
    sections = [getattr(cfg, name) for name in type(cfg).model_fields if name != "kind"]
    for obj in (cfg, *sections):
        for name, f in type(obj).model_fields.items():
            assert f.description, f"{type(obj).__name__}.{name} has no help"
    text = config_markdown()
    for section in ("model", "data", "optim", "mesh", "train", "dpo", "reward", "sft"):
        assert f"## `{section}`" in text
    assert "| `optim.learning_rate` | `float` |" in text
    docs = REPO / "docs" / "configuration.md"
    assert docs.read_text() == text, (
        'docs/configuration.md is stale; regenerate it with: python -c "from jaxrlhf.train.config '
        "import config_markdown as m; print(m(), end='')\" > docs/configuration.md"
    )


@pytest.mark.parametrize(
    "overrides, scan",
    [
        ([], False),  # CPU: remat "auto" and scan "auto" stay unrolled (docs/benchmarks.md)
        (["model.remat=none"], False),
        (["model.remat=full"], True),  # with a policy, only a scan saves memory on XLA:CPU
        (["model.remat=dots_saveable"], True),
        (["model.remat=true"], True),
        (["model.scan_layers=true"], True),
        (["model.scan_layers=false", "model.remat=full"], False),
    ],
)
def test_scan_layers_auto_on_cpu(overrides, scan):
    import jax

    assert jax.default_backend() == "cpu"
    cfg = load_config(None, overrides)
    assert cfg.model.use_scan is scan


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")), ids=str
)
def test_every_shipped_config_loads_and_its_data_exists(path):
    """Each file under configs/ is a valid config whose shipped data files (`asset:`, including the
    held-out prompts of `reward_eval`) exist; a plan-only config may name the user's own files."""
    from jaxrlhf.train.algorithms import load_config
    from jaxrlhf.train.pipeline import resolve_data_files

    cfg = load_config(str(REPO / path))
    for spec in (cfg.data.train_files, cfg.data.eval_files, cfg.reward_eval.prompt_files):
        for name in [spec] if isinstance(spec, str) else spec or []:
            if name.startswith("asset:"):
                (file,) = resolve_data_files(name)
                assert Path(file).is_file(), (path, file)


def test_reward_eval_weights_must_match_its_functions():
    with pytest.raises(ConfigError, match="reward_eval.reward_weights has 1 entries for 2"):
        config_from_dict({"kind": "dpo", "reward_eval": {
            "reward_funcs": ["jaxrlhf.rewards:vader_sentiment", "jaxrlhf.rewards:format_reward"],
            "reward_weights": [1.0]}})  # fmt: skip
