"""Balanced, uneven sequence shards: :class:`ShardPlan`, :func:`split` and :func:`gather`.

A plan is a pure function of (token count, sp size, rank), re-derived on every call: nothing here caches a
size, so a new stage grid (a new token count) simply gives a new plan on every rank at once.

Zero-length shards (``num_tokens < sp_size``) are supported: the trailing ranks get 0 tokens and every
collective in this package still runs on them (they enter every collective with empty tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def shard_sizes(num_tokens: int, sp_size: int) -> tuple[int, ...]:
    """Every rank's shard length: the first ``num_tokens % sp_size`` ranks get one extra token."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if sp_size < 1:
        raise ValueError(f"sp_size must be >= 1, got {sp_size}")
    base, extra = divmod(num_tokens, sp_size)
    return tuple(base + (1 if r < extra else 0) for r in range(sp_size))


@dataclass(frozen=True)
class ShardPlan:
    """This rank's contiguous slice ``[start, start + length)`` of a ``num_tokens``-long sequence.

    Shards are in rank order and balanced to within one token. All derived values are computed on access (no
    cache): the plan is cheap, and a cached size is how a stale shape survives a stage switch.
    """

    num_tokens: int
    """Total sequence length being sharded (video tokens only; replicated text tokens are not sharded)."""
    sp_size: int
    """Number of ranks sharing the sequence (the sp group's size)."""
    rank: int
    """This rank's index inside the sp group."""

    def __post_init__(self) -> None:
        shard_sizes(self.num_tokens, self.sp_size)  # validates num_tokens / sp_size
        if not 0 <= self.rank < self.sp_size:
            raise ValueError(f"rank must be in [0, {self.sp_size}), got {self.rank}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every rank's shard length, in rank order."""
        return shard_sizes(self.num_tokens, self.sp_size)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Every rank's shard start, in rank order."""
        sizes = self.sizes
        return tuple(sum(sizes[:r]) for r in range(self.sp_size))

    @property
    def start(self) -> int:
        """First token of this rank's shard."""
        return self.offsets[self.rank]

    @property
    def length(self) -> int:
        """Number of tokens on this rank (0 when ``num_tokens < sp_size`` and this is a trailing rank)."""
        return self.sizes[self.rank]

    @property
    def max_length(self) -> int:
        """The longest shard: the padded length :func:`gather` exchanges."""
        return max(self.sizes)


def split(x: torch.Tensor, dim: int, plan: ShardPlan) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (a contiguous copy, so the full tensor can be freed)."""
    if x.shape[dim] != plan.num_tokens:
        raise ValueError(f"split: x.shape[{dim}]={x.shape[dim]} but the plan shards {plan.num_tokens} tokens")
    return x.narrow(dim, plan.start, plan.length).contiguous()


def all_shard_lengths(length: int, group: ProcessGroup | None = None) -> list[int]:
    """Every rank's ``length`` in ``group`` (one equal-size all_gather of an int64 scalar).

    Collective: every rank of ``group`` must call it. Never cache the result across calls — a later call with
    a different sequence length would use stale split sizes and hang or corrupt the exchange.
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([length], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [int(t.item()) for t in everyone]


def gather(
    x_local: torch.Tensor,
    dim: int,
    group: ProcessGroup | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Concatenate every rank's (possibly uneven, possibly empty) shard along ``dim``, in rank order.

    Collective over ``group``; every rank gets the full tensor. Shards are padded to the longest, gathered with
    an *equal-size* all_gather and trimmed — gloo rejects unequal ``all_gather`` and an unequal
    ``all_gather_into_tensor`` can hang one rank until the timeout, so sizes are never unequal on the wire.

    ``num_tokens``: the full length, when the shards follow :class:`ShardPlan` (sizes derived locally, no size
    exchange). ``None``: the lengths are exchanged first (arbitrary contiguous shards). All ranks must pass the
    same kind of argument, or they enter different collectives and hang.
    """
    world = dist.get_world_size(group)
    dim = dim % x_local.dim()
    if num_tokens is None:
        sizes = all_shard_lengths(x_local.shape[dim], group)
    else:
        rank = dist.get_rank(group)
        plan = ShardPlan(num_tokens, world, rank)
        sizes = list(plan.sizes)
        if x_local.shape[dim] != plan.length:
            # Raising here leaves the other ranks waiting in the all_gather below until the timeout; it is still
            # better than gathering a wrong shape silently.
            raise ValueError(f"gather: rank {rank} holds {x_local.shape[dim]} tokens, plan says {plan.length}")
    s_max = max(sizes)
    pad = s_max - x_local.shape[dim]
    if pad:
        pad_shape = list(x_local.shape)
        pad_shape[dim] = pad
        x_local = torch.cat([x_local, x_local.new_zeros(pad_shape)], dim=dim)
    x_local = x_local.contiguous()
    padded = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(padded, x_local, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(padded, sizes)], dim=dim)
