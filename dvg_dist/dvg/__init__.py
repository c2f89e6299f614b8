"""DVG as pure tensor math: single process, no torch.distributed, no diffusers (DESIGN §2)."""

from .demands import (
    Demands,
    analyse,
    demand_weights,
    lucas_kanade,
    pyramid_lucas_kanade,
    spatial_demand,
    temporal_demand,
)
from .noise import hash_noise, random_noise
from .options import DVGOptions, Mode, RenoiseMode, ResizeMode, TemporalDemandMethod
from .planner import COST_PRESETS, Candidate, CostModel, Grid, InfeasibleBudget, Planner, match, sort_key
from .resize import anchor_linear_1d, anchors, area_anchor_spatial, nested_coords, resize, sample_at, stage_coords
from .sampler import (
    Decision,
    EulerStep,
    PlanRecord,
    SamplerConfig,
    StageContext,
    StepRule,
    local_decider,
    sample,
)
from .schedule import (
    executed_step_counts,
    flow_sigmas,
    released_step_counts,
    shift_sigmas,
    sigma_to_timestep,
    stage_boundaries,
)
from .transition import extrapolate_x0, renoise, smooth_sketch

__all__ = [
    "COST_PRESETS",
    "Candidate",
    "CostModel",
    "DVGOptions",
    "Decision",
    "Demands",
    "EulerStep",
    "Grid",
    "InfeasibleBudget",
    "Mode",
    "PlanRecord",
    "Planner",
    "RenoiseMode",
    "ResizeMode",
    "SamplerConfig",
    "StageContext",
    "StepRule",
    "TemporalDemandMethod",
    "analyse",
    "anchor_linear_1d",
    "anchors",
    "area_anchor_spatial",
    "demand_weights",
    "executed_step_counts",
    "extrapolate_x0",
    "flow_sigmas",
    "hash_noise",
    "local_decider",
    "lucas_kanade",
    "match",
    "nested_coords",
    "pyramid_lucas_kanade",
    "random_noise",
    "released_step_counts",
    "renoise",
    "resize",
    "sample",
    "sample_at",
    "shift_sigmas",
    "sigma_to_timestep",
    "smooth_sketch",
    "sort_key",
    "spatial_demand",
    "stage_boundaries",
    "stage_coords",
    "temporal_demand",
]
