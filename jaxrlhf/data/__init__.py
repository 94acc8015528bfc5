"""Data layer: load preference/SFT rows, normalise, tokenize, collate and iterate.

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
from jaxrlhf.data.iterator import BatchIterator, Collate
from jaxrlhf.data.loading import DataError, Location, Rows, load_rows
from jaxrlhf.data.preference import (
    STANDARD_ROLES,
    ParseStats,
    PreferenceExample,
    check_roles,
    parse_preferences,
    parse_row,
)
from jaxrlhf.data.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs

__all__ = [
    "Batch",
    "BatchIterator",
    "Collate",
    "DataError",
    "Location",
    "ParseStats",
    "PreferenceExample",
    "Rows",
    "STANDARD_ROLES",
    "TokenizeStats",
    "TokenizedPair",
    "bucket_length",
    "check_roles",
    "collate_pairs",
    "collate_sequences",
    "left_pad",
    "load_rows",
    "packed_attention_mask",
    "parse_preferences",
    "parse_row",
    "tokenize_pairs",
]
