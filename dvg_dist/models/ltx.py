"""The LTX-Video adapter (``LTXPipeline``, text-to-video; ``LTXImageToVideoPipeline``, the same checkpoint with a first
frame) and its sequence plan, on diffusers' own ``LTXVideoTransformer3DModel`` and ``AutoencoderKLLTXVideo``.

What ``LTXPipeline.__call__`` does, and how each piece maps onto the engine:

- **Latent layout.** The pipeline keeps its latent packed, ``[B, S, C]`` (``_pack_latents``, patch 1: one token per
  latent voxel in (T, H, W) order); the engine's latent is ``[B, C, T, H, W]``. :meth:`LTXVideoAdapter.forward` packs
  and unpacks around the transformer call with the pipeline's own static ``_pack_latents`` / ``_unpack_latents``
  (permutations, so no value changes; the scheduler's step is elementwise, so stepping either layout is the same).
- **Positions.** The transformer builds its rotary table from ``num_frames, height, width`` and
  ``rope_interpolation_scale = (vae_temporal / frame_rate, vae_spatial, vae_spatial)``. Every DVG stage passes its own
  grid and the pipeline's scale unchanged: plain per-grid positions, as Wan and the Hunyuan families get at a reduced
  grid (their rotary tables are built from the current grid too). A reduced stage is then the model drawing a
  smaller, shorter video at its training pixel pitch and frame rate — inputs of the kind it was trained on at many
  sizes — rather than a coarse sampling of the full extent (scaling the interpolation by ``full / stage`` per axis),
  which puts every token's position between those it ever saw.
- **Timestep.** ``t.expand(B)``: the scheduler's float32 timestep per video, whatever the transformer's dtype.
- **Image-to-video** (``--image``; an ``LTXPipeline`` checkpoint takes one, as ``LTXImageToVideoPipeline`` loads the
  same files). The image's latent, from that pipeline's own ``prepare_latents`` (the VAE posterior sampled from the
  request's generator, normalised), is frame 0 of the latent and never stepped; the timestep is per token,
  ``t · (1 - mask)`` with the mask 1 on frame 0. The engine writes the image into frame 0 of every stage's model input
  (sampled at the stage's coordinates), points frame 0's velocity at it and writes it into the final latent, so a
  full run equals the pipeline's and DVG's sketch sees the image. Under sequence parallelism the per-token timestep
  splits with the tokens (a stage with fewer tokens than ranks is refused).
- **Guidance.** Plain CFG, ``uncond + g·(cond − uncond)`` in float32 on ``noise_pred.float()``, with the two branches
  run as **one batch** ``[negative, positive]``. Batch 1 and batch 2 round differently (a matrix–vector product in
  the timestep embedder at batch 1), so to equal the pipeline bit for bit the adapter declares ``batched_cfg`` and the
  engine runs that batch (``runtime/guidance.py``). Under CFG-parallel (``--use_cfg_parallel``, or a ``cfg2`` stage
  layout) each half of the ranks runs one branch at batch 1 instead: the same video up to that round-off. The
  pipeline's ``guidance_rescale`` (default 0) has no config key: it is always 0 here.
- **Schedule.** ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` and ``shift_terminal``: ``mu`` from
  the video's latent size, ``sigmas = linspace(1, 1/N, N)`` (``runtime/solver.py``, ``DynamicShiftSolver``).
- **Decode.** ``_denormalize_latents`` with the VAE's ``latents_mean`` / ``latents_std`` / ``scaling_factor``, then the
  VAE at ``sampling.decode_timestep`` (the pipeline's default 0: then no noise is mixed in). A timestep-conditioned
  VAE (LTX-Video 0.9.1+) is given that timestep and decodes ``(1 - s)·z + s·ε`` (``decode_noise_scale``, ε from the
  request's generator, :meth:`LTXVideoAdapter.decode_input`); an unconditioned one (0.9.0) neither.

Not supported (the adapter registry refuses their checkpoints in one line): ``LTXConditionPipeline``, whose
conditions at other frames are either blended into latent frames ``frame_index // 8`` on or appended as extra
tokens carrying their own pixel coordinates (``video_coords``), with a denoise strength: at a DVG stage with fewer
latent frames those positions have no exact counterpart, so its conditioning would have to be re-derived per stage
grid; transformer patches other than 1 (the pipeline passes the latent sizes to the rotary embedding, so only patch
1 is self-consistent in diffusers itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from ..dvg.resize import sample_at
from ..dvg.sampler import StageContext
from .base import (
    CLEAN_FIRST_FRAME,
    Adapter,
    Conditioning,
    FamilySpec,
    InputError,
    SequencePlan,
    check_token_shards,
    first_frame_mask,
    pin_first_frame,
    with_first_frame,
)

# The sequence-parallel layout, as diffusers' own ``_cp_plan`` for LTXVideoTransformer3DModel minus its text split:
# the packed hidden states ``[B, S, C]`` are split at the transformer's input (listed first, so they fix the token
# count), the rotary cos/sin (``rope`` outputs 0 and 1, ``[B, S, D]``, built from the whole grid) and, for
# image-to-video, the per-token timestep ``[B, S]`` with the same partition (text-to-video's ``[B]`` has no dim 1
# and stays whole), and ``proj_out`` is gathered so every rank unpacks the whole velocity. Text enters
# cross-attention only (``attn2``, kept local: each rank's queries attend all text tokens), so it is neither split
# nor declared.
LTX_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"": {"hidden_states": 1, "timestep": 1}, "rope": {"0": 1, "1": 1}},
    gather_outputs={"proj_out": 1},
)

MAX_SEQUENCE_LENGTH = 128
"""T5 prompt tokens: ``LTXPipeline``'s ``max_sequence_length`` default (prompts are padded to it)."""


