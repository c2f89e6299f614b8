"""The staged sampler around a velocity function (docs/architecture.md, eq. 6 and 14)."""

from __future__ import annotations

import json

import pytest
import torch

from dvg_dist.dvg import (
    Decision,
    DVGOptions,
    Grid,
    InfeasibleBudget,
    Mode,
    Planner,
    RenoiseMode,
    ResizeMode,
    SamplerConfig,
    analyse,
    executed_step_counts,
    flow_sigmas,
    hash_noise,
    random_noise,
    renoise,
    resize,
    sample,
    sample_at,
    sigma_to_timestep,
    smooth_sketch,
    stage_boundaries,
    stage_coords,
)

C = 4
SEED = 7
MODEL_SHIFT = 5.0
GRIDS = [Grid(9, 17, 23), Grid(7, 13, 19)]
MODES = list(Mode)


def budget_for(full: Grid, n: int, mode: Mode) -> float:
    """A budget the mode can reach on this grid (the single-axis ablations have few actions)."""
    if mode in (Mode.FULL, Mode.FIXED):
        return 0.5
    sel = Mode.DVG if mode in (Mode.TRILINEAR, Mode.RANDOM_RENOISE) else mode
    for b in (0.5, 0.6, 0.55, 0.65, 0.7, 0.45):
        try:
            Planner(full, n, b).feasible(sel)
            return b
        except InfeasibleBudget:
            continue
    raise AssertionError(f"no budget found for {mode.value} on {full} with {n} steps")


def config(full: Grid, n: int, mode: Mode = Mode.DVG, budget: float | None = None, **opts) -> SamplerConfig:
    if mode == Mode.FIXED:
        opts.setdefault("fixed", (0.7, 0.6))
    return SamplerConfig(
        full=full,
        num_steps=n,
        shift=MODEL_SHIFT,
        budget=budget_for(full, n, mode) if budget is None else budget,
        mode=mode,
        options=DVGOptions(**opts),
    )


def stage_shifts(cfg: SamplerConfig) -> list[float]:
    if cfg.mode == Mode.FULL:
        return [MODEL_SHIFT]
    return [MODEL_SHIFT if s is None else s for s in cfg.options.stage_shifts]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class Observer:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def __call__(self, step: int, stage: int, x0: torch.Tensor) -> None:
        self.seen.append((step, stage, x0.clone()))


# -- the oracle: the sampler must land exactly on a known clean field ------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("n", [50, 12])
@pytest.mark.parametrize("full", GRIDS, ids=str)
def test_oracle_velocity_recovers_the_target(make_field, make_oracle, full, n, mode):
    cfg = config(full, n, mode)
    target = make_field(1, C, full, seed=1)
    oracle = make_oracle(target, full)
    obs = Observer()
    out, record = sample(oracle, cfg, SEED, C, observer=obs)
    assert out.shape == (1, C, full.t, full.h, full.w), f"output shape {tuple(out.shape)}"
    err = maxdiff(out, target)
    assert err < 2e-6, f"{mode.value}, N={n}, {full}: output differs from the oracle's target by {err:.3e}"

    # Exactly N model calls, step indices 0 … N-1, each on its stage's grid.
    calls = oracle.calls
    assert [c.ctx.step for c in calls] == list(range(n)), f"{len(calls)} calls with steps {[c.ctx.step for c in calls]}"
    grids = [Grid(*st["grid"]) for st in record.stages]
    if mode == Mode.FULL:
        want_counts, bounds = [n], []
    else:
        bounds = stage_boundaries(n)
        want_counts = executed_step_counts(n, bounds)
    per_stage = [sum(c.ctx.stage == k for c in calls) for k in range(len(grids))]
    assert per_stage == want_counts, f"calls per stage {per_stage}, expected the executed counts {want_counts}"
    for c in calls:
        g = grids[c.ctx.stage]
        assert tuple(c.x.shape) == (1, C, g.t, g.h, g.w), (
            f"step {c.ctx.step} (stage {c.ctx.stage}) ran on {tuple(c.x.shape[2:])}, the stage grid is {g}"
        )
        assert c.ctx.grid == g

    # Timesteps: σ·1000 of the current stage's schedule (the model's shift, then 9, 11, 11).
    shifts = stage_shifts(cfg)
    schedules = [flow_sigmas(n, s) for s in shifts]
    for c in calls:
        k, i = c.ctx.stage, c.ctx.step
        want = sigma_to_timestep(float(schedules[k][i]))
        assert c.timestep == want, f"step {i} stage {k}: timestep {c.timestep}, expected {want} (shift {shifts[k]})"
        assert c.ctx.shift == shifts[k] and c.ctx.sigma == float(schedules[k][i])

    # Every transition's x̂0 is the target at that stage's coordinates (σ used = σ told to the model).
    assert [(s, k) for s, k, _ in obs.seen] == [(b, k) for k, b in enumerate(bounds)], (
        f"observer saw (step, stage) {[(s, k) for s, k, _ in obs.seen]}, expected boundaries {bounds}"
    )
    coords = stage_coords(grids)
    for step, k, x0 in obs.seen:
        want = sample_at(target, coords[k], full)
        assert x0.shape == want.shape, f"x̂0 at step {step} has shape {tuple(x0.shape)}, expected {tuple(want.shape)}"
        err = maxdiff(x0, want)
        assert err < 1e-5, f"{mode.value}: x̂0 after step {step} (stage {k}) differs from the target by {err:.3e}"


