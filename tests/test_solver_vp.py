"""Variance-preserving schedulers (CogVideoX's DDIM and stochastic DPM-solver++) in the staged sampler.

``full`` mode is checked against the loop of ``CogVideoXPipeline`` written out here (model call, guidance left
out, ``scheduler.step`` with the pipeline's arguments and ``generator=``); DVG mode against the VP process
``z = α·x0 + s·ε`` at every switch. Tiny schedulers built in memory; the model is a fixed function of (z, t).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, UniPCMultistepScheduler

from dvg_dist.dvg import DVGOptions, Grid, SamplerConfig, hash_noise, resize, sample, smooth_sketch
from dvg_dist.dvg.sampler import VPProcess
from dvg_dist.dvg.transition import vp_flow_sigma
from dvg_dist.models import InputError
from dvg_dist.runtime.solver import (
    DiffusersSolver,
    VPSolver,
    check_checkpoint_scheduler,
    check_scheduler,
    make_solver,
    request_generators,
    scheduler_shift,
)

C = 4
FULL = Grid(5, 12, 16)
PERM = (0, 2, 1, 3, 4)  # [B, C, T, H, W] -> CogVideoX's [B, F, C, H, W]
INV = (0, 2, 1, 3, 4)
SEEDS = [11, 23]


def cogvideox15_dpm(**overrides) -> CogVideoXDPMScheduler:
    """CogVideoX 1.5's scheduler settings: v-prediction, trailing spacing, zero terminal SNR."""
    cfg = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )  # fmt: skip
    return CogVideoXDPMScheduler(**{**cfg, **overrides})


def cogvideox_ddim(**overrides) -> CogVideoXDDIMScheduler:
    """CogVideoX-2b's deterministic DDIM settings (snr_shift_scale 3)."""
    cfg = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )  # fmt: skip
    return CogVideoXDDIMScheduler(**{**cfg, **overrides})


def toy(x: torch.Tensor, timestep: float) -> torch.Tensor:
    """A fixed nonlinear function of (z, t) on ``[B, C, T, H, W]``: not an oracle, so any mismatch shows."""
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(C, C, generator=g) / C
    return torch.tanh(torch.einsum("dc,bcthw->bdthw", mix, x)) + 0.3 * x * (1.0 - timestep / 1000.0)