def ltx_vae_scale(vae: dict[str, Any]) -> tuple[int, int]:
    """(temporal, spatial) compression of an ``AutoencoderKLLTXVideo`` from its ``config.json``: the explicit ratios
    when the config sets them, else what the class derives, ``patch · 2^(scaling stages)`` (released: 8 and 32)."""
    stages = sum(bool(s) for s in vae.get("spatio_temporal_scaling", (True, True, True, False)))
    spatial = vae.get("spatial_compression_ratio") or int(vae.get("patch_size", 4)) * 2**stages
    temporal = vae.get("temporal_compression_ratio") or int(vae.get("patch_size_t", 1)) * 2**stages
    return int(temporal), int(spatial)


def decode_timestep(
    vae: Any, batch: int, dtype: torch.dtype, device: torch.device, timestep: float = 0.0
) -> torch.Tensor | None:
    """What ``LTXPipeline`` passes a VAE's decode as ``temb``: ``decode_timestep`` per video for a
    timestep-conditioned VAE (0.9.1+), None for the others (0.9.0, which ignore the setting, as the pipeline does).
    The noise mix that goes with it is :meth:`LTXVideoAdapter.decode_input`'s."""
    if not vae.config.timestep_conditioning:
        return None
    return torch.tensor([timestep] * batch, device=device, dtype=dtype)


def mark_cross_attention(transformer: torch.nn.Module) -> None:
    """Flag every block's ``attn2`` as cross-attention (``is_cross_attention``, the attribute diffusers' other
    attention classes carry and ``LTXAttention`` lacks), so the sequence-parallel hooks leave it local: its keys are
    the whole prompt on every rank, not the sharded video tokens."""
    for block in getattr(transformer, "transformer_blocks", ()):
        block.attn2.is_cross_attention = True


