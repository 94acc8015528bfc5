"""Reward-model training-step throughput: jaxrlhf `RewardObjective` vs `trl.RewardTrainer`, on CPU.

The same harness as `bench/bench_dpo_vs_trl.py` (see its docstring for the timing and token
definitions), running only the reward-model configurations:

* ``jax-reward``  `from_pretrained(demo, head="score", init_score_head=True)` + `RewardObjective`
  on packed pairs (prompt once, score read at each completion's last token).
* ``trl-reward``  `AutoModelForSequenceClassification(num_labels=1)` from the same directory, fed
  jaxrlhf's token ids pre-tokenized (``chosen_ids`` / ``rejected_ids`` = prompt + completion).

    python bench/bench_reward_vs_trl.py            # ~5 min on 2 CPU cores
    python bench/bench_reward_vs_trl.py --quick

Not part of the test suite.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo_vs_trl import main  # noqa: E402

if __name__ == "__main__":
    main(default_benchmarks=("reward",))
