"""Action space, stage grids, densities, budget filter and matching (docs/architecture.md, eq. 6–10)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from dvg_dist.dvg import (
    COST_PRESETS,
    Candidate,
    CostModel,
    DVGOptions,
    Grid,
    InfeasibleBudget,
    Mode,
    Planner,
    match,
    sort_key,
)

FULL = Grid(21, 90, 160)  # Wan 720p: 81 frames × 720 × 1280 → latent 21 × 90 × 160
N = 50
RELEASED = [14, 11, 11, 14]
EXECUTED = [15, 11, 11, 13]


def planner(budget: float = 0.5, **kw) -> Planner:
    kw.setdefault("spatial_multiple", 2)
    return Planner(FULL, N, budget, **kw)


def _density(grids: list[tuple[int, int, int]], counts: list[int], full: Grid = FULL, n: int = N) -> float:
    return sum(t * h * w * k for (t, h, w), k in zip(grids, counts)) / (full.voxels * n)


def _cand(s: float, t23: int, density: float) -> Candidate:
    return Candidate(s=s, t23=t23, grids=(), density=density, executed_density=density, flop_density=density)


# -- grids -------------------------------------------------------------------------------------------------


def test_planner_step_counts():
    p = planner()
    assert p.boundaries == [14, 25, 36]
    assert p.step_counts == RELEASED, f"released counts {p.step_counts}"
    assert p.executed_counts == EXECUTED, f"executed counts {p.executed_counts}"


def test_sketch_grid_by_hand():
    # T1 = round(0.8·0.5·21) = round(8.4) = 8; H1: 0.5·90 = 45 → 2·round(22.5) = 2·22 = 44; W1 = 80.
    g = planner().sketch_grid()
    assert g == Grid(8, 44, 80), f"sketch grid {g}, expected 8x44x80"
    # The sketch's frames scale with the budget: round(0.8·0.3·21) = round(5.04) = 5.
    assert Planner(FULL, N, 0.3).sketch_frames() == 5


def test_spatial_rounding_is_half_to_even():
    p = Planner(Grid(5, 53, 53), 50, 0.5, spatial_multiple=1)
    got = p.spatial_size(0.5, 53)
    assert got == 26, f"0.5·53 = 26.5 rounded to {got}; half-to-even gives 26 (half-up would give 27)"
    assert p.spatial_size(0.5, 55) == 28, "0.5·55 = 27.5 → 28 (half-to-even)"
    assert p.spatial_size(0.7, 90) == 63
    p2 = Planner(Grid(5, 90, 160), 50, 0.5, spatial_multiple=2)
    assert p2.spatial_size(0.7, 90) == 64, "0.7·90 = 63 → 2·round(31.5) = 64"
    assert p2.spatial_size(0.5, 90) == 44, "0.5·90 = 45 → 2·round(22.5) = 44"
    # Clamped: at least one multiple, at most full (a full size that is not a multiple stays full).
    p4 = Planner(Grid(5, 7, 9), 50, 0.5, spatial_multiple=4)
    assert p4.spatial_size(0.05, 7) == 4
    assert p4.spatial_size(1.0, 7) == 7
    assert p4.spatial_size(1.0, 9) == 9, "s = 1 keeps the full side even when it is not a multiple"
    assert p4.spatial_size(0.9, 9) == 8, "round(8.1) = 8 is a multiple of 4 (below full)"


def test_full_candidate_density_is_exactly_one():
    c = planner().full_candidate()
    assert (c.density, c.executed_density, c.flop_density) == (1.0, 1.0, 1.0)
    assert c.grids == (FULL,)
    assert c.s == 1.0 and c.t23 == FULL.t


def test_density_of_s1_full_frames_by_hand():
    # candidate(1.0, T) still has the reduced sketch: 8x44x80 for 14 released steps, full for 36.
    c = planner().candidate(1.0, 21)
    assert c.grids == (Grid(8, 44, 80), FULL, FULL, FULL)
    want = (8 * 44 * 80 * 14 + 21 * 90 * 160 * 36) / (21 * 90 * 160 * 50)
    assert c.density == pytest.approx(want, abs=1e-15), f"density {c.density}, by hand {want}"
    assert c.density < 1.0


def test_density_of_one_dvg_action_by_hand():
    c = planner().candidate(0.7, 15)
    # Stage 2: H = 2·round(63/2) = 64, W = 0.7·160 = 112.
    grids = [(8, 44, 80), (15, 64, 112), (15, 90, 160), (21, 90, 160)]
    assert [g.as_list() for g in c.grids] == [list(g) for g in grids], f"grids {[str(g) for g in c.grids]}"
    want = _density(grids, RELEASED)
    want_exec = _density(grids, EXECUTED)
    assert c.density == pytest.approx(want, abs=1e-15), f"density {c.density}, by hand {want}"
    assert c.executed_density == pytest.approx(want_exec, abs=1e-15), (
        f"executed density {c.executed_density}, by hand {want_exec}"
    )


def test_flop_density_by_hand_and_below_token_density():
    cm = COST_PRESETS["wan2.1-14b"]
    d, ffn, text = 5120, 13824, 512
    linear = 8 * d * d + 4 * d * d + 4 * d * text + 4 * d * ffn
    assert cm.linear == linear and cm.quadratic == 4 * d and cm.patch == (1, 2, 2)
    p = planner(cost_model=cm)
    c = p.candidate(0.7, 15)
    # Tokens with patch (1, 2, 2): ceil of each side over the patch.
    tokens = [8 * 22 * 40, 15 * 32 * 56, 15 * 45 * 80, 21 * 45 * 80]
    assert [g.tokens((1, 2, 2)) for g in c.grids] == tokens
    cost = [linear * L + 4 * d * L * L for L in tokens]
    want = sum(ci * k for ci, k in zip(cost, EXECUTED)) / (cost[-1] * N)
    assert c.flop_density == pytest.approx(want, rel=1e-12), f"flop density {c.flop_density}, by hand {want}"
    # At 720p the quadratic (attention) term dominates: FLOPs shrink faster than tokens.
    assert 4 * d * tokens[-1] > linear, "the test premise (quadratic term dominates at 720p) does not hold"
    assert c.flop_density < c.executed_density < c.density, (
        f"flop {c.flop_density:.4f}, executed {c.executed_density:.4f}, token {c.density:.4f} not in that order"
    )


def test_flop_density_equals_token_density_without_quadratic_term():
    p = planner(cost_model=CostModel(linear=1.0, quadratic=0.0, patch=(1, 1, 1)))
    c = p.candidate(0.6, 12)
    assert c.flop_density == pytest.approx(c.executed_density, rel=1e-12)


def test_grid_helpers():
    g = Grid.parse("21x90x160")
    assert g == FULL and str(g) == "21x90x160" and g.voxels == 21 * 90 * 160
    assert Grid(3, 5, 7).tokens((1, 2, 2)) == 3 * 3 * 4
    for bad in ("21x90", "0x2x2", "ax2x3"):
        with pytest.raises(ValueError):
            Grid.parse(bad)


def _check_grids(p: Planner, c: Candidate) -> None:
    g = c.grids
    assert g[-1] == p.full, f"({c.s}, {c.t23}): last grid {g[-1]} is not the full {p.full}"
    for k in range(len(g) - 1):
        a, b = g[k], g[k + 1]
        assert a.t <= b.t and a.h <= b.h and a.w <= b.w, f"({c.s}, {c.t23}): stage {k} {a} > stage {k + 1} {b}"
    for k, x in enumerate(g):
        assert x.t >= 1 and x.h >= 1 and x.w >= 1, f"stage {k} grid {x} has an empty axis"
        for side, full in ((x.h, p.full.h), (x.w, p.full.w)):
            assert side == full or side % p.spatial_multiple == 0, (
                f"({c.s}, {c.t23}): stage {k} side {side} not a multiple of {p.spatial_multiple} nor full {full}"
            )


@pytest.mark.parametrize("mode", [Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY])
@pytest.mark.parametrize(
    ("full", "mult", "opts"),
    [
        (FULL, 2, DVGOptions()),
        (Grid(9, 17, 23), 1, DVGOptions()),
        (Grid(7, 13, 19), 2, DVGOptions(s_grid=0.05)),
        (Grid(21, 90, 160), 2, DVGOptions(sketch_spatial_ratio=0.8, sketch_temporal_factor=1.0)),  # sketch > s
    ],
)
def test_grids_are_valid_for_every_candidate(mode, full, mult, opts):
    p = Planner(full, N, 0.5, options=opts, spatial_multiple=mult)
    cands = p.candidates(mode)
    assert cands
    for c in cands:
        _check_grids(p, c)


def test_spatial_and_temporal_only_structure():
    p = planner(0.6)
    for c in p.candidates(Mode.SPATIAL_ONLY):
        assert c.t23 == FULL.t and c.grids[1] == c.grids[2], f"spatial-only ({c.s}): grids {c.grids}"
        assert c.grids[1].t == FULL.t
    assert [c.s for c in p.candidates(Mode.SPATIAL_ONLY)] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for c in p.candidates(Mode.TEMPORAL_ONLY):
        assert c.s == 1.0 and c.grids[1] == Grid(c.t23, FULL.h, FULL.w), f"temporal-only: {c}"
    assert [c.t23 for c in p.candidates(Mode.TEMPORAL_ONLY)] == list(range(p.sketch_frames(), FULL.t + 1))
    dvg = p.candidates(Mode.DVG)
    assert len(dvg) == 6 * (FULL.t - p.sketch_frames() + 1)


def test_spatial_candidates_grid():
    assert DVGOptions().spatial_candidates() == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    fine = DVGOptions(s_grid=0.05).spatial_candidates()
    assert len(fine) == 11 and fine[0] == 0.5 and fine[-1] == 1.0 and 0.55 in fine


def test_fixed_candidate():
    p = planner()
    c = p.fixed_candidate(0.7, 0.5)
    assert c.t23 == 10, f"T23 = round(0.5·21) = round(10.5) = 10 (half-to-even); got {c.t23}"
    assert c == p.candidate(0.7, 10)
    low = p.fixed_candidate(0.6, 0.1)
    assert low.t23 == p.sketch_frames() == 8, f"r·T below the sketch's frames is raised to T1 = 8; got {low.t23}"
    assert p.fixed_candidate(1.0, 1.0).t23 == 21


def test_temporal_multiple_keeps_reduced_stages_whole_temporal_patches():
    """CogVideoX 1.5 (patch_size_t 2): the sketch, T₂₃ candidates and a fixed r give even frame counts; the full
    grid keeps its own count (odd here, as a grid the model pads itself)."""
    for full in (Grid(22, 12, 16), Grid(21, 12, 16)):
        p = Planner(full, N, 0.5, spatial_multiple=2, temporal_multiple=2)
        t1 = p.sketch_frames()
        assert t1 == 2 * round(round(p.options.sketch_temporal_factor * 0.5 * full.t) / 2) and t1 % 2 == 0, t1
        cands = p.candidates(Mode.DVG)
        assert sorted({c.t23 for c in cands}) == [t for t in range(t1, full.t + 1) if t % 2 == 0 or t == full.t]
        for c in cands + p.candidates(Mode.TEMPORAL_ONLY):
            assert all(g.t % 2 == 0 or g.t == full.t for g in c.grids), c.grids
        assert p.fixed_candidate(1.0, 0.5).t23 in (10, 12) and p.fixed_candidate(1.0, 0.5).t23 % 2 == 0
    assert Planner(Grid(6, 8, 8), N, 0.5, temporal_multiple=2).fixed_candidate(1.0, 0.5).t23 == 4  # round(1.5) = 2
    assert Planner(Grid(1, 8, 8), N, 1.0, temporal_multiple=2).sketch_frames() == 1  # never above the full count
    with pytest.raises(ValueError, match="temporal_multiple must be >= 1"):
        Planner(FULL, N, 0.5, temporal_multiple=0)


# -- budget filter ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.4, 0.5, 0.6, 0.7])
@pytest.mark.parametrize("mode", [Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY])
def test_feasible_within_delta_complete_and_sorted(budget, mode):
    p = planner(budget)
    all_c = p.candidates(mode)
    inside = [c for c in all_c if abs(c.density - budget) <= p.options.delta + 1e-12]
    if not inside:
        with pytest.raises(InfeasibleBudget):
            p.feasible(mode)
        return
    f = p.feasible(mode)
    assert len(f) == len(inside), f"feasible has {len(f)} actions, {len(inside)} are within δ"
    for c in f:
        gap = abs(c.density - budget)
        assert gap <= 0.02 + 1e-12, f"({c.s}, {c.t23}) density {c.density:.4f} is {gap:.4f} from {budget}"
    keys = [sort_key(c, budget) for c in f]
    assert keys == sorted(keys), "feasible actions are not sorted by (|gap|, −ρ, −s, −T23)"


def test_sort_key_tie_breaks():
    budget = 0.5
    # Exactly representable equal gaps on both sides of the budget.
    above = _cand(0.6, 10, 0.625)
    below = _cand(1.0, 21, 0.375)
    nearer = _cand(0.5, 8, 0.5625)
    same_rho_small_s = _cand(0.7, 12, 0.625)
    same_rho_s_fewer_t = _cand(0.7, 11, 0.625)
    got = sorted([below, same_rho_s_fewer_t, above, nearer, same_rho_small_s], key=lambda c: sort_key(c, budget))
    want = [nearer, same_rho_small_s, same_rho_s_fewer_t, above, below]
    # nearer: gap 0.0625. Then gap 0.125: denser (0.625) before 0.375; among ρ = 0.625, larger s (0.7)
    # first, and for equal s more frames first; the 0.375 one (largest s of all) comes last.
    assert [(c.s, c.t23) for c in got] == [(c.s, c.t23) for c in want], f"order {[(c.s, c.t23) for c in got]}"
    assert sort_key(above, budget) == (0.125, -0.625, -0.6, -10)


def test_feasible_order_on_a_real_case():
    # Two real actions of 9x17x23, N=12, budget 0.5 (both within δ): the sorted list keeps gap order.
    p = Planner(Grid(9, 17, 23), 12, 0.5)
    f = p.feasible()
    gaps = [abs(c.density - 0.5) for c in f]
    assert gaps == sorted(gaps), f"gaps {gaps} are not ascending"
    assert (f[0].s, f[0].t23) == (0.6, 5), f"closest action is ({f[0].s}, {f[0].t23}), expected (0.6, 5)"


def test_infeasible_budget_names_the_reachable_range():
    p = Planner(FULL, N, 0.2, spatial_multiple=2)
    dens = [c.density for c in p.candidates()]
    lo, hi = min(dens), max(dens)
    with pytest.raises(InfeasibleBudget) as info:
        p.feasible()
    msg = str(info.value)
    for token in ("0.2", f"{lo:.3f}", f"{hi:.3f}", "21x90x160", "50"):
        assert token in msg, f"message {msg!r} does not contain {token!r}"
    assert isinstance(info.value, ValueError)
    # The refine stage alone is 14/50 = 0.28 of the full density; nothing is below it.
    assert lo > 0.28, f"lowest reachable density {lo:.4f} is below the refine-stage floor 0.28"


@pytest.mark.parametrize("n", [4, 6, 8, 12])
def test_few_step_budgets_name_the_reachable_densities(n):
    """Wan 720p at 4-12 steps: the one-line error names the reachable released densities and, when the budget is
    below them, the lowest executed density; ``budget_counting=executed`` filters on what the calls really run."""
    low = Planner(FULL, n, 0.3, spatial_multiple=2)  # the sketch's frames scale with the budget: same planner
    dens = sorted({c.density for c in low.candidates()})
    with pytest.raises(InfeasibleBudget) as info:
        low.feasible()
    msg = str(info.value)
    assert "\n" not in msg and f"{dens[0]:.3f}-{dens[-1]:.3f}" in msg and f"{n} steps" in msg, msg
    lowest = min(c.executed_density for c in low.candidates())
    assert f"dvg.budget_counting=executed) the lowest is {lowest:.3f}" in msg, msg
    executed = Planner(FULL, n, 0.5, DVGOptions(budget_counting="executed"), spatial_multiple=2)
    assert lowest < dens[0], f"N={n}: executed {lowest:.3f} should be below released {dens[0]:.3f}"
    chosen = executed.feasible()[0]
    assert abs(chosen.executed_density - 0.5) <= 0.02 + 1e-12, f"N={n}: executed density {chosen.executed_density}"
    assert chosen.density > chosen.executed_density  # the released counting would have charged more
    if n == 4:  # released counting: the refine stage's 2 of 4 calls alone are 0.5, so 0.5 is out of reach
        with pytest.raises(InfeasibleBudget, match=r"0\.5 is infeasible"):
            Planner(FULL, n, 0.5, spatial_multiple=2).feasible()
    else:
        assert Planner(FULL, n, 0.5, spatial_multiple=2).feasible()


def test_planner_rejects_bad_arguments():
    for b in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            Planner(FULL, N, b)
    with pytest.raises(ValueError):
        Planner(FULL, N, 0.5, spatial_multiple=0)
    with pytest.raises(ValueError, match="at least 4 steps"):
        Planner(FULL, 3, 0.5)


# -- matching ---------------------------------------------------------------------------------------------


def _ref_match(cands: list[Candidate], w_s: float, w_t: float, lam: float) -> Candidate:
    s2 = [c.s**2 for c in cands]
    t = [c.t23 for c in cands]
    ns = [(a - min(s2)) / max(max(s2) - min(s2), 1e-8) for a in s2]
    nt = [(b - min(t)) / max(max(t) - min(t), 1e-8) for b in t]
    losses = [lam * (a - w_s) ** 2 + (1 - lam) * (b - w_t) ** 2 for a, b in zip(ns, nt)]
    return cands[losses.index(min(losses))]  # index() = first minimum


def test_match_by_hand():
    a = _cand(1.0, 9, 0.50)  # largest s², fewest frames → Ŝ = 1, R̂ = 0
    b = _cand(0.5, 15, 0.50)  # smallest s², most frames → Ŝ = 0, R̂ = 1
    c = _cand(0.8, 11, 0.50)  # Ŝ = (0.64 - 0.25)/0.75 = 0.52, R̂ = 2/6
    assert match([b, c, a], 1.0, 0.0) is a, "w_s = 1 should pick the largest s² with the fewest frames"
    assert match([a, c, b], 0.0, 1.0) is b, "w_s = 0 should pick the most frames with the smallest s²"
    # w_s = 0.5: loss(a) = loss(b) = 0.25, loss(c) = 0.5·0.02² + 0.5·(1/6)² ≈ 0.0141.
    assert match([a, b, c], 0.5, 0.5) is c
    # Exact tie between a and b: the first in the given order wins.
    assert match([a, b], 0.5, 0.5) is a
    assert match([b, a], 0.5, 0.5) is b
    # λ = 1: only the spatial term counts.
    assert match([b, c, a], 0.5, 0.5, lam=1.0) is c
    assert match([c, a, b], 0.0, 1.0, lam=1.0) is b
    # λ = 0: only the temporal term counts; w_t = 0 → fewest frames.
    assert match([b, c, a], 0.9, 0.0, lam=0.0) is a
    assert match([c], 0.3, 0.7) is c
    with pytest.raises(ValueError):
        match([], 0.5, 0.5)


def test_match_follows_weights_on_real_feasible_set():
    p = planner(0.5)
    f = p.feasible()
    assert len(f) >= 3
    for w_s in (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0):
        for lam in (0.5, 0.2, 0.8):
            got = match(f, w_s, 1 - w_s, lam)
            want = _ref_match(f, w_s, 1 - w_s, lam)
            assert got is want, f"w_s={w_s}, λ={lam}: chose ({got.s}, {got.t23}), formula gives ({want.s}, {want.t23})"
    s_max = max(c.s for c in f)
    top = match(f, 1.0, 0.0, 1.0)
    assert top.s == s_max, f"λ=1, w_s=1 chose s={top.s}, the largest feasible s is {s_max}"
    t_max = max(c.t23 for c in f)
    assert match(f, 0.0, 1.0, 0.0).t23 == t_max
    # choose(): dvg uses match with λ from the options; single-axis ablations take the closest action.
    chosen, feas = p.choose(0.3)
    assert feas == f and chosen == match(f, 0.3, 0.7, 0.5)
    only, feas_s = planner(0.6).choose(0.9, Mode.TEMPORAL_ONLY)
    assert only is feas_s[0]


def test_match_ties_take_first_in_sorted_order():
    # Every feasible action twice (equal copies, distinct objects): each loss ties with its copy, and the
    # chosen one must be the earlier object.
    f = planner(0.5).feasible()
    copies = [replace(c) for c in f]
    for w_s in (0.0, 0.3, 0.5, 0.8, 1.0):
        got = match([*f, *copies], w_s, 1 - w_s)
        assert any(got is c for c in f), f"w_s={w_s}: match chose a later copy of ({got.s}, {got.t23})"
        assert got is match(f, w_s, 1 - w_s)


def test_more_weight_on_space_never_lowers_s():
    # On the real feasible set, increasing w_s (λ = 1) picks non-decreasing s.
    f = planner(0.5).feasible()
    ss = [match(f, w, 1 - w, 1.0).s for w in [i / 20 for i in range(21)]]
    assert all(a <= b for a, b in itertools.pairwise(ss)), f"s along increasing w_s: {ss}"
    assert math.isclose(ss[-1], max(c.s for c in f))
