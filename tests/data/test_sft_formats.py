"""SFT rows of every TRL format: the token ids and loss masks jaxrlhf trains on equal what TRL's own
`SFTTrainer` preprocessing makes of the same rows with the same tokenizer (SmolLM2's, chat template
included), except the differences docs/data.md names:

* BOS: jaxrlhf puts the tokenizer's BOS in front of plain text (`data.add_bos`, on by default); TRL
  leaves it to the tokenizer's post-processor, which adds none for SmolLM2: compared with add_bos off.
* the line break a chat template writes after a conversation's final EOS is not trained here (the
  model stops at EOS); TRL's completion mask trains it.
* `sft.assistant_only` is on by default and works with any template that renders prefixes; TRL's
  `assistant_only_loss` is off by default and needs `{% generation %}` markers.
* a conversational prompt that ends with an assistant turn is continued here (prefill); TRL 1.16
  opens a new assistant turn.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.trl_data import trl_dpo_examples, trl_grpo_prompt_ids, trl_kto_examples, trl_sft_examples

from jaxrlhf.data.sft import render_sft_row, tokenize_sft

USER = {"role": "user", "content": "What color is the sky?"}
REPLY = {"role": "assistant", "content": "Blue."}
TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]  # fmt: skip
# A ChatML template with generation markers (TRL's assistant_only_loss needs them), tools and a kwarg.
MARKED = "".join([
    "{% if tools %}{{ '<|im_start|>system\\nTOOLS ' + (tools | map(attribute='function.name') | join(',')) ",
    "+ '<|im_end|>\\n' }}{% endif %}",
    "{% if flavour is defined %}{{ '<|im_start|>system\\nFLAVOUR ' + flavour + '<|im_end|>\\n' }}{% endif %}",
    "{% for message in messages %}{% if message['role'] == 'assistant' %}",
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}",
    "{% endgeneration %}{{ '\\n' }}",
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
])

ROWS = {
    "text": {"text": "The sky is blue."},
    "text_with_eos": {"text": "The sky is blue.<|im_end|>"},
    "prompt_completion": {"prompt": "The sky is", "completion": " blue."},
    "merged_at_boundary": {"prompt": "ab", "completion": "c"},  # one token across the boundary
    "implicit_space": {"prompt": "Q: hi\n\nA:", "completion": " Hello"},
    "messages": {"messages": [USER, REPLY]},
    "multi_turn": {"messages": TWO_TURNS},
    "conversational_pc": {"prompt": [USER], "completion": [REPLY]},
    "sharegpt": {"conversations": [{"from": "user", "value": "Hi"},
                                   {"from": "assistant", "value": "Hello!"}]},  # fmt: skip
    "conversational_pc_system": {"prompt": [{"role": "system", "content": "Be brief."}, USER],
                                 "completion": [REPLY]},  # fmt: skip
}


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2's real tokenizer (the demo model's directory)."""
    from jaxrlhf.models import load_tokenizer
    from jaxrlhf.models.demo import demo_model_path

    return demo_model_path(), load_tokenizer(demo_model_path())


def ours(rows, tokenizer, *, completion_only=True, assistant_only=True, **options):
    texts = [render_sft_row(r, tokenizer, completion_only=completion_only, assistant_only=assistant_only)
             for r in rows]  # fmt: skip
    seqs, stats = tokenize_sft(texts, tokenizer, add_bos=False, **options)
    assert stats.kept == len(rows)
    return [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in seqs]


def without_trailing_break(ids, mask, tokenizer):
    """TRL's mask with the line break after the final EOS untrained (the deliberate difference)."""
    mask = list(mask)
    if len(ids) >= 2 and ids[-2] == tokenizer.eos_token_id and tokenizer.decode(ids[-1:]).strip() == "":
        mask[-1] = 0
    return mask


@pytest.mark.parametrize("completion_only", [True, False])
def test_every_format_tokenizes_as_trl(smollm, completion_only):
    path, tokenizer = smollm
    names = list(ROWS)
    rows = [ROWS[n] for n in names]
    # TRL trains whole conversations by default (assistant_only_loss=False): compare with that.
    got = ours(rows, tokenizer, completion_only=completion_only, assistant_only=False)
    want = trl_sft_examples(rows, path, completion_only_loss=completion_only)
    for name, (ids, mask), ref in zip(names, got, want, strict=True):
        assert ids == ref["input_ids"], name
        if completion_only and name.startswith("conversational"):
            assert mask == without_trailing_break(ref["input_ids"], ref["loss_mask"], tokenizer), name
        else:
            assert mask == ref["loss_mask"], name


