"""Flow-matching sigma schedules and the DVG stage boundaries (docs/architecture.md, eq. 6).

Notation: ``x_σ = (1-σ)·x0 + σ·ε`` and the model predicts ``v ≈ ε - x0``. A schedule of N steps is the
N+1 sigmas ``σ_0 … σ_N`` with ``σ_N = 0``; model call ``i`` runs at ``σ_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``σ' = k·σ / (1 + (k-1)·σ)``: the shift of diffusers' ``FlowMatchEulerDiscreteScheduler``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, shift: float, sigma_max: float = 1.0, sigma_min: float = 0.0) -> torch.Tensor:
    """The N+1 shifted sigmas of an N-step schedule, float64, ending at exactly 0.

    Base sigmas are ``linspace(sigma_max, sigma_min, N+1)[:-1]`` followed by 0, then shifted.
    HunyuanVideo's pipelines: ``sigma_max=1, sigma_min=0`` (``linspace(1, 0, N+1)``). Wan's
    ``UniPCMultistepScheduler`` with flow sigmas: ``sigma_max=1, sigma_min=1/1000``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= sigma_min < sigma_max <= 1:
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    base = torch.linspace(sigma_max, sigma_min, num_steps + 1, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift)
    sigmas[-1] = 0.0
    return sigmas


def sigma_to_timestep(sigma: float) -> float:
    """The timestep diffusers passes to a flow-matching transformer: ``σ · 1000``."""
    return sigma * NUM_TRAIN_TIMESTEPS


def stage_boundaries(num_steps: int, fractions: Sequence[float] = (0.28, 0.50, 0.72)) -> list[int]:
    """Model-call indices after which the stage switches: ``⌊f·N⌋`` for each fraction, pushed apart where the
    floors collide so that every stage runs at least one model call on its own grid.

    N=50 → [14, 25, 36]; N=12 → [3, 6, 8]; N=8 → [2, 4, 5]; N=4 → [0, 1, 2] (the floors [1, 2, 2] would leave
    stage 3 without a call). The call *on* a boundary still runs on the old grid; its velocity is what the
    transition extrapolates from. Boundaries must be strictly increasing and at most N-2 (the refine stage needs a
    call after the last switch), so the four stages need N ≥ 4; fewer is an error.
    """
    if num_steps < 4:
        raise ValueError(
            f"DVG's four stages need at least 4 steps (one model call each); got {num_steps}: use more steps or "
            "mode full"
        )
    floors = [math.floor(f * num_steps) for f in fractions]
    if len(floors) != 3 or not 0 <= floors[0] <= floors[1] <= floors[2] < num_steps:
        raise ValueError(
            f"stage boundaries {floors} (fractions {list(fractions)} of {num_steps} steps) must be 3 non-decreasing "
            f"indices inside [0, {num_steps - 1}]"
        )
    # Few steps: collisions are resolved by moving a boundary one call later, and off the end by moving earlier.
    bounds = list(floors)
    for k in range(1, 3):
        bounds[k] = max(bounds[k], bounds[k - 1] + 1)
    bounds[2] = min(bounds[2], num_steps - 2)
    for k in (1, 0):
        bounds[k] = min(bounds[k], bounds[k + 1] - 1)
    return bounds


def released_step_counts(num_steps: int, boundaries: Sequence[int]) -> list[int]:
    """Steps per stage counted the released way: the boundary call counts to the *next* stage.

    N=50 → [14, 11, 11, 14]; N=12 → [3, 3, 2, 4]. These are the ``n_k`` of the density (eq. 7).
    """
    edges = [0, *boundaries, num_steps]
    return [b - a for a, b in zip(edges, edges[1:])]


def executed_step_counts(num_steps: int, boundaries: Sequence[int]) -> list[int]:
    """Model calls actually run on each stage's grid: the boundary call runs on the old grid.

    N=50 → [15, 11, 11, 13].
    """
    edges = [-1, *boundaries, num_steps - 1]
    return [b - a for a, b in zip(edges, edges[1:])]
