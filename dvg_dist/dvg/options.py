"""The DVG algorithm's settings, with the released defaults (docs/architecture.md). Pure data, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    """What the staged sampler runs."""

    FULL = "full"
    """One stage at full size: exactly the plain flow-matching sampler."""
    DVG = "dvg"
    """The four stages with (s, r) chosen from the sketch's demands under the budget."""
    SPATIAL_ONLY = "spatial-only"
    """Ablation: stages 2 and 3 cut space only, at the s closest to the budget among those within δ."""
    TEMPORAL_ONLY = "temporal-only"
    """Ablation: stages 2 and 3 cut time only, at the frame count closest to the budget among those within δ."""
    FIXED = "fixed"
    """Ablation: a manual (s, r) given in ``DVGOptions.fixed``; no budget filter."""
    TRILINEAR = "trilinear"
    """Ablation: ``dvg`` with plain trilinear resizing instead of anchor resizing."""
    RANDOM_RENOISE = "random-renoise"
    """Ablation: ``dvg`` with fresh ``randn`` noise at each re-noise instead of the coordinate hash field."""


class ResizeMode(str, Enum):
    AREA_ANCHOR = "area-anchor"
    """Space: area interpolation per frame, then the anchor pixels restored exactly; time: anchor-linear."""
    ANCHOR_LINEAR = "anchor-linear"
    """All three axes anchor-linear (the paper's wording)."""
    TRILINEAR = "trilinear"
    """Plain ``F.interpolate(mode="trilinear")`` (ablation)."""


class RenoiseMode(str, Enum):
    HASH = "hash"
    """The coordinate-hash field of the user's seed (the same field as the first noise)."""
    HASH_FIXED_SEED = "hash-fixed-seed"
    """The coordinate-hash field of ``DVGOptions.renoise_seed`` (the released code's 12345)."""
    RANDOM = "random"
    """``torch.randn`` from a generator seeded by the user's seed and the step (ablation)."""


class BudgetCounting(str, Enum):
    """Which density the budget filter (eq. 8) compares with ρ*."""

    RELEASED = "released"
    """Eq. 7 as released: the model call on a boundary counts to the *next* stage (N=50: n = 14, 11, 11, 14)."""
    EXECUTED = "executed"
    """Each model call counts to the grid it runs on (N=50: 15, 11, 11, 13). At few steps the two differ a lot
    (N=8: 2, 2, 1, 3 against 3, 2, 1, 2), and this one is the compute the run actually spends."""


class MeanFlowSwitchEnd(str, Enum):
    """Where the average-velocity interval of a stage's last model call ends (MeanFlow checkpoints)."""

    STAGE = "stage"
    """The next timestep of the stage's own schedule: the step the stage would have taken, so the model is asked
    for the same kind of interval as at every other call; ``x̂0 = x - σ·u`` then extrapolates past it."""
    ZERO = "zero"
    """0: the model's one-step estimate of the clean latent, which ``x̂0 = x - σ·u`` then is exactly."""


class TemporalDemandMethod(str, Enum):
    LK = "lk"
    """One global Lucas–Kanade vector per frame pair (released)."""
    PYRAMID = "pyramid"
    """Coarse-to-fine Lucas–Kanade with warping: sees motion above ≈1–2 latent px/frame."""