def pack(x: torch.Tensor, patch: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """``[B, C, T, H, W]`` → the pipeline's packed ``[B, S, C]`` (its own ``_pack_latents``)."""
    from diffusers import LTXPipeline

    return LTXPipeline._pack_latents(x, patch[1], patch[0])


def unpack(tokens: torch.Tensor, grid: Grid, patch: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """The pipeline's packed ``[B, S, C]`` → ``[B, C, T, H, W]`` on ``grid`` (its own ``_unpack_latents``)."""
    from diffusers import LTXPipeline

    return LTXPipeline._unpack_latents(tokens, grid.t, grid.h, grid.w, patch[1], patch[0])


def call_transformer(
    module: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    rope_interpolation_scale: tuple[float, float, float],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """One diffusers call on a ``[B, C, T, H, W]`` latent, with the sizes and rotary scale as ``LTXPipeline`` passes
    them (the latent's own T, H, W); returns the raw packed output ``[B, S, C]``. Shared by the adapter and
    ``launch/check_gpu.py``."""
    _, _, t, h, w = x.shape
    return module(
        hidden_states=pack(x),
        timestep=timestep,
        num_frames=t,
        height=h,
        width=w,
        rope_interpolation_scale=rope_interpolation_scale,
        return_dict=False,
        **kwargs,
    )[0]


class LTXVideoAdapter(Adapter):
    """``LTXPipeline`` (text-to-video) and ``LTXImageToVideoPipeline`` (the same checkpoint with a first frame): T5
    text in cross-attention, CFG batched as the pipeline, FlowMatch Euler with dynamic shifting, the
    timestep-conditioned LTX VAE."""

    family = "ltx"
    pipeline_classes = ("LTXPipeline", "LTXImageToVideoPipeline")
    i2v_pipeline_classes = ("LTXImageToVideoPipeline",)
    sequence_plan = LTX_SEQUENCE_PLAN
    batched_cfg = True
    decode_noise = True
    fps = 25
    """``LTXPipeline``'s ``frame_rate`` default: what the rotary scale tells the model, and the written video's rate."""
    max_sequence_length = MAX_SEQUENCE_LENGTH

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        _check_patch(dict(pipe.transformer.config))
        for module in self.transformers():
            mark_cross_attention(module)
        # The pipeline's own numbers (its compression attributes, frame_rate), so the rotary table is the same float.
        self.rope_interpolation_scale = (
            pipe.vae_temporal_compression_ratio / self.fps,
            pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio,
        )
        self._i2v_twin: Any = None

    @classmethod
    def image_use(cls, model_index: dict[str, Any]) -> str:
        # Lightricks' checkpoints are LTXPipeline ones that LTXImageToVideoPipeline loads as they are: --image optional.
        return "required" if model_index.get("_class_name") in cls.i2v_pipeline_classes else "optional"

    @staticmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Geometry from the transformer's and VAE's configs (as loaded, or as read from their JSON files)."""
        temporal, spatial = ltx_vae_scale(vae)
        p = int(transformer.get("patch_size", 1))
        return FamilySpec(
            latent_channels=int(vae.get("latent_channels", 128)),
            patch=(int(transformer.get("patch_size_t", 1)), p, p),
            vae_scale=(temporal, spatial, spatial),
        )

    @staticmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        """Per-layer FLOPs from the config (the released 2B: hidden 32 × 64 = 2048, FFN 4 × 2048 — diffusers'
        ``FeedForward`` default width; cross-attention reads the T5 prompt padded to 128 tokens)."""
        hidden = int(transformer.get("num_attention_heads", 32)) * int(transformer.get("attention_head_dim", 64))
        p = int(transformer.get("patch_size", 1))
        patch = (int(transformer.get("patch_size_t", 1)), p, p)
        return CostModel.from_arch(hidden, 4 * hidden, MAX_SEQUENCE_LENGTH, patch)

    @classmethod
    def check_checkpoint(cls, path: str | Path, config: Any) -> None:
        """Refuse, before any weight loads, a transformer patch other than 1."""
        _check_patch(cls.read_json_configs(path)[0])

    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        sampling: SamplingConfig,
        image: Any | None,
        grid: Grid,
        generators: list[torch.Generator] | None = None,
    ) -> Conditioning:
        """As ``LTXPipeline.__call__``: ``encode_prompt`` (T5 states + boolean mask, padded to 128 tokens), CFG when
        ``guidance_scale > 1`` with the negative prompt's encoding stacked first, as one batch. With an image, as
        ``LTXImageToVideoPipeline``: its latent (sampled from ``generators``) is frame 0, clean."""
        self.check_image(image)
        do_cfg = sampling.guidance_scale > 1.0
        with torch.no_grad():
            embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
                prompt=prompts,
                negative_prompt=negative_prompts,
                do_classifier_free_guidance=do_cfg,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                device=self.device,
            )
        dtype = self.transformer_dtype
        cond: dict[str, Any] = {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask}
        uncond: dict[str, Any] | None = None
        if do_cfg:
            uncond = {"encoder_hidden_states": negative.to(dtype), "encoder_attention_mask": negative_mask}
        if image is None:
            return Conditioning(cond, uncond)
        if generators is None:  # a direct call: the run's seed, as the engine's request generators
            generators = [torch.Generator().manual_seed(sampling.seed) for _ in prompts]
        condition = self._first_frame_condition(image, len(prompts), grid, embeds.dtype, generators)
        for kwargs in (cond, uncond):
            if kwargs is not None:
                kwargs[CLEAN_FIRST_FRAME] = True
        return Conditioning(cond, uncond, condition, [g.get_state() for g in generators])

    def _first_frame_condition(
        self, image: Any, batch: int, grid: Grid, dtype: torch.dtype, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """``LTXImageToVideoPipeline.prepare_latents``' own first frame: the image's VAE latent sampled from
        ``generators[b]``, normalised with the VAE's ``latents_mean`` / ``latents_std``, repeated over the full grid's
        frames so it is a full-size field every stage samples at its coordinates (only frame 0 is read). An
        LTXPipeline checkpoint borrows the I2V pipeline's function through a twin sharing its modules."""
        import diffusers

        pipe = self.pipe
        if not self.is_i2v and self._i2v_twin is None:
            self._i2v_twin = diffusers.LTXImageToVideoPipeline(
                scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                transformer=pipe.transformer,
            )  # fmt: skip
        i2v = pipe if self.is_i2v else self._i2v_twin
        st, sh, sw = self.spec.vae_scale
        height, width, frames = grid.h * sh, grid.w * sw, (grid.t - 1) * st + 1
        with torch.no_grad():
            pixels = pipe.video_processor.preprocess([image] * batch, height=height, width=width)
            packed, _ = i2v.prepare_latents(
                pixels.to(self.device, dtype), batch, self.spec.latent_channels, height, width, frames,
                torch.float32, self.device, list(generators), None,
            )  # fmt: skip
        # Frame 0 of the pipeline's initial latent is the image latent itself (mask 1 there: init·1 + noise·0).
        return unpack(packed, grid)[:, :, :1].expand(-1, -1, grid.t, -1, -1).contiguous()

    def model_input(self, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid) -> torch.Tensor:
        if conditioning.latent_condition is None:
            return x.to(self.transformer_dtype)
        # LTXImageToVideoPipeline's latents hold the image in frame 0 throughout (never stepped).
        condition = sample_at(conditioning.latent_condition, ctx.coords, full)
        return with_first_frame(x, condition).to(self.transformer_dtype)

    def pin_velocity(
        self, v: torch.Tensor, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid
    ) -> torch.Tensor:
        """Image-to-video: frame 0 is the image, known exactly; its velocity points at it (the pipeline does not
        step frame 0, and the model input and the final latent carry the image there, so a full run is unchanged
        while DVG's sketch and temporal upsampling see the image)."""
        if conditioning.latent_condition is None:
            return v
        return pin_first_frame(v, x, sample_at(conditioning.latent_condition, ctx.coords, full), ctx.sigma)

    def final_latent(self, latent: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if conditioning.latent_condition is None:
            return latent
        return with_first_frame(latent, conditioning.latent_condition)

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # LTXPipeline: ``t.expand(B)`` of the scheduler's float32 timesteps.
        return torch.full((batch,), timestep, device=self.device, dtype=torch.float32)

    def forward(
        self, module: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on the packed latent (the engine's batched-CFG pass is ``[x, x]`` against the stacked
        ``[negative, positive]`` text), in float32 as the pipeline takes ``noise_pred.float()``. Image-to-video: the
        timestep per token as ``LTXImageToVideoPipeline`` builds it, ``t · (1 - mask)`` with the mask 1 on frame 0."""
        if kwargs.get(CLEAN_FIRST_FRAME):
            kwargs = {k: v for k, v in kwargs.items() if k != CLEAN_FIRST_FRAME}
            keep = first_frame_mask(tuple(x_in.shape[2:]), x_in.device)  # the pipeline's 1 - conditioning_mask
            t = t.to(x_in.device).unsqueeze(-1) * keep.flatten().unsqueeze(0)
            from ..parallel import sequence_parallel_state

            state = sequence_parallel_state(module)
            if state is not None:
                check_token_shards("LTX-Video image-to-video", t.shape[1], state.groups.layout.sp_degree)
        out = call_transformer(module, x_in, t, self.rope_interpolation_scale, kwargs).float()
        return unpack(out, Grid(*x_in.shape[2:]))

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        # LTXPipeline's own un-normalisation (latents_mean / latents_std / scaling_factor), so decodes match it exactly.
        vae = self.pipe.vae
        return self.pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def decode_input(
        self, z: torch.Tensor, sampling: SamplingConfig, generators: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, float]:
        """As ``LTXPipeline`` before its VAE call: for a timestep-conditioned VAE, ``(1 - s)·z + s·ε`` with ε drawn
        from the requests' generators (the pipeline's ``generator=``; fresh here, as the pipeline's is when given
        ``latents=``) and s = ``decode_noise_scale`` (default: the decode timestep). At 0 the mix is the identity, so
        it is skipped."""
        t = sampling.decode_timestep
        scale = t if sampling.decode_noise_scale is None else sampling.decode_noise_scale
        if not self.pipe.vae.config.timestep_conditioning or (t == 0 and scale == 0):
            return z, t
        from diffusers.utils.torch_utils import randn_tensor

        if generators is None:  # a direct call: the run's seed, as the engine's request generators
            generators = [torch.Generator().manual_seed(sampling.seed) for _ in range(z.shape[0])]
        noise = randn_tensor(z.shape, generator=list(generators), device=z.device, dtype=z.dtype)
        s = torch.tensor([scale] * z.shape[0], device=z.device, dtype=z.dtype)[:, None, None, None, None]
        return (1 - s) * z + s * noise, t

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        z = self.vae_input(latents.to(vae.device, vae.dtype))
        with torch.no_grad():
            video = vae.decode(z, decode_timestep(vae, z.shape[0], z.dtype, z.device), return_dict=False)[0]
        return self.postprocess(video)


def _check_patch(transformer: dict[str, Any]) -> None:
    p, pt = int(transformer.get("patch_size", 1)), int(transformer.get("patch_size_t", 1))
    if (p, pt) != (1, 1):
        raise InputError(
            f"LTX-Video transformers with patch_size {p} / patch_size_t {pt} are not supported: LTXPipeline gives the "
            "rotary embedding the latent's own sizes, which only patch 1 (every released checkpoint) matches"
        )
