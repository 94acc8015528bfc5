"""Meshes and partition rules (`data`, `fsdp`, `tensor`)."""

from jaxrlhf.parallel.partition import (
    AXES,
    DEFAULT_RULES,
    host_array,
    is_stacked,
    make_mesh,
    param_sharding,
    partition_spec,
    path_str,
)

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "host_array",
    "is_stacked",
    "make_mesh",
    "param_sharding",
    "partition_spec",
    "path_str",
]
