"""The staged engine: encode → DVG's staged sampler with the adapter's transformer as velocity → decode.

Nothing here assumes one process: the velocity is one adapter forward (the sequence-parallel hooks shard
inside it), and the sketch decision comes through the sampler's ``decide`` seam.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DTYPES, Config
from ..dvg.options import Mode
from ..dvg.planner import COST_PRESETS, CostModel, Grid, Planner
from ..dvg.sampler import DecideFn, PlanRecord, SamplerConfig, StageContext, local_decider, sample
from ..models import ADAPTERS, Adapter, InputError, adapter_class, read_model_index, resolve_model_path
from . import lora, memory
from .compiling import compile_transformers, measure_compile
from .distributed import ParallelContext
from .guidance import guided
from .solver import check_checkpoint_scheduler, make_solver, request_generators, scheduler_shift, sigma_range
from .vae import TileSettings, check_tiling

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One video to make."""

    prompt: str
    seed: int = 0
    negative_prompt: str | None = None
    image: str | None = None
    """Path of the first frame (I2V checkpoints only)."""
    name: str | None = None


@dataclass
class StepTrace:
    """One model call as the engine ran it (tests and logs read this)."""

    step: int
    stage: int
    timestep: float
    expert: str
    grid: tuple[int, int, int]
    guidance: float
    next_timestep: float = 0.0
    """Where the call's step ends (what a MeanFlow checkpoint is given as ``timestep_r``)."""


@dataclass
class Result:
    requests: list[Request]
    latent: torch.Tensor
    frames: np.ndarray | None
    """uint8 ``[B, F, H, W, 3]``; None when decoding was skipped."""
    record: PlanRecord
    timings: dict[str, float]
    trace: list[StepTrace] = field(default_factory=list)
    layouts: list[dict[str, Any]] | None = None
    """Per stage, with ``parallel.stage_layouts``: the layout it ran on and why (``StageLayouts.records``)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name} requested but CUDA is not available here")
    return device


def cost_model(config: Config, cls: type[Adapter], transformer_config: dict[str, Any]) -> CostModel:
    """The configured preset, or (``auto``) the one the checkpoint's transformer config implies."""
    name = config.model.cost_model
    return cls.cost_model_from_config(transformer_config) if name == "auto" else COST_PRESETS[name]


def full_grid(config: Config, adapter_cls: type[Adapter], model_path: str | Path) -> Grid:
    """The full latent for the config's size and frame count, from the checkpoint's own geometry."""
    width, height = config.sampling.pixel_size()
    return adapter_cls.read_spec(model_path).latent_grid(width, height, config.sampling.frame_num)


def validate(config: Config, requests: list[Request], model_checks: bool = True) -> Grid:
    """Every check that needs no weights: checkpoint directory, size, frame count, budget feasibility, image
    arguments. Raises a one-line error; returns the full latent grid. ``model_checks=False`` skips what depends on
    the model settings alone (VAE tiling, the checkpoint's own refusals, the LoRA files): for a per-request check
    of an already loaded model, whose requests change only the sampling settings."""
    if not config.model.path:
        raise InputError("no model: set model.path in the config or pass --model")
    path = resolve_model_path(config.model.path)
    cls = adapter_class(path)
    grid = full_grid(config, cls, path)
    spec = cls.read_spec(path)
    if model_checks:
        check_tiling(TileSettings.from_config(config.model), cls.read_json_configs(path)[1])
        cls.check_checkpoint(path, config)
        check_checkpoint_scheduler(path, config.sampling.steps)
        lora.check(config, path)  # reads every LoRA file: once per model, not per request
    s = config.sampling
    if s.use_dynamic_cfg and not cls.dynamic_cfg:
        raise InputError(
            f"sampling.use_dynamic_cfg (--use_dynamic_cfg) is CogVideoX's guidance schedule; this {cls.family} "
            "checkpoint has none"
        )
    if (s.decode_timestep or s.decode_noise_scale) and not cls.decode_noise:
        raise InputError(
            f"sampling.decode_timestep / decode_noise_scale (--decode_timestep) are LTX-Video's VAE settings; this "
            f"{cls.family} checkpoint has none"
        )
    if s.mode != Mode.FULL:
        cost = cost_model(config, cls, cls.read_json_configs(path)[0])
        planner = Planner(grid, s.steps, s.budget, config.dvg, spec.spatial_multiple, cost, spec.temporal_multiple)
        if s.mode == Mode.FIXED:
            if config.dvg.fixed is None:
                raise InputError("mode fixed needs --fixed s,r (or dvg.fixed in the config)")
        else:
            planner.feasible(Mode.DVG if s.mode in (Mode.TRILINEAR, Mode.RANDOM_RENOISE) else s.mode)
    image_use = cls.image_use(read_model_index(path))
    for r in requests:
        if r.image is not None and image_use == "none":
            raise InputError(f"--image given but {path} is a text-to-video checkpoint")
        if r.image is None and image_use == "required":
            raise InputError(f"{path} is an image-to-video checkpoint: pass --image")
        if r.image is not None and not Path(r.image).is_file():
            raise InputError(f"image not found: {r.image}")
    return grid


