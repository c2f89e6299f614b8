"""Sigma schedules and stage boundaries (docs/architecture.md, eq. 6)."""

from __future__ import annotations

import pytest
import torch

from dvg_dist.dvg import (
    executed_step_counts,
    flow_sigmas,
    released_step_counts,
    shift_sigmas,
    sigma_to_timestep,
    stage_boundaries,
)


@pytest.mark.parametrize(
    ("n", "bounds", "released", "executed"),
    [
        (50, [14, 25, 36], [14, 11, 11, 14], [15, 11, 11, 13]),
        (12, [3, 6, 8], [3, 3, 2, 4], [4, 3, 2, 3]),
        (8, [2, 4, 5], [2, 2, 1, 3], [3, 2, 1, 2]),
        (6, [1, 3, 4], [1, 2, 1, 2], [2, 2, 1, 1]),
        # The floors [1, 2, 2] collide: pushed apart so each stage runs one call on its own grid.
        (4, [0, 1, 2], [0, 1, 1, 2], [1, 1, 1, 1]),
    ],
)
def test_stage_step_counts(n, bounds, released, executed):
    got = stage_boundaries(n)
    assert got == bounds, f"N={n}: boundaries {got}, expected {bounds}"
    got_rel = released_step_counts(n, got)
    assert got_rel == released, f"N={n}: released step counts {got_rel}, expected {released}"
    got_exe = executed_step_counts(n, got)
    assert got_exe == executed, f"N={n}: executed step counts {got_exe}, expected {executed}"
    assert sum(got_rel) == n and sum(got_exe) == n, f"N={n}: counts {got_rel}/{got_exe} do not sum to N"


def test_step_counts_sum_to_n_for_every_feasible_n():
    for n in range(4, 120):
        b = stage_boundaries(n)
        rel, exe = released_step_counts(n, b), executed_step_counts(n, b)
        assert sum(rel) == n and sum(exe) == n, f"N={n}: released {rel}, executed {exe} do not sum to N"
        assert all(k >= 1 for k in exe), f"N={n}: a stage executes no model call: {exe}"
        # The boundary call runs on the old grid: executed = released shifted by one call.
        assert exe[0] == rel[0] + 1 and exe[-1] == rel[-1] - 1 and exe[1:-1] == rel[1:-1], (
            f"N={n}: executed {exe} is not released {rel} with the boundary call moved back a stage"
        )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_steps_raise(n):
    with pytest.raises(ValueError, match="at least 4 steps"):
        stage_boundaries(n)


def test_custom_fractions_are_floors_pushed_apart_within_the_run():
    assert stage_boundaries(20, (0.25, 0.5, 0.75)) == [5, 10, 15]
    assert stage_boundaries(20, (0.5, 0.5, 0.75)) == [10, 11, 15]  # equal floors: the later one moves on a call
    assert stage_boundaries(20, (0.25, 0.5, 0.99)) == [5, 10, 18]  # the refine stage keeps its one call
    assert stage_boundaries(20, (0.9, 0.95, 0.99)) == [16, 17, 18]  # pushed back from the end
    for fractions in [(0.6, 0.5, 0.75), (0.25, 0.5, 1.0), (-0.1, 0.5, 0.75)]:
        with pytest.raises(ValueError, match="non-decreasing"):
            stage_boundaries(20, fractions)


@pytest.mark.parametrize("n", [12, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 9.0, 11.0])
def test_flow_sigmas_equal_the_shift_formula(n, shift):
    got = flow_sigmas(n, shift)
    base = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    want = shift * base / (1 + (shift - 1) * base)
    assert got.shape == (n + 1,), f"expected {n + 1} sigmas, got shape {tuple(got.shape)}"
    assert got.dtype == torch.float64
    err = (got - want).abs().max().item()
    assert err < 1e-15, f"N={n}, shift={shift}: max |σ - k·σ/(1+(k-1)σ)| = {err:.3e}"
    assert got[0].item() == 1.0, f"σ_0 = {got[0].item()!r}, expected exactly 1"
    assert got[-1].item() == 0.0, f"σ_N = {got[-1].item()!r}, expected exactly 0"
    assert bool((got[1:] < got[:-1]).all()), "sigmas are not strictly decreasing"


def test_shift_sigmas_by_hand():
    # k = 3, σ = 0.5: 1.5 / (1 + 2·0.5) = 0.75
    got = shift_sigmas(torch.tensor([0.5], dtype=torch.float64), 3.0).item()
    assert got == pytest.approx(0.75, abs=1e-15), f"shift 3 of 0.5 gave {got}, expected 0.75"
    with pytest.raises(ValueError):
        shift_sigmas(torch.tensor([0.5]), 0.0)


def test_sigma_max():
    n, shift, smax = 50, 5.0, 1 - 1 / 1000
    got = flow_sigmas(n, shift, sigma_max=smax)
    base = torch.linspace(smax, 0, n + 1, dtype=torch.float64)
    want = shift * base / (1 + (shift - 1) * base)
    want[-1] = 0.0
    err = (got - want).abs().max().item()
    assert err < 1e-15, f"sigma_max={smax}: max deviation from the shifted linspace {err:.3e}"
    first = shift * smax / (1 + (shift - 1) * smax)
    assert got[0].item() == pytest.approx(first, abs=1e-15), f"σ_0 = {got[0].item()}, expected {first}"
    assert got[0].item() < 1.0 and got[-1].item() == 0.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            flow_sigmas(10, 1.0, sigma_max=bad)
    with pytest.raises(ValueError):
        flow_sigmas(0, 1.0)


def test_sigma_to_timestep():
    assert sigma_to_timestep(0.25) == 250.0
    assert sigma_to_timestep(1.0) == 1000.0
