"""The model-agnostic staged sampler: DVG's four stages around any velocity function.

    x ← ε(sketch coords)
    for each model call i:
        v ← velocity(x, t_i, stage)
        if i is a stage boundary: x̂0 ← x - σ_i·v; (sketch only) decide; new schedule; resize;
                                   (sketch only) smooth; x ← (1-σ'_{i+1})·y + σ'_{i+1}·ε(next coords)
        else:                      x ← step_rule(x, v, i)

CFG, the model, and how a decision reaches every rank are the caller's (``velocity``, ``decide``). The formulas
above are flow matching's; a step rule that is also a :class:`NoiseProcess` (a VP scheduler's) replaces them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .demands import Demands, analyse
from .noise import as_seed_list, hash_noise, random_noise
from .options import DVGOptions, MeanFlowSwitchEnd, Mode, RenoiseMode, ResizeMode
from .planner import COST_PRESETS, Candidate, CostModel, Grid, Planner, full_candidate
from .resize import resize, stage_coords
from .schedule import flow_sigmas, sigma_to_timestep
from .transition import extrapolate_x0, renoise, smooth_sketch, vp_flow_sigma, vp_renoise, vp_x0

logger = logging.getLogger(__name__)

Coords = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StageContext:
    """What a velocity function may need about the current model call."""

    stage: int
    """0-based stage index (0 = sketch; ``full`` mode has only stage 0, at full size)."""
    grid: Grid
    coords: Coords
    """Full-resolution (t, h, w) coordinates of this grid's samples (I2V conditioning is sampled here)."""
    step: int
    """0-based model-call index within the N steps."""
    sigma: float
    shift: float
    next_timestep: float = 0.0
    """Where this call's step ends: the stage schedule's next timestep, 0 at the last call, and at a stage's last
    call what ``options.meanflow_switch_end`` says. Average-velocity (MeanFlow) models take it as ``timestep_r``;
    the rest ignore it."""


VelocityFn = Callable[[torch.Tensor, float, StageContext], torch.Tensor]


class StepRule(Protocol):
    """A solver on one stage's schedule. ``reset`` starts a stage: the N+1 sigmas of the new schedule and
    the shift they were made with (a multistep solver rebuilds itself and drops its history, since the
    grid changed); ``timestep(i)`` is what the model is given at call ``i``; ``step`` advances i → i+1.

    A rule that also implements :class:`NoiseProcess` (a VP scheduler: its own ᾱ schedule, the ``sigmas`` ignored)
    defines x̂0, the re-noise and the first state; otherwise they are flow matching's on ``sigmas``."""

    def reset(self, sigmas: torch.Tensor, shift: float) -> None: ...

    def timestep(self, i: int) -> float: ...

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor: ...