def test_assistant_turns_tools_and_template_kwargs_as_trl(smollm, tmp_path):
    """Every assistant turn trained (TRL's assistant_only_loss with a marked template); the `tools` and
    `chat_template_kwargs` columns reach the template as TRL passes them."""
    path, tokenizer = smollm
    template = tmp_path / "marked.jinja"
    template.write_text(MARKED)
    tokenizer = type(tokenizer).from_pretrained(path)
    tokenizer.chat_template = MARKED
    rows = [{"messages": TWO_TURNS}, {"messages": [USER, REPLY], "tools": TOOLS},
            {"messages": TWO_TURNS, "chat_template_kwargs": {"flavour": "terse"}}]  # fmt: skip
    got = ours(rows, tokenizer, assistant_only=True)
    want = trl_sft_examples(rows, path, assistant_only_loss=True, chat_template_path=str(template))
    for (ids, mask), ref in zip(got, want, strict=True):
        assert ids == ref["input_ids"]
        assert mask == ref["loss_mask"]
    assert "TOOLS add" in tokenizer.decode(got[1][0]) and "FLAVOUR terse" in tokenizer.decode(got[2][0])
    trained = [tokenizer.decode([i for i, m in zip(*g, strict=True) if m]) for g in got]
    assert trained[0] == "Hello!<|im_end|>Ciao<|im_end|>"


def test_every_assistant_turn_without_generation_markers(smollm):
    """SmolLM2's template has no generation markers (TRL refuses assistant_only_loss with it): each
    assistant turn is found by rendering the conversation's prefixes."""
    _, tokenizer = smollm
    (ids, mask), = ours([{"messages": TWO_TURNS}], tokenizer)
    spans, inside = [], False
    for i, m in enumerate(mask):
        if m and not inside:
            spans.append([i, i])
        if m:
            spans[-1][1] = i + 1
        inside = bool(m)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["Hello!<|im_end|>", "Ciao<|im_end|>"]
    full = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tokenizer.decode(ids) == full  # the whole conversation, as the template renders it


def test_prefilled_prompt_is_continued(smollm):
    """A conversational prompt ending with an assistant turn is continued (`continue_final_message`):
    the completion extends that message; no second assistant turn is opened."""
    _, tokenizer = smollm
    row = {"prompt": [USER, {"role": "assistant", "content": "It is"}],
           "completion": [{"role": "assistant", "content": " blue."}]}  # fmt: skip
    (ids, mask), = ours([row], tokenizer)
    text = tokenizer.decode(ids)
    assert text.count("<|im_start|>assistant") == 1 and "It is blue.<|im_end|>" in text
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == " blue.<|im_end|>"


def test_truncation_and_bos(smollm):
    """`max_prompt_length` keeps the prompt's end, `max_length` the sequence's start; BOS goes in
    front of plain text with add_bos and is never a target; a row left with no target is dropped."""
    _, tokenizer = smollm
    row = render_sft_row({"prompt": "one two three four five six", "completion": " seven eight"}, tokenizer)
    (seq,), _ = tokenize_sft([row], tokenizer, add_bos=True)
    assert seq.input_ids[0] == tokenizer.bos_token_id and seq.loss_mask[0] == 0
    full = seq.input_ids.tolist()
    (cut,), stats = tokenize_sft([row], tokenizer, max_prompt_length=3, max_length=5)
    prompt_len = int(np.argmax(seq.loss_mask))
    assert cut.input_ids.tolist() == (full[prompt_len - 3 : prompt_len] + full[prompt_len:])[:5]
    assert stats.truncated_prompt == 1 and stats.truncated_completion == 1
    assert cut.loss_mask.tolist() == [0, 0, 0, 1, 1]
    kept, stats = tokenize_sft([row], tokenizer, max_prompt_length=3, truncation_mode="drop")
    assert kept == [] and stats.dropped_long_prompt == 1
    kept, stats = tokenize_sft([row], tokenizer, max_length=4)  # the prompt fills it: nothing to train
    assert kept == [] and stats.dropped_no_room == 1