@pytest.mark.parametrize(
    ("mode", "opts"),
    [
        (Mode.DVG, {}),
        (Mode.TRILINEAR, {}),
        (Mode.RANDOM_RENOISE, {}),
        (Mode.DVG, {"renoise": "hash-fixed-seed"}),
        (Mode.DVG, {"resize": "anchor-linear", "smooth_keep": 0.4}),
        (Mode.SPATIAL_ONLY, {}),
    ],
    ids=["dvg", "trilinear", "random-renoise", "hash-fixed-seed", "anchor-linear", "spatial-only"],
)
def test_first_noise_and_every_renoise(make_field, make_oracle, mode, opts):
    """x_0 is the hash field at the sketch coordinates; after each switch x = (1-σ')·y + σ'·ε(new coords)
    with y the resized (and, leaving the sketch, smoothed) x̂0 and σ' from the new stage's schedule."""
    full, n = GRIDS[0], 12
    cfg = config(full, n, mode, **opts)
    target = make_field(1, C, full, seed=2)
    oracle = make_oracle(target, full)
    _, record = sample(oracle, cfg, SEED, C)
    grids = [Grid(*st["grid"]) for st in record.stages]
    coords = stage_coords(grids)
    first = oracle.calls[0]
    want0 = hash_noise(SEED, C, *coords[0])
    assert torch.equal(first.x, want0), f"first noise differs from the hash field by {maxdiff(first.x, want0):.3e}"

    eff = cfg.effective_options
    shifts = stage_shifts(cfg)
    for k, b in enumerate(stage_boundaries(n)):
        x0 = sample_at(target, coords[k], full)
        y = resize(x0, grids[k + 1], eff.resize)
        if k == 0:
            y = smooth_sketch(y, eff.smooth_keep)
        sigma = float(flow_sigmas(n, shifts[k + 1])[b + 1])
        g = grids[k + 1]
        if eff.renoise == RenoiseMode.RANDOM:
            eps = random_noise(SEED, (C, g.t, g.h, g.w), salt=b + 1)
        else:
            seed = eff.renoise_seed if eff.renoise == RenoiseMode.HASH_FIXED_SEED else SEED
            eps = hash_noise(seed, C, *coords[k + 1])
        want = renoise(y, eps, sigma)
        got = oracle.calls[b + 1].x
        assert got.shape == want.shape, f"stage {k + 1} starts on {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = maxdiff(got, want)
        assert err < 1e-5, f"{mode.value} {opts}: latent after switch {k}→{k + 1} (step {b}) off by {err:.3e}"


