"""What the runner's overlap buys on the demo: the DPO demo's training loop with the next batch
prepared while the device runs the step (`train.prefetch`) and metrics fetched every `log_every`
steps, against the old order (the batch made after each step, the metrics read after each step).

    .venv/bin/python bench/bench_loop_overlap.py --steps 12 [--out bench/results/loop_overlap.json]

Each variant is a fresh run of `configs/dpo_demo.yaml` (reference log-probs precomputed and cached
once, before the loop; no evaluation, no export); the time per step is measured between the logs of
step 1 and of the last step (`metrics.jsonl` records when each was written), so start-up,
compilation and the first step are left out. On a CPU the device is the host: the overlap can only
hide the collate and the transfer, not the step itself.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

VARIANTS = {
    "in order, metrics every step": {"train.prefetch": False, "train.log_every": 1},
    "prefetch, metrics every step": {"train.prefetch": True, "train.log_every": 1},
    "prefetch, metrics every 10 steps": {"train.prefetch": True, "train.log_every": 10},
}


def seconds_per_step(output_dir: str, steps: int) -> float:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}
    return (rows[steps]["time"] - rows[1]["time"]) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/dpo_demo.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    from jaxrlhf.train import load_config, train

    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, overrides in VARIANTS.items():
            with tempfile.TemporaryDirectory() as out:
                extra = {"train.max_steps": args.steps, "train.output_dir": out, "train.export": False,
                         "train.save_every": 0, "train.resume": False, "data.eval_files": None,
                         "task_eval.enabled": False, **overrides}  # fmt: skip
                cfg = load_config(args.config, [f"{k}={v}" for k, v in extra.items()])
                start = time.perf_counter()
                train(cfg, log=lambda msg: None)
                per_step = seconds_per_step(out, args.steps)
                results[name].append(per_step)
                total = time.perf_counter() - start
                print(f"[{repeat}] {name}: {per_step:.3f} s/step ({total:.0f} s in all)")
    base = min(results["in order, metrics every step"])
    print(f"\n{'variant':<36}{'s/step (best)':>14}{'vs in order':>13}")
    for name, values in results.items():
        print(f"{name:<36}{min(values):>14.3f}{base / min(values):>12.3f}x")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "steps": args.steps, "seconds_per_step": results}, f, indent=2)


if __name__ == "__main__":
    main()
