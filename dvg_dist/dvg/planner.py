"""The action space, stage grids, densities, the budget filter and demand matching (docs/architecture.md, eq. 6–10).

An *action* is the pair (s, T₂₃) chosen when leaving the sketch: stage 2 runs at spatial ratio ``s`` and
``T₂₃`` latent frames, stage 3 at full space and the same frames, stage 4 at full size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .options import BudgetCounting, DVGOptions, Mode
from .schedule import executed_step_counts, released_step_counts, stage_boundaries


@dataclass(frozen=True, order=True)
class Grid:
    """A latent grid: frames × height × width (``T, H, W`` of ``[B, C, T, H, W]``)."""

    t: int
    h: int
    w: int

    @property
    def voxels(self) -> int:
        return self.t * self.h * self.w

    def tokens(self, patch: Sequence[int]) -> int:
        pt, ph, pw = patch
        return math.ceil(self.t / pt) * math.ceil(self.h / ph) * math.ceil(self.w / pw)

    def as_list(self) -> list[int]:
        return [self.t, self.h, self.w]

    def __str__(self) -> str:
        return f"{self.t}x{self.h}x{self.w}"

    @classmethod
    def parse(cls, text: str) -> Grid:
        """``"21x90x160"`` → ``Grid(21, 90, 160)``."""
        parts = text.lower().replace("*", "x").split("x")
        if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"grid must be TxHxW with positive integers, e.g. 21x90x160; got {text!r}")
        return cls(*(int(p) for p in parts))


@dataclass(frozen=True)
class CostModel:
    """FLOPs of one forward at ``L`` tokens: ``linear·L + quadratic·L²`` (per layer; layers cancel out).

    Per token and layer, with hidden size d, FFN width f and L_text text tokens: self-attention q/k/v/o
    projections 8d², cross-attention q/o projections 4d², cross-attention scores 4d·L_text, FFN 4d·f; the
    self-attention scores and weighted sum add 4d per *pair* of tokens — the quadratic term.
    """

    linear: float
    quadratic: float
    patch: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_arch(
        cls, hidden: int, ffn: int, text_tokens: int = 512, patch: tuple[int, int, int] = (1, 2, 2)
    ) -> CostModel:
        linear = 8 * hidden**2 + 4 * hidden**2 + 4 * hidden * text_tokens + 4 * hidden * ffn
        return cls(linear=float(linear), quadratic=float(4 * hidden), patch=patch)

    def cost(self, grid: Grid) -> float:
        tokens = grid.tokens(self.patch)
        return self.linear * tokens + self.quadratic * tokens**2


# Hidden size, FFN width and text tokens of the released architectures (diffusers configs).
COST_PRESETS: dict[str, CostModel] = {
    "wan2.1-14b": CostModel.from_arch(5120, 13824, 512, (1, 2, 2)),
    "wan2.1-1.3b": CostModel.from_arch(1536, 8960, 512, (1, 2, 2)),
    "hunyuanvideo": CostModel.from_arch(3072, 12288, 256, (1, 2, 2)),
    "hunyuanvideo-1.5": CostModel.from_arch(2048, 8192, 1000, (1, 1, 1)),
}


class InfeasibleBudget(ValueError):
    """No action's density is within δ of the budget."""


@dataclass(frozen=True)
class Candidate:
    """One action with its four stage grids and its densities."""

    s: float
    t23: int
    grids: tuple[Grid, ...]
    density: float
    """Token density with the released step counting (eq. 7)."""
    executed_density: float
    """Token density with the model calls each grid actually runs."""
    flop_density: float
    """FLOPs relative to the full run, under the cost model (executed counting)."""

    def to_dict(self) -> dict:
        return {
            "s": self.s,
            "t23": self.t23,
            "grids": [g.as_list() for g in self.grids],
            "density": self.density,
            "executed_density": self.executed_density,
            "flop_density": self.flop_density,
        }


def full_candidate(full: Grid) -> Candidate:
    """The one-stage full run (``mode = full``): every density is exactly 1, at any step count."""
    return Candidate(s=1.0, t23=full.t, grids=(full,), density=1.0, executed_density=1.0, flop_density=1.0)