def test_resize_ablation_changes_the_renoised_latent(make_field, make_oracle):
    full, n = GRIDS[0], 12
    target = make_field(1, C, full, seed=2)
    runs = {}
    for mode in (Mode.DVG, Mode.TRILINEAR):
        o = make_oracle(target, full)
        sample(o, config(full, n, mode, budget=0.5), SEED, C, decide=lambda x0: Decision(0.6, 5))
        runs[mode] = o.calls[stage_boundaries(n)[0] + 1].x
    diff = maxdiff(runs[Mode.DVG], runs[Mode.TRILINEAR])
    assert diff > 1e-3, f"trilinear and anchor resizing give the same stage-2 latent (max diff {diff:.3e})"


# -- decisions ---------------------------------------------------------------------------------------------


def test_custom_decide_is_honoured(make_field, make_oracle):
    full, n = GRIDS[0], 50
    cfg = config(full, n, budget=0.5)
    target = make_field(1, C, full, seed=3)
    oracle = make_oracle(target, full)
    got_x0 = []

    def decide(x0_hat: torch.Tensor) -> Decision:
        got_x0.append(x0_hat.clone())
        return Decision(0.7, 6)

    out, record = sample(oracle, cfg, SEED, C, decide=decide)
    assert len(got_x0) == 1, f"decide called {len(got_x0)} times, expected once"
    planner = cfg.planner()
    sketch = planner.sketch_grid()
    want_x0 = sample_at(target, stage_coords((sketch, full))[0], full)
    assert got_x0[0].shape == want_x0.shape and maxdiff(got_x0[0], want_x0) < 1e-5, "decide did not get the sketch x̂0"
    # s = 0.7 → H = round(11.9) = 12, W = round(16.1) = 16; T23 = 6.
    want = [sketch, Grid(6, 12, 16), Grid(6, 17, 23), full]
    used = [Grid(*st["grid"]) for st in record.stages]
    assert used == want, f"stage grids {[str(g) for g in used]}, expected {[str(g) for g in want]}"
    shapes = {c.ctx.stage: tuple(c.x.shape[2:]) for c in oracle.calls}
    assert shapes == {k: (g.t, g.h, g.w) for k, g in enumerate(want)}, f"grids run: {shapes}"
    assert record.chosen["s"] == 0.7 and record.chosen["t23"] == 6
    assert record.chosen == planner.candidate(0.7, 6).to_dict()
    assert record.demands is None and record.feasible == []
    assert maxdiff(out, target) < 2e-6


def test_default_decider_uses_demands_of_the_sketch(make_field, make_oracle):
    full, n = GRIDS[0], 12
    cfg = config(full, n, budget=0.6)
    target = make_field(1, C, full, seed=4)
    _, record = sample(make_oracle(target, full), cfg, SEED, C)
    planner = cfg.planner()
    x0 = sample_at(target, stage_coords((planner.sketch_grid(), full))[0], full)
    d = analyse(x0)
    assert record.demands is not None
    for key, want in d.to_dict().items():
        assert record.demands[key] == pytest.approx(want, abs=1e-4), f"demand {key}: {record.demands[key]} vs {want}"
    chosen, feasible = planner.choose(d.w_s)
    assert (record.chosen["s"], record.chosen["t23"]) == (chosen.s, chosen.t23), (
        f"chose ({record.chosen['s']}, {record.chosen['t23']}), the planner picks ({chosen.s}, {chosen.t23})"
    )
    assert record.feasible == [c.to_dict() for c in feasible]


def test_fixed_spatial_and_temporal_only_grids(make_field, make_oracle):
    full, n = GRIDS[0], 12
    target = make_field(1, C, full, seed=5)
    _, rec = sample(make_oracle(target, full), config(full, n, Mode.FIXED, fixed=(0.7, 0.6)), SEED, C)
    # T23 = round(0.6·9) = round(5.4) = 5; H = 12, W = 16.
    assert rec.stages[1]["grid"] == [5, 12, 16] and rec.stages[2]["grid"] == [5, 17, 23], rec.stages
    assert rec.feasible == [] and rec.demands is None
    _, rec = sample(make_oracle(target, full), config(full, n, Mode.SPATIAL_ONLY), SEED, C)
    assert rec.stages[1]["grid"] == rec.stages[2]["grid"] and rec.stages[1]["grid"][0] == full.t, rec.stages
    _, rec = sample(make_oracle(target, full), config(full, n, Mode.TEMPORAL_ONLY), SEED, C)
    assert rec.chosen["s"] == 1.0 and rec.stages[1]["grid"][1:] == [full.h, full.w], rec.stages


