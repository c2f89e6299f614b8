"""Shared helpers for the algorithm tests: smooth full-size fields and an oracle velocity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from dvg_dist.dvg import Grid, StageContext, sample_at


def smooth_field(batch: int, channels: int, grid: Grid, seed: int = 0) -> torch.Tensor:
    """A smooth, non-trivial full-size field ``[B, C, T, H, W]``: a few low-frequency cosines per (b, c)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(grid.t, dtype=torch.float64)[:, None, None] / max(grid.t - 1, 1)
    h = torch.arange(grid.h, dtype=torch.float64)[None, :, None] / max(grid.h - 1, 1)
    w = torch.arange(grid.w, dtype=torch.float64)[None, None, :] / max(grid.w - 1, 1)
    out = torch.zeros(batch, channels, grid.t, grid.h, grid.w, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            amp, ft, fh, fw, phase = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
            out[b, c] = (0.5 + amp) * torch.cos(
                math.pi * ((1 + 2 * ft) * t + (1 + 2 * fh) * h + (1 + 2 * fw) * w) + 2 * math.pi * phase
            ) + 0.3 * (b - c / max(channels, 1))
    return out.to(torch.float32)


@dataclass
class Call:
    """One recorded velocity call."""

    x: torch.Tensor
    timestep: float
    ctx: StageContext


@dataclass
class Oracle:
    """``v = (x - target(coords)) / σ`` with σ read from the *timestep* argument (σ·1000), so any σ/timestep
    inconsistency between what the sampler steps with and what it tells the model shows up."""

    target: torch.Tensor
    full: Grid
    calls: list[Call] = field(default_factory=list)

    def __call__(self, x: torch.Tensor, timestep: float, ctx: StageContext) -> torch.Tensor:
        self.calls.append(Call(x.clone(), timestep, ctx))
        sigma = timestep / 1000.0
        x0 = sample_at(self.target, ctx.coords, self.full).to(x.dtype)
        return (x - x0) / sigma


@pytest.fixture
def make_field():
    """The :func:`smooth_field` factory."""
    return smooth_field


@pytest.fixture
def make_oracle():
    """The :class:`Oracle` factory: ``make_oracle(target, full)``."""
    return Oracle
