"""Plans for pod slices, before the pod: the project's steps compiled for a TPU topology (libtpu's
compiler, no TPU) or fake CPU devices, on shapes alone, with their memory, the compiler's estimated
step time and MFU, and the settings that fit (`jaxrlhf plan`; docs/scaling.md).

Modules: `target` (devices and chips), `steps` (the steps lowered on abstract inputs), `planner`
(compile, read memory and cost, search), `hlo_cost` (loop-aware FLOPs, cycles and collectives from
the optimized HLO), `arithmetic` (the memory and FLOPs formulas), `shapes` (abstract states and
batches), `models` (known `config.json`s), `run` (a user's run config to plans: the CLI).
"""

from jaxrlhf.plan.hlo_cost import HloCost, analyze, breakdown
from jaxrlhf.plan.planner import candidates, compile_plan, search
from jaxrlhf.plan.steps import STEPS, PlanSpec
from jaxrlhf.plan.target import CHIPS, Chip, PlanError, Target, cpu_target, resolve, tpu_target

__all__ = [
    "CHIPS",
    "STEPS",
    "Chip",
    "HloCost",
    "PlanError",
    "PlanSpec",
    "Target",
    "analyze",
    "breakdown",
    "candidates",
    "compile_plan",
    "cpu_target",
    "resolve",
    "search",
    "tpu_target",
]
