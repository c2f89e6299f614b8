"""The Python API: :class:`DVG` wraps a diffusers video pipeline (a checkpoint directory, a hub id, or a pipeline
already loaded) and generates with DVG, one in-process call per video. The CLI (``launch/generate.py``) and the
server are users of this class.

.. code-block:: python

    from dvg_dist import DVG

    dvg = DVG.from_pretrained("build/tiny-wan", config="configs/tiny-wan.yaml")
    out = dvg.generate("a red ball rolling over green grass", seed=3, budget=0.5)
    out.frames.shape             # (17, 64, 64, 3) uint8, like diffusers' output_type="np"
    out.plan.chosen.density      # 0.48...
    out.save("out/ball.mp4")

Under ``torchrun`` every rank builds the same ``DVG`` and makes the same calls: the process group is set up once,
in :meth:`DVG.from_pretrained`, and stays up between calls; rank 0's output holds the frames, the other ranks' none.
Bad arguments raise :class:`ValueError` subclasses (``ConfigError``, ``InputError``, ``InfeasibleBudget``) with the
same one-line messages the CLI prints, before any model work of that call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .config import Config, ConfigError, load_config
from .dvg.demands import Demands
from .models import InputError

OutputType = Literal["np", "pil", "latent"]


@dataclass(frozen=True)
class StagePlan:
    """One stage as it ran: its latent grid ``(T, H, W)``, the model calls ``[first, last]`` and the shift."""

    grid: tuple[int, int, int]
    steps: tuple[int, int]
    shift: float
    time_s: float | None = field(default=None, compare=False)
    """Seconds the stage took (not part of the plan's equality)."""


@dataclass(frozen=True)
class Chosen:
    """The action the planner chose: spatial ratio ``s``, stage-2/3 frame count ``t23`` and its densities."""

    s: float
    t23: int
    density: float
    executed_density: float
    flop_density: float

    @property
    def speedup_bound(self) -> float:
        """``1 / flop_density``: the speed-up the FLOP model allows."""
        return 1.0 / self.flop_density


@dataclass(frozen=True)
class Plan:
    """Everything one run decided."""

    mode: str
    num_steps: int
    budget: float
    stages: tuple[StagePlan, ...]
    chosen: Chosen
    demands: Demands | None
    """None in ``full`` and ``fixed`` modes (no sketch is analysed)."""
    feasible: tuple[dict[str, Any], ...] = ()
    """The candidates within the budget tolerance, as the planner scored them."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any], timings: Mapping[str, float] | None = None) -> Plan:
        c = record["chosen"]
        d = record.get("demands")
        timings = timings or {}
        stages = tuple(
            StagePlan(tuple(st["grid"]), tuple(st["steps"]), float(st["shift"]), timings.get(f"stage{k + 1}"))  # type: ignore[arg-type]
            for k, st in enumerate(record["stages"])
        )
        chosen = Chosen(float(c["s"]), int(c["t23"]), float(c["density"]), float(c["executed_density"]),
                        float(c["flop_density"]))  # fmt: skip
        demands = None if not d else Demands(d["spatial"], d["temporal"], d["w_s"], d["w_t"])
        return cls(record["mode"], int(record["num_steps"]), float(record["budget"]), stages, chosen, demands,
                   tuple(record.get("feasible") or ()))  # fmt: skip


@dataclass
class VideoOutput:
    """One generated video."""

    prompt: str
    seed: int
    frames: Any
    """``np``: ``uint8 [F, H, W, 3]``; ``pil``: a list of ``PIL.Image``; None for ``latent``, for :meth:`DVG.plan`
    and on ranks other than 0."""
    latent: torch.Tensor
    """The final latent ``[1, C, T, H, W]`` (every rank holds it)."""
    plan: Plan
    timings: dict[str, float]
    """Seconds: ``encode``, ``stage1``…``stage4``, ``transitions``, ``decide``, ``denoise``, ``decode``, ``total``."""
    fps: int
    sidecar: dict[str, Any] = field(default_factory=dict)
    """The JSON record the CLI writes next to the video (prompt, settings, plan, demands, timings, ...)."""

    def save(self, path: str | Path, sidecar: bool = True) -> Path:
        """Write the video as H.264 mp4 (atomically), and ``<stem>.json`` next to it unless ``sidecar=False``."""
        from .runtime.outputs import write_json, write_video

        if self.frames is None:
            raise InputError("this output has no frames (output_type='latent', DVG.plan, or not rank 0)")
        frames = self.frames if isinstance(self.frames, np.ndarray) else np.stack([np.asarray(f) for f in self.frames])
        path = Path(path)
        write_video(path, frames, self.fps)
        if sidecar:
            write_json(path.with_suffix(".json"), {**self.sidecar, "files": {"video": path.name}})
        return path


@dataclass(frozen=True)
class StepInfo:
    """What a ``callback`` gets after each model call."""

    step: int
    """Model call index, 0-based, over the whole run."""
    num_steps: int
    stage: int
    """0-based stage (0 = the sketch); always 0 in ``full`` mode."""
    num_stages: int
    timestep: float
    grid: tuple[int, int, int]
    """The latent grid this call ran on."""


_PER_CALL = {
    "steps": "sampling.steps",
    "budget": "sampling.budget",
    "mode": "sampling.mode",
    "size": "sampling.size",
    "frame_num": "sampling.frame_num",
    "guidance_scale": "sampling.guidance_scale",
    "guidance_scale_2": "sampling.guidance_scale_2",
    "true_cfg_scale": "sampling.true_cfg_scale",
    "negative_prompt": "sampling.negative_prompt",
}
"""Keyword arguments of :meth:`DVG.generate` that override one sampling field for that call."""


def _as_config(config: Config | str | Path | None, overrides: Mapping[str, Any] | None) -> Config:
    """A ``Config`` from a YAML path, a ``Config`` (copied) or None (the defaults), with ``section.key`` overrides."""
    items = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    if isinstance(config, Config):
        import dataclasses

        base = {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}
        from .config import _build, apply_overrides

        return _build(Config, apply_overrides(json.loads(json.dumps(base, default=_plain)), items), "")  # type: ignore[no-any-return]
    return load_config(config, items)


def call_config(config: Config, settings: Mapping[str, Any]) -> Config:
    """``config`` with :meth:`DVG.generate`'s per-call ``settings`` (``budget``, ``steps``, ...) applied, as a new
    ``Config`` (``config`` itself when there are none); an unknown setting is a one-line :class:`InputError`."""
    unknown = sorted(set(settings) - set(_PER_CALL))
    if unknown:
        raise InputError(f"unknown argument {unknown[0]}; per-call settings are {', '.join(_PER_CALL)}")
    items = {_PER_CALL[k]: v for k, v in settings.items() if v is not None}
    return _as_config(config, items) if items else config


def _plain(value: Any) -> Any:
    """JSON of the config's non-JSON values (enums, LoRA specs) for the copy in :func:`_as_config`."""
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"not serialisable: {value!r}")


