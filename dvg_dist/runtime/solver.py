"""The checkpoint's own diffusers scheduler as the staged sampler's step rule.

At every stage switch the scheduler is rebuilt from the checkpoint's config with the next stage's shift,
so a multistep solver (UniPC, which Wan checkpoints ship with) starts with an empty history on the new
grid, and it continues at the same step index of the recomputed N-step schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_SHIFT_KEYS = {"FlowMatchEulerDiscreteScheduler": "shift", "UniPCMultistepScheduler": "flow_shift"}


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers the staged sampler cannot drive exactly (one line)."""
    name = type(scheduler).__name__
    if name not in _SHIFT_KEYS:
        raise ValueError(f"scheduler {name} is not supported; use one of {', '.join(sorted(_SHIFT_KEYS))}")
    if name == "UniPCMultistepScheduler" and not (
        scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
    ):
        raise ValueError("UniPCMultistepScheduler must be in flow-prediction mode with use_flow_sigmas=True")
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise ValueError(f"{name} with use_dynamic_shifting is not supported: the stage shifts are explicit")


def scheduler_shift(scheduler: Any) -> float:
    """The checkpoint's own shift."""
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
