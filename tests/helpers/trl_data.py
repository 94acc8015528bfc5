"""What TRL's own dataset preparation makes of a list of rows: the reference for jaxrlhf's token ids
and loss masks.

Nothing here reimplements TRL. Each function builds the real TRL trainer (`trl.SFTTrainer`,
`trl.DPOTrainer`, `trl.KTOTrainer`, `trl.GRPOTrainer`, TRL 1.16) on a tiny random torch model with the
given tokenizer, truncation off and packing off, and runs every row through that trainer's own code:
the offline trainers' `_prepare_dataset`, the method their `__init__` runs on `train_dataset`
(trl/trainer/sft_trainer.py:1026, trl/trainer/dpo_trainer.py:849, trl/trainer/kto_trainer.py:860), and
GRPO's `_tokenize_prompts`, the method its `_generate` turns a batch's prompts into the ids it
generates from (trl/trainer/grpo_trainer.py:2221). Each row becomes a one-row `datasets.Dataset` (or
one-prompt batch) of its own, so TRL decides the format (conversational or not, prompt given or
implicit) per row, as it does from the first row of a uniform dataset or batch.

The trainers are cached per tokenizer directory and dataset format; a call costs a few
milliseconds a row once its trainer exists (about a second to build). Everything TRL and
transformers would write goes under one temporary directory removed at exit; their logs and warnings
are silenced.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import warnings
from typing import Any

_TMP = tempfile.TemporaryDirectory(prefix="jaxrlhf-trl-data-")


@contextlib.contextmanager
def _quiet():
    """Silence TRL / transformers / datasets / accelerate logs and Python warnings for the block."""
    import datasets
    import transformers

    names = ("trl", "transformers", "datasets", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    tf_level = transformers.logging.get_verbosity()
    progress = datasets.is_progress_bar_enabled()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        transformers.logging.set_verbosity(tf_level)
        if progress:
            datasets.enable_progress_bars()


def _tiny_model(vocab_size: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def _common_args() -> dict[str, Any]:
    return dict(
        output_dir=os.path.join(_TMP.name, "out"),
        report_to=[],
        use_cpu=True,
        max_length=None,  # no truncation (and the DPO prompt-length filter is off)
        dataset_num_proc=None,
        save_strategy="no",
        logging_strategy="no",
    )


def _one_row_dataset(row: dict):
    import datasets

    return datasets.Dataset.from_list([row])


@functools.lru_cache(maxsize=32)
def _sft_trainer(
    tokenizer_dir: str,
    prompt_completion: bool,
    conversational: bool,
    completion_only_loss: bool | None,
    assistant_only_loss: bool,
    chat_template_path: str | None,
):
    """An `SFTTrainer` built on a sample row of the given format (TRL reads the format from its first
    row: the default of `completion_only_loss`, the conversational check of `assistant_only_loss`)."""
    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if prompt_completion:
        sample = (
            {
                "prompt": [{"role": "user", "content": "a"}],
                "completion": [{"role": "assistant", "content": "b"}],
            }
            if conversational
            else {"prompt": "a", "completion": " b"}
        )
    else:
        sample = (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
            if conversational
            else {"text": "a b"}
        )
    args = trl.SFTConfig(
        **_common_args(),
        packing=False,
        padding_free=False,
        completion_only_loss=completion_only_loss,
        assistant_only_loss=assistant_only_loss,
        chat_template_path=chat_template_path,
    )
    return trl.SFTTrainer(
        model=_tiny_model(len(tokenizer)),
        args=args,
        train_dataset=_one_row_dataset(sample),
        processing_class=tokenizer,
    )


def _sft_loss_mask(labels: list[int]) -> list[int]:
    # TRL's labels are -100 where the loss skips a token (trl/trainer/sft_trainer.py:1421-1426). The
    # collator pads labels with -100 (sft_trainer.py:199-201), and the fused LM head, the loss
    # SFTTrainer.compute_loss runs, scores hidden state i against labels[i + 1]: it drops labels[0]
    # (trl/trainer/utils.py:1617-1619). So token 0 is never a target.
    return [int(i > 0 and label != -100) for i, label in enumerate(labels)]


def trl_sft_examples(
    rows: list[dict],
    tokenizer_dir: str,
    *,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    chat_template_path: str | None = None,
) -> list[dict]:
    """TRL `SFTTrainer`'s preprocessing of each row: token ids and the tokens its loss trains on.

    Rows may be language modelling `{"text": str}`, conversational language modelling
    `{"messages": [msg, ...]}`, prompt-completion `{"prompt": str, "completion": str}` or conversational
    prompt-completion `{"prompt": [msg, ...], "completion": [msg, ...]}`, with optional `tools` (a list,
    or a JSON string) and `chat_template_kwargs` (a dict) columns for conversational rows, passed by TRL
    to `apply_chat_template`.

    Args:
        rows: The dataset rows; formats may be mixed (each row is prepared on its own).
        tokenizer_dir: A local Hugging Face tokenizer directory.
        completion_only_loss: `SFTConfig.completion_only_loss`; `None` (TRL's default) means True for
            prompt-completion rows and False otherwise.
        assistant_only_loss: `SFTConfig.assistant_only_loss` (conversational rows only). TRL needs
            `{% generation %}` markers in the chat template; without them it swaps in a training template
            from `trl.chat_template_utils.get_training_chat_template`, which raises `ValueError` for a
            template it does not know (SmolLM2's among them): that error propagates from here.
        chat_template_path: `SFTConfig.chat_template_path`: a `.jinja` file whose template replaces the
            tokenizer's (e.g. one with generation markers), or a tokenizer to clone a template from.

    Returns:
        One dict per row: `input_ids` (list[int]); `labels` (list[int], TRL's label column, -100 where
        the loss skips a token); `loss_mask` (list[int], aligned with `input_ids`: 1 where the token at
        position i is a target of the loss, i.e. `labels[i] != -100` and `i > 0`, since the causal shift
        drops the first label).
    """
    from trl.data_utils import is_conversational, is_conversational_from_value

    out = []
    with _quiet():
        for row in rows:
            conversational = is_conversational(row) or is_conversational_from_value(row)
            trainer = _sft_trainer(
                tokenizer_dir,
                "prompt" in row and "completion" in row,
                conversational,
                completion_only_loss,
                assistant_only_loss,
                chat_template_path,
            )
            prepared = trainer._prepare_dataset(
                _one_row_dataset(row), trainer.processing_class, trainer.args, False, None, "train"
            )[0]
            labels = list(prepared["labels"])
            out.append(
                {
                    "input_ids": list(prepared["input_ids"]),
                    "labels": labels,
                    "loss_mask": _sft_loss_mask(labels),
                }
            )
    return out


@functools.lru_cache(maxsize=8)
def _reference_trainer(kind: str, tokenizer_dir: str):
    """TRL's `DPOTrainer` (kind "dpo") or `KTOTrainer` ("kto") on tiny models, with a sample row."""
    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    # KTO's `loss_type="kto"` (the default) estimates the KL term, which needs a device batch > 1
    # (trl/trainer/kto_trainer.py:844-847): TrainingArguments' default of 8 is kept.
    config, trainer, row = {
        "dpo": (trl.DPOConfig, trl.DPOTrainer, {"prompt": "a", "chosen": " b", "rejected": " c"}),
        "kto": (trl.KTOConfig, trl.KTOTrainer, {"prompt": "a", "completion": " b", "label": True}),
    }[kind]
    return trainer(
        model=_tiny_model(len(tokenizer)),
        # Given, else TRL reloads the policy from its name, which a model built from a config lacks.
        ref_model=_tiny_model(len(tokenizer)),
        args=config(**_common_args(), precompute_ref_log_probs=False),
        train_dataset=_one_row_dataset(row),
        processing_class=tokenizer,
    )


def trl_dpo_examples(rows: list[dict], tokenizer_dir: str) -> list[dict]:
    """TRL `DPOTrainer`'s preprocessing of each preference row.

    Rows may be explicit-prompt standard `{"prompt": str, "chosen": str, "rejected": str}`,
    explicit-prompt conversational (lists of messages), or implicit-prompt `{"chosen", "rejected"}`
    (either kind), where TRL takes the longest common prefix as the prompt (`trl.data_utils.extract_prompt`).
    Optional `tools` / `chat_template_kwargs` columns go to `apply_chat_template`. No truncation
    (`max_length=None`).

    Args:
        rows: The preference rows; each is prepared on its own.
        tokenizer_dir: A local Hugging Face tokenizer directory.

    Returns:
        One dict per row with TRL's column names: `prompt_ids`, `chosen_ids`, `rejected_ids`
        (list[int]; the completions without the prompt). TRL's collator trains on
        `prompt_ids + chosen_ids` / `prompt_ids + rejected_ids` with a completion mask of
        `[0] * len(prompt_ids) + [1] * len(completion)` (trl/trainer/dpo_trainer.py:146-150).
    """
    out = []
    with _quiet():
        trainer = _reference_trainer("dpo", tokenizer_dir)
        for row in rows:
            prepared = trainer._prepare_dataset(
                _one_row_dataset(row), trainer.processing_class, trainer.args, "train"
            )[0]
            out.append({k: list(prepared[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return out


def trl_kto_examples(rows: list[dict], tokenizer_dir: str) -> list[dict]:
    """TRL `KTOTrainer`'s preprocessing of each unpaired preference row.

    Rows may be standard `{"prompt": str, "completion": str, "label": bool}` or conversational
    (`prompt` and `completion` lists of messages), with optional `tools` (a list, or a JSON string) and
    `chat_template_kwargs` (a dict) columns passed to `apply_chat_template`. No truncation
    (`max_length=None`). What TRL does (`KTOTrainer._prepare_dataset`, trl/trainer/kto_trainer.py:1044-1184):

    * standard rows get the tokenizer's EOS token appended to the completion text unless it already
      ends with it (kto_trainer.py:1071-1082); conversational rows get none (the template ends the turn);
    * the prompt is tokenized alone and prompt + completion together, with `trl.data_utils._tokenize`:
      `tokenizer(text=...)` with the tokenizer's default special tokens for text (a BOS only if its
      post-processor adds one), `apply_chat_template(tokenize=True)` for messages, the prompt with
      `add_generation_prompt=True` (kto_trainer.py:1088-1108, trl/data_utils.py:367-403);
    * `prompt_ids` is the common token prefix of the two, `completion_ids` the rest of prompt +
      completion (kto_trainer.py:1110-1129; `trl.data_utils.common_prefix_length`): a token that merges
      across the boundary belongs to the completion, and for conversations the completion keeps the
      line break the template writes after its final EOS.

    The KL term's mismatched completions (`KL_completion_ids`, kto_trainer.py:1141-1156) are not
    returned: TRL rotates `completion_ids` by +1 within each run of `per_device_train_batch_size` rows of
    the dataset (a `batched` map), so row i of a run takes row i-1's completion and the run's first row
    its last row's. A one-row dataset would only give back the row's own completion.

    Args:
        rows: The unpaired rows; each is prepared on its own.
        tokenizer_dir: A local Hugging Face tokenizer directory.

    Returns:
        One dict per row with TRL's column names: `prompt_ids`, `completion_ids` (list[int]) and `label`
        (bool). TRL's collator trains on `prompt_ids + completion_ids` with a completion mask of
        `[0] * len(prompt_ids) + [1] * len(completion_ids)` (trl/trainer/kto_trainer.py:163-173).
    """
    out = []
    with _quiet():
        trainer = _reference_trainer("kto", tokenizer_dir)
        for row in rows:
            prepared = trainer._prepare_dataset(
                _one_row_dataset(row), trainer.processing_class, trainer.args, "train"
            )[0]
            out.append(
                {
                    "prompt_ids": list(prepared["prompt_ids"]),
                    "completion_ids": list(prepared["completion_ids"]),
                    "label": bool(prepared["label"]),
                }
            )
    return out


def _zero_reward(completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


@functools.lru_cache(maxsize=8)
def _grpo_trainer(tokenizer_dir: str, chat_template_kwargs_json: str):
    import json

    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    args = trl.GRPOConfig(
        output_dir=os.path.join(_TMP.name, "out"),
        report_to=[],
        use_cpu=True,
        use_vllm=False,
        save_strategy="no",
        logging_strategy="no",
        chat_template_kwargs=json.loads(chat_template_kwargs_json) or None,
    )
    return trl.GRPOTrainer(
        model=_tiny_model(len(tokenizer)),
        reward_funcs=_zero_reward,
        args=args,
        train_dataset=_one_row_dataset({"prompt": "a"}),
        processing_class=tokenizer,
    )


def trl_grpo_prompt_ids(
    rows: list[dict], tokenizer_dir: str, *, chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """The token ids TRL `GRPOTrainer` generates from for each prompt-only row (no padding).

    Rows are `{"prompt": str}` or `{"prompt": [msg, ...]}`. Each row's prompt goes, as a one-prompt
    batch, through `GRPOTrainer._tokenize_prompts` (trl/trainer/grpo_trainer.py:1684-1761), the method
    `_generate` calls on the batch's prompts before generating (grpo_trainer.py:2221; the prompts are the
    rows' `prompt` values, grpo_trainer.py:2337, unchanged without images or environments). GRPO does no
    dataset preprocessing and never truncates prompts in TRL 1.16 (no `max_prompt_length`). There:

    * text prompts are `tokenizer(text=prompts)["input_ids"]`, the tokenizer's default special tokens
      included (grpo_trainer.py:1757);
    * conversations are `apply_chat_template(conversation=prompts, add_generation_prompt=True,
      tokenize=True, tools=<trainer tools or None>, chat_template=None, **args.chat_template_kwargs)`
      (grpo_trainer.py:1737-1746). Tools and template kwargs are trainer-wide: `GRPOTrainer(tools=[python
      callables])` and `GRPOConfig.chat_template_kwargs` (grpo_trainer.py:788). Per-row `tools` or
      `chat_template_kwargs` columns do not reach the chat template (they only go to reward functions as
      extra columns), so they are ignored here as in TRL. Trainer tools are not offered here.

    Args:
        rows: The prompt rows; each is tokenized on its own (TRL reads the format from a batch's first
            prompt, grpo_trainer.py:1686).
        tokenizer_dir: A local Hugging Face tokenizer directory.
        chat_template_kwargs: `GRPOConfig.chat_template_kwargs`, for every conversational row.

    Returns:
        One list of token ids per row, as TRL's generation receives it before left-padding.
    """
    import json

    out = []
    with _quiet():
        trainer = _grpo_trainer(tokenizer_dir, json.dumps(chat_template_kwargs or {}, sort_keys=True))
        for row in rows:
            prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"]])
            out.append([int(i) for i in prompt_ids[0]])
    return out