def full_coords(grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.arange(grid.t), torch.arange(grid.h), torch.arange(grid.w)


def pipeline_loop(sched, latents: torch.Tensor, steps: int, generator) -> torch.Tensor:
    """``CogVideoXPipeline.__call__``'s denoising loop on pipeline-layout latents, the transformer replaced by
    :func:`toy` (test code, not a model forward)."""
    sched = type(sched).from_config(sched.config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    latents = latents * sched.init_noise_sigma
    extra_step_kwargs = {"eta": 0.0, "generator": generator}
    old_pred_original_sample = None
    for i, t in enumerate(timesteps):
        noise_pred = toy(latents.permute(INV), float(t)).permute(PERM).float()
        if not isinstance(sched, CogVideoXDPMScheduler):
            latents = sched.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        else:
            latents, old_pred_original_sample = sched.step(
                noise_pred,
                old_pred_original_sample,
                t,
                timesteps[i - 1] if i > 0 else None,
                latents,
                **extra_step_kwargs,
                return_dict=False,
            )
        latents = latents.to(torch.float32)
    return latents


def run_full(sched, steps: int, seeds: list[int], generator_seeds: list[int] | None = None) -> torch.Tensor:
    cfg = SamplerConfig(full=FULL, num_steps=steps, shift=scheduler_shift(sched), mode="full")
    solver = VPSolver(sched, steps, request_generators(generator_seeds or seeds), PERM)
    out, record = sample(lambda x, t, ctx: toy(x, t), cfg, seeds, C, step_rule=solver)
    assert record.stages[0]["shift"] == sched.config.snr_shift_scale
    return out


# -- (a) full mode is the pipeline's loop, exactly ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "steps"),
    [
        (cogvideox15_dpm, 12),
        (cogvideox15_dpm, 50),
        (cogvideox15_dpm, 30),  # 1000 // 30 != the spacing of the trailing timesteps: diffusers' own quirk, kept
        (cogvideox_ddim, 12),
        (lambda: cogvideox_ddim(prediction_type="epsilon", rescale_betas_zero_snr=False), 12),
        (lambda: cogvideox15_dpm(timestep_spacing="leading", rescale_betas_zero_snr=False, snr_shift_scale=3.0), 8),
    ],
    ids=["dpm-12", "dpm-50", "dpm-30", "ddim-12", "ddim-epsilon-12", "dpm-leading-8"],
)
def test_full_mode_equals_the_pipeline_loop_exactly(make, steps):
    sched = make()
    ours = run_full(sched, steps, SEEDS)
    latents = hash_noise(SEEDS, C, *full_coords(FULL)).permute(PERM)  # the pipeline given latents=our first noise
    generator = [torch.Generator().manual_seed(s) for s in SEEDS]
    ref = pipeline_loop(sched, latents, steps, generator).permute(INV)
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    diff = (ours - ref).abs().max().item()
    assert diff == 0.0, f"{type(sched).__name__}, {steps} steps: full mode differs from the pipeline by {diff:.3e}"


def test_dpm_steps_draw_from_the_request_generators():
    """The DPM noise is the generators': another generator seed (same first noise) changes the result, a single
    request with a one-element list equals the pipeline given one generator."""
    sched = cogvideox15_dpm()
    a = run_full(sched, 12, SEEDS)
    b = run_full(sched, 12, SEEDS, generator_seeds=[12, 24])
    assert (a - b).abs().max().item() > 1e-3, "the DPM steps ignore the request generators"
    one = run_full(sched, 12, [SEEDS[0]])
    latents = hash_noise(SEEDS[0], C, *full_coords(FULL)).permute(PERM)
    ref = pipeline_loop(sched, latents, 12, torch.Generator().manual_seed(SEEDS[0])).permute(INV)
    assert torch.equal(one, ref)
    assert torch.equal(one[0], a[0]), "a request's result depends on the other requests of its batch"


def test_request_generators_are_seeded_cpu_generators():
    gens = request_generators([5, 6])
    assert all(g.device.type == "cpu" for g in gens)
    for g, seed in zip(gens, [5, 6]):
        assert torch.equal(torch.randn(7, generator=g), torch.randn(7, generator=torch.Generator().manual_seed(seed)))


# -- (b) DVG mode: the VP transition ------------------------------------------------------------------------------

STAGE_SHIFTS = (None, 2.0, 4.0, 4.0)
STEPS = 12


class Recorder:
    """The toy model, recording each call's state, output, context, the stage scheduler and generator states."""

    def __init__(self, solver: VPSolver) -> None:
        self.solver = solver
        self.calls: list[dict] = []

    def __call__(self, x, t, ctx):
        v = toy(x, t)
        gens = self.solver.generator
        self.calls.append(
            dict(x=x.clone(), v=v.clone(), t=t, ctx=ctx, sched=self.solver.scheduler, gen=[g.get_state() for g in gens])
        )
        return v


def run_dvg(make):
    sched = make()
    opts = DVGOptions(stage_shifts=STAGE_SHIFTS, fixed=(0.7, 0.8))
    cfg = SamplerConfig(full=FULL, num_steps=STEPS, shift=scheduler_shift(sched), mode="fixed", options=opts)
    solver = VPSolver(sched, STEPS, request_generators(SEEDS), PERM)
    rec = Recorder(solver)
    seen: list[tuple[int, int, torch.Tensor]] = []
    out, record = sample(
        rec, cfg, SEEDS, C, step_rule=solver, observer=lambda i, k, x0: seen.append((i, k, x0.clone())),
    )  # fmt: skip
    return sched, cfg, rec, seen, out, record


def stage_scheduler(sched, shift: float):
    fresh = type(sched).from_config(sched.config, snr_shift_scale=shift)
    fresh.set_timesteps(STEPS)
    return fresh


def dpm_step(sched, v, old, t, back, x, gen_states):
    """One pipeline-layout DPM (or DDIM) step from the recorded generator states."""
    gens = [torch.Generator() for _ in gen_states]
    for g, s in zip(gens, gen_states):
        g.set_state(s)
    if isinstance(sched, CogVideoXDPMScheduler):
        return sched.step(v.permute(PERM), old, t, back, x.permute(PERM), generator=gens, return_dict=False)
    return sched.step(v.permute(PERM), t, x.permute(PERM), generator=gens, return_dict=False)


@pytest.mark.parametrize("make", [cogvideox15_dpm, cogvideox_ddim], ids=["dpm", "ddim"])
def test_dvg_transitions_follow_the_vp_process(make):
    sched, cfg, rec, seen, out, record = run_dvg(make)
    assert out.shape == (len(SEEDS), C, FULL.t, FULL.h, FULL.w) and torch.isfinite(out).all()
    calls = rec.calls
    assert [c["ctx"].step for c in calls] == list(range(STEPS)), "the schedule does not continue at the step index"
    bounds = record.boundaries
    own = sched.config.snr_shift_scale
    shifts = [own if s is None else s for s in STAGE_SHIFTS]
    grids = [Grid(*st["grid"]) for st in record.stages]
    coords = [c["ctx"].coords for c in calls]
    assert [st["shift"] for st in record.stages] == shifts

    # Each stage's scheduler is the checkpoint's, rebuilt with the stage's shift as snr_shift_scale.
    for c in calls:
        k, i = c["ctx"].stage, c["ctx"].step
        want = stage_scheduler(sched, shifts[k])
        assert c["sched"].config.snr_shift_scale == shifts[k] and c["ctx"].shift == shifts[k]
        assert torch.equal(c["sched"].alphas_cumprod, want.alphas_cumprod), f"stage {k}: not the stage's ᾱ"
        assert c["t"] == float(want.timesteps[i]), f"step {i}: timestep {c['t']}, expected {want.timesteps[i]}"
        a = float(want.alphas_cumprod[want.timesteps[i]])
        assert c["ctx"].sigma == pytest.approx(math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a)), abs=1e-12)
    assert calls[0]["ctx"].sigma == 1.0, "zero terminal SNR: the first call is pure noise (flow σ = 1)"

    assert [(i, k) for i, k, _ in seen] == [(b, k) for k, b in enumerate(bounds)]
    for (b, k, x0), nxt in zip(seen, [*bounds[1:], None]):
        call, new = calls[b], calls[b + 1]
        t = call["sched"].timesteps[b]
        # x̂0 is the scheduler's own pred_original_sample at the boundary call.
        pred = dpm_step(call["sched"], call["v"], None, t, None, call["x"], call["gen"])[1]
        assert torch.equal(x0, pred.permute(INV)), f"x̂0 after step {b} is not the scheduler's pred_original_sample"
        # The re-noise is α'·y + s'·ε at the new stage's timestep of call b+1.
        y = resize(x0, grids[k + 1], cfg.options.resize)
        if k == 0:
            y = smooth_sketch(y, cfg.options.smooth_keep)
        eps = hash_noise(SEEDS, C, *coords[b + 1])
        stage = new["sched"]
        t_new = stage.timesteps[b + 1]
        ab = stage.alphas_cumprod[t_new]
        want = (ab**0.5) * y + ((1 - ab) ** 0.5) * eps
        assert torch.equal(new["x"], want), f"re-noise after step {b} is not α'·y + s'·ε"
        forward = stage.add_noise(y, eps, t_new.reshape(1))  # diffusers' own forward process, in float32
        assert (new["x"] - forward).abs().max().item() < 1e-5
        # A fresh stage: its first step has no second-order history (old x̂0 None, timestep_back None) ...
        first = calls[b + 2]
        step0 = dpm_step(stage, new["v"], None, t_new, None, new["x"], new["gen"])
        assert torch.equal(first["x"], step0[0].permute(INV)), f"step {b + 1} is not a fresh stage's first step"
        # ... and its second step has it again (DPM: the previous call's x̂0 and timestep), where there is one.
        if b + 2 < (STEPS - 1 if nxt is None else nxt):
            step1 = dpm_step(stage, first["v"], step0[1], stage.timesteps[b + 2], t_new, first["x"], first["gen"])
            assert torch.equal(calls[b + 3]["x"], step1[0].permute(INV)), f"step {b + 2}: not the second-order step"


