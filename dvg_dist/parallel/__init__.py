"""Sequence parallelism (docs/parallel.md): shard plans, the parallel layout and its groups, attention collectives.

No diffusers import at module level: :mod:`dvg_dist.parallel.hooks` applies a model family's plan to a diffusers
transformer and registers its attention backend (imported lazily) on first use.
"""

from dvg_dist.parallel.attention import (
    AttentionOutput,
    merge_attention,
    ring_attention,
    sdpa_with_lse,
    ulysses_attention,
    usp_attention,
)
from dvg_dist.parallel.diffusers_backend import SequenceParallelState
from dvg_dist.parallel.hooks import (
    parallelize_transformer,
    sequence_parallel,
    sequence_parallel_state,
    unparallelize_transformer,
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
    "SequenceParallelState",
    "ShardPlan",
    "all_shard_lengths",
    "build_groups",
    "default_backend",
    "default_layout",
    "gather",
    "merge_attention",
    "parallelize_transformer",
    "ring_attention",
    "sdpa_with_lse",
    "sequence_parallel",
    "sequence_parallel_state",
    "shard_sizes",
    "split",
    "ulysses_attention",
    "unparallelize_transformer",
    "usp_attention",
]
