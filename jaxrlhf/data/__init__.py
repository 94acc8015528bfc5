"""Data layer: load preference/SFT rows, normalise, tokenize, collate and iterate (SFT rows of
every TRL format, and packing: `jaxrlhf.data.sft`; ranked rows and a prompt's pairs packed as one
group: `jaxrlhf.data.ranked`, `jaxrlhf.data.groups`).

Typical DPO pipeline::

    rows = load_rows("data/train.jsonl")
    examples, parse_stats = parse_preferences(rows, tokenizer)
    pairs, token_stats = tokenize_pairs(examples, tokenizer, max_length=1024,
                                        max_prompt_length=512)
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    batches = BatchIterator(pairs, collate, global_batch_size=64, seed=0,
                            length_fn=lambda pair: pair.packed_length)
"""

from jaxrlhf.data.collate import (
    Batch,
    bucket_length,
    collate_pairs,
    collate_sequences,
    left_pad,
    packed_attention_mask,
)
from jaxrlhf.data.groups import TokenizedGroup, collate_groups, group_pairs, group_shape
from jaxrlhf.data.iterator import BatchIterator, Collate
from jaxrlhf.data.loading import DataError, Location, Rows, load_rows
from jaxrlhf.data.preference import (
    STANDARD_ROLES,
    ParseStats,
    PreferenceExample,
    check_roles,
    parse_preferences,
    parse_row,
    template_kwargs,
    to_chatml,
)
from jaxrlhf.data.ranked import ranked_pairs
from jaxrlhf.data.sft import (
    PackedRow,
    SFTText,
    SFTTokens,
    collate_sft,
    pack_sequences,
    render_sft_row,
    tokenize_sft,
)
from jaxrlhf.data.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs

__all__ = [
    "Batch",
    "BatchIterator",
    "Collate",
    "DataError",
    "Location",
    "PackedRow",
    "ParseStats",
    "PreferenceExample",
    "Rows",
    "SFTText",
    "SFTTokens",
    "STANDARD_ROLES",
    "TokenizeStats",
    "TokenizedGroup",
    "TokenizedPair",
    "bucket_length",
    "check_roles",
    "collate_groups",
    "collate_pairs",
    "collate_sequences",
    "collate_sft",
    "left_pad",
    "group_pairs",
    "group_shape",
    "load_rows",
    "pack_sequences",
    "packed_attention_mask",
    "parse_preferences",
    "parse_row",
    "ranked_pairs",
    "render_sft_row",
    "tokenize_pairs",
    "tokenize_sft",
    "template_kwargs",
    "to_chatml",
]