# -- full mode is the plain sampler -------------------------------------------------------------------------


def _nonlinear_velocity(x: torch.Tensor, timestep: float) -> torch.Tensor:
    return 0.3 * x - 0.2 * torch.tanh(2 * x) + 0.01 * (timestep / 1000.0) * torch.cos(x)


@pytest.mark.parametrize("n", [12, 30])
def test_full_mode_equals_a_hand_written_euler_loop(n):
    full = GRIDS[1]
    cfg = SamplerConfig(full=full, num_steps=n, shift=3.0, mode="full", sigma_max=0.999)
    calls = []

    def velocity(x, timestep, ctx):
        calls.append((ctx.stage, tuple(x.shape), ctx.shift))
        return _nonlinear_velocity(x, timestep)

    out, record = sample(velocity, cfg, [SEED, SEED + 1], C)
    x = hash_noise([SEED, SEED + 1], C, torch.arange(full.t), torch.arange(full.h), torch.arange(full.w))
    sig = flow_sigmas(n, 3.0, sigma_max=0.999)
    for i in range(n):
        v = _nonlinear_velocity(x, float(sig[i]) * 1000)
        x = x + float(sig[i + 1] - sig[i]) * v
    err = maxdiff(out, x)
    assert err < 1e-6, f"full mode differs from the hand Euler loop by {err:.3e}"
    assert maxdiff(out, torch.zeros_like(out)) > 0.1, "degenerate test: the result is ~0"
    assert calls == [(0, (2, C, full.t, full.h, full.w), 3.0)] * n, "full mode did not run N calls on the full grid"
    assert record.boundaries == [] and record.step_counts == [n] and record.executed_counts == [n]
    assert len(record.stages) == 1 and record.stages[0]["grid"] == full.as_list()
    d = record.to_dict()
    assert d["density"] == d["executed_density"] == d["flop_density"] == 1.0


# -- the plan record ----------------------------------------------------------------------------------------


def test_plan_record_is_json_and_complete(make_field, make_oracle):
    full, n = GRIDS[0], 50
    cfg = config(full, n, budget=0.5)
    _, record = sample(make_oracle(make_field(1, C, full), full), cfg, SEED, C)
    d = json.loads(json.dumps(record.to_dict()))
    assert d["mode"] == "dvg" and d["num_steps"] == n and d["budget"] == 0.5
    assert d["boundaries"] == [14, 25, 36]
    assert d["step_counts"] == [14, 11, 11, 14] and d["executed_counts"] == [15, 11, 11, 13]
    stages = d["stages"]
    assert len(stages) == 4
    assert [st["steps"] for st in stages] == [[0, 14], [15, 25], [26, 36], [37, 49]], [st["steps"] for st in stages]
    assert [st["shift"] for st in stages] == [MODEL_SHIFT, 9.0, 11.0, 11.0]
    assert [st["executed_steps"] for st in stages] == [15, 11, 11, 13]
    assert stages[-1]["grid"] == full.as_list()
    cand = cfg.planner().candidate(d["chosen"]["s"], d["chosen"]["t23"])
    for key in ("density", "executed_density", "flop_density"):
        assert d[key] == getattr(cand, key), f"{key} {d[key]} differs from the planner's {getattr(cand, key)}"
        assert 0 < d[key] < 1
    assert [st["grid"] for st in stages] == [g.as_list() for g in cand.grids]
    assert set(d["demands"]) == {"spatial", "temporal", "w_s", "w_t"}
    assert d["feasible"] and d["chosen"] in d["feasible"], "the chosen action is not in the feasible table"
    for row in d["feasible"]:
        assert abs(row["density"] - 0.5) <= 0.02 + 1e-12
    assert {"decide", "stage1", "stage2", "stage3", "stage4"} <= set(d["timings"]), d["timings"]
    assert all(isinstance(v, float) and v >= 0 for v in d["timings"].values())


# -- errors -------------------------------------------------------------------------------------------------


