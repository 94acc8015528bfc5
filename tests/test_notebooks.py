"""Execute the example notebooks end to end (nbclient, the venv's python3 kernel, cwd = repo root).

In `make test` every notebook runs on a tiny random model with SmolLM2's tokenizer standing in for the
demo model (`$JAXRLHF_DEMO_MODEL`): every cell and every call of the notebook runs, in a fraction of
the time. On the real SmolLM2-135M-Instruct they run under the `demo_model` marker (`make test-all`).
Add a notebook to NOTEBOOKS to have it executed by the test suite.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = [
    "01_dpo_quickstart.ipynb",
    "02_rlhf_with_ppo.ipynb",
    "03_losses_in_your_jax_code.ipynb",
    "04_lora_dpo.ipynb",
    "05_grpo_verifiable_rewards.ipynb",
]
KERNEL_NAME = "python3"
TIMEOUT_S = 600


def _kernel_uses_this_python() -> bool:
    """True when the ``python3`` kernelspec would start ``sys.executable``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        return False
    exe = spec.argv[0]
    # jupyter_client replaces a bare "python" / "python3" with sys.executable when launching.
    if exe in {"python", f"python{sys.version_info[0]}",
               f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        return True
    return os.path.realpath(exe) == os.path.realpath(sys.executable)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Make ``python3`` resolve to this interpreter (the venv), installing a spec if needed."""
    if _kernel_uses_this_python():
        yield
        return
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.prefix})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    # JUPYTER_PATH is searched before the user / system data dirs.
    mp.setenv("JUPYTER_PATH", os.pathsep.join([str(jupyter_dir), os.environ.get("JUPYTER_PATH", "")]))
    try:
        assert _kernel_uses_this_python()
        yield
    finally:
        mp.undo()


def _execute(name: str) -> None:
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=TIMEOUT_S,
        resources={"metadata": {"path": str(REPO_ROOT)}},  # the kernel's cwd
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env, tiny_dir, monkeypatch):
    """Each notebook on the tiny stand-in model (the kernel inherits the environment)."""
    monkeypatch.setenv("JAXRLHF_DEMO_MODEL", tiny_dir)
    _execute(name)


@pytest.mark.demo_model
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_demo_model(name, kernel_env, monkeypatch):
    monkeypatch.delenv("JAXRLHF_DEMO_MODEL", raising=False)
    _execute(name)