@dataclass(frozen=True)
class DVGOptions:
    """Every knob of DVG. The defaults are the released implementation's."""

    boundary_fractions: tuple[float, float, float] = (0.28, 0.50, 0.72)
    """Stage switches after model calls ``⌊f·N⌋``; at few steps pushed apart so every stage runs a call."""
    sketch_spatial_ratio: float = 0.5
    """``s_1``: the sketch stage's spatial ratio."""
    sketch_temporal_factor: float = 0.8
    """``r_1 = round(factor·ρ*·T)/T``: the sketch's frame count scales with the budget."""
    stage_shifts: tuple[float | None, float | None, float | None, float | None] = (None, 9.0, 11.0, 11.0)
    """Schedule shift per stage; ``None`` keeps the model's own shift."""
    s_min: float = 0.5
    """Smallest spatial ratio ``s`` of stages 2-3 the planner considers."""
    s_max: float = 1.0
    """Largest spatial ratio ``s`` of stages 2-3 the planner considers."""
    s_grid: float = 0.1
    """Spacing of the spatial-ratio candidates (0.05 is the paper's finest)."""
    delta: float = 0.02
    """Budget tolerance δ of the filter ``|ρ(a) - ρ*| ≤ δ``."""
    alpha: float = 2.6
    """Temperature α of the demand weights."""
    lam: float = 0.5
    """λ of the matching objective (spatial term weight)."""
    temporal_demand: TemporalDemandMethod = TemporalDemandMethod.LK
    """How the temporal demand (eq. 4) estimates motion between adjacent sketch frames."""
    pyramid_levels: int = 3
    """Levels of the coarse-to-fine estimate when ``temporal_demand = pyramid``."""
    resize: ResizeMode = ResizeMode.AREA_ANCHOR
    """How x̂0 is resized to the next stage's grid at a transition (eq. 11-12)."""
    renoise: RenoiseMode = RenoiseMode.HASH
    """Which noise re-noises the resized x̂0 at a transition (eq. 13-14)."""
    renoise_seed: int = 12345
    """Seed of the re-noise field when ``renoise = hash-fixed-seed``."""
    smooth_keep: float = 0.7
    """Sketch smoothing: ``y ← keep·y + (1-keep)·avgpool3×3(y)`` after leaving the sketch."""
    fixed: tuple[float, float] | None = None
    """``(s, r)`` for ``mode = fixed``."""
    budget_counting: BudgetCounting = BudgetCounting.RELEASED
    """Step counting of the density the budget filter uses: ``released`` (eq. 7, the paper's numbers) or
    ``executed`` (the model calls as they run; closer to the real cost at 4-12 steps)."""
    meanflow_switch_end: MeanFlowSwitchEnd = MeanFlowSwitchEnd.STAGE
    """MeanFlow (``timestep_r``) checkpoints: the interval end given to a stage's last model call, whose average
    velocity the transition extrapolates to ``x̂0``. Within a stage it is always the stage schedule's next
    timestep, and 0 at the very last call."""

    def __post_init__(self) -> None:
        # Coerce strings from YAML/CLI into enums so callers may pass either.
        for name, enum in (
            ("temporal_demand", TemporalDemandMethod),
            ("resize", ResizeMode),
            ("renoise", RenoiseMode),
            ("budget_counting", BudgetCounting),
            ("meanflow_switch_end", MeanFlowSwitchEnd),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(value))
                except ValueError:
                    choices = ", ".join(e.value for e in enum)
                    raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None
        object.__setattr__(self, "boundary_fractions", tuple(float(f) for f in self.boundary_fractions))
        object.__setattr__(self, "stage_shifts", tuple(None if s is None else float(s) for s in self.stage_shifts))
        if len(self.boundary_fractions) != 3 or not 0 < self.boundary_fractions[0] < self.boundary_fractions[1]:
            raise ValueError(
                f"boundary_fractions must be 3 increasing fractions in (0, 1); got {self.boundary_fractions}"
            )
        if not self.boundary_fractions[1] < self.boundary_fractions[2] < 1:
            raise ValueError(
                f"boundary_fractions must be 3 increasing fractions in (0, 1); got {self.boundary_fractions}"
            )
        if len(self.stage_shifts) != 4 or any(s is not None and s <= 0 for s in self.stage_shifts):
            raise ValueError(f"stage_shifts must be 4 positive numbers or null; got {self.stage_shifts}")
        if not 0 < self.sketch_spatial_ratio <= 1:
            raise ValueError(f"sketch_spatial_ratio must be in (0, 1]; got {self.sketch_spatial_ratio}")
        if not 0 < self.sketch_temporal_factor <= 1:
            raise ValueError(f"sketch_temporal_factor must be in (0, 1]; got {self.sketch_temporal_factor}")
        if not 0 < self.s_min <= self.s_max <= 1:
            raise ValueError(f"need 0 < s_min <= s_max <= 1; got s_min={self.s_min}, s_max={self.s_max}")
        if not 0 < self.s_grid <= 0.5:
            raise ValueError(f"s_grid must be in (0, 0.5]; got {self.s_grid}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0; got {self.delta}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must be in [0, 1]; got {self.lam}")
        if self.pyramid_levels < 1:
            raise ValueError(f"pyramid_levels must be >= 1; got {self.pyramid_levels}")
        if not 0 <= self.smooth_keep <= 1:
            raise ValueError(f"smooth_keep must be in [0, 1]; got {self.smooth_keep}")
        if self.fixed is not None:
            fixed = tuple(float(v) for v in self.fixed)
            if len(fixed) != 2 or not all(0 < v <= 1 for v in fixed):
                raise ValueError(f"fixed must be (s, r) with both in (0, 1]; got {self.fixed}")
            object.__setattr__(self, "fixed", fixed)

    def spatial_candidates(self) -> list[float]:
        """``s ∈ {s_min, s_min + grid, …, s_max}``, rounded to 1e-9 so 0.1-steps are exact decimals."""
        count = round((self.s_max - self.s_min) / self.s_grid + 1e-9)
        values = [round(self.s_min + k * self.s_grid, 9) for k in range(count + 1)]
        if values[-1] < self.s_max - 1e-9:
            values.append(self.s_max)
        return values