def test_infeasible_budget_raises_before_any_model_call():
    calls = []

    def velocity(x, timestep, ctx):
        calls.append(ctx.step)
        return x

    cfg = config(GRIDS[0], 50, budget=0.2)
    with pytest.raises(InfeasibleBudget, match="infeasible"):
        sample(velocity, cfg, SEED, C)
    assert calls == [], f"the velocity ran {len(calls)} times before the infeasible budget was reported"


def test_wrong_velocity_shape_raises():
    def velocity(x, timestep, ctx):
        return x[..., :-1]

    with pytest.raises(ValueError, match="shape"):
        sample(velocity, config(GRIDS[0], 12, budget=0.5), SEED, C)


def test_fixed_mode_needs_fixed_option():
    with pytest.raises(ValueError):
        SamplerConfig(full=GRIDS[0], num_steps=12, shift=5.0, mode="fixed")
    with pytest.raises(ValueError):
        SamplerConfig(full=GRIDS[0], num_steps=12, shift=0.0)


# -- batches ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.DVG, Mode.FULL])
def test_batch_of_seeds_equals_single_runs(make_field, mode):
    full, n = GRIDS[1], 12
    seeds = [3, 11]
    target = make_field(2, C, full, seed=6)

    def make_velocity(tgt):
        def velocity(x, timestep, ctx):
            x0 = sample_at(tgt, ctx.coords, full)
            # Not an oracle: the result depends on the noise, so seeds must map to their own batch element.
            return 0.8 * (x - x0) / (timestep / 1000) + 0.1 * torch.sin(3 * x)

        return velocity

    cfg = config(full, n, mode, budget=0.5)

    def decide(x0):
        return Decision(0.8, 4)

    batch, rec = sample(make_velocity(target), cfg, seeds, C, decide=decide)
    assert batch.shape == (2, C, full.t, full.h, full.w)
    for k, s in enumerate(seeds):
        single, rec_k = sample(make_velocity(target[k : k + 1]), cfg, s, C, decide=decide)
        err = maxdiff(batch[k : k + 1], single)
        assert err < 1e-6, f"{mode.value}: batch element {k} (seed {s}) differs from its single run by {err:.3e}"
        assert rec_k.stages == rec.stages
    swapped, _ = sample(make_velocity(target.flip(0)), cfg, seeds[::-1], C, decide=decide)
    assert maxdiff(swapped, batch.flip(0)) < 1e-6, "swapping seeds and targets does not swap the outputs"
    other, _ = sample(make_velocity(target), cfg, [seeds[0], 99], C, decide=decide)
    assert maxdiff(other[0], batch[0]) < 1e-6 and maxdiff(other[1], batch[1]) > 1e-3, "seed does not matter"


def test_dtype_float64(make_field, make_oracle):
    full = GRIDS[1]
    target = make_field(1, C, full).double()
    out, _ = sample(make_oracle(target, full), config(full, 12, budget=0.5), SEED, C, dtype=torch.float64)
    assert out.dtype == torch.float64
    err = maxdiff(out, target)
    assert err < 1e-12, f"float64 oracle run is off by {err:.3e}"


def test_resize_mode_string_round_trip():
    # The ablation modes are dvg with one option changed.
    cfg = config(GRIDS[0], 12, Mode.TRILINEAR)
    assert cfg.effective_options.resize == ResizeMode.TRILINEAR and cfg.selection_mode == Mode.DVG
    cfg = config(GRIDS[0], 12, Mode.RANDOM_RENOISE)
    assert cfg.effective_options.renoise == RenoiseMode.RANDOM and cfg.selection_mode == Mode.DVG


@pytest.mark.parametrize(("s", "t23"), [(0.6, 2), (0.6, 12), (0.0, 5), (1.2, 5)])
def test_out_of_range_decision_raises(s, t23):
    # 9x17x23, budget 0.5: the sketch has 4 frames, so T23 must be in [4, 9] and s in (0, 1].
    def velocity(x, timestep, ctx):
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="decide returned"):
        sample(velocity, config(GRIDS[0], 12, budget=0.5), SEED, C, decide=lambda x0: Decision(s, t23))


