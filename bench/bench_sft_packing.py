"""SFT with and without packing (`sft.packing`) on the demo model and the demo SFT data (CPU).

Each setting runs `configs/sft_demo.yaml` for two epochs through the Python API, in its own
subprocess, with a step logged every step; the second epoch is timed (every padded shape is compiled
in the first). Reported per setting: examples, rows (packed rows hold several examples), steps per
epoch, the real share of the padded tokens, the second epoch's seconds, examples per second, and
the held-out loss after training (the same data and loss, so the two should be close).

    python bench/bench_sft_packing.py                 # both settings, the table
    python bench/bench_sft_packing.py --json out.json

Not part of the test suite (timing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TAG = "BENCH_RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(packing: bool, out: str) -> dict:
    from jaxrlhf.train import load_config, train

    overrides = [f"train.output_dir={out}", "train.num_epochs=2", "train.log_every=1", "train.save_every=0",
                 "train.export=false", "train.resume=false", "train.tensorboard=false",
                 "task_eval.enabled=false", f"sft.packing={str(packing).lower()}"]  # fmt: skip
    cfg = load_config(os.path.join(HERE, "..", "configs", "sft_demo.yaml"), overrides)
    result = train(cfg)
    with open(os.path.join(out, "summary.json")) as f:
        data = json.load(f)["data"]
    examples = data["train/examples"]
    rows = data.get("train/packed_rows", examples)
    per_epoch = rows // cfg.train.batch_size
    second = result.train_metrics[per_epoch:]
    seconds = sum(m["step_seconds"] for m in second)
    return {"packing": packing, "examples": examples, "rows": rows, "steps_per_epoch": per_epoch,
            "epoch_seconds": seconds, "examples_per_second": per_epoch * cfg.train.batch_size
            * (examples / rows) / seconds, "eval_loss_after": result.eval_after["loss"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", choices=["packed", "unpacked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as out:
            print(TAG + json.dumps(run_one(args.one == "packed", out)), flush=True)
        return
    rows = []
    for one in ("unpacked", "packed"):
        proc = subprocess.run([sys.executable, __file__, "--one", one], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
        if proc.returncode or not lines:
            sys.exit(f"{one} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len(TAG) :]))
    print("| packing | examples | rows | steps/epoch | epoch 2 (s) | examples/s | held-out loss after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['packing']} | {r['examples']} | {r['rows']} | {r['steps_per_epoch']} | "
              f"{r['epoch_seconds']:.1f} | {r['examples_per_second']:.1f} | {r['eval_loss_after']:.4f} |")
    print(f"speed-up (examples/s): {rows[1]['examples_per_second'] / rows[0]['examples_per_second']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
