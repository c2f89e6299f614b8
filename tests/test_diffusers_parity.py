"""`full` mode is exactly the plain flow-matching sampler of diffusers' schedulers.

The only test of the foundation that imports diffusers.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from dvg_dist.dvg import Grid, SamplerConfig, flow_sigmas, hash_noise, sample

FULL = Grid(5, 9, 11)
C = 4


def _velocity(x: torch.Tensor, timestep: float) -> torch.Tensor:
    """A fixed nonlinear field of (x, t): not an oracle, so any schedule mismatch shows."""
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(C, C, generator=g) / C
    return torch.tanh(torch.einsum("dc,bcthw->bdthw", mix, x)) + 0.3 * x * (timestep / 1000.0)


@pytest.mark.parametrize(("steps", "shift"), [(12, 7.0), (50, 5.0), (4, 1.0)])
def test_full_mode_equals_euler_over_flow_match_euler_sigmas(steps, shift):
    cfg = SamplerConfig(full=FULL, num_steps=steps, shift=shift, mode="full")
    ours, record = sample(lambda x, t, ctx: _velocity(x, t), cfg, seeds=11, channels=C)

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    # HunyuanVideo's pipelines pass exactly these sigmas; the scheduler shifts them and appends 0.
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    x = hash_noise(11, C, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w))
    by_hand = x.clone()
    for i, t in enumerate(sched.timesteps):
        by_hand = by_hand + (sched.sigmas[i + 1] - sched.sigmas[i]) * _velocity(by_hand, float(t))
        x = sched.step(_velocity(x, float(t)), t, x).prev_sample

    rel = float((ours - by_hand).norm() / by_hand.norm())
    assert rel < 1e-5, f"full mode differs from the hand-written Euler loop by {rel:.2e} (relative)"
    rel_step = float((ours - x).norm() / x.norm())
    assert rel_step < 1e-5, f"full mode differs from FlowMatchEulerDiscreteScheduler.step by {rel_step:.2e}"
    assert record.stages == [
        {"grid": [5, 9, 11], "steps": [0, steps - 1], "shift": shift, "step_count": steps, "executed_steps": steps}
    ]


def test_timesteps_passed_to_the_model_are_the_schedulers():
    seen: list[float] = []

    def velocity(x, t, ctx):
        seen.append(t)
        return torch.zeros_like(x)

    sample(velocity, SamplerConfig(full=FULL, num_steps=10, shift=7.0, mode="full"), seeds=0, channels=C)
    sched = FlowMatchEulerDiscreteScheduler(shift=7.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 11)[:-1])
    assert np.allclose(seen, sched.timesteps.numpy(), rtol=0, atol=1e-3), (seen, sched.timesteps)


def test_wan_unipc_flow_sigmas_match_flow_sigmas_with_sigma_min():
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    sched.set_timesteps(30)
    ours = flow_sigmas(30, 5.0, sigma_max=1.0, sigma_min=1 / 1000)
    diff = (sched.sigmas.double() - ours).abs()
    # diffusers lowers sigma_0 by 1e-6 to keep UniPC's log finite; everything else agrees to float32.
    assert diff[0] <= 1.1e-6 and float(diff[1:].max()) < 1e-6, diff
