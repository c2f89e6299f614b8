"""Typed, validated run configuration (sections ``model``, ``sampling``, ``parallel``, ``dvg``) and its strict
YAML loading (docs/architecture.md, Layout).

YAML maps onto the dataclasses field by field; an unknown key is an error naming its dotted path, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .dvg.options import DVGOptions, Mode
from .dvg.planner import COST_PRESETS, Grid

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ATTENTION_BACKENDS = ("native", "xfuser", "deepspeed")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale its delta is applied with (``--lora PATH[:SCALE]``; YAML: the same string, or a
    mapping ``{path, scale}``)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"a LoRA needs a non-empty path; got {self.path!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise ConfigError(f"LoRA {self.path}: scale must be a finite number; got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def parse(cls, value: Any, where: str) -> LoraSpec:
        """``"PATH"``, ``"PATH:SCALE"``, a mapping ``{path, scale}`` or a ``LoraSpec``; ``where`` names the field.

        The scale is what follows the last colon when that is a number. A tail that is not a number is an error,
        unless the whole string ends in ``.safetensors`` (a colon inside the path itself)."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"path", "scale"})
            if unknown or "path" not in value:
                why = f"unknown key {unknown[0]}" if unknown else "no path"
                raise ConfigError(f"{where}: a LoRA mapping takes path and scale; {why} in {value!r}")
            return cls(value["path"], value.get("scale", 1.0))
        if not isinstance(value, str):
            raise ConfigError(f"{where}: a LoRA is PATH[:SCALE] or {{path, scale}}; got {value!r}")
        path, sep, tail = value.rpartition(":")
        if not sep:
            return cls(value)
        try:
            scale = float(tail)
        except ValueError:
            if value.endswith(".safetensors"):
                return cls(value)
            raise ConfigError(
                f"{where}: {value!r} is not PATH[:SCALE] (SCALE a number, e.g. lora.safetensors:0.8)"
            ) from None
        if not path or not math.isfinite(scale):
            raise ConfigError(f"{where}: {value!r} is not PATH[:SCALE] (SCALE a finite number after a path)")
        return cls(path, scale)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass
