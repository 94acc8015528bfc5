"""Meshes and partition rules (`data`, `fsdp`, `tensor`)."""

from jaxrlhf.parallel.partition import (
    AXES,
    BATCH_AXES,
    DEFAULT_RULES,
    activation_sharding,
    batch_axes,
    host_array,
    is_stacked,
    make_mesh,
    param_sharding,
    partition_spec,
    path_str,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "activation_sharding",
    "batch_axes",
    "host_array",
    "is_stacked",
    "make_mesh",
    "param_sharding",
    "partition_spec",
    "path_str",
]