def test_preference_rows_tokenize_as_trl_dpo(smollm):
    """Preference rows against TRL's `DPOTrainer` preprocessing: the same prompt and completion ids,
    except the documented differences (BOS compared off; the line break after a conversational
    completion's EOS dropped here)."""
    from jaxrlhf.data import parse_preferences, tokenize_pairs

    path, tokenizer = smollm
    green = {"role": "assistant", "content": "Green."}
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": [USER], "chosen": [REPLY], "rejected": [green]},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Q: hi\n\nA: Hello", "rejected": "Q: hi\n\nA: Hey"},
            {"chosen": [USER, REPLY], "rejected": [USER, green]}]  # fmt: skip
    examples, _ = parse_preferences(rows, tokenizer)
    pairs, _ = tokenize_pairs(examples, tokenizer, add_bos=False)
    want = trl_dpo_examples(rows, path)
    for row, pair, ref in zip(rows, pairs, want, strict=True):
        chat = isinstance(row["chosen"], list)
        assert pair.prompt_ids.tolist() == ref["prompt_ids"]
        for ids, theirs in ((pair.chosen_ids, ref["chosen_ids"]), (pair.rejected_ids, ref["rejected_ids"])):
            assert ids.tolist() == (theirs[:-1] if chat else theirs)  # TRL keeps the "\n" after EOS
            if chat:
                assert tokenizer.decode(theirs[-1:]) == "\n" and theirs[-2] == tokenizer.eos_token_id
    # The implicit text prompt: TRL's `extract_prompt` cuts mid-word ("Q: hi\n\nA: He" + "llo"), but its
    # tokenization then keeps the common token prefix, so the ids equal jaxrlhf's word-boundary split.
    assert examples[3].prompt == "Q: hi\n\nA:" and tokenizer.decode(want[3]["prompt_ids"]) == "Q: hi\n\nA:"


def test_unpaired_and_prompt_only_rows_tokenize_as_trl(smollm):
    """KTO's unpaired rows against TRL's `KTOTrainer` preprocessing (the same differences as DPO's),
    and the online methods' prompts against the ids `GRPOTrainer._tokenize_prompts` generates from."""
    from jaxrlhf.data.preference import PreferenceExample
    from jaxrlhf.data.tokenize import tokenize_pairs
    from jaxrlhf.train.algorithms.kto import parse_kto_rows

    path, tokenizer = smollm
    rows = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": [USER], "completion": [REPLY], "label": False},
            {"prompt": [{"role": "system", "content": "Be brief."}, USER], "completion": [REPLY],
             "label": True}]  # fmt: skip
    examples, _ = parse_kto_rows(rows, tokenizer, skip_invalid=False, drop_degenerate=False, source="")
    pairs, _ = tokenize_pairs([PreferenceExample(e.prompt, e.chosen, e.chosen) for e in examples], tokenizer,
                              add_bos=False)  # fmt: skip
    for row, pair, ref in zip(rows, pairs, trl_kto_examples(rows, path), strict=True):
        chat = isinstance(row["prompt"], list)
        assert pair.prompt_ids.tolist() == ref["prompt_ids"]
        assert pair.chosen_ids.tolist() == (ref["completion_ids"][:-1] if chat else ref["completion_ids"])
        assert bool(ref["label"]) == row["label"]

    import json
    import tempfile

    from jaxrlhf.train.online import load_prompt_rows

    prompts = [{"prompt": "The sky is"}, {"prompt": "Question: "}, {"prompt": [USER]},
               {"prompt": [{"role": "system", "content": "Be brief."}, *TWO_TURNS[:3]]}]  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in prompts))
        f.flush()
        ours_ids = [ids.tolist() for ids, _ in load_prompt_rows([f.name], tokenizer, max_prompt_length=512)]
    assert ours_ids == trl_grpo_prompt_ids(prompts, path)


def test_template_whose_generation_prompt_is_not_a_prefix_splits_as_trl(smollm, tmp_path):
    """A template whose generation prompt opens a `<think>` block (DeepSeek-R1's): the completion
    starts where the prompt's rendering and the whole row's part, as in TRL."""
    path, tokenizer = smollm
    thinking = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                "{% endif %}")  # fmt: skip
    (tmp_path / "thinking.jinja").write_text(thinking)
    tok = type(tokenizer).from_pretrained(path)
    tok.chat_template = thinking
    row = {"prompt": [USER], "completion": [{"role": "assistant", "content": "<think>\nsky</think>Blue."}]}
    ((ids, mask),) = ours([row], tok)
    (ref,) = trl_sft_examples([row], path, chat_template_path=str(tmp_path / "thinking.jinja"))
    assert ids == ref["input_ids"]
    assert mask == without_trailing_break(ref["input_ids"], ref["loss_mask"], tok)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "sky</think>Blue.<|im_end|>"  # the prompt ends with the opened <think>, as generated