class ModelConfig:
    """The checkpoint and how to run it. The geometry fields (``latent_channels``, ``patch``, ``vae_scale``,
    ``spatial_multiple``) serve planning without a checkpoint; the engine reads the checkpoint's own."""

    family: str = "wan"
    """Model family of the planner tool and the configs: wan, hunyuanvideo, hunyuanvideo15, cogvideox, ltx (the
    engine reads the family from the checkpoint's ``model_index.json``)."""
    path: str | None = None
    """Local diffusers directory or hub id."""
    shift: float | None = None
    """The model's own schedule shift; None takes the checkpoint scheduler's (Wan 720p ships 5.0, 480p 3.0;
    HunyuanVideo 7.0). Without a checkpoint (the planner tool) None means 5.0."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    device: str = "auto"
    """cuda, cpu, cuda:N, or auto (cuda when available)."""
    vae_tiling: bool = True
    """Decode with the VAE's tiled decoder where diffusers offers one (bounded memory at 720p)."""
    vae_tile_size: int = 256
    """Tiled decode: tile edge in pixels (diffusers' 256), a multiple of the VAE's spatial compression."""
    vae_tile_stride: int = 192
    """Tiled decode: pixels between tile starts (diffusers' 192); neighbours overlap by size - stride, blended."""
    vae_tile_frames: int = 16
    """Temporal chunk in pixel frames where the VAE tiles time (HunyuanVideo; diffusers' 16)."""
    vae_tile_frame_stride: int = 12
    """Pixel frames between temporal chunks (diffusers' 12); chunks overlap by frames - frame_stride, blended."""
    latent_channels: int = 16
    """Latent channels C (Wan, HunyuanVideo: 16; HunyuanVideo-1.5: 32)."""
    patch: tuple[int, int, int] = (1, 2, 2)
    """Transformer patch (pt, ph, pw)."""
    vae_scale: tuple[int, int, int] = (4, 8, 8)
    """VAE compression (time, height, width): pixel frames = scale_t·(T-1) + 1."""
    spatial_multiple: int = 2
    """Every stage's latent H and W must be a multiple of this (Wan: 2, since ph = pw = 2)."""
    offload: bool = False
    """Model CPU offload: each component (text encoder, transformer(s), VAE) lives on the CPU and moves to the
    device only while it runs (diffusers' ``enable_model_cpu_offload`` idea); same result, lower peak memory."""
    text_encoder_offload: bool = False
    """Move the text encoder(s) back to the CPU after encoding (Wan's ``--t5_cpu`` idea)."""
    cost_model: str = "auto"
    """FLOP cost model for the flop density: ``auto`` (from the checkpoint's transformer config; the
    planner tool without a checkpoint uses wan2.1-14b) or one of ``COST_PRESETS``."""
    loras: tuple[LoraSpec, ...] = ()
    """LoRA adapters for ``transformer`` (Wan; the high-noise expert of Wan 2.2 A14B), in order, each
    ``"PATH[:SCALE]"`` (scale 1.0 by default) or ``{path, scale}``: safetensors files in the diffusers/PEFT,
    original Wan or musubi key format, loaded with diffusers' ``load_lora_weights`` right after the pipeline
    (before the sequence-parallel hooks, FSDP2 and offload). Checked before any weight loads
    (``runtime/lora.py``)."""
    loras_2: tuple[LoraSpec, ...] = ()
    """LoRA adapters for ``transformer_2``, the low-noise expert of a Wan 2.2 A14B checkpoint (``--lora_2``)."""
    fuse_lora: bool = False
    """Fuse the LoRA deltas (at their scales) into the weights after loading and drop the LoRA layers: the
    transformer runs at its plain speed and memory; the adapters cannot be changed afterwards."""
    compile: str = "none"
    """``torch.compile`` the transformer(s) (``--compile``): ``none``; ``blocks`` compiles each repeated block
    (regional compilation, the blocks share one graph); ``full`` the whole transformer. The sequence length is
    dynamic, so every stage grid and every plan reuse one compiled graph; compile time is reported apart from the
    denoising time. Not with ``offload`` or ``parallel.shard_weights``."""

    def __post_init__(self) -> None:
        if self.compile not in ("none", "blocks", "full"):
            raise ConfigError(f"model.compile must be none, blocks or full; got {self.compile!r}")
        if self.compile != "none" and self.offload:
            raise ConfigError("--compile with --offload is not supported: moving weights between devices recompiles")
        self.loras = _lora_specs(self.loras, "model.loras")
        self.loras_2 = _lora_specs(self.loras_2, "model.loras_2")
        if not isinstance(self.fuse_lora, bool):
            raise ConfigError(f"model.fuse_lora must be true or false; got {self.fuse_lora!r}")
        if self.fuse_lora and not (self.loras or self.loras_2):
            raise ConfigError("model.fuse_lora (--fuse_lora) is set but no LoRA is given (--lora / --lora_2)")
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        self.vae_scale = tuple(int(p) for p in self.vae_scale)  # type: ignore[assignment]
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ConfigError(f"model.patch must be 3 positive ints; got {list(self.patch)}")
        if len(self.vae_scale) != 3 or min(self.vae_scale) < 1:
            raise ConfigError(f"model.vae_scale must be 3 positive ints; got {list(self.vae_scale)}")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"model.shift must be > 0; got {self.shift}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.latent_channels < 1 or self.spatial_multiple < 1:
            raise ConfigError("model.latent_channels and model.spatial_multiple must be >= 1")
        if not 0 < self.vae_tile_stride <= self.vae_tile_size:
            raise ConfigError(
                f"model.vae_tile_stride must be in (0, vae_tile_size {self.vae_tile_size}]; got {self.vae_tile_stride}"
            )
        if not 0 < self.vae_tile_frame_stride <= self.vae_tile_frames:
            raise ConfigError(
                f"model.vae_tile_frame_stride must be in (0, vae_tile_frames {self.vae_tile_frames}]; "
                f"got {self.vae_tile_frame_stride}"
            )
        if self.cost_model != "auto" and self.cost_model not in COST_PRESETS:
            choices = ", ".join(["auto", *sorted(COST_PRESETS)])
            raise ConfigError(f"model.cost_model must be one of {choices}; got {self.cost_model!r}")


def _lora_specs(value: Any, where: str) -> tuple[LoraSpec, ...]:
    """A field's LoRAs as ``LoraSpec``\\s: one string or mapping, a list/tuple of them, or None (none)."""
    if value is None:  # ``loras:`` left empty in YAML
        return ()
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(LoraSpec.parse(v, where) for v in items)