@dataclass
class Planner:
    """Builds and ranks the actions for one latent size, step count, budget and mode.

    ``spatial_multiple`` is what the backbone accepts per spatial side (Wan: 2 since ph = pw = 2);
    ``temporal_multiple`` what it accepts in latent frames (CogVideoX 1.5: 2, its ``patch_size_t``; 1 elsewhere).
    Every reduced stage's frame count is a multiple of it; the full grid is the model's own.
    """

    full: Grid
    num_steps: int
    budget: float
    options: DVGOptions = field(default_factory=DVGOptions)
    spatial_multiple: int = 1
    cost_model: CostModel = field(default_factory=lambda: COST_PRESETS["wan2.1-14b"])
    temporal_multiple: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1]; got {self.budget}")
        if self.spatial_multiple < 1:
            raise ValueError(f"spatial_multiple must be >= 1; got {self.spatial_multiple}")
        if self.temporal_multiple < 1:
            raise ValueError(f"temporal_multiple must be >= 1; got {self.temporal_multiple}")
        self.boundaries = stage_boundaries(self.num_steps, self.options.boundary_fractions)
        self.step_counts = released_step_counts(self.num_steps, self.boundaries)
        self.executed_counts = executed_step_counts(self.num_steps, self.boundaries)
        self.counts_executed = self.options.budget_counting == BudgetCounting.EXECUTED

    def budget_density(self, c: Candidate) -> float:
        """The density the budget filter compares with ρ* (``options.budget_counting``)."""
        return c.executed_density if self.counts_executed else c.density

    # -- grids ---------------------------------------------------------------------------------------

    def spatial_size(self, ratio: float, full: int) -> int:
        """``round(ratio·full)`` (half-to-even, like Python and the released code), then to the nearest
        multiple of the backbone's spatial multiple, at least one multiple, at most ``full``."""
        m = self.spatial_multiple
        size = round(ratio * full)
        if size >= full:
            return full  # s = 1 is the full side even when the full side is not a multiple of m
        size = m * round(size / m)
        return max(min(m, full), min(size, full))

    def temporal_size(self, frames: int) -> int:
        """``frames`` to the nearest multiple of the backbone's temporal multiple (half-to-even), at least one
        multiple, at most the full frame count (itself allowed whatever it is)."""
        full, m = self.full.t, self.temporal_multiple
        if frames >= full:
            return full
        return max(min(m, full), min(m * round(frames / m), full))

    def sketch_frames(self) -> int:
        """``T_1 = round(factor·ρ*·T)``, at least 1 (at least and a multiple of the temporal multiple)."""
        return self.temporal_size(max(1, round(self.options.sketch_temporal_factor * self.budget * self.full.t)))

    def sketch_grid(self) -> Grid:
        s1 = self.options.sketch_spatial_ratio
        return Grid(self.sketch_frames(), self.spatial_size(s1, self.full.h), self.spatial_size(s1, self.full.w))

    def stage_grids(self, s: float, t23: int, spatial_in_stage3: bool = False) -> tuple[Grid, ...]:
        """The four grids of action (s, T₂₃): sketch, (s, T₂₃), (1 or s, T₂₃), full — made non-decreasing."""
        f = self.full
        stage2 = Grid(t23, self.spatial_size(s, f.h), self.spatial_size(s, f.w))
        stage3 = stage2 if spatial_in_stage3 else Grid(t23, f.h, f.w)
        grids = [self.sketch_grid(), stage2, stage3, f]
        for k in range(len(grids) - 2, -1, -1):  # each stage at most the next one
            nxt = grids[k + 1]
            g = grids[k]
            grids[k] = Grid(min(g.t, nxt.t), min(g.h, nxt.h), min(g.w, nxt.w))
        return tuple(grids)

    # -- densities -----------------------------------------------------------------------------------

    def _ratio(self, grids: Sequence[Grid], counts: Sequence[int]) -> float:
        # Integer numerator: equal plans give bit-equal densities, so the sort's ties are real ties.
        return sum(g.voxels * n for g, n in zip(grids, counts)) / (self.full.voxels * self.num_steps)

    def candidate(self, s: float, t23: int, spatial_in_stage3: bool = False) -> Candidate:
        grids = self.stage_grids(s, t23, spatial_in_stage3)
        cost_full = self.cost_model.cost(self.full) * self.num_steps
        flops = sum(self.cost_model.cost(g) * n for g, n in zip(grids, self.executed_counts))
        return Candidate(
            s=s,
            t23=t23,
            grids=grids,
            density=self._ratio(grids, self.step_counts),
            executed_density=self._ratio(grids, self.executed_counts),
            flop_density=flops / cost_full,
        )

    def full_candidate(self) -> Candidate:
        """The one-stage full run (``mode = full``): every density is exactly 1."""
        return full_candidate(self.full)

    def candidates(self, mode: Mode = Mode.DVG) -> list[Candidate]:
        """Every action the mode allows, before the budget filter."""
        t1 = self.sketch_frames()
        m = self.temporal_multiple
        frames = [t for t in range(t1, self.full.t + 1) if t % m == 0 or t == self.full.t]
        svals = self.options.spatial_candidates()
        if mode == Mode.SPATIAL_ONLY:
            return [self.candidate(s, self.full.t, spatial_in_stage3=True) for s in svals]
        if mode == Mode.TEMPORAL_ONLY:
            return [self.candidate(1.0, t) for t in frames]
        return [self.candidate(s, t) for s in svals for t in frames]

    def fixed_candidate(self, s: float, r: float) -> Candidate:
        """``mode = fixed``: the manual (s, r), with T₂₃ = round(r·T) (to the temporal multiple) within [T_1, T]."""
        t23 = max(self.sketch_frames(), self.temporal_size(round(r * self.full.t)))
        return self.candidate(s, t23)

    # -- budget filter and matching ------------------------------------------------------------------

    def feasible(self, mode: Mode = Mode.DVG) -> list[Candidate]:
        """Eq. 8: actions within δ of the budget, sorted by (|gap|, −ρ, −s, −T₂₃)."""
        cands = self.candidates(mode)
        eps = 1e-12  # a density exactly δ away is inside, whatever the float rounding of the subtraction
        kept = [c for c in cands if abs(self.budget_density(c) - self.budget) <= self.options.delta + eps]
        if not kept:
            dens = sorted({self.budget_density(c) for c in cands})
            lo, hi = dens[0], dens[-1]
            below = [d for d in dens if d < self.budget]
            above = [d for d in dens if d > self.budget]
            nearest = ", ".join(f"{d:.3f}" for d in ([below[-1]] if below else []) + ([above[0]] if above else []))
            hint = " (try dvg.s_grid=0.05)" if mode == Mode.SPATIAL_ONLY and self.options.s_grid > 0.05 else ""
            if not self.counts_executed and self.budget < lo and self.num_steps <= 12:
                # At few steps the released counting charges each boundary call to the next, larger stage.
                executed = min(c.executed_density for c in cands)
                hint += f"; counting the calls as they run (dvg.budget_counting=executed) the lowest is {executed:.3f}"
            counting = "executed" if self.counts_executed else "released"
            raise InfeasibleBudget(
                f"budget {self.budget:g} is infeasible for latent {self.full} with {self.num_steps} steps in mode "
                f"{mode.value}: no action is within {self.options.delta:g} of it; reachable densities ({counting} "
                f"counting) are {lo:.3f}-{hi:.3f} with gaps, the nearest being {nearest}{hint}"
            )
        return sorted(kept, key=lambda c: sort_key(c, self.budget, self.counts_executed))

    def choose(self, w_s: float, mode: Mode = Mode.DVG) -> tuple[Candidate, list[Candidate]]:
        """The action for demand weight ``w_s`` (``w_t = 1 - w_s``), and the sorted feasible set.

        dvg: min–max matching (eq. 9–10); the single-axis ablations: the feasible action closest to the budget.
        """
        feasible = self.feasible(mode)
        if mode in (Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY):
            return feasible[0], feasible
        return match(feasible, w_s, 1.0 - w_s, self.options.lam), feasible


