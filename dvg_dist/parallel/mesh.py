"""The parallel layout (validated degrees) and its process groups, built once.

Rank order, outermost to innermost: ``dp × cfg × ring × ulysses``, i.e.
``rank = ((dp_rank * cfg_degree + cfg_rank) * ring_degree + ring_rank) * ulysses_degree + ulysses_rank``
(``dp_degree`` is 1 except in a stage layout that runs slices of a batch side by side,
:mod:`dvg_dist.parallel.layouts`). Ulysses partners are
adjacent ranks (the all-to-all is the heaviest collective: keep it on the fastest links), and the sp rank
``ring_rank * ulysses_degree + ulysses_rank`` orders sequence shards so that each Ulysses group holds one
contiguous block of the sequence — the block the ring passes around. No rank arithmetic outside this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class Axis(str, Enum):
    """Named mesh axes (``sp`` is the product ``ring × ulysses``)."""

    CFG = "cfg"
    RING = "ring"
    ULYSSES = "ulysses"
    SP = "sp"
    DP = "dp"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is split: ``world_size = dp_degree × cfg_degree × ring_degree × ulysses_degree``."""

    world_size: int
    """Number of ranks in the default process group."""
    ulysses_degree: int = 1
    """Ranks exchanging heads↔sequence by all-to-all; must divide ``num_heads``."""
    ring_degree: int = 1
    """Ranks passing K/V blocks around a ring (any sequence length, any head count)."""
    cfg_degree: int = 1
    """1, or 2 to run the conditional and unconditional passes on the two halves of the world."""
    num_heads: int | None = None
    """Attention heads of the backbone, when known: checked against ``ulysses_degree``."""
    dp_degree: int = 1
    """Sub-groups running different slices of the batch (1 outside a data-parallel stage layout)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "ulysses_degree", "ring_degree", "cfg_degree", "dp_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2, got {self.cfg_degree}")
        product = self.dp_degree * self.cfg_degree * self.ring_degree * self.ulysses_degree
        if product != self.world_size:
            dp = f"dp_degree {self.dp_degree} × " if self.dp_degree > 1 else ""
            raise ValueError(
                f"{dp}cfg_degree × ring_degree × ulysses_degree = {self.cfg_degree} × {self.ring_degree} × "
                f"{self.ulysses_degree} = {product}, but world_size is {self.world_size}"
            )
        if self.num_heads is not None and self.num_heads % self.ulysses_degree:
            sp = self.world_size // (self.cfg_degree * self.dp_degree)
            ok = [u for u in _divisors(sp) if self.num_heads % u == 0]
            raise ValueError(
                f"ulysses_degree={self.ulysses_degree} does not divide num_heads={self.num_heads}; with "
                f"world_size={self.world_size} and cfg_degree={self.cfg_degree} use ulysses_degree in {ok} "
                f"(ring_degree = {sp} / ulysses_degree)"
            )

    @property
    def sp_degree(self) -> int:
        """Ranks sharing one sequence: ``ring_degree × ulysses_degree``."""
        return self.ring_degree * self.ulysses_degree

    def coords(self, rank: int) -> dict[Axis, int]:
        """This rank's index along every axis (``SP``: inside its sp group; ``DP`` only when ``dp_degree > 1``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        dp, rest = divmod(rank, self.cfg_degree * self.sp_degree)
        cfg, sp = divmod(rest, self.sp_degree)
        ring, ulysses = divmod(sp, self.ulysses_degree)
        coords = {Axis.CFG: cfg, Axis.RING: ring, Axis.ULYSSES: ulysses, Axis.SP: sp}
        return {**coords, Axis.DP: dp} if self.dp_degree > 1 else coords

    def axis_groups(self, axis: Axis) -> list[list[int]]:
        """All rank groups along ``axis``, in a fixed order (the same on every rank)."""
        u, r, c, d = self.ulysses_degree, self.ring_degree, self.cfg_degree, self.dp_degree

        def rank_of(di: int, ci: int, ri: int, ui: int) -> int:
            return ((di * c + ci) * r + ri) * u + ui

        outer = [(di, ci) for di in range(d) for ci in range(c)]
        if axis is Axis.ULYSSES:
            return [[rank_of(di, ci, ri, ui) for ui in range(u)] for di, ci in outer for ri in range(r)]
        if axis is Axis.RING:
            return [[rank_of(di, ci, ri, ui) for ri in range(r)] for di, ci in outer for ui in range(u)]
        if axis is Axis.SP:
            return [[rank_of(di, ci, ri, ui) for ri in range(r) for ui in range(u)] for di, ci in outer]
        if axis is Axis.CFG:
            return [
                [rank_of(di, ci, ri, ui) for ci in range(c)] for di in range(d) for ri in range(r) for ui in range(u)
            ]
        return [[rank_of(di, ci, ri, ui) for di in range(d)] for ci in range(c) for ri in range(r) for ui in range(u)]