@runtime_checkable
class NoiseProcess(Protocol):
    """How states, model outputs and clean latents relate on one stage's schedule: what a transition needs.

    ``x0(x, v, i)`` is the clean latent the output ``v`` of model call ``i`` points at; ``noised(y, ε, i)`` the
    state of call ``i`` whose clean latent is ``y``; ``initial(ε)`` the first state; ``sigma(i)`` the flow σ with
    call ``i``'s signal-to-noise ratio (for ``StageContext`` and the logs). A step rule that implements these owns
    the process; for any other the sampler uses :class:`FlowProcess` on its own sigmas."""

    def sigma(self, i: int) -> float: ...

    def x0(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor: ...

    def noised(self, y: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor: ...

    def initial(self, noise: torch.Tensor) -> torch.Tensor: ...


class FlowProcess:
    """Flow matching on the N+1 sigmas of a stage: ``x = (1-σ_i)·x0 + σ_i·ε``, ``x̂0 = x - σ_i·v``."""

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas

    def sigma(self, i: int) -> float:
        return float(self.sigmas[i])

    def x0(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return extrapolate_x0(x, v, self.sigma(i))

    def noised(self, y: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return renoise(y, noise, self.sigma(i))

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise


class VPProcess:
    """Variance preserving on a discrete ``ᾱ`` table (a DDPM-family scheduler's ``alphas_cumprod``) and a stage's
    integer timesteps: ``z = α_t·x0 + s_t·ε`` with ``α = √ᾱ_t``, ``s = √(1-ᾱ_t)`` at ``t = timesteps[i]``.

    ``x0`` is the scheduler's own ``pred_original_sample`` arithmetic on the 0-d ``alphas_cumprod[t]`` (bit for bit
    what its step computes), ``noised`` is ``α_t·y + s_t·ε`` at the call's timestep, ``initial`` is ``ε`` times
    the scheduler's ``init_noise_sigma`` (as the pipelines), ``sigma`` is ``s/(α+s)``."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: str = "v_prediction",
        init_noise_sigma: float = 1.0,
    ) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.timesteps = timesteps
        self.prediction = prediction
        self.init_noise_sigma = init_noise_sigma

    def alpha_bar(self, i: int) -> torch.Tensor:
        """The 0-d ``ᾱ`` of call ``i``, indexed as the scheduler indexes it."""
        return self.alphas_cumprod[self.timesteps[i]]

    def sigma(self, i: int) -> float:
        return vp_flow_sigma(float(self.alpha_bar(i)))

    def x0(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return vp_x0(x, v, self.alpha_bar(i), self.prediction)

    def noised(self, y: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return vp_renoise(y, noise, self.alpha_bar(i))

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.init_noise_sigma


def process_of(step_rule: StepRule, sigmas: torch.Tensor) -> NoiseProcess:
    """The process of the stage ``step_rule`` was just reset to: its own, or flow matching on ``sigmas``."""
    return step_rule if isinstance(step_rule, NoiseProcess) else FlowProcess(sigmas)


class EulerStep:
    """``x_{i+1} = x_i + (σ_{i+1} - σ_i)·v_i``; the model gets ``σ_i·1000``."""

    def __init__(self) -> None:
        self.sigmas: torch.Tensor | None = None

    def reset(self, sigmas: torch.Tensor, shift: float) -> None:
        self.sigmas = sigmas

    def timestep(self, i: int) -> float:
        assert self.sigmas is not None, "reset() must be called with the schedule first"
        return sigma_to_timestep(float(self.sigmas[i]))

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        assert self.sigmas is not None, "reset() must be called with the schedule first"
        return x + float(self.sigmas[i + 1] - self.sigmas[i]) * v


@dataclass(frozen=True)
class Decision:
    """What leaving the sketch decides: the action, and the analysis behind it (for the record).

    Small and plain so one rank can compute it and broadcast it to the others.
    """

    s: float
    t23: int
    demands: Demands | None = None
    feasible: list[dict[str, Any]] = field(default_factory=list)


DecideFn = Callable[[torch.Tensor], Decision]


@dataclass
class SamplerConfig:
    """One staged run. ``full`` is the final latent grid (T, H, W) at full size."""

    full: Grid
    num_steps: int
    shift: float
    """The model's own schedule shift (used where ``options.stage_shifts`` says None, and in ``full``)."""
    budget: float = 0.5
    mode: Mode = Mode.DVG
    options: DVGOptions = field(default_factory=DVGOptions)
    spatial_multiple: int = 1
    temporal_multiple: int = 1
    """Reduced stages' latent frames are a multiple of it (the transformer's temporal patch)."""
    sigma_max: float = 1.0
    sigma_min: float = 0.0
    """Base schedule ends (see :func:`flow_sigmas`): Hunyuan (1, 0), Wan's UniPC (1, 1/1000)."""
    cost_model: CostModel = field(default_factory=lambda: COST_PRESETS["wan2.1-14b"])

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        if self.mode == Mode.FIXED and self.options.fixed is None:
            raise ValueError("mode fixed needs options.fixed = (s, r)")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0; got {self.shift}")

    @property
    def effective_options(self) -> DVGOptions:
        """The two resize/noise ablations are ``dvg`` with one option changed."""
        if self.mode == Mode.TRILINEAR:
            return replace(self.options, resize=ResizeMode.TRILINEAR)
        if self.mode == Mode.RANDOM_RENOISE:
            return replace(self.options, renoise=RenoiseMode.RANDOM)
        return self.options

    @property
    def selection_mode(self) -> Mode:
        return Mode.DVG if self.mode in (Mode.TRILINEAR, Mode.RANDOM_RENOISE) else self.mode

    def planner(self) -> Planner:
        return Planner(
            full=self.full,
            num_steps=self.num_steps,
            budget=self.budget,
            options=self.effective_options,
            spatial_multiple=self.spatial_multiple,
            cost_model=self.cost_model,
            temporal_multiple=self.temporal_multiple,
        )

    def stage_shift(self, stage: int) -> float:
        if self.mode == Mode.FULL:
            return self.shift
        s = self.options.stage_shifts[stage]
        return self.shift if s is None else s


def local_decider(config: SamplerConfig) -> DecideFn:
    """The default ``decide``: analyse the sketch on this process and choose the action."""
    planner = config.planner()
    opts = config.effective_options

    def decide(x0_hat: torch.Tensor) -> Decision:
        if config.selection_mode == Mode.FIXED:
            assert opts.fixed is not None
            c = planner.fixed_candidate(*opts.fixed)
            return Decision(c.s, c.t23)
        demands = analyse(x0_hat, opts.alpha, opts.temporal_demand, opts.pyramid_levels)
        chosen, feasible = planner.choose(demands.w_s, config.selection_mode)
        return Decision(chosen.s, chosen.t23, demands, [c.to_dict() for c in feasible])

    return decide


@dataclass
class PlanRecord:
    """Everything a run decided, for logs and the JSON sidecar."""

    mode: str
    num_steps: int
    budget: float
    boundaries: list[int]
    step_counts: list[int]
    executed_counts: list[int]
    stages: list[dict[str, Any]]
    chosen: dict[str, Any]
    demands: dict[str, float] | None
    feasible: list[dict[str, Any]]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "num_steps": self.num_steps,
            "budget": self.budget,
            "boundaries": self.boundaries,
            "step_counts": self.step_counts,
            "executed_counts": self.executed_counts,
            "stages": self.stages,
            "chosen": self.chosen,
            "density": self.chosen.get("density"),
            "executed_density": self.chosen.get("executed_density"),
            "flop_density": self.chosen.get("flop_density"),
            "demands": self.demands,
            "feasible": self.feasible,
            "timings": self.timings,
        }


def _noise(
    config: SamplerConfig, seeds: Sequence[int], channels: int, coords: Coords, step: int, like: torch.Tensor
) -> torch.Tensor:
    opts = config.effective_options
    if step > 0 and opts.renoise == RenoiseMode.RANDOM:
        shape = (channels, len(coords[0]), len(coords[1]), len(coords[2]))
        return random_noise(seeds, shape, salt=step, dtype=like.dtype, device=like.device)
    if step > 0 and opts.renoise == RenoiseMode.HASH_FIXED_SEED:
        seeds = [opts.renoise_seed] * len(seeds)
    return hash_noise(seeds, channels, *coords, dtype=like.dtype, device=like.device)


def sample(
    velocity: VelocityFn,
    config: SamplerConfig,
    seeds: int | Sequence[int],
    channels: int,
    *,
    decide: DecideFn | None = None,
    step_rule: StepRule | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    observer: Callable[[int, int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, PlanRecord]:
    """Run the staged sampler; returns the final full-size latent ``[B, C, T, H, W]`` and the plan record.

    ``decide`` maps the sketch's ``x̂0`` to a :class:`Decision` (default: :func:`local_decider`);
    ``observer(step, stage, x̂0)`` sees every transition's extrapolated latent.
    """
    seed_list = as_seed_list(seeds)
    opts = config.effective_options
    n = config.num_steps
    # ``full`` has no stages, so it runs at any step count; the staged modes need room for 3 boundaries.
    planner = None if config.mode == Mode.FULL else config.planner()
    if planner is not None and decide is None:
        decide = local_decider(config)
    step_rule = step_rule or EulerStep()

    # Plan what can be planned before any model call: fail on an infeasible budget now, not after the sketch.
    decision: Decision | None = None
    if planner is None:
        chosen = full_candidate(config.full)
        grids: tuple[Grid, ...] = chosen.grids
        boundaries: list[int] = []
    else:
        if config.selection_mode != Mode.FIXED:
            planner.feasible(config.selection_mode)
        # Until the decision, only the sketch grid is known; the others are placeholders at full size.
        grids = (planner.sketch_grid(), config.full, config.full, config.full)
        boundaries = planner.boundaries
        chosen = planner.candidate(1.0, config.full.t)

    coords = stage_coords(grids)
    stage = 0
    shift = config.stage_shift(0)
    sigmas = flow_sigmas(n, shift, config.sigma_max, config.sigma_min)
    step_rule.reset(sigmas, shift)
    process = process_of(step_rule, sigmas)
    x = process.initial(_noise(config, seed_list, channels, coords[0], 0, torch.empty(0, dtype=dtype, device=device)))
    timings: dict[str, float] = {}
    t_stage = time.perf_counter()

    for i in range(n):
        sigma = process.sigma(i)
        switching = stage < len(boundaries) and i == boundaries[stage]
        if i == n - 1 or (switching and opts.meanflow_switch_end == MeanFlowSwitchEnd.ZERO):
            next_timestep = 0.0
        else:
            next_timestep = step_rule.timestep(i + 1)  # before a switch: the old stage's schedule, not the new one
        ctx = StageContext(stage, grids[stage], coords[stage], i, sigma, shift, next_timestep)
        v = velocity(x, step_rule.timestep(i), ctx)
        if v.shape != x.shape:
            raise ValueError(f"velocity at step {i} has shape {tuple(v.shape)}; the latent is {tuple(x.shape)}")
        if not switching:
            x = step_rule.step(x, v, i)
            continue

        # -- stage switch after model call i (no extra call) -----------------------------------------
        t_switch = time.perf_counter()
        x0_hat = process.x0(x, v, i)
        if observer is not None:
            observer(i, stage, x0_hat)
        assert planner is not None  # only staged modes have boundaries
        if stage == 0:
            t_decide = time.perf_counter()
            assert decide is not None
            decision = decide(x0_hat)
            timings["decide"] = time.perf_counter() - t_decide
            # A custom decide may return anything: outside these bounds the planner's clamping would record
            # a sketch grid that never ran (T23 < T1) or a T23 that never ran (T23 > T).
            t1, m = planner.sketch_frames(), planner.temporal_multiple
            whole = decision.t23 % m == 0 or decision.t23 == config.full.t
            if not (0 < decision.s <= 1 and t1 <= decision.t23 <= config.full.t and whole):
                multiple = f", a multiple of {m}" if m > 1 else ""
                raise ValueError(
                    f"decide returned s={decision.s}, T23={decision.t23}; need 0 < s <= 1 and "
                    f"{t1} <= T23 <= {config.full.t} (the sketch's frames up to the full frames{multiple})"
                )
            spatial_in_stage3 = config.selection_mode == Mode.SPATIAL_ONLY
            chosen = planner.candidate(decision.s, decision.t23, spatial_in_stage3)
            grids = chosen.grids
            coords = stage_coords(grids)
            _log_decision(config, decision, chosen)
        timings[f"stage{stage + 1}"] = time.perf_counter() - t_stage
        t_stage = time.perf_counter()

        stage += 1
        shift = config.stage_shift(stage)
        sigmas = flow_sigmas(n, shift, config.sigma_max, config.sigma_min)  # whole schedule anew, same step index
        step_rule.reset(sigmas, shift)
        process = process_of(step_rule, sigmas)
        y = resize(x0_hat, grids[stage], opts.resize)
        if stage == 1:
            y = smooth_sketch(y, opts.smooth_keep)
        eps = _noise(config, seed_list, channels, coords[stage], i + 1, y)
        x = process.noised(y, eps, i + 1)
        timings["transitions"] = timings.get("transitions", 0.0) + time.perf_counter() - t_switch
        logger.info(
            "stage %d -> %d after step %d: grid %s, shift %g, re-noised at sigma %.4f",
            stage, stage + 1, i, grids[stage], shift, process.sigma(i + 1),
        )  # fmt: skip

    timings[f"stage{stage + 1}"] = time.perf_counter() - t_stage
    if tuple(x.shape[2:]) != (config.full.t, config.full.h, config.full.w):
        raise AssertionError(f"final latent {tuple(x.shape)} is not the full grid {config.full}")
    record = _record(config, planner, grids, chosen, decision, timings)
    return x, record


def _log_decision(config: SamplerConfig, decision: Decision, chosen: Candidate) -> None:
    why = ""
    if decision.demands is not None:
        d = decision.demands
        why = f"D_s={d.spatial:.3f} D_t={d.temporal:.3f} -> w_s={d.w_s:.3f} w_t={d.w_t:.3f}; "
    logger.info(
        "%s decision: %schose s=%g T23=%d of %d feasible; grids %s; density %.3f (executed %.3f, flops %.3f)",
        config.mode.value, why, chosen.s, chosen.t23, len(decision.feasible) or 1,
        " -> ".join(str(g) for g in chosen.grids), chosen.density, chosen.executed_density, chosen.flop_density,
    )  # fmt: skip


def _record(
    config: SamplerConfig,
    planner: Planner | None,
    grids: Sequence[Grid],
    chosen: Candidate,
    decision: Decision | None,
    timings: dict[str, float],
) -> PlanRecord:
    n = config.num_steps
    if planner is None:
        boundaries, counts, executed = [], [n], [n]
    else:
        boundaries, counts, executed = planner.boundaries, planner.step_counts, planner.executed_counts
    edges = [-1, *boundaries, n - 1]
    stages = [
        {
            "grid": g.as_list(),
            "steps": [edges[k] + 1, edges[k + 1]],
            "shift": config.stage_shift(k),
            "step_count": counts[k],
            "executed_steps": executed[k],
        }
        for k, g in enumerate(grids)
    ]
    return PlanRecord(
        mode=config.mode.value,
        num_steps=n,
        budget=config.budget,
        boundaries=list(boundaries),
        step_counts=list(counts),
        executed_counts=list(executed),
        stages=stages,
        chosen=chosen.to_dict(),
        demands=decision.demands.to_dict() if decision and decision.demands else None,
        feasible=decision.feasible if decision else [],
        timings=timings,
    )