def load_pipeline(path: str, dtype: torch.dtype, device: torch.device, skip: tuple[str, ...] = ()) -> Any:
    """The user's checkpoint through diffusers' own ``from_pretrained`` (safetensors only); the components named
    in ``skip`` are not loaded at all (None in the pipeline)."""
    import diffusers

    cls = diffusers.DiffusionPipeline
    if skip:
        # The pipeline's own class: DiffusionPipeline.from_pretrained checks optional components against its own
        # (empty) list and would load one passed as None anyway (WanImageToVideoPipeline's image_encoder).
        cls = getattr(diffusers, read_model_index(resolve_model_path(path))["_class_name"])
    pipe = cls.from_pretrained(path, dtype=dtype, use_safetensors=True, **dict.fromkeys(skip))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class Engine:
    """Holds a loaded pipeline and its adapter; ``generate`` runs one batch of requests."""

    def __init__(self, config: Config, pipe: Any | None = None, parallel: ParallelContext | None = None) -> None:
        self.config = config
        self.parallel = parallel
        path = config.model.path
        memory.check_options(config, None if parallel is None else parallel.layout)
        if pipe is None:
            if not path:
                raise InputError("no model: set model.path in the config or pass --model")
            local = resolve_model_path(path)
            cls = adapter_class(local)
            device = resolve_device(config.model.device)
            rank, world = (0, 1) if parallel is None else (parallel.rank, parallel.layout.world_size)
            skip = memory.skipped_components(config, rank, world, read_model_index(local))
            # With a memory option the weights stay on the CPU until memory.place decides what goes where (a
            # sharded transformer only ever sends its shards to the device).
            pipe = load_pipeline(
                path, DTYPES[config.model.dtype], memory.CPU if memory.places_components(config) else device, skip
            )
        else:
            device = pipe.transformer.device  # a pipeline passed in runs where it is
            cls = ADAPTERS.get(type(pipe).__name__)  # type: ignore[assignment]
            if cls is None:
                raise InputError(f"no adapter for {type(pipe).__name__}")
        # LoRAs first: every rank loads the same adapters into the plain modules, which the sequence-parallel hooks,
        # FSDP2 and offload below then treat like any other weights.
        self.loras = lora.apply(pipe, config.model)
        self.adapter = cls(pipe)
        if parallel is not None:
            from ..parallel import parallelize_transformer

            # Every transformer the adapter may call (both experts of a MoE), sharded over the sp group
            # (a one-rank sp group, e.g. pure CFG-parallel, leaves the model local).
            for module in self.adapter.transformers():
                parallelize_transformer(
                    module, self.adapter.sequence_plan, parallel.groups, config.parallel.attention_backend
                )
            parallel.attach(self.adapter, config)  # per-stage layouts (parallel.stage_layouts); else a no-op
        # Weight sharding (FSDP2 over the sp group) and CPU offload, after the sequence-parallel hooks: FSDP2 keeps
        # them (it swaps the module's class, not the instance).
        placed = memory.place(pipe, self.adapter, config, None if parallel is None else parallel.groups, device)
        self.offload, self.shard_reports = placed
        # After the hooks, FSDP2 and placement: the compiled regions see the modules as they will run.
        compile_transformers(self.adapter.transformers(), config.model.compile)
        spec = self.adapter.spec
        self.spec = spec

    def sampler_config(self, grid: Grid, config: Config | None = None) -> SamplerConfig:
        config = config or self.config
        s, m = config.sampling, config.model
        sched = self.adapter.scheduler
        sigma_max, sigma_min = sigma_range(sched)
        return SamplerConfig(
            full=grid,
            num_steps=s.steps,
            shift=m.shift if m.shift is not None else scheduler_shift(sched, grid),  # dynamic shifting: per size
            budget=s.budget,
            mode=s.mode,
            options=config.dvg,
            spatial_multiple=self.spec.spatial_multiple,
            temporal_multiple=self.spec.temporal_multiple,
            sigma_max=sigma_max,
            sigma_min=sigma_min,
            cost_model=cost_model(config, type(self.adapter), dict(self.adapter.pipe.transformer.config)),
        )

    def generate(
        self,
        requests: list[Request],
        *,
        decode: bool = True,
        decide: DecideFn | None = None,
        progress: bool = True,
        config: Config | None = None,
        on_step: Callable[[StepTrace], None] | None = None,
    ) -> Result:
        """One batch: the requests share size, steps and plan (demands pooled over the batch). ``config``
        replaces the engine's for this call (same model and layout; e.g. a batch line's own budget or mode).
        ``on_step`` is called with each model call's :class:`StepTrace` right after it (progress reporting)."""
        if not requests:
            raise InputError("no prompts given")
        if len({r.image for r in requests}) > 1:
            raise InputError("the requests of one batch share their image (one first frame per batch)")
        config = config or self.config
        s = config.sampling
        width, height = s.pixel_size()
        grid = self.spec.latent_grid(width, height, s.frame_num)
        cfg = self.sampler_config(grid, config)
        adapter = self.adapter
        timings: dict[str, float] = {}
        t_total = time.perf_counter()

        image = _load_image(requests[0].image) if requests[0].image else None
        negatives = [r.negative_prompt if r.negative_prompt is not None else s.negative_prompt for r in requests]
        par = self.parallel
        offload = self.offload
        t0 = time.perf_counter()
        rank0_encodes = par is not None and config.parallel.text_encoder == "rank0"
        if offload is not None and (not rank0_encodes or par is None or par.is_main):
            offload.use(*memory.encode_components(adapter))  # on the device while encoding, off right after
        # Stochastic schedulers (CogVideoX's DPM) draw each step's noise from one generator per request, seeded with
        # its seed on the CPU (as the pipeline's generator=): the same on every rank. A pipeline that draws from it
        # while preparing (CogVideoX I2V's image latent) does so in encode; the states it leaves reach every rank.
        generators = request_generators([r.seed for r in requests])
        prompts = [r.prompt for r in requests]
        if rank0_encodes:
            # Rank 0 encodes; every rank receives the same tensors (bit-identical to encoding everywhere). The other
            # ranks did not even load the encoders (memory.skipped_components).
            assert par is not None
            mine = adapter.encode(prompts, negatives, s, image, grid, generators) if par.is_main else None
            conditioning = par.broadcast_conditioning(mine, adapter.device)
        else:
            conditioning = adapter.encode(prompts, negatives, s, image, grid, generators)
        for generator, state in zip(generators, conditioning.generator_states or ()):
            generator.set_state(state)
        if offload is not None:
            offload.release()
        timings["encode"] = time.perf_counter() - t0

        trace: list[StepTrace] = []
        main = par is None or par.is_main
        bars = _StageBars(cfg, enabled=progress and main)
        cfg_parallel = par is not None and par.layout.cfg_degree == 2 and conditioning.uncond is not None
        if par is not None and decide is None and cfg.mode != Mode.FULL:
            decide = par.broadcast_decider(local_decider(cfg))
        stages = None if par is None else par.stage_plan(cfg.mode == Mode.FULL, len(requests), conditioning)

        fault = _injected_fault(par)

        def velocity(x: torch.Tensor, timestep: float, ctx: StageContext) -> torch.Tensor:
            if fault is not None and ctx.step == fault:
                raise RuntimeError(f"injected fault at step {ctx.step} (DVG_FAULT_INJECT)")
            module, expert = adapter.transformer_for(timestep)
            if offload is not None:
                offload.use(expert)  # the expert that runs now on the device, the other one (MoE) off
            g = adapter.guidance_for(timestep, s)
            x_in = adapter.model_input(x, ctx, conditioning, grid)
            t = adapter.timestep_tensor(timestep, x.shape[0])
            step = adapter.step_kwargs(ctx, x.shape[0])  # MeanFlow's timestep_r; usually empty
            with torch.no_grad():
                fwd = lambda xi, ti, kw: adapter.forward(module, xi, ti, kw)  # noqa: E731
                if stages is not None:  # this stage's own layout (parallel.stage_layouts)
                    v = stages.velocity(ctx, fwd, x_in, t, conditioning, step, g, adapter)
                elif cfg_parallel:
                    # Each half of the world runs one branch; one exchange gives both to everyone.
                    assert par is not None and conditioning.uncond is not None
                    mine = conditioning.cond if par.cfg_rank == 0 else conditioning.uncond
                    v, v_uncond = par.exchange_cfg(fwd(x_in, t, {**mine, **step}))
                    v = v_uncond + g * (v - v_uncond)
                else:
                    cond, uncond = conditioning.cond, conditioning.uncond
                    batched, shared = adapter.batched_cfg, adapter.shared_cfg_kwargs
                    v = guided(fwd, x_in, t, cond, uncond, step, g, batched, shared)
            v = adapter.pin_velocity(v, x, ctx, conditioning, grid)
            grid_k = (ctx.grid.t, ctx.grid.h, ctx.grid.w)
            trace.append(StepTrace(ctx.step, ctx.stage, timestep, expert, grid_k, g, ctx.next_timestep))
            bars.update(ctx)
            if on_step is not None:
                on_step(trace[-1])
            return v.to(x.dtype)

        permutation = getattr(adapter, "scheduler_permutation", None)
        solver = make_solver(adapter.scheduler, s.steps, generators, permutation, grid=grid)
        t0 = time.perf_counter()
        with measure_compile(config.model.compile != "none") as compiled:
            try:
                latent, record = sample(
                    velocity, cfg, [r.seed for r in requests], self.spec.latent_channels,
                    decide=decide, step_rule=solver, dtype=torch.float32, device=adapter.device,
                )  # fmt: skip
            finally:
                bars.close()
        latent = adapter.final_latent(latent, conditioning)
        timings["denoise"] = time.perf_counter() - t0 - compiled.seconds
        for key, value in record.timings.items():
            timings[key] = value
        if config.model.compile != "none":
            timings["compile"] = compiled.seconds
            logger.info("torch.compile: %d new graph(s) in %.1f s this run", compiled.graphs, compiled.seconds)

        if offload is not None:  # the transformers leave the device; the VAE comes on for the decode
            offload.use(*(["vae"] if decode else []))
        frames = None
        # Every rank holds the same final latent. With vae_parallel, all ranks decode their share of the tiles /
        # frame chunks and rank 0 blends them; otherwise rank 0 decodes alone. Tiled per model.vae_tiling.
        split = par is not None and config.parallel.vae_parallel
        if decode and (main or split):
            from .vae import TileSettings, decode_latent

            t0 = time.perf_counter()
            frames = decode_latent(
                adapter, latent, tiling=TileSettings.from_config(config.model), parallel=split, sampling=s,
                generators=generators,
            )  # fmt: skip
            timings["decode"] = time.perf_counter() - t0
        if offload is not None:
            offload.release()
        timings["total"] = time.perf_counter() - t_total
        layouts = None if stages is None else stages.records()
        return Result(requests, latent, frames, record, timings, trace, layouts)


