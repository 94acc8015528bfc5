"""Command line: `jaxrlhf train KIND --config FILE [key=value ...]`, `demo`, `eval`, `chat`, `plan`.

`train` runs a method (KIND: sft, reward, dpo, kto, ppo, grpo, rloo or online_dpo) from a YAML config (see
docs/configuration.md) with dotted `key=value`
overrides; `demo` is the main job (DPO on the embedded demo model with held-out task accuracy,
preference metrics and sample replies before and after); `eval` measures task accuracy (greedy
replies judged by the checker of each row's family); `chat` loads a model (default: the embedded
SmolLM2-135M-Instruct) with our Flax model and prints the replies it generates (greedy decoding);
`plan` compiles a run's steps for a TPU slice with the TPU compiler, on shapes alone (no TPU, no
weights), and says whether they fit, their estimated step time and MFU (docs/scaling.md).

Mistakes in what the user gave -- config, data, checkpoint, a run whose loss turns NaN -- are one
line on stderr naming the file (and row and field) or the step, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for writing clear Python code.",
)


def generate_replies(model_path: str, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy chat replies of the model at `model_path` (our Flax implementation) and the seconds taken."""
    import numpy as np

    from jaxrlhf.data import left_pad
    from jaxrlhf.generation import generate
    from jaxrlhf.models import from_pretrained, load_tokenizer

    model, tok = from_pretrained(model_path), load_tokenizer(model_path)
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    ids, mask = left_pad(rows, tok.pad_token_id)
    start = time.perf_counter()
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        temperature=0.0,
    )
    tokens, done = np.asarray(out.tokens), np.asarray(out.completion_mask)
    replies = [
        tok.decode(row[m == 1], skip_special_tokens=True).strip() for row, m in zip(tokens, done, strict=True)
    ]
    return replies, time.perf_counter() - start


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by what the user gave (config, data, checkpoint, a diverging run): reported as
    one line on stderr with exit code 2, never as a traceback."""
    from jaxrlhf.data import DataError
    from jaxrlhf.models import CheckpointError, UnsupportedModelError
    from jaxrlhf.plan.target import PlanError
    from jaxrlhf.train.checkpoint import NonFiniteError
    from jaxrlhf.train.config import ConfigError

    return (ConfigError, DataError, CheckpointError, UnsupportedModelError, NonFiniteError, PlanError)


def _reported(fn: Callable[[], int]) -> int:
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars would bury the one error line
    try:
        return fn()
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_chat(prompts: Sequence[str], max_new_tokens: int, model_path: str = "demo") -> int:
    from jaxrlhf.train.common import model_directory

    path = model_directory(model_path)
    print(f"model: {path}")
    replies, seconds = generate_replies(path, prompts, max_new_tokens)
    for prompt, reply in zip(prompts, replies, strict=True):
        print(f"\nuser: {prompt}\nassistant: {reply}")
    print(f"\n({seconds:.1f}s, compilation included)")
    return 0


def run_eval(model_path: str, data: Sequence[str], max_new_tokens: int, batch_size: int, samples: int,
             output: str | None) -> int:  # fmt: skip
    """`jaxrlhf eval`: task accuracy of a model on data with `family` / `answer` columns."""
    from jaxrlhf.evaluation import (
        evaluate_tasks,
        format_samples,
        format_task_report,
        load_task_prompts,
        write_task_eval,
    )
    from jaxrlhf.models import from_pretrained, load_tokenizer
    from jaxrlhf.train.common import model_directory
    from jaxrlhf.train.pipeline import resolve_data_files

    path = model_directory(model_path)  # checked first: a bad model fails before the data is read
    files = resolve_data_files(list(data))
    tokenizer = load_tokenizer(path)
    prompts = load_task_prompts(files, tokenizer)
    start = time.perf_counter()
    result = evaluate_tasks(
        from_pretrained(path), tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        samples_per_family=samples,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if output is None:
        model_name = "demo" if model_path == "demo" else os.path.basename(os.path.normpath(path))
        stem = "+".join(os.path.basename(f).split(".")[0] for f in files)
        output = os.path.join("runs", "eval", f"{model_name}__{stem}.json")
    write_task_eval(output, result, model=model_path, data=files)
    print(f"model: {path}\ndata: {', '.join(files)} ({result.total} prompts, greedy, "
          f"{max_new_tokens} new tokens at most; {seconds:.1f}s)\n")  # fmt: skip
    print(format_task_report(None, result))
    print(format_samples(None, result))
    print(f"\nwritten: {output}")
    return 0


def run_demo(config: str, overrides: Sequence[str]) -> int:
    """The main job: DPO on the embedded demo model with the shipped data; held-out task accuracy
    (greedy replies judged by each family's checker) and preference metrics, before and after."""
    from jaxrlhf.evaluation import format_samples, format_task_report
    from jaxrlhf.train import load_config, train

    cfg = load_config(config, overrides, kind="dpo")
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    if result.export_dir is None:
        return 1
    print(f"\nDPO demo: {result.steps} steps in {minutes:.1f} min (data, reference, training, evaluation)")
    before, after = result.task_before, result.task_after
    if before is not None and after is not None:
        verdict = "better" if after.accuracy > before.accuracy else "not better"
        print(f"held-out task accuracy (greedy replies, checked): {before.accuracy:.3f} -> "
              f"{after.accuracy:.3f} ({verdict})\n")  # fmt: skip
        print(format_task_report(before, after))
    print()
    print(format_eval(*(_preference_metrics(m) for m in (result.eval_before, result.eval_after))))
    if after is not None:
        print("\nsample replies (the first prompts of each family, whatever their outcome):")
        print(format_samples(before, after))
    return 0


def _preference_metrics(metrics: dict[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if not k.startswith("task/")}


def run_train(kind: str, config: str | None, overrides: Sequence[str]) -> int:
    from jaxrlhf.train import load_config, train

    result = train(load_config(config, overrides, kind=kind))
    if result.eval_before or result.eval_after:
        print(format_eval(result.eval_before, result.eval_after))
    return 0


def run_plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """`jaxrlhf plan`: the run of `--config` compiled for `--topology`; exit 0 if every step fits."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: the slice's devices come from libtpu
    if args.platform == "cpu":
        from jaxrlhf.plan.target import set_host_devices

        set_host_devices(args.devices or 8)
    from jaxrlhf.plan.run import model_config_json, plan_run, specs_from_config, write_json
    from jaxrlhf.plan.target import resolve
    from jaxrlhf.train import load_config

    cfg = load_config(args.config, overrides, kind=args.kind)
    target = resolve(args.platform, args.topology, args.devices)  # errors before anything heavy
    specs = specs_from_config(cfg, target, model_config_json(cfg.model.path))
    print(f"plan: {cfg.kind} of {cfg.model.path} on {target.name} ({target.count} x {target.chip.name}, "
          f"{target.chip.hbm_gb:g} GB HBM each); every time and MFU below is the compiler's "
          "estimate")  # fmt: skip
    result = plan_run(specs, target, search=not args.no_search)
    for step, overrides_found in result["suggestions"].items():
        print(f"{step} fits with: {' '.join(overrides_found)}")
    print(f"verdict: {'fits' if result['fits'] else 'does not fit'} on {target.name}")
    if args.json:
        write_json(result, args.json)
        print(f"written: {args.json}")
    return 0 if result["fits"] else 1


def format_eval(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    """A before/after table of held-out metrics."""
    keys = sorted(set(before or {}) | set(after or {}))
    lines = [f"{'held-out metric':<34}{'before':>12}{'after':>12}"]
    for k in keys:
        b = f"{before[k]:.4f}" if before and k in before else "-"
        a = f"{after[k]:.4f}" if after and k in after else "-"
        lines.append(f"{k:<34}{b:>12}{a:>12}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxrlhf.train.algorithms import ALGORITHMS  # the kinds come from the registry

    kinds = tuple(ALGORITHMS)
    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("kind", choices=kinds, metavar="KIND",
                    help="; ".join(f"{k}: {a.help}" for k, a in ALGORITHMS.items()))  # fmt: skip
    tr.add_argument("--config", help="YAML config (configs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.learning_rate=1e-5")
    demo = sub.add_parser("demo", help="the main job: DPO on the embedded demo model, before/after")
    demo.add_argument("--config", default="configs/dpo_demo.yaml")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ev = sub.add_parser("eval", help="task accuracy: greedy replies to prompts with checkable answers")
    ev.add_argument("--model", default="demo", help="checkpoint directory or hub id (default: demo model)")
    ev.add_argument("--data", action="append", required=True,
                    help="JSON Lines / parquet / ... with prompt, family and answer columns (repeatable); "
                    "asset:dpo_demo/test.jsonl is the shipped held-out set")  # fmt: skip
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--samples", type=int, default=2, help="replies shown per family (the first rows)")
    ev.add_argument("--output", help="JSON report (default: runs/eval/<model>__<data>.json)")
    chat = sub.add_parser("chat", help="chat with a model through our Flax implementation")
    chat.add_argument("--model", default="demo", help="checkpoint directory or hub id (default: demo model)")
    chat.add_argument("--prompt", action="append", help="a user message (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    pl = sub.add_parser("plan", help="compile a run for a TPU slice (no TPU needed): fits? step time? MFU?")
    pl.add_argument("--config", help="the run's YAML config (as for `jaxrlhf train`)")
    pl.add_argument("--kind", choices=kinds,
                    help="what the run trains (default: the config's kind)")  # fmt: skip
    pl.add_argument("--topology", help="TPU slice GENERATION:AxB[xC], e.g. v5p:4x4x4 (64 chips), v5e:16x16; "
                    "GPUs: h100:8, h200:2x8 (hosts x GPUs)")  # fmt: skip
    pl.add_argument("--platform", choices=("tpu", "gpu", "cpu"), default="tpu",
                    help="tpu (libtpu's compiler), gpu (XLA's CUDA plugin: memory and FLOPs, no time) "
                    "or cpu (fake host devices: memory only)")  # fmt: skip
    pl.add_argument("--devices", type=int, help="--platform cpu: the number of fake devices (default 8)")
    pl.add_argument("--json", help="write the plan's rows and verdict as JSON here")
    pl.add_argument("--no-search", action="store_true", help="do not look for settings that fit")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=64")
    args, extra = parser.parse_known_args(argv)
    if args.command == "plan":
        bad = [x for x in extra if "=" not in x]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
        return _reported(lambda: run_plan(args, [*args.overrides, *extra]))
    if args.command in ("train", "demo"):
        bad = [x for x in extra if "=" not in x]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
        overrides = [*args.overrides, *extra]
        if args.command == "train":
            return _reported(lambda: run_train(args.kind, args.config, overrides))
        return _reported(lambda: run_demo(args.config, overrides))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "eval":
        return _reported(lambda: run_eval(args.model, args.data, args.max_new_tokens, args.batch_size,
                                          args.samples, args.output))  # fmt: skip
    return _reported(lambda: run_chat(args.prompt or DEFAULT_PROMPTS, args.max_new_tokens, args.model))


if __name__ == "__main__":
    sys.exit(main())