# -- few steps and the interval end (MeanFlow's timestep_r) ----------------------------------------------------


@pytest.mark.parametrize("switch_end", ["stage", "zero"])
@pytest.mark.parametrize("n", [4, 6, 8, 12])
def test_few_steps_and_next_timestep_follow_each_stage_schedule(make_field, make_oracle, n, switch_end):
    """At 4-12 steps every stage runs at least one call, the oracle still lands on its target, and each call's
    ``next_timestep`` is the next timestep of *its own stage's* schedule (0 at the last call; at a stage's last
    call the old stage's next one, or 0 with ``meanflow_switch_end=zero``), always below the call's timestep."""
    full = GRIDS[0]
    shifts = (None, 9.0, 11.0, 11.0)
    cfg = config(full, n, Mode.DVG, meanflow_switch_end=switch_end, stage_shifts=shifts)
    target = make_field(1, C, full, seed=1)
    oracle = make_oracle(target, full)  # a straight path: its velocity is also the exact average velocity
    out, record = sample(oracle, cfg, SEED, C)
    err = maxdiff(out, target)
    assert err < 2e-6, f"N={n}: output differs from the oracle's target by {err:.3e}"
    bounds = stage_boundaries(n)
    assert {c.ctx.stage for c in oracle.calls} == {0, 1, 2, 3}
    assert record.executed_counts == executed_step_counts(n, bounds) and min(record.executed_counts) >= 1
    for call in oracle.calls:
        i, k = call.ctx.step, call.ctx.stage
        sigmas = flow_sigmas(n, MODEL_SHIFT if shifts[k] is None else shifts[k])
        assert call.timestep == pytest.approx(sigma_to_timestep(float(sigmas[i])), abs=1e-9)
        zero = i == n - 1 or (switch_end == "zero" and i in bounds)
        want = 0.0 if zero else sigma_to_timestep(float(sigmas[i + 1]))
        assert call.ctx.next_timestep == pytest.approx(want, abs=1e-9), f"N={n}, call {i} (stage {k + 1})"
        assert call.ctx.next_timestep < call.timestep, f"N={n}, call {i}: interval end not below its start"


def test_the_next_stages_first_timestep_is_no_interval_end():
    """Why a stage's last call does not end at the next stage's first timestep: the next stage's larger shift puts
    it at or above the current one at the sketch switch (N=8: equal, N=12 and 50: above), an interval of zero or
    negative length."""
    for n, relation in [(8, "equal"), (12, "above"), (50, "above")]:
        b = stage_boundaries(n)[0]
        here, there = float(flow_sigmas(n, MODEL_SHIFT)[b]), float(flow_sigmas(n, 9.0)[b + 1])
        assert (there == pytest.approx(here)) if relation == "equal" else there > here, (n, here, there)


def test_x0_from_an_average_velocity_on_gaussian_data():
    """``x̂0 = x_σ - σ·u(σ, r)`` with the exact average velocity of Gaussian data N(0, s²) (each noise ε rides the
    straight-in-law path x_σ = sd(σ)·ε, sd² = (1-σ)²s² + σ²): r = 0 gives the ODE's endpoint s·ε exactly; r → σ gives
    the posterior mean (1-σ)s²/sd(σ)·ε, the extrapolation an ordinary velocity model makes."""
    from dvg_dist.dvg import extrapolate_x0

    s, eps = 1.0, torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def sd(sigma: float) -> float:
        return ((1 - sigma) ** 2 * s**2 + sigma**2) ** 0.5

    def u(sigma: float, r: float) -> torch.Tensor:  # (x_σ - x_r) / (σ - r) along the flow's own path
        return (sd(sigma) - sd(r)) / (sigma - r) * eps

    sigma = 0.9375  # the sketch switch of a 12-step run at shift 5
    endpoint = extrapolate_x0(sd(sigma) * eps, u(sigma, 0.0), sigma)
    assert maxdiff(endpoint, s * eps) < 1e-12
    near = extrapolate_x0(sd(sigma) * eps, u(sigma, sigma - 1e-7), sigma)
    assert maxdiff(near, (1 - sigma) * s**2 / sd(sigma) * eps) < 1e-6