def default_layout(world_size: int, num_heads: int, use_cfg_parallel: bool = False) -> ParallelLayout:
    """All sp ranks in Ulysses when the heads allow it, else the largest Ulysses degree dividing both the heads
    and the sp size (``gcd``), the rest of the sp ranks in the ring."""
    cfg = 2 if use_cfg_parallel else 1
    if world_size % cfg:
        raise ValueError(f"use_cfg_parallel needs an even world_size, got {world_size}")
    sp = world_size // cfg
    ulysses = math.gcd(sp, num_heads)
    return ParallelLayout(world_size, ulysses, sp // ulysses, cfg, num_heads)


def default_backend(override: str | None = None) -> str:
    """``override`` if given, else ``nccl`` when CUDA is available, else ``gloo``."""
    if override:
        return override
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process group along every axis, and its coordinates."""

    layout: ParallelLayout
    rank: int
    """Global rank."""
    groups: dict[Axis, ProcessGroup]
    coords: dict[Axis, int]

    def group(self, axis: Axis) -> ProcessGroup:
        """This rank's group along ``axis``."""
        return self.groups[axis]

    @property
    def ulysses(self) -> ProcessGroup:
        return self.groups[Axis.ULYSSES]

    @property
    def ring(self) -> ProcessGroup:
        return self.groups[Axis.RING]

    @property
    def sp(self) -> ProcessGroup:
        return self.groups[Axis.SP]

    @property
    def cfg(self) -> ProcessGroup:
        return self.groups[Axis.CFG]

    @property
    def dp(self) -> ProcessGroup:
        """The data-parallel group (only a layout with ``dp_degree > 1`` has one)."""
        if Axis.DP not in self.groups:
            raise RuntimeError(f"layout {self.layout} has no data-parallel group (dp_degree 1)")
        return self.groups[Axis.DP]


GroupCache = dict[tuple[int, ...], ProcessGroup]
"""Process groups by their (sorted) global ranks, shared by the layouts built with it."""


def build_groups(layout: ParallelLayout, backend: str | None = None, cache: GroupCache | None = None) -> ParallelGroups:
    """Create every sub-group of ``layout`` over the initialised default process group.

    Hazard: ``dist.new_group`` is collective over the *whole world* — every rank must create every group, in the
    same order, even the groups it is not a member of, or the ranks deadlock. The loop below is rank-independent
    for that reason; each rank only keeps the groups that contain it.

    ``cache``: groups already created for other layouts, by rank list; a rank list found there is reused instead
    of created again (several stage layouts share most of their groups). Every rank must pass caches that were
    filled by the same sequence of calls — the reuse decision is then the same everywhere. The DP axis is created
    only when ``dp_degree > 1``.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs an initialised default process group (dist.init_process_group)")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(f"layout is for world_size={layout.world_size}, the process group has {world} ranks")
    rank = dist.get_rank()
    mine: dict[Axis, ProcessGroup] = {}
    axes = (Axis.CFG, Axis.RING, Axis.ULYSSES, Axis.SP) + ((Axis.DP,) if layout.dp_degree > 1 else ())
    for axis in axes:
        for ranks in layout.axis_groups(axis):
            key = tuple(ranks)
            if cache is not None and key in cache:
                group = cache[key]
            else:
                group = dist.new_group(ranks, backend=backend)
                if cache is not None:
                    cache[key] = group
            if rank in ranks:
                assert group is not None
                mine[axis] = group
    return ParallelGroups(layout, rank, mine, layout.coords(rank))