@dataclass
class SamplingConfig:
    """One generation's sampling settings (flag names follow the official Wan/Hunyuan scripts)."""

    steps: int = 50
    """Denoising steps N (model calls; 4-12 for step-distilled models, at least 4 in the DVG modes)."""
    seed: int = 0
    """Seed of the initial noise and of every re-noise field (a prompts line may give its own)."""
    budget: float = 0.5
    """ρ*: the target token density of the DVG plan."""
    mode: Mode = Mode.DVG
    """``full`` (the plain sampler, equal to the diffusers pipeline), ``dvg``, or one of the ablations."""
    size: str = "1280x720"
    """Pixel size W x H."""
    frame_num: int = 81
    """Pixel frames; must fit the VAE's frame rule (scale_t·k + 1)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance; 1 skips the unconditional pass."""
    guidance_scale_2: float | None = None
    """Guidance of the low-noise expert of a two-expert model (Wan 2.2 A14B); None = ``guidance_scale``."""
    true_cfg_scale: float = 1.0
    """Real CFG for families whose ``guidance_scale`` is embedded guidance (HunyuanVideo): > 1 adds the
    negative-prompt pass."""
    negative_prompt: str = ""
    """The unconditional branch's prompt under CFG (a prompts line may give its own)."""
    use_dynamic_cfg: bool = False
    """CogVideoX's cosine schedule of the guidance scale over the timestep (its pipelines' ``use_dynamic_cfg``; the
    CogVideoX 1.5 recipe turns it on); refused for the families that have none."""
    decode_timestep: float = 0.0
    """LTX-Video's decode timestep (its pipelines' ``decode_timestep``): given to a timestep-conditioned VAE
    (LTX-Video 0.9.1+; the released recipes use 0.03-0.05), which then decodes the latent mixed with
    ``decode_noise_scale`` of fresh noise from the request's seed. 0 (the pipelines' default) decodes the latent as it
    is; refused for the families that have no such VAE."""
    decode_noise_scale: float | None = None
    """The noise mixed into the latent before a timestep-conditioned decode, ``(1 - s)·z + s·ε``; None = the decode
    timestep (the pipelines' default)."""

    def __post_init__(self) -> None:
        try:
            self.mode = Mode(self.mode)
        except ValueError:
            raise ConfigError(
                f"sampling.mode must be one of {', '.join(m.value for m in Mode)}; got {self.mode!r}"
            ) from None
        if self.steps < 1:
            raise ConfigError(f"sampling.steps must be >= 1; got {self.steps}")
        if self.steps < 4 and self.mode != Mode.FULL:
            raise ConfigError(
                f"sampling.steps must be >= 4 in mode {self.mode.value} (each of the four stages runs at least one "
                f"model call); got {self.steps} (--mode full runs any step count)"
            )
        if not 0 < self.budget <= 1:
            raise ConfigError(f"sampling.budget must be in (0, 1]; got {self.budget}")
        if self.frame_num < 1:
            raise ConfigError(f"sampling.frame_num must be >= 1; got {self.frame_num}")
        if self.guidance_scale < 0 or (self.guidance_scale_2 is not None and self.guidance_scale_2 < 0):
            raise ConfigError("sampling.guidance_scale and guidance_scale_2 must be >= 0")
        for key, value in (("decode_timestep", self.decode_timestep), ("decode_noise_scale", self.decode_noise_scale)):
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"sampling.{key} must be in [0, 1]; got {value}")
        self.pixel_size()  # validates the format

    def pixel_size(self) -> tuple[int, int]:
        """(width, height) from ``size`` ("1280x720" or "1280*720")."""
        parts = str(self.size).lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"sampling.size must be WxH, e.g. 1280x720; got {self.size!r}")
        return int(parts[0]), int(parts[1])


