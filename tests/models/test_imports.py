"""The modules of `jaxrlhf.models` import without circles.

Each module is imported on its own in a fresh interpreter with the packages `jaxrlhf` and
`jaxrlhf.models` registered but their `__init__` files not run (those import every module in a fixed
order, which could hide a circle that only breaks when another module is imported first). And no
module hides a circle behind an import inside a function: every `jaxrlhf` import is at module level.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers.procs import cpu_env
from helpers.scripts import ROOT

MODELS_DIR = os.path.join(ROOT, "jaxrlhf", "models")
MODULES = sorted(n[:-3] for n in os.listdir(MODELS_DIR) if n.endswith(".py") and n != "__init__.py")

def _imports(module: str) -> set[str]:
    """The `jaxrlhf.models` modules that `module` imports at module level."""
    with open(os.path.join(MODELS_DIR, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        parts = [n.split(".") for n in names if n.startswith("jaxrlhf.models.")]
        found |= {p[2] for p in parts if p[2] in MODULES}
    return found


def test_modules_are_listed():
    assert {"attention", "config", "decoder", "layers", "lora", "moe"} <= set(MODULES)


def test_module_level_imports_form_no_circle():
    """The graph of module-level imports between `jaxrlhf.models` modules has no cycle (so any
    module imports first, alone, whatever the order)."""
    graph = {m: _imports(m) - {m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import circle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])
    assert graph["moe"] and "decoder" not in graph["moe"]  # moe builds on layers, not on decoder


def test_a_module_imports_alone():
    """One module in a fresh interpreter with the packages registered but their `__init__` not run
    (the graph above covers every module; this checks the registration trick itself works)."""
    script = _ALONE.format(root=os.path.dirname(MODELS_DIR), models=MODELS_DIR, module="moe")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=cpu_env(1), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# Register the two packages without running their __init__, then import one module.
_ALONE = """
import importlib, importlib.util, sys, types
for name, path in (("jaxrlhf", {root!r}), ("jaxrlhf.models", {models!r})):
    package = types.ModuleType(name)
    package.__path__ = [path]
    package.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    sys.modules[name] = package
module = importlib.import_module("jaxrlhf.models." + {module!r})
assert module.__file__.startswith({models!r}), module.__file__
print("OK")
"""


@pytest.mark.parametrize("module", MODULES)
def test_no_function_level_jaxrlhf_import(module):
    with open(os.path.join(MODELS_DIR, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = set(map(id, tree.body))
    nested = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            nested += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] == "jaxrlhf"]
    assert not nested, f"jaxrlhf/models/{module}.py imports inside a function: {nested}"
