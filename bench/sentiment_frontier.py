"""The reward-KL frontier of the controlled-sentiment task (docs/sentiment.md; Rafailov et al. 2023,
arXiv:2305.18290, Figure 2 left): every method's held-out ground-truth reward against its KL to the
reference, at each evaluation of each run.

    python bench/sentiment_frontier.py                    # the whole sweep (88 min on 2 CPU cores)
    python bench/sentiment_frontier.py --only dpo_b0.1    # one run (others already done are reused)
    python bench/sentiment_frontier.py --plot-only        # redraw from what is there
    python bench/sentiment_frontier.py --plot-only --include bench/results/sentiment_*.json  # + recorded

Runs, all on the prompts of `asset:sentiment` (jaxrlhf/assets/sentiment/make_data.py), each a
`jaxrlhf train` subprocess on a shipped config with overrides:

* `rm`: the reward model (configs/sentiment/reward.yaml: the RLHF demo's, trained on the whole data);
  its held-out pairwise accuracy against VADER;
* `ppo_kl<c>`: PPO against that reward model at several `ppo.kl_coef` (configs/ppo_demo.yaml);
* `ppo_gt`: PPO with VADER itself as the reward (configs/sentiment/ppo_gt.yaml);
* `dpo_b<beta>`: DPO at several `dpo.beta` (configs/sentiment/dpo.yaml);
* `preferred_ft`: SFT on the best sample of each prompt (configs/sentiment/preferred_ft.yaml);
* `grpo`: GRPO with VADER as the reward (configs/sentiment/grpo.yaml).

Resumable: a run whose `summary.json` exists is not run again, and an interrupted run resumes from
its last checkpoint. Every run evaluates with the same `reward_eval` settings (held-out prompts,
samples per prompt, seed, temperature 1), so the points are comparable. Writes
`<out>/frontier.json` (every point, the reward model's accuracy, the wall time of each run) and
`<out>/frontier.png`. `--include` adds the runs of recorded `frontier.json` files (bench/results/)
to the table and the plot. `--model`, `--data` and `--set` make a small version (the test suite runs
one on a tiny random model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KL_COEFS = (0.05, 0.2, 0.5)
BETAS = (0.05, 0.1, 0.5)


@dataclass
class Run:
    name: str
    method: str  # the line it belongs to in the plot
    kind: str
    config: str
    overrides: list[str] = field(default_factory=list)


def plan(kl_coefs: Sequence[float], betas: Sequence[float], grpo: bool) -> list[Run]:
    runs = [Run("rm", "reward model", "reward", "configs/sentiment/reward.yaml")]
    runs += [Run(f"ppo_kl{c:g}", "PPO (learnt reward model)", "ppo", "configs/ppo_demo.yaml",
                 [f"ppo.kl_coef={c}"]) for c in kl_coefs]  # fmt: skip
    runs.append(Run("ppo_gt", "PPO-GT (VADER reward)", "ppo", "configs/sentiment/ppo_gt.yaml"))
    runs += [Run(f"dpo_b{b:g}", "DPO", "dpo", "configs/sentiment/dpo.yaml", [f"dpo.beta={b}"]) for b in betas]
    runs.append(Run("preferred_ft", "Preferred-FT", "sft", "configs/sentiment/preferred_ft.yaml"))
    if grpo:
        runs.append(Run("grpo", "GRPO (VADER reward)", "grpo", "configs/sentiment/grpo.yaml"))
    return runs


def data_overrides(run: Run, data: str | None) -> list[str]:
    """The `asset:sentiment/...` files `run`'s config names, replaced by the same names in `data`."""
    if data is None:
        return []
    import yaml

    with open(os.path.join(ROOT, run.config)) as f:
        cfg = yaml.safe_load(f)
    out = []
    for section, key in (("data", "train_files"), ("data", "eval_files"), ("reward_eval", "prompt_files")):
        value = (cfg.get(section) or {}).get(key)
        if value is None:
            continue
        names = [value] if isinstance(value, str) else value
        local = [os.path.join(data, name.removeprefix("asset:sentiment/")) for name in names]
        out.append(f"{section}.{key}={local[0] if isinstance(value, str) else json.dumps(local)}")
    return out


