"""The checkpoint's own diffusers scheduler as the staged sampler's step rule.

At every stage switch the scheduler is rebuilt from the checkpoint's config with the next stage's shift,
so a multistep solver (UniPC, which Wan checkpoints ship with) starts with an empty history on the new
grid, and it continues at the same step index of the recomputed N-step schedule.

Variance-preserving schedulers (CogVideoX's DDIM and stochastic DPM-solver++, v-prediction) run through
:class:`VPSolver`, which also owns the noise process of the transitions (``dvg.sampler.VPProcess``); its stage
shift is the scheduler's ``snr_shift_scale``. :func:`make_solver` picks the class.

``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` (LTX-Video) runs through
:class:`DynamicShiftSolver`: its shift follows the video's size (``mu``), so it needs the latent grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dvg.planner import Grid
from ..dvg.sampler import VPProcess
from ..dvg.transition import extrapolate_x0, renoise
from ..models.base import InputError

_SHIFT_KEYS = {"FlowMatchEulerDiscreteScheduler": "shift", "UniPCMultistepScheduler": "flow_shift"}
_VP_SHIFT_KEYS = {"CogVideoXDDIMScheduler": "snr_shift_scale", "CogVideoXDPMScheduler": "snr_shift_scale"}
_SHIFT_KEYS.update(_VP_SHIFT_KEYS)


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers the staged sampler cannot drive exactly (one line)."""
    name = type(scheduler).__name__
    if name not in _SHIFT_KEYS:
        raise ValueError(f"scheduler {name} is not supported; use one of {', '.join(sorted(_SHIFT_KEYS))}")
    if name in _VP_SHIFT_KEYS:
        check_vp_scheduler_config(name, dict(scheduler.config))
        return
    if name == "UniPCMultistepScheduler" and not (
        scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
    ):
        raise ValueError("UniPCMultistepScheduler must be in flow-prediction mode with use_flow_sigmas=True")
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{name} with use_dynamic_shifting is not supported: the stage shifts are explicit")
        kind = scheduler.config.get("time_shift_type", "exponential")
        if kind != "exponential":
            raise ValueError(
                f"{name} with time_shift_type={kind} is not supported: only the exponential time shift is a shift "
                "(exp(mu)) the stages can set"
            )


def is_dynamic(scheduler: Any) -> bool:
    """Whether the scheduler's shift depends on the video's size (``use_dynamic_shifting``: LTX-Video)."""
    return bool(getattr(scheduler.config, "use_dynamic_shifting", False))


def dynamic_mu(scheduler: Any, grid: Grid) -> float:
    """``LTXPipeline``'s resolution-dependent ``mu`` for a video whose full latent is ``grid``: its own
    ``calculate_shift`` on ``video_sequence_length`` = the latent's T·H·W, with the scheduler config's keys and the
    pipeline's defaults. The time shift ``e^mu / (e^mu + 1/σ - 1)`` is the flow shift ``k = e^mu``."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    c = scheduler.config
    return calculate_shift(
        grid.t * grid.h * grid.w,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )


def scheduler_shift(scheduler: Any, grid: Grid | None = None) -> float:
    """The checkpoint's own shift; with dynamic shifting ``e^mu`` at the full latent ``grid`` (required then)."""
    if is_dynamic(scheduler):
        if grid is None:
            raise ValueError(f"{type(scheduler).__name__} with use_dynamic_shifting: its shift needs the latent grid")
        return math.exp(dynamic_mu(scheduler, grid))
    return float(getattr(scheduler.config, _SHIFT_KEYS[type(scheduler).__name__]))


