"""What an adapter declares about a diffusers video family, and the contract the engine relies on.

An adapter never copies a model's ``forward``: it says how to call the diffusers transformer (which
kwargs, how the timestep is passed, what is concatenated to the latent for I2V), how the pipeline encodes
prompts, how the VAE decodes, and — for sequence parallelism — which tensors carry the tokens.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from ..dvg.resize import sample_at
from ..dvg.sampler import StageContext


class InputError(ValueError):
    """A request the model cannot take; the message is one line meant for the user."""


@dataclass(frozen=True)
class SequencePlan:
    """Which module inputs carry the token sequence and where the sequence is gathered again (the
    diffusers ``_cp_plan`` idea, as data). Applied by :func:`dvg_dist.parallel.hooks.parallelize_transformer`.

    Keys are module paths inside the transformer (``""`` is the transformer itself); values name the
    forward argument (or output index) and the sequence dim.
    """

    split_inputs: dict[str, dict[str, int]] = field(default_factory=dict)
    """module → {argument name: sequence dim} split across the sp group before the module runs."""
    replicated_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """module → arguments every rank keeps whole (text tokens of joint attention)."""
    gather_outputs: dict[str, int] = field(default_factory=dict)
    """module → sequence dim of its output, all-gathered after it runs."""
    direct_sdpa_text: str | None = None
    """For attention processors that call torch's ``scaled_dot_product_attention`` themselves instead of diffusers'
    ``dispatch_attention_fn`` (CogVideoX's): where their joint sequence holds the replicated text tokens, ``"first"``
    (``[text, video]``) or ``"last"``; the hooks then route those calls to the sequence-parallel attention. None: the
    processors dispatch through diffusers (every other family)."""


@dataclass
class Conditioning:
    """Everything the transformer needs besides the latent and the timestep, for one batch of prompts."""

    cond: dict[str, Any]
    """Transformer kwargs of the conditional pass."""
    uncond: dict[str, Any] | None
    """Transformer kwargs of the unconditional pass; None when guidance is off (one pass per step)."""
    latent_condition: torch.Tensor | None = None
    """Full-size ``[B, C', T, H, W]`` channels concatenated to the latent (I2V), sampled at each stage's
    coordinates so every stage sees the same image at the same place."""
    generator_states: list[torch.Tensor] | None = None
    """The requests' generator states after :meth:`Adapter.encode` drew from them (CogVideoX I2V samples its image
    latent from the pipeline's ``generator``); every rank's solver continues from these, so a stochastic scheduler's
    step noise is the pipeline's. None when encoding draws nothing."""


CLEAN_FIRST_FRAME = "dvg_clean_first_frame"
"""A conditioning entry (not a transformer kwarg: the adapter's ``forward`` takes it out) saying the batch's frame 0
is a clean image under per-token timesteps (Wan 2.2 TI2V and LTX-Video image-to-video). It rides in the kwargs so
it reaches every rank with the broadcast conditioning."""


def first_frame_mask(grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[1, 1, T, H, W]`` float32: 0 on frame 0 (the image), 1 elsewhere — the pipelines' first-frame mask."""
    mask = torch.ones((1, 1, *grid), dtype=torch.float32, device=device)
    mask[:, :, 0] = 0
    return mask


def with_first_frame(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``x`` with frame 0 replaced by ``condition``'s, as the pipelines write it: ``(1 - mask)·c + mask·x``."""
    mask = first_frame_mask(tuple(x.shape[2:]), x.device)
    return (1 - mask) * condition.to(x) + mask * x


def pin_first_frame(v: torch.Tensor, x: torch.Tensor, condition: torch.Tensor, sigma: float) -> torch.Tensor:
    """The velocity with frame 0 pointed at the clean image ``c`` (``condition``'s frame 0): ``(x - c)/σ``, so
    x̂0 = x - σ·v holds the image there."""
    v = v.clone()
    v[:, :, 0] = ((x[:, :, 0] - condition[:, :, 0].to(x)) / sigma).to(v.dtype)
    return v


def check_token_shards(model: str, tokens: int, sp_degree: int) -> None:
    """Refuse a per-token-timestep forward that would leave a rank without tokens: diffusers' timestep embedders
    cannot reshape an empty per-token timestep (the 1-D-timestep families run empty shards fine)."""
    if tokens < sp_degree:
        raise InputError(
            f"{model} under sequence parallelism needs at least one token per rank: a stage grid has {tokens} "
            f"tokens for {sp_degree} ranks (use a larger size or fewer ranks)"
        )


@dataclass(frozen=True)
class FamilySpec:
    """A family's geometry: what the planner and the validation need, read from the loaded checkpoint."""

    latent_channels: int
    patch: tuple[int, int, int]
    vae_scale: tuple[int, int, int]

    @property
    def spatial_multiple(self) -> int:
        """Stage grids' H and W must be whole patches."""
        return math.lcm(self.patch[1], self.patch[2])

    @property
    def temporal_multiple(self) -> int:
        """Reduced stage grids' T must be whole temporal patches (CogVideoX 1.5: 2; 1 elsewhere)."""
        return self.patch[0]

    def latent_grid(self, width: int, height: int, frames: int) -> Grid:
        """The full latent of a ``width × height`` video of ``frames`` frames; refuses (never rounds) what the
        VAE and the patch cannot take exactly, naming the nearest valid values."""
        st, sh, sw = self.vae_scale
        if frames < 1 or (frames - 1) % st:
            lo = max(1, (frames - 1) // st * st + 1)
            raise InputError(f"frame count {frames} is not {st}k+1 for this model; nearest valid: {lo} or {lo + st}")
        mh, mw = sh * self.patch[1], sw * self.patch[2]
        if width < mw or height < mh or width % mw or height % mh:
            raise InputError(
                f"size {width}x{height}: width must be a multiple of {mw} and height of {mh} "
                f"(nearest valid: {max(mw, round(width / mw) * mw)}x{max(mh, round(height / mh) * mh)})"
            )
        return Grid((frames - 1) // st + 1, height // sh, width // sw)


class Adapter(ABC):
    """One diffusers family. Subclasses declare data and small functions; the engine does the rest."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    """diffusers pipeline class names this adapter drives (checked after loading)."""
    i2v_pipeline_classes: ClassVar[tuple[str, ...]] = ()
    """The subset that is image-to-video (needs ``--image``)."""
    sequence_plan: ClassVar[SequencePlan] = SequencePlan()
    fps: ClassVar[int] = 16
    """Frame rate of the written video."""
    batched_cfg: ClassVar[bool] = False
    """The pipeline runs the two guidance branches as one batch ``[uncond, cond]`` (CogVideoX, LTX-Video); the
    engine then does too wherever both branches run on the same ranks (``runtime/guidance.py``)."""
    shared_cfg_kwargs: ClassVar[frozenset[str]] = frozenset()
    """Conditioning tensors without a batch dimension, passed once to a batched-CFG pass (CogVideoX's ``ofs``)."""
    dynamic_cfg: ClassVar[bool] = False
    """The family has a guidance schedule over the timestep (``sampling.use_dynamic_cfg``; CogVideoX)."""
    decode_noise: ClassVar[bool] = False
    """The family's VAE may take a decode timestep and noise (``sampling.decode_timestep``; LTX-Video)."""
    transformer_config: ClassVar[str] = "transformer/config.json"
    vae_config: ClassVar[str] = "vae/config.json"

    @staticmethod
    @abstractmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Geometry from the transformer's and VAE's configs."""

    @staticmethod
    @abstractmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        """Per-layer FLOPs ``a·L + b·L²`` of this transformer, from its config (hidden, FFN, text tokens)."""

    @classmethod
    def read_json_configs(cls, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """The transformer's and VAE's ``config.json`` of a checkpoint directory (no weights loaded)."""
        p = Path(path)
        try:
            transformer = json.loads((p / cls.transformer_config).read_text())
            vae = json.loads((p / cls.vae_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: cannot read the transformer/VAE configs ({e})") from None
        return transformer, vae

    @classmethod
    def read_spec(cls, path: str | Path) -> FamilySpec:
        """Geometry from a checkpoint directory's JSON configs, without loading any weights — so bad sizes,
        frame counts and budgets are refused before the heavy work."""
        return cls.spec_from_configs(*cls.read_json_configs(path))

    def __init__(self, pipe: Any) -> None:
        name = type(pipe).__name__
        if name not in self.pipeline_classes:
            raise InputError(
                f"{self.family} adapter drives {', '.join(self.pipeline_classes)}; the checkpoint is a {name}"
            )
        self.pipe = pipe

    # -- declared geometry ---------------------------------------------------------------------------

    @property
    def spec(self) -> FamilySpec:
        """The loaded checkpoint's geometry."""
        return self.spec_from_configs(dict(self.pipe.transformer.config), dict(self.pipe.vae.config))

    @property
    def is_i2v(self) -> bool:
        return type(self.pipe).__name__ in self.i2v_pipeline_classes

    @classmethod
    def image_use(cls, model_index: dict[str, Any]) -> str:
        """``"required"``, ``"optional"`` or ``"none"``: whether a checkpoint (its ``model_index.json``) takes
        ``--image``. Image-to-video pipelines need one; Wan 2.2 TI2V's text-to-video pipeline may take one."""
        return "required" if model_index.get("_class_name") in cls.i2v_pipeline_classes else "none"

    @property
    def accepts_image(self) -> bool:
        """Whether ``encode`` may be given an image (its VAE then encodes it: offload keeps the VAE near)."""
        return self.image_use({"_class_name": type(self.pipe).__name__, **dict(self.pipe.config)}) != "none"

    def check_image(self, image: Any | None) -> None:
        """Refuse, in one line, an image this checkpoint cannot take or a missing one it needs."""
        name = type(self.pipe).__name__
        if image is not None and not self.accepts_image:
            raise InputError(f"--image needs an image-to-video checkpoint; this one is text-to-video ({name})")
        if image is None and self.is_i2v:
            raise InputError(f"this is an image-to-video checkpoint ({name}): pass --image")

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    execution_device: torch.device | None = None
    """Where the components compute when they do not all live there (model CPU offload, FSDP2 CPU offload);
    None: where the transformer is."""

    @property
    def device(self) -> torch.device:
        return self.execution_device or self.pipe.transformer.device

    # -- conditioning --------------------------------------------------------------------------------

    @abstractmethod
    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        sampling: SamplingConfig,
        image: Any | None,
        grid: Grid,
        generators: list[torch.Generator] | None = None,
    ) -> Conditioning:
        """Prompt (and image) conditioning with the pipeline's own encode functions. ``sampling`` says which
        guidance is on (the family decides what its scales mean: CFG, embedded guidance, true CFG). ``generators``
        are the requests' own (the pipeline's ``generator=``), for a family whose pipeline draws from them while
        preparing its inputs; one that does returns their states after (``Conditioning.generator_states``)."""

    # -- one transformer pass ------------------------------------------------------------------------

    def transformers(self) -> list[torch.nn.Module]:
        """Every transformer this pipeline may run (both experts of a two-expert model)."""
        second = getattr(self.pipe, "transformer_2", None)
        return [self.pipe.transformer] + ([second] if second is not None else [])

    @staticmethod
    def num_heads_from_config(transformer: dict[str, Any]) -> int:
        """Attention heads (the Ulysses degree must divide them)."""
        return int(transformer["num_attention_heads"])

    def transformer_for(self, timestep: float) -> tuple[torch.nn.Module, str]:
        """The transformer that runs at ``timestep`` and a name for it (two-expert MoE families override)."""
        return self.pipe.transformer, "transformer"

    def guidance_for(self, timestep: float, sampling: SamplingConfig) -> float:
        """The scale combining the two passes at ``timestep``: ``v = v_u + g·(v_c - v_u)``."""
        return sampling.guidance_scale

    def model_input(self, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid) -> torch.Tensor:
        """The latent the transformer sees: ``x``, plus I2V condition channels sampled at this stage."""
        if conditioning.latent_condition is None:
            return x.to(self.transformer_dtype)
        cond = sample_at(conditioning.latent_condition, ctx.coords, full).to(x)
        return torch.cat([x, cond], dim=1).to(self.transformer_dtype)

    def pin_velocity(
        self, v: torch.Tensor, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid
    ) -> torch.Tensor:
        """The guided velocity of one call, where the conditioning fixes part of the latent exactly (Wan 2.2 TI2V's
        image frame) pointed at that known clean value, so x̂0 — what the sketch is read from and what DVG's
        transitions resize — carries it instead of a free-running value. Most families fix nothing."""
        return v

    def final_latent(self, latent: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoised full-size latent as the pipeline hands it to the VAE (Wan 2.2 TI2V writes the image's
        latent into frame 0 after the last step); unchanged by default."""
        return latent

    @abstractmethod
    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        """How the family passes the timestep (dtype, shape) — exactly as its pipeline does."""

    def step_kwargs(self, ctx: StageContext, batch: int) -> dict[str, Any]:
        """Per-call transformer kwargs besides the conditioning (MeanFlow's ``timestep_r``); none by default."""
        return {}

    @classmethod
    def check_checkpoint(cls, path: str | Path, config: Any) -> None:
        """Refuse, before any weight loads, a run ``config`` that this checkpoint cannot take (one line); the
        default refuses nothing."""
        return None

    def forward(
        self, module: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Call the diffusers transformer itself; never a copy of its forward."""
        return module(hidden_states=x_in, timestep=t, return_dict=False, **kwargs)[0]

    # -- solver, decode ------------------------------------------------------------------------------

    @property
    def scheduler(self) -> Any:
        """The checkpoint's own scheduler (its class and config are what the solver rebuilds per stage)."""
        return self.pipe.scheduler

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's latent → VAE-input scaling (the Hunyuan families: divide by ``scaling_factor``)."""
        return latents / self.pipe.vae.config.scaling_factor

    def decode_input(
        self, z: torch.Tensor, sampling: SamplingConfig, generators: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, float]:
        """The VAE-input latent as the pipeline decodes it, and the decode timestep its VAE takes (LTX-Video mixes in
        noise for a timestep-conditioned VAE); unchanged, 0, by default."""
        return z, 0.0

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latent ``[B, C, T, H, W]`` → uint8 frames ``[B, F, H, W, 3]``: the pipeline's VAE and its own
        ``video_processor.postprocess_video``, as its ``__call__`` does for ``output_type="np"``."""
        vae = self.pipe.vae
        z = self.vae_input(latents.to(vae.device, vae.dtype))
        with torch.no_grad():
            video = vae.decode(z, return_dict=False)[0]
        return self.postprocess(video)

    def postprocess(self, video: torch.Tensor) -> np.ndarray:
        """The VAE's video ``[B, 3, F, H, W]`` → uint8 frames ``[B, F, H, W, 3]`` with the pipeline's own
        ``video_processor.postprocess_video`` (tiled and distributed decodes in ``runtime/vae.py`` end here too)."""
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")
        return (np.clip(np.asarray(frames), 0.0, 1.0) * 255.0).round().astype(np.uint8)