def train(run: Run, out: str, args: argparse.Namespace) -> float:
    """Run `run` in a subprocess (resuming its checkpoint if any); returns the wall seconds."""
    overrides = [f"train.output_dir={os.path.join(out, run.name)}", *run.overrides,
                 *data_overrides(run, args.data), *args.set]  # fmt: skip
    if args.model:
        overrides.append(f"model.path={args.model}")
    if run.kind == "ppo" and run.name != "ppo_gt":
        overrides.append(f"ppo.reward_model={os.path.join(out, 'rm', 'export')}")
    cmd = [sys.executable, "-m", "jaxrlhf", "train", run.kind, "--config", os.path.join(ROOT, run.config),
           *overrides]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(out, f"{run.name}.log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.time() - start


def read_metrics(directory: str) -> list[dict]:
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(runs: Sequence[Run], out: str) -> dict:
    """Every run's evaluation points (step, reward, KL and their standard errors)."""
    result: dict = {"runs": {}}
    for run in runs:
        directory = os.path.join(out, run.name)
        if not os.path.exists(os.path.join(directory, "summary.json")):
            continue
        rows = [r for r in read_metrics(directory) if r.get("split") == "eval"]
        entry: dict = {
            "method": run.method,
            "kind": run.kind,
            "config": run.config,
            "overrides": run.overrides,
        }
        if run.kind == "reward":
            entry["accuracy"] = [
                {"step": r["step"], "accuracy": r["accuracy"]} for r in rows if "accuracy" in r
            ]
        else:
            by_step = {r["step"]: r for r in rows if "reward_eval/reward" in r}  # the last eval of a step
            entry["points"] = [
                {"step": s, "reward": r["reward_eval/reward"], "kl": r["reward_eval/kl"],
                 "reward_sem": r["reward_eval/reward_sem"], "kl_sem": r["reward_eval/kl_sem"]}
                for s, r in sorted(by_step.items())
            ]  # fmt: skip
        timing = os.path.join(out, f"{run.name}.seconds")
        if os.path.exists(timing):
            with open(timing) as f:
                entry["wall_seconds"] = float(f.read())
        result["runs"][run.name] = entry
    return result


def include(result: dict, paths: Sequence[str]) -> dict:
    """`result` with the runs of recorded `frontier.json` files added; a run whose name is taken
    is added as `<name> (<file stem>)`."""
    runs = dict(result["runs"])
    for path in paths:
        with open(path) as f:
            recorded = json.load(f)["runs"]
        stem = os.path.splitext(os.path.basename(path))[0]
        for name, entry in recorded.items():
            runs[name if name not in runs else f"{name} ({stem})"] = {**entry, "recorded_in": path}
    return {**result, "runs": runs}


def draw(result: dict, path: str) -> None:
    """Reward against KL (± one standard error each), one colour per method; runs of one method share
    the colour (markers differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {"PPO (learnt reward model)": "tab:orange", "PPO-GT (VADER reward)": "tab:red",
               "DPO": "tab:blue", "Preferred-FT": "tab:green",
               "GRPO (VADER reward)": "tab:purple"}  # fmt: skip
    markers = "os^Dv<>"
    seen: dict[str, int] = {}
    for name, entry in result["runs"].items():
        points = entry.get("points")
        if not points:
            continue
        method = entry["method"]
        k = seen.get(method, 0)
        seen[method] = k + 1
        kl = [p["kl"] for p in points]
        reward = [p["reward"] for p in points]
        xerr = [p["kl_sem"] or 0.0 for p in points]  # recorded runs may lack it (None)
        ax.errorbar(kl, reward, xerr=xerr, yerr=[p["reward_sem"] for p in points],
                    color=colours.get(method, "gray"), marker=markers[k % len(markers)], lw=0.8, ms=5,
                    elinewidth=0.5, capsize=2, alpha=0.85, label=f"{method}: {name}")  # fmt: skip
    ax.set_xlabel("KL(policy || reference), nats per continuation (held-out prompts)")
    ax.set_ylabel("mean VADER sentiment of continuations")
    ax.set_title("Controlled sentiment, SmolLM2-135M-Instruct: reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sentiment_frontier"))
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--kl-coefs", default=",".join(map(str, KL_COEFS)))
    ap.add_argument("--betas", default=",".join(map(str, BETAS)))
    ap.add_argument("--no-grpo", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--model", default=None, help="model.path of every run (default: the configs', 'demo')")
    ap.add_argument(
        "--data", default=None, help="a directory written by make_data.py (default: asset:sentiment)"
    )
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--png", default=None, help="where to draw the plot (default: <out>/frontier.png)")
    ap.add_argument("--include", nargs="*", default=[],
                    help="recorded frontier.json files whose runs join the table and the plot")
    args = ap.parse_args(argv)
    kl_coefs = [float(c) for c in args.kl_coefs.split(",") if c]
    runs = plan(kl_coefs, [float(b) for b in args.betas.split(",") if b], not args.no_grpo)
    os.makedirs(args.out, exist_ok=True)
    only = {n for n in args.only.split(",") if n}
    if not args.plot_only:
        for run in runs:
            if only and run.name not in only:
                continue
            if os.path.exists(os.path.join(args.out, run.name, "summary.json")):
                print(f"{run.name}: done before", flush=True)
                continue
            seconds = train(run, args.out, args)
            with open(os.path.join(args.out, f"{run.name}.seconds"), "w") as f:
                f.write(f"{seconds:.1f}")
            print(f"{run.name}: {seconds / 60:.1f} min", flush=True)
    result = collect(runs, args.out)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(result, f, indent=1)
    result = include(result, args.include)
    draw(result, args.png or os.path.join(args.out, "frontier.png"))
    print(table(result), flush=True)
    return result


def table(result: dict) -> str:
    """One line per run: the first and the last evaluation, and the best reward seen."""
    w = max([14, *(len(name) + 2 for name in result["runs"])])
    lines = [f"{'run':<{w}}{'method':<28}{'reward before':>14}{'after':>8}{'KL after':>10}{'minutes':>9}"]
    for name, e in result["runs"].items():
        minutes = f"{e['wall_seconds'] / 60:.1f}" if "wall_seconds" in e else "-"
        if "accuracy" in e:
            acc = e["accuracy"]
            first, last = (f"{acc[0]['accuracy']:.3f}", f"{acc[-1]['accuracy']:.3f}") if acc else ("-", "-")
            lines.append(f"{name:<{w}}{'pairwise accuracy':<28}{first:>14}{last:>8}{'':>10}{minutes:>9}")
        elif e.get("points"):
            p0, p1 = e["points"][0], e["points"][-1]
            lines.append(f"{name:<{w}}{e['method']:<28}{p0['reward']:>+14.3f}{p1['reward']:>+8.3f}"
                         f"{p1['kl']:>10.2f}{minutes:>9}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