def sort_key(c: Candidate, budget: float, executed: bool = False) -> tuple[float, float, float, int]:
    """The filter's order: (|ρ − ρ*|, −ρ, −s, −T₂₃) — closest to the budget, then the denser, then the
    larger s, then more frames. ``ρ`` is the released density, or the executed one when ``executed``."""
    d = c.executed_density if executed else c.density
    return (abs(d - budget), -d, -c.s, -c.t23)


def match(feasible: Sequence[Candidate], w_s: float, w_t: float, lam: float = 0.5) -> Candidate:
    """Eq. 9–10: min–max normalise ``s²`` and ``T₂₃`` over the feasible set and pick the action closest
    to the demand weights; the first in the given (sorted) order wins ties."""
    if not feasible:
        raise ValueError("match needs at least one feasible action")
    s2 = [c.s**2 for c in feasible]
    t = [float(c.t23) for c in feasible]
    s_lo, s_span = min(s2), max(max(s2) - min(s2), 1e-8)
    t_lo, t_span = min(t), max(max(t) - min(t), 1e-8)
    best, best_loss = feasible[0], math.inf
    for c, a, b in zip(feasible, s2, t):
        loss = lam * ((a - s_lo) / s_span - w_s) ** 2 + (1 - lam) * ((b - t_lo) / t_span - w_t) ** 2
        if loss < best_loss:
            best, best_loss = c, loss
    return best