def _injected_fault(par: ParallelContext | None) -> int | None:
    """Fault injection for tests of failure handling: ``DVG_FAULT_INJECT=RANK:STEP`` makes that rank raise at
    that model call. Unset (always, outside tests), nothing happens."""
    spec = os.environ.get("DVG_FAULT_INJECT")
    if not spec:
        return None
    rank, _, step = spec.partition(":")
    return int(step) if int(rank) == (0 if par is None else par.rank) else None


class _StageBars:
    """One tqdm bar per stage, sized by the model calls that stage runs."""

    def __init__(self, cfg: SamplerConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.counts = [cfg.num_steps] if cfg.mode == Mode.FULL else cfg.planner().executed_counts
        self.stage = -1
        self.bar: Any = None

    def update(self, ctx: StageContext) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if ctx.stage != self.stage:
            self.close()
            self.stage = ctx.stage
            label = f"stage {ctx.stage + 1}/{len(self.counts)} {ctx.grid}"
            self.bar = tqdm(total=self.counts[ctx.stage], desc=label, unit="step", leave=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_image(path: str) -> Any:
    from PIL import Image

    return Image.open(path).convert("RGB")


def sidecar(
    result: Result, index: int, config: Config, files: dict[str, str], parallel: dict[str, int] | None = None
) -> dict[str, Any]:
    """The JSON written next to each video."""
    req = result.requests[index]
    plan = result.record.to_dict()
    for k, stage in enumerate(plan["stages"]):
        stage["time_s"] = result.timings.get(f"stage{k + 1}")
        if result.layouts is not None and k < len(result.layouts):
            stage["layout"] = result.layouts[k]  # parallel.stage_layouts: the layout and the cost model's estimates
    demands = plan.get("demands")
    s = config.sampling
    experts: dict[str, int] = {}
    for t in result.trace:
        experts[t.expert] = experts.get(t.expert, 0) + 1
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt if req.negative_prompt is not None else s.negative_prompt,
        "seed": req.seed,
        "image": req.image,
        "model": config.model.path,
        "mode": s.mode.value,
        "budget": s.budget,
        "steps": s.steps,
        "size": s.size,
        "frame_num": s.frame_num,
        "guidance_scale": s.guidance_scale,
        "guidance_scale_2": s.guidance_scale_2,
        "true_cfg_scale": s.true_cfg_scale,
        "plan": plan,
        "demands": None if demands is None else {"spatial": demands["spatial"], "temporal": demands["temporal"]},
        "weights": None if demands is None else {"w_s": demands["w_s"], "w_t": demands["w_t"]},
        "experts": experts,
        "loras": [
            {"component": c, "path": spec.path, "scale": spec.scale}
            for c, specs in (("transformer", config.model.loras), ("transformer_2", config.model.loras_2))
            for spec in specs
        ],
        "fuse_lora": config.model.fuse_lora,
        "parallel": parallel or {"world_size": 1},
        "batch": len(result.requests),
        "timings": result.timings,
        "files": files,
    }
