"""The LTX-Video adapter (``LTXPipeline``, text-to-video) and its sequence plan, on diffusers' own
``LTXVideoTransformer3DModel`` and ``AutoencoderKLLTXVideo``.

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
- **Guidance.** Plain CFG, ``uncond + g·(cond − uncond)`` in float32 on ``noise_pred.float()``, with the two branches
  run as **one batch** ``[negative, positive]``. Batch 1 and batch 2 round differently (a matrix–vector product in
  the timestep embedder at batch 1), so to equal the pipeline bit for bit the adapter declares ``batched_cfg`` and the
  engine runs that batch (``runtime/guidance.py``). Under CFG-parallel (``--use_cfg_parallel``, or a ``cfg2`` stage
  layout) each half of the ranks runs one branch at batch 1 instead: the same video up to that round-off. The
  pipeline's ``guidance_rescale`` (default 0) has no config key: it is always 0 here.
- **Schedule.** ``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting`` and ``shift_terminal``: ``mu`` from
  the video's latent size, ``sigmas = linspace(1, 1/N, N)`` (``runtime/solver.py``, ``DynamicShiftSolver``).
- **Decode.** ``_denormalize_latents`` with the VAE's ``latents_mean`` / ``latents_std`` / ``scaling_factor``, then the
  VAE at the pipeline's default ``decode_timestep`` 0 (``decode_noise_scale`` then 0: no noise is mixed in). A
  timestep-conditioned VAE (LTX-Video 0.9.1+) is given that timestep; an unconditioned one (0.9.0) none.

Not supported (the adapter registry refuses their checkpoints in one line): ``LTXConditionPipeline``, whose
conditions at other frames are either blended into latent frames ``frame_index // 8`` on or appended as extra
tokens carrying their own pixel coordinates (``video_coords``), with a denoise strength: at a DVG stage with fewer
latent frames those positions have no exact counterpart, so its conditioning would have to be re-derived per stage
grid; ``LTXImageToVideoPipeline`` (a clean frame 0 with per-token timesteps, the same shape as Wan 2.2 TI2V's
image-to-video, which is supported: not built yet); transformer patches other than 1 (the pipeline passes the latent
sizes to the rotary embedding, so only patch 1 is self-consistent in diffusers itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from .base import Adapter, Conditioning, FamilySpec, InputError, SequencePlan

# The sequence-parallel layout, as diffusers' own ``_cp_plan`` for LTXVideoTransformer3DModel minus its text split:
# the packed hidden states ``[B, S, C]`` are split at the transformer's input (listed first, so they fix the token
# count), the rotary cos/sin (``rope`` outputs 0 and 1, ``[B, S, D]``, built from the whole grid) with the same
# partition, and ``proj_out`` is gathered so every rank unpacks the whole velocity. Text enters cross-attention only
# (``attn2``, kept local: each rank's queries attend all text tokens), so it is neither split nor declared.
LTX_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"": {"hidden_states": 1}, "rope": {"0": 1, "1": 1}},
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


def decode_timestep(vae: Any, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """What ``LTXPipeline`` passes a VAE's decode as ``temb`` at its default ``decode_timestep`` 0: a zero per video
    for a timestep-conditioned VAE (0.9.1+), None for the others (0.9.0). With ``decode_noise_scale`` left at its
    default (the decode timestep, 0) the pipeline's noise mix ``(1 - 0)·z + 0·ε`` leaves the latent as it is."""
    if not vae.config.timestep_conditioning:
        return None
    return torch.tensor([0.0] * batch, device=device, dtype=dtype)


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
    """``LTXPipeline`` (text-to-video): T5 text in cross-attention, CFG batched as the pipeline, FlowMatch Euler with
    dynamic shifting, the timestep-conditioned LTX VAE."""

    family = "ltx"
    pipeline_classes = ("LTXPipeline",)
    sequence_plan = LTX_SEQUENCE_PLAN
    batched_cfg = True
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
        ``guidance_scale > 1`` with the negative prompt's encoding stacked first, as one batch."""
        if image is not None:
            raise InputError(
                "--image needs an image-to-video checkpoint; this one is text-to-video (LTXPipeline), and "
                "LTXImageToVideoPipeline is not supported yet"
            )
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
        cond = {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask}
        if not do_cfg:
            return Conditioning(cond, None)
        uncond = {"encoder_hidden_states": negative.to(dtype), "encoder_attention_mask": negative_mask}
        return Conditioning(cond, uncond)

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # LTXPipeline: ``t.expand(B)`` of the scheduler's float32 timesteps.
        return torch.full((batch,), timestep, device=self.device, dtype=torch.float32)

    def forward(
        self, module: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on the packed latent (the engine's batched-CFG pass is ``[x, x]`` against the stacked
        ``[negative, positive]`` text), in float32 as the pipeline takes ``noise_pred.float()``."""
        out = call_transformer(module, x_in, t, self.rope_interpolation_scale, kwargs).float()
        return unpack(out, Grid(*x_in.shape[2:]))

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        # LTXPipeline's own un-normalisation (latents_mean / latents_std / scaling_factor), so decodes match it exactly.
        vae = self.pipe.vae
        return self.pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

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