@dataclass
class ParallelConfig:
    """How the processes of one run split the work: ``world = cfg × ulysses × ring`` (docs/parallel.md)."""

    ulysses_degree: int | None = None
    """Ranks exchanging heads↔sequence by all-to-all (must divide the heads); None = as many as the heads
    allow, the rest in the ring."""
    ring_degree: int | None = None
    """Ranks passing K/V around a ring (any length, any heads); None = what the Ulysses degree leaves."""
    cfg_parallel: bool = False
    """Run the conditional and unconditional passes on the two halves of the world (needs guidance)."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_s: float = 600.0
    """Process-group timeout: a rank that dies or stalls fails the run within this, never a hang."""
    attention_backend: str = "native"
    """Sequence-parallel attention implementation: ``native`` (ours: torch.distributed + SDPA, the reference),
    ``xfuser`` (yunchang's USP ``LongContextAttention``) or ``deepspeed`` (DeepSpeed-Ulysses
    ``DistributedAttention``); the last two need their extra installed."""
    shard_weights: bool = False
    """Shard the transformer weights over the sp group with FSDP2 (``fully_shard``): each rank keeps 1/sp of
    the parameters and gathers one block's at a time; same result."""
    vae_parallel: bool = False
    """Split the VAE decode over the ranks by tiles / frame chunks and gather on rank 0 (xDiT's DistVAE idea)."""
    text_encoder: str = "each"
    """``each``: every rank encodes the prompt itself; ``rank0``: rank 0 encodes and broadcasts (the other ranks
    never run the text encoder). Same result either way."""
    stage_layouts: tuple[str, ...] | None = None
    """Per-stage layouts (``--stage_layouts``): one entry for every stage, or 4, one per DVG stage (``full`` mode
    uses the last). An entry is ``auto`` (a cost model picks the cheapest layout for that stage's grid), ``fixed``
    (the layout of the degrees above) or a spec: ``dpN``, ``cfgN``, ``uN`` (Ulysses), ``rN`` (ring) joined by ``x``,
    e.g. ``u4``, ``cfg2xu2``, ``dp2xu2``; the degrees must multiply to the world size. CFG-parallel needs guidance,
    ``dpN`` a batch of N or more prompts (``generate.py --batch_size``, ``DVG.generate_batch``; Ray and serve run one
    per batch). A string is split at commas. None: every stage on the fixed layout. Switching layouts moves no data;
    same result (docs/parallel.md)."""
    link_latency_us: float | None = None
    """Cost model of ``auto`` stage layouts: microseconds per collective call; None = measured at start-up."""
    link_bandwidth_gbs: float | None = None
    """Cost model: GB/s one rank sends to the others in a collective; None = measured at start-up."""
    compute_tflops: float | None = None
    """Cost model: TFLOP/s one rank achieves in the transformer; None = measured at start-up (one matmul)."""

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"parallel.{name} must be >= 1; got {value}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be one of auto, nccl, gloo; got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be > 0; got {self.timeout_s}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"parallel.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if self.text_encoder not in ("each", "rank0"):
            raise ConfigError(f"parallel.text_encoder must be one of each, rank0; got {self.text_encoder!r}")
        if self.stage_layouts is not None:
            from .parallel.layouts import parse_entry  # lazy: the config module stays free of torch.distributed

            entries = self.stage_layouts
            if isinstance(entries, str):
                entries = tuple(e.strip() for e in entries.split(","))
            if not isinstance(entries, tuple | list) or len(entries) not in (1, 4):
                raise ConfigError(
                    f"parallel.stage_layouts must be one entry or 4 (one per DVG stage); got {self.stage_layouts!r}"
                )
            try:
                self.stage_layouts = tuple(str(parse_entry(e)) for e in entries)
            except ValueError as e:
                raise ConfigError(f"parallel.stage_layouts: {e}") from None
        for name in ("link_latency_us", "link_bandwidth_gbs", "compute_tflops"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"parallel.{name} must be > 0; got {value}")


@dataclass
class Config:
    """A whole run: model, sampling, parallel layout and the DVG algorithm's options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dvg: DVGOptions = field(default_factory=DVGOptions)

    def latent_grid(self) -> Grid:
        """The full latent (T, H, W) of ``sampling.size``/``frame_num`` under the model's VAE; refuses sizes
        the VAE and patch cannot take exactly instead of rounding them."""
        st, sh, sw = self.model.vae_scale
        width, height = self.sampling.pixel_size()
        frames = self.sampling.frame_num
        if (frames - 1) % st:
            raise ConfigError(f"sampling.frame_num must be {st}k+1 for this VAE (e.g. 81); got {frames}")
        mh, mw = sh * self.model.patch[1], sw * self.model.patch[2]
        if height % mh or width % mw:
            raise ConfigError(f"sampling.size {width}x{height}: width must be a multiple of {mw}, height of {mh}")
        return Grid((frames - 1) // st + 1, height // sh, width // sw)


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys are errors naming their path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{path}.{name}" if path else name)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, hint, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """YAML lists become tuples where the field is a tuple; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. size: 1280 — let the field's own check say what shape it wants
    if hint in (int, float, str) and not isinstance(value, hint):
        raise ConfigError(f"{path} must be {hint.__name__}; got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must be key=value, e.g. dvg.alpha=3.0; got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return _build(Config, data, "")
