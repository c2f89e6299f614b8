"""Sequence parallelism (DESIGN §3): shard plans, the parallel layout and its groups, attention collectives.

No diffusers imports here: model adapters call into this package.
"""

from dvg_dist.parallel.attention import (
    AttentionOutput,
    merge_attention,
    ring_attention,
    sdpa_with_lse,
    ulysses_attention,
    usp_attention,
)
from dvg_dist.parallel.mesh import (
    Axis,
    ParallelGroups,
    ParallelLayout,
    build_groups,
    default_backend,
    default_layout,
)
from dvg_dist.parallel.shard import ShardPlan, all_shard_lengths, gather, shard_sizes, split

__all__ = [
    "AttentionOutput",
    "Axis",
    "ParallelGroups",
    "ParallelLayout",
    "ShardPlan",
    "all_shard_lengths",
    "build_groups",
    "default_backend",
    "default_layout",
    "gather",
    "merge_attention",
    "ring_attention",
    "sdpa_with_lse",
    "shard_sizes",
    "split",
    "ulysses_attention",
    "usp_attention",
]