def sigma_range(scheduler: Any) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the base schedule this scheduler builds (see ``dvg.flow_sigmas``)."""
    if type(scheduler).__name__ == "UniPCMultistepScheduler":
        return 1.0, 1.0 / scheduler.config.num_train_timesteps
    return 1.0, 0.0


class DiffusersSolver:
    """A :class:`dvg_dist.dvg.StepRule` backed by a fresh copy of ``template`` per stage."""

    def __init__(self, template: Any, num_steps: int) -> None:
        check_scheduler(template)
        self.template = template
        self.num_steps = num_steps
        self.scheduler: Any = None
        self._started = False

    def reset(self, sigmas: torch.Tensor, shift: float) -> None:
        name = type(self.template).__name__
        sched = type(self.template).from_config(self.template.config, **{_SHIFT_KEYS[name]: shift})
        if name == "FlowMatchEulerDiscreteScheduler":
            # What the HunyuanVideo pipelines pass; the scheduler shifts them and appends 0.
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, self.num_steps + 1)[:-1])
        else:
            sched.set_timesteps(self.num_steps)
        self.scheduler = sched
        self._started = False

    def timestep(self, i: int) -> float:
        return float(self.scheduler.timesteps[i])

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        if not self._started:
            # A rebuilt scheduler continues at step i of its schedule, not at 0.
            self.scheduler.set_begin_index(i)
            self._started = True
        return self.scheduler.step(v, self.scheduler.timesteps[i], x, return_dict=False)[0]


class DynamicShiftSolver(DiffusersSolver):
    """``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` (LTX-Video), driven as ``LTXPipeline`` drives
    it: ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``, so full mode's timesteps and sigmas are the pipeline's
    bit for bit (``shift_terminal``, karras / exponential / beta sigmas included: the scheduler applies them).

    Stage shifts: the model's own shift (a stage whose ``dvg.stage_shifts`` entry is None, and ``full``) is
    ``e^mu`` at the *full* latent's size — the schedule the pipeline would run for this video — and is set with that
    exact ``mu``; an explicit shift ``k`` is ``mu = ln k``.

    Also the stage's noise process (``dvg.NoiseProcess``): σ, x̂0 and the re-noise are flow matching's on the
    scheduler's own sigmas. ``shift_terminal`` stretches them (released LTX-Video: the last σ before 0 is 0.1), which
    the sampler's ``flow_sigmas`` cannot express, and a transition must read the σ the state is really at.
    """

    def __init__(self, template: Any, num_steps: int, grid: Grid) -> None:
        super().__init__(template, num_steps)
        self.mu = dynamic_mu(template, grid)
        self.own_shift = math.exp(self.mu)

    def reset(self, sigmas: torch.Tensor, shift: float) -> None:
        mu = self.mu if shift == self.own_shift else math.log(shift)
        sched = type(self.template).from_config(self.template.config)
        n = self.num_steps
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # LTXPipeline's retrieve_timesteps call
        self.scheduler = sched
        self._started = False

    # -- the noise process (dvg.NoiseProcess) --------------------------------------------------------------

    def sigma(self, i: int) -> float:
        return float(self.scheduler.sigmas[i])

    def x0(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return extrapolate_x0(x, v, self.sigma(i))

    def noised(self, y: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return renoise(y, noise, self.sigma(i))

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise


# -- variance-preserving schedulers (CogVideoX) ---------------------------------------------------------------

VP_PREDICTIONS = ("v_prediction", "epsilon")


def check_vp_scheduler_config(name: str, config: dict[str, Any], num_steps: int | None = None) -> None:
    """Refuse a VP scheduler config the solver cannot drive exactly (one line; from the JSON, before weights)."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTIONS:
        raise ValueError(
            f"{name} with prediction_type={prediction} is not supported; use {' or '.join(VP_PREDICTIONS)}"
        )
    if prediction == "epsilon" and config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            f"{name}: epsilon prediction with rescale_betas_zero_snr divides by alpha = 0 at the first step; "
            "use v_prediction"
        )
    if float(config.get("snr_shift_scale", 3.0)) <= 0:
        raise ValueError(f"{name}: snr_shift_scale must be > 0; got {config.get('snr_shift_scale')}")
    train = int(config.get("num_train_timesteps", 1000))
    if num_steps is not None and num_steps > train:
        raise ValueError(f"{name}: {num_steps} steps is more than its {train} training timesteps")


def check_checkpoint_scheduler(path: str | Path, num_steps: int | None = None) -> None:
    """Before any weight loads: refuse a checkpoint whose ``scheduler/scheduler_config.json`` names a scheduler
    the solver does not drive, or a VP scheduler config it cannot drive exactly (one-line ``InputError``). The flow
    schedulers' settings are checked on the loaded scheduler (:func:`check_scheduler`)."""
    file = Path(path) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return  # not a diffusers layout this check knows; loading reports what is missing
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the scheduler config ({e})") from None
    name = str(config.get("_class_name"))
    if name not in _SHIFT_KEYS:
        raise InputError(f"{path}: scheduler {name} is not supported; use one of {', '.join(sorted(_SHIFT_KEYS))}")
    if name in _VP_SHIFT_KEYS:
        try:
            check_vp_scheduler_config(name, config, num_steps)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None


def is_vp_scheduler(scheduler: Any) -> bool:
    return type(scheduler).__name__ in _VP_SHIFT_KEYS


def request_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per request, seeded with its seed: the ``generator=`` a diffusers pipeline is
    given for a batch (``randn_tensor`` draws sample b from generator b). On the CPU, so every rank of a
    sequence-parallel group, whatever its device, draws the same numbers."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


class VPSolver(DiffusersSolver):
    """A CogVideoX DDIM / DPM scheduler as the step rule, and its VP process for the transitions.

    Per stage the scheduler is rebuilt with ``snr_shift_scale`` = the stage's shift and ``set_timesteps(N)``, as the
    pipeline; :class:`dvg_dist.dvg.sampler.VPProcess` on its ``alphas_cumprod`` and timesteps gives x̂0 (the
    scheduler's ``pred_original_sample`` arithmetic), the re-noise ``α'·y + s'·ε`` and the flow-equivalent σ.

    ``CogVideoXDPMScheduler`` is a stochastic second-order solver: every step draws noise from ``generator`` (one
    per request, :func:`request_generators`; a fresh generator per run, as the pipeline's ``generator=``), and it
    is given the previous call's ``pred_original_sample`` and timestep, exactly as ``CogVideoXPipeline`` passes
    them (``timesteps[i - 1] if i > 0 else None``). A rebuilt stage starts that history empty: its first step is
    first-order, as the pipeline's step 0.

    ``permutation`` takes the sampler's ``[B, C, T, H, W]`` latent to the pipeline's latent layout (CogVideoX:
    ``(0, 2, 1, 3, 4)``, ``[B, F, C, H, W]``); the step runs there, so its noise is drawn in the pipeline's order.
    """

    def __init__(
        self,
        template: Any,
        num_steps: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        permutation: tuple[int, ...] | None = None,
        eta: float = 0.0,
    ) -> None:
        if not is_vp_scheduler(template):
            raise ValueError(f"VPSolver drives {', '.join(sorted(_VP_SHIFT_KEYS))}; got {type(template).__name__}")
        super().__init__(template, num_steps)
        check_vp_scheduler_config(type(template).__name__, dict(template.config), num_steps)
        self.generator = generator
        self.permutation = permutation
        self.inverse = None if permutation is None else tuple(int(k) for k in np.argsort(permutation))
        self.eta = eta
        self.stochastic = type(template).__name__ == "CogVideoXDPMScheduler"
        self.process: VPProcess | None = None
        self._first: int | None = None
        self._old_x0: torch.Tensor | None = None

    def reset(self, sigmas: torch.Tensor, shift: float) -> None:
        sched = type(self.template).from_config(self.template.config, snr_shift_scale=shift)
        sched.set_timesteps(self.num_steps)
        self.scheduler = sched
        self.process = VPProcess(
            sched.alphas_cumprod, sched.timesteps, sched.config.prediction_type, sched.init_noise_sigma
        )
        self._first = None  # the first call of this stage: no second-order history before it
        self._old_x0 = None

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        sched = self.scheduler
        if self._first is None:
            self._first = i
        t = sched.timesteps[i]
        z, out = self._to_pipeline(x), self._to_pipeline(v)
        if self.stochastic:
            back = sched.timesteps[i - 1] if i > self._first else None
            prev, self._old_x0 = sched.step(
                out, self._old_x0, t, back, z, eta=self.eta, generator=self.generator, return_dict=False
            )
        else:
            prev = sched.step(out, t, z, eta=self.eta, generator=self.generator, return_dict=False)[0]
        return self._from_pipeline(prev)

    # -- the noise process (dvg.NoiseProcess) --------------------------------------------------------------

    def _vp(self) -> VPProcess:
        assert self.process is not None, "reset() must be called with the schedule first"
        return self.process

    def sigma(self, i: int) -> float:
        return self._vp().sigma(i)

    def x0(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return self._vp().x0(x, v, i)

    def noised(self, y: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return self._vp().noised(y, noise, i)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return self._vp().initial(noise)

    def _to_pipeline(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.permutation is None else x.permute(self.permutation)

    def _from_pipeline(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.permute(self.inverse).contiguous()


def make_solver(
    template: Any,
    num_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    permutation: tuple[int, ...] | None = None,
    grid: Grid | None = None,
) -> DiffusersSolver:
    """The step rule for the checkpoint's scheduler: :class:`VPSolver` for the VP schedulers (which use
    ``generator`` and ``permutation``), :class:`DynamicShiftSolver` for a dynamically shifted FlowMatch one (which
    needs the full latent ``grid``), :class:`DiffusersSolver` for the other flow ones."""
    if is_vp_scheduler(template):
        return VPSolver(template, num_steps, generator, permutation)
    if is_dynamic(template):
        if grid is None:
            raise ValueError(f"{type(template).__name__} with use_dynamic_shifting: its solver needs the latent grid")
        return DynamicShiftSolver(template, num_steps, grid)
    return DiffusersSolver(template, num_steps)