def test_vp_process_on_its_own():
    """``VPProcess`` is the diffusers arithmetic on the 0-d ᾱ: x̂0 of the re-noised y with the true v is y."""
    sched = stage_scheduler(cogvideox15_dpm(), 1.0)
    proc = VPProcess(sched.alphas_cumprod, sched.timesteps, "v_prediction", sched.init_noise_sigma)
    y = torch.randn(2, C, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, C, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    for i in (0, 5, STEPS - 1):
        t = sched.timesteps[i]
        z = proc.noised(y, eps, i)
        v = sched.get_velocity(y, eps, t.reshape(1))  # diffusers' v target: α·ε - s·x0
        assert (proc.x0(z, v, i) - y).abs().max().item() < 1e-5
        a = float(sched.alphas_cumprod[t])
        assert proc.sigma(i) == vp_flow_sigma(a)
    assert proc.sigma(0) == 1.0 and vp_flow_sigma(1.0) == 0.0 and vp_flow_sigma(0.5) == 0.5


# -- (c) a Gaussian toy with a known posterior ---------------------------------------------------------------------

MU = torch.tensor([0.8, -0.5, 0.0, 1.5], dtype=torch.float64)
TAU = torch.tensor([0.3, 0.7, 1.0, 0.5], dtype=torch.float64)


def posterior_mean(z: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """E[x0 | z] for x0 ~ N(μ_c, τ_c²) per element and z = α·x0 + s·ε."""
    a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    mu, tau2 = MU.view(1, C, 1, 1, 1), (TAU**2).view(1, C, 1, 1, 1)
    return mu + a * tau2 * (z.double() - a * mu) / (a * a * tau2 + s2)


def test_gaussian_posterior_x0_and_samples():
    """With the exact v-model of Gaussian data, every transition's x̂0 is the exact posterior mean (at zero SNR:
    μ), and full mode's samples have the data's mean and spread."""
    sched = cogvideox_ddim(snr_shift_scale=1.0)
    table: dict[tuple[int, int], float] = {}
    alphas = {k: stage_scheduler(sched, k).alphas_cumprod for k in {1.0, *STAGE_SHIFTS[1:]}}

    def exact_v(x, t, ctx):
        ab = float(alphas[ctx.shift][int(t)])
        table[(ctx.stage, ctx.step)] = ab
        a, sd = math.sqrt(ab), math.sqrt(1 - ab)
        x0 = posterior_mean(x, ab)
        eps = (x.double() - a * x0) / sd
        return (a * eps - sd * x0).float()

    seen: list[tuple[int, int, torch.Tensor]] = []
    states: dict[int, torch.Tensor] = {}

    def velocity(x, t, ctx):
        states[ctx.step] = x.clone()
        return exact_v(x, t, ctx)

    opts = DVGOptions(stage_shifts=STAGE_SHIFTS, fixed=(0.7, 0.8))
    cfg = SamplerConfig(full=FULL, num_steps=STEPS, shift=1.0, mode="fixed", options=opts)
    solver = VPSolver(sched, STEPS, request_generators([0]), PERM)
    sample(velocity, cfg, 0, C, step_rule=solver, observer=lambda i, k, x0: seen.append((i, k, x0.clone())))
    assert len(seen) == 3
    for i, k, x0 in seen:
        want = posterior_mean(states[i], table[(k, i)])
        err = (x0.double() - want).abs().max().item()
        assert err < 1e-5, f"x̂0 after step {i} is off the exact posterior mean by {err:.2e}"

    # Zero terminal SNR: the first call's x̂0 is the prior mean, whatever the noise.
    proc = VPProcess(stage_scheduler(sched, 1.0).alphas_cumprod, stage_scheduler(sched, 1.0).timesteps)
    z = torch.randn(1, C, 2, 3, 4, generator=torch.Generator().manual_seed(4))
    x0 = proc.x0(z, exact_v(z, float(proc.timesteps[0]), _ctx(1.0)), 0)
    assert (x0.double() - MU.view(1, C, 1, 1, 1)).abs().max().item() < 1e-6

    # DDIM's first step out of zero SNR under-disperses at few steps (τ = 0.3: 13 % at 50 steps, 5 % at 200).
    big = Grid(3, 32, 32)
    cfg = SamplerConfig(full=big, num_steps=200, shift=1.0, mode="full")
    out, _ = sample(exact_v, cfg, 1, C, step_rule=VPSolver(sched, 200))
    mean, std = out.double().mean(dim=(0, 2, 3, 4)), out.double().std(dim=(0, 2, 3, 4))
    assert (mean - MU).abs().max().item() < 0.03, f"sample means {mean.tolist()}, data {MU.tolist()}"
    assert ((std - TAU).abs() / TAU).max().item() < 0.08, f"sample spreads {std.tolist()}, data {TAU.tolist()}"


def _ctx(shift: float):
    from dvg_dist.dvg import StageContext

    return StageContext(0, FULL, full_coords(FULL), 0, 1.0, shift)


# -- what the solver drives, and what it refuses --------------------------------------------------------------------


def test_check_scheduler_accepts_cogvideox_and_refuses_what_it_cannot_drive():
    for sched in (
        cogvideox15_dpm(),
        cogvideox_ddim(),
        cogvideox_ddim(prediction_type="epsilon", rescale_betas_zero_snr=False),
    ):
        check_scheduler(sched)
        assert isinstance(make_solver(sched, 10, request_generators([0])), VPSolver)
    flow = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    solver = make_solver(flow, 10)
    assert type(solver) is DiffusersSolver
    with pytest.raises(ValueError, match="prediction_type=sample is not supported"):
        check_scheduler(cogvideox15_dpm(prediction_type="sample"))
    with pytest.raises(ValueError, match="epsilon prediction with rescale_betas_zero_snr"):
        check_scheduler(cogvideox15_dpm(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="VPSolver drives"):
        VPSolver(flow, 10)


def test_checkpoint_scheduler_refused_before_loading(tmp_path):
    (tmp_path / "scheduler").mkdir()
    config_file = tmp_path / "scheduler" / "scheduler_config.json"

    def write(sched_or_dict):
        d = sched_or_dict if isinstance(sched_or_dict, dict) else {"_class_name": type(sched_or_dict).__name__}
        if not isinstance(sched_or_dict, dict):
            d.update(dict(sched_or_dict.config))
        config_file.write_text(json.dumps(d))

    write(cogvideox15_dpm())
    check_checkpoint_scheduler(tmp_path, 50)
    for bad, match in [
        (cogvideox15_dpm(prediction_type="sample"), "prediction_type=sample"),
        ({"_class_name": "DDPMScheduler"}, "scheduler DDPMScheduler is not supported"),
    ]:
        write(bad)
        with pytest.raises(InputError, match=match) as e:
            check_checkpoint_scheduler(tmp_path, 50)
        assert "\n" not in str(e.value)
    write(cogvideox15_dpm())
    with pytest.raises(InputError, match="1001 steps is more than its 1000 training timesteps"):
        check_checkpoint_scheduler(tmp_path, 1001)