class DVG:
    """DVG generation on one diffusers video pipeline (see the module docstring)."""

    def __init__(
        self,
        pipe: Any | None = None,
        config: Config | str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        distributed: bool = True,
    ) -> None:
        """Wrap ``pipe`` (a loaded diffusers pipeline; None loads ``model.path`` of the config). ``overrides``:
        ``{"section.key": value}`` on top of ``config``. ``distributed``: join the process group the launcher's
        environment describes (``torchrun``); a single process joins none."""
        from .executors.worker import Worker
        from .runtime.distributed import env_world, validate_layout
        from .runtime.versions import check_versions

        check_versions()
        self.config = _as_config(config, overrides)
        if pipe is not None and not self.config.model.path:
            self.config.model.path = str(getattr(pipe, "name_or_path", "") or "in-memory")
        world = env_world()[1] if distributed else 1
        self._checkpoint = _is_checkpoint(self.config.model.path)
        if pipe is None or self._checkpoint:
            from .runtime.engine import validate

            validate(self.config, [])  # checkpoint, size, frames, budget, LoRAs: before any weight loads
        validate_layout(self.config, world, batch=None)  # a dpN stage layout: checked per call
        self.worker = Worker(self.config)
        if world > 1:
            self.worker.init_distributed()
        self.worker.load(pipe)
        self.engine = self.worker.engine

    @classmethod
    def from_pretrained(
        cls,
        path_or_pipeline: Any,
        config: Config | str | Path | None = None,
        parallel: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> DVG:
        """Load a checkpoint directory or hub id (or take a loaded pipeline). ``parallel``: ``{"ulysses_degree":
        2, ...}`` (the ``parallel`` config section); keyword ``overrides`` set ``section__key`` fields, e.g.
        ``model__dtype="bfloat16"``, ``sampling__steps=8``."""
        more: dict[str, Any] = {k.replace("__", "."): v for k, v in overrides.items()}
        for key, value in (parallel or {}).items():
            more[f"parallel.{key}"] = value
        if isinstance(path_or_pipeline, str | Path):
            more["model.path"] = str(path_or_pipeline)
            return cls(None, config, more)
        return cls(path_or_pipeline, config, more)

    # -- generation ----------------------------------------------------------------------------------------

    def _call_config(self, settings: Mapping[str, Any]) -> Config:
        return call_config(self.config, settings)

    def generate(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        image: str | Path | None = None,
        output_type: OutputType = "np",
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> VideoOutput:
        """One video. ``settings``: ``budget``, ``mode``, ``steps``, ``size``, ``frame_num``, ``guidance_scale``,
        ``guidance_scale_2``, ``true_cfg_scale``, ``negative_prompt`` for this call (the config's otherwise).
        ``callback(StepInfo)`` runs after every model call (on every rank)."""
        request = self._request(prompt, seed, image, None)
        return self._run([request], output_type, callback, progress, decode=output_type != "latent",
                         settings=settings)[0]  # fmt: skip

    def generate_batch(
        self,
        prompts: list[str],
        *,
        seeds: list[int] | None = None,
        negative_prompts: list[str | None] | None = None,
        image: str | Path | None = None,
        output_type: OutputType = "np",
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> list[VideoOutput]:
        """Several videos in one batch: every model call runs all of them (``batch`` samples), which is what a data
        parallel stage layout (``parallel.stage_layouts`` ``dpN``) splits across ranks. They share one plan: DVG
        decides it from the sketch demands pooled over the batch, so in ``dvg`` mode a video may differ from the
        one :meth:`generate` makes of its prompt alone (in ``full`` and ``fixed`` mode only by batched arithmetic).
        ``seeds``: one per prompt (default: the config's seed plus the prompt's index); ``negative_prompts``: one per
        prompt (None: the ``negative_prompt`` setting, else the config's); ``image``: one first frame for all of them;
        ``settings`` as in :meth:`generate`."""
        if not isinstance(prompts, list | tuple) or not prompts:
            raise InputError("prompts must be a non-empty list of strings")
        base = self.config.sampling.seed
        seeds = [base + k for k in range(len(prompts))] if seeds is None else list(seeds)
        negatives = [None] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(seeds) != len(prompts) or len(negatives) != len(prompts):
            raise InputError(
                f"{len(prompts)} prompts need as many seeds and negative prompts; got {len(seeds)} and {len(negatives)}"
            )
        requests = [self._request(p, seed, image, n) for p, seed, n in zip(prompts, seeds, negatives, strict=True)]
        return self._run(requests, output_type, callback, progress, decode=output_type != "latent", settings=settings)

    def plan(self, prompt: str, *, seed: int | None = None, image: str | Path | None = None,
             **settings: Any) -> VideoOutput:  # fmt: skip
        """Denoise without decoding: the plan, demands, timings and final latent of the video ``generate`` would
        make with the same arguments (``frames`` is None)."""
        request = self._request(prompt, seed, image, None)
        return self._run([request], "latent", None, False, decode=False, settings=settings)[0]

    def _request(self, prompt: str, seed: int | None, image: str | Path | None, negative: str | None) -> Any:
        from .runtime.engine import Request

        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is empty")
        return Request(prompt, self.config.sampling.seed if seed is None else int(seed),
                       negative, None if image is None else str(image))  # fmt: skip

    def _run(
        self,
        requests: list[Any],
        output_type: OutputType,
        callback: Callable[[StepInfo], None] | None,
        progress: bool,
        decode: bool,
        settings: Mapping[str, Any],
    ) -> list[VideoOutput]:
        from .runtime.engine import sidecar

        if output_type not in ("np", "pil", "latent"):
            raise InputError(f"output_type must be np, pil or latent; got {output_type!r}")
        config = self._call_config(settings)
        self._validate(config, requests)
        on_step = None if callback is None else _step_callback(callback, config)
        result = self.engine.generate(requests, decode=decode, progress=progress, config=config, on_step=on_step)
        outputs = []
        for k, request in enumerate(requests):
            frames: Any = None
            if result.frames is not None and output_type != "latent":
                frames = result.frames[k]
                if output_type == "pil":
                    from PIL import Image

                    frames = [Image.fromarray(f) for f in frames]
            record = sidecar(result, k, config, {}, self.worker.layout_record())
            plan = Plan.from_record(record["plan"], result.timings)
            outputs.append(VideoOutput(request.prompt, request.seed, frames, result.latent[k : k + 1], plan,
                                       dict(result.timings), self.engine.adapter.fps, record))  # fmt: skip
        return outputs

    def _validate(self, config: Config, requests: list[Any]) -> None:
        """The CLI's checks for this call; a pipeline built in memory (no checkpoint directory to read) gets the
        checks its loaded modules allow: the latent grid of the size and frames, and the budget's feasibility.
        A forced data-parallel stage layout is checked against this call's batch."""
        from .dvg.options import Mode
        from .runtime.distributed import guidance_on, resolve_stage_layouts
        from .runtime.engine import validate

        par = self.engine.parallel
        if par is not None and config.parallel.stage_layouts is not None:
            resolve_stage_layouts(config, par.layout.world_size, par.num_heads, guidance_on(config), len(requests))
        if self._checkpoint:
            validate(config, requests, model_checks=False)  # the model's own were checked at load
            return
        s = config.sampling
        grid = self.engine.spec.latent_grid(*s.pixel_size(), s.frame_num)
        if s.mode not in (Mode.FULL, Mode.FIXED):
            mode = Mode.DVG if s.mode in (Mode.TRILINEAR, Mode.RANDOM_RENOISE) else s.mode
            self.engine.sampler_config(grid, config).planner().feasible(mode)

    # -- lifetime --------------------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """Rank 0 (or a single process): the rank whose outputs hold the frames."""
        return self.worker.is_main

    def close(self) -> None:
        """Leave the process group (torchrun); the model is freed with the object."""
        self.worker.shutdown()

    def __enter__(self) -> DVG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_checkpoint(path: str | None) -> bool:
    """Whether ``path`` names a checkpoint the validation can read (a directory or a cached hub id)."""
    if not path:
        return False
    from .runtime.engine import resolve_model_path

    try:
        return (resolve_model_path(path) / "model_index.json").is_file()
    except (InputError, OSError, ValueError):
        return False


def _step_callback(callback: Callable[[StepInfo], None], config: Config) -> Callable[[Any], None]:
    from .dvg.options import Mode

    stages = 1 if config.sampling.mode == Mode.FULL else 4
    steps = config.sampling.steps

    def on_step(trace: Any) -> None:
        callback(StepInfo(trace.step, steps, trace.stage, stages, trace.timestep, tuple(trace.grid)))

    return on_step


__all__ = ["DVG", "Chosen", "ConfigError", "Demands", "Plan", "StagePlan", "StepInfo", "VideoOutput"]
