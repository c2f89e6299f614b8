"""The CogVideoX 1.5 adapter (T2V and I2V) and its sequence plan, on diffusers' own ``CogVideoXPipeline`` /
``CogVideoXImageToVideoPipeline`` / ``CogVideoXTransformer3DModel``.

What the two pipelines' ``__call__`` do, and how this adapter reproduces it with their own functions:

- Latent layout: the pipelines hold latents as ``[B, F, C, H, W]``; the engine's are ``[B, C, T, H, W]``.
  :meth:`CogVideoXAdapter.forward` permutes around the transformer call and back.
- Frames: the VAE takes ``4k + 1`` pixel frames (``k + 1`` latent frames); CogVideoX 1.5's transformer patches
  ``patch_size_t = 2`` latent frames together, so the pipelines pad an odd latent frame count with one extra latent
  frame *in front* (``additional_frames``), denoise it along, and drop it before decoding. The released recipe (81
  frames → 21 latent frames) needs it, so it is reproduced exactly, not refused: the full latent grid includes the
  padding frame (:meth:`CogVideoXSpec.latent_grid`) and :meth:`CogVideoXAdapter.final_latent` drops it.
- Stage grids: the planner keeps every reduced stage's latent frame count a multiple of ``patch_size_t``
  (``FamilySpec.temporal_multiple``), so every stage runs whole temporal patches and the cost model counts what runs.
  :meth:`CogVideoXAdapter.forward` still takes any grid: an odd frame count gets the pipelines' own kind of padding
  (its first latent frame repeated in front, the image-latent convention of the I2V pipeline) and the output's
  padding frame is dropped.
- Prompts: ``pipe.encode_prompt`` (T5, padded to 226 tokens, the pipelines' ``max_sequence_length``); the
  negative prompt only under CFG (``guidance_scale > 1``).
- Timestep: ``t.expand(B)``, the scheduler's int64 timestep. Guidance: plain CFG ``uncond + g·(cond - uncond)``,
  or with ``use_dynamic_cfg`` the pipelines' cosine schedule of the scale over the timestep
  (:meth:`CogVideoXAdapter.guidance_for`).
- Rotary positions: ``pipe._prepare_rotary_positional_embeddings`` for the grid of each call (every DVG stage
  its own), passed as ``image_rotary_emb``; the positions are slices of the transformer's ``sample_height`` /
  ``sample_width`` table, so larger sizes are refused.
- I2V (CogVideoX 1.5 layout, ``in_channels = 2·C``): ``pipe.prepare_latents`` encodes the image and lays the
  condition latents out over the padded frames (the image latent in frame 0, zeros after), concatenated on
  channels; the base ``Adapter.model_input`` samples them at each stage's coordinates. ``ofs`` is the pipeline's
  ``latents.new_full((1,), 2.0)`` when the transformer has an ``ofs_embed_dim``.
- Decode: ``vae.decode(1 / scaling_factor · latents)`` (that exact arithmetic) then
  ``video_processor.postprocess_video``.

Guidance runs as the pipelines run it, the unconditional and conditional passes as one batch of 2B
(``batched_cfg``; ``ofs`` passed once, as they pass it); under CFG-parallel each half of the ranks runs one branch at
batch B instead, the same video up to float round-off (a batch-1 matrix product rounds differently from a batch-2
one on CPU). The I2V image latent is sampled (``latent_dist.sample``) from the request's generator, which the DPM
scheduler's step noise then continues, as the pipeline's ``generator`` (``Conditioning.generator_states``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from .base import Adapter, Conditioning, FamilySpec, InputError, SequencePlan

# CogVideoXTransformer3DModel has no diffusers ``_cp_plan``. Its forward: ``patch_embed(encoder_hidden_states,
# hidden_states)`` projects both and concatenates ``[text, video]``; the forward splits them again before the blocks;
# every ``CogVideoXBlock`` runs joint attention over ``[text, video]`` (``CogVideoXAttnProcessor2_0``, which calls
# torch's SDPA itself) and per-token norms and FFN; ``norm_final`` → ``norm_out`` → ``proj_out`` → unpatchify.
# - The rotary ``(cos, sin)`` comes in as the transformer's ``image_rotary_emb`` kwarg, each ``[T'·H'·W', D]``:
#   split on dim 0 at the root, so every block gets this rank's rows (it is the first split: it fixes the forward's
#   token count).
# - The video tokens are split where they enter the first block (``hidden_states [B, L, D]``), after the patch
#   embedding; the blocks' outputs stay sharded from block to block.
# - Text tokens are REPLICATED: the joint attention must attend them once, and the text stream is updated by every
#   block, so every rank computes it whole; the attention puts them first (``direct_sdpa_text="first"``).
# - ``proj_out``'s output is gathered on dim 1 so every rank unpatchifies the whole velocity.
COGVIDEOX_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"": {"image_rotary_emb": 0}, "transformer_blocks.0": {"hidden_states": 1}},
    replicated_inputs={"transformer_blocks.0": ("encoder_hidden_states",)},
    gather_outputs={"proj_out": 1},
    direct_sdpa_text="first",
)

MAX_SEQUENCE_LENGTH = 226
"""T5 prompt tokens: the pipelines' ``max_sequence_length`` default (every forward carries all of them)."""

PAD_FRAMES = "dvg_cogvideox_pad_frames"
"""A conditioning entry (not a transformer kwarg: :meth:`CogVideoXAdapter.forward` takes it out): the latent frames
the pipeline pads in front of the video, dropped by :meth:`CogVideoXAdapter.final_latent`. It rides in the kwargs so
it reaches every rank with the broadcast conditioning."""

OFS = 2.0
"""The ``ofs`` value both CogVideoX 1.5 I2V pipelines pass (``latents.new_full((1,), fill_value=2.0)``)."""


@dataclass(frozen=True)
class CogVideoXSpec(FamilySpec):
    """CogVideoX 1.5's geometry: the VAE's ``4k + 1`` frames, sizes in whole patches of 16 pixels, latent frames
    padded in front to a multiple of ``patch_size_t`` as the pipelines pad them, and at most the rotary table's
    ``sample_height × sample_width`` latent pixels."""

    max_latent_hw: tuple[int, int] = (300, 300)

    def pad_frames(self, latent_frames: int) -> int:
        """The pipelines' ``additional_frames`` for ``latent_frames`` unpadded latent frames."""
        return -latent_frames % self.patch[0]

    def latent_grid(self, width: int, height: int, frames: int) -> Grid:
        grid = super().latent_grid(width, height, frames)
        max_h, max_w = self.max_latent_hw
        if grid.h > max_h or grid.w > max_w:
            _, sh, sw = self.vae_scale
            raise InputError(
                f"size {width}x{height}: this CogVideoX checkpoint's rotary positions reach at most "
                f"{max_w * sw}x{max_h * sh} (transformer sample_width x sample_height); nearest valid: "
                f"{min(width, max_w * sw)}x{min(height, max_h * sh)}"
            )
        return Grid(grid.t + self.pad_frames(grid.t), grid.h, grid.w)


class CogVideoXAdapter(Adapter):
    """``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline`` of CogVideoX 1.5 (``patch_size_t = 2``, rotary)."""

    family = "cogvideox"
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")
    i2v_pipeline_classes = ("CogVideoXImageToVideoPipeline",)
    sequence_plan = COGVIDEOX_SEQUENCE_PLAN
    fps = 16  # CogVideoX 1.5 is trained on and shown at 16 fps
    max_sequence_length = MAX_SEQUENCE_LENGTH
    batched_cfg = True
    dynamic_cfg = True
    shared_cfg_kwargs = frozenset({"ofs"})
    scheduler_permutation = (0, 2, 1, 3, 4)
    """The engine's ``[B, C, T, H, W]`` → the pipelines' ``[B, F, C, H, W]``: the solver steps there, so the DPM
    scheduler draws its noise in the pipelines' layout and order."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        cfg = pipe.transformer.config
        if cfg.patch_size_t is None or not cfg.use_rotary_positional_embeddings:
            # CogVideoX 1.0 (no temporal patch; 2B: sin-cos positions tied to its one 720x480x49 size) is another
            # layout: its rotary crop region and fixed-size positional embeddings have no per-stage-grid rule here.
            raise InputError(
                "CogVideoX: only the 1.5 layout is supported (patch_size_t and rotary positions); this checkpoint "
                f"has patch_size_t={cfg.patch_size_t}, use_rotary_positional_embeddings="
                f"{cfg.use_rotary_positional_embeddings}"
            )
        self._rotary: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- geometry ------------------------------------------------------------------------------------

    @staticmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Latent channels from the VAE (``in_channels`` of the transformer is 2·C for I2V), spatial compression
        ``2^(len(block_out_channels) - 1)`` as the pipelines compute it, patch ``(patch_size_t, p, p)``."""
        p = int(transformer.get("patch_size", 2))
        pt = int(transformer.get("patch_size_t") or 1)
        spatial = 2 ** (len(vae.get("block_out_channels", (128, 256, 256, 512))) - 1)
        return CogVideoXSpec(
            latent_channels=int(vae.get("latent_channels", 16)),
            patch=(pt, p, p),
            vae_scale=(int(vae.get("temporal_compression_ratio", 4)), spatial, spatial),
            max_latent_hw=(int(transformer.get("sample_height", 60)), int(transformer.get("sample_width", 90))),
        )

    @staticmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        """Per-layer FLOPs from the config (CogVideoX1.5-5B: hidden 48×64 = 3072, FFN 4×3072, 226 text tokens).

        Joint attention, as HunyuanVideo's: the 226 text tokens are concatenated to the video tokens, so each video
        token's scores reach ``L + 226`` keys — the ``4d·L_text`` linear term ``CostModel.from_arch`` counts for
        cross-attention — plus the quadratic ``4d·L²``. ``from_arch`` also counts cross-attention q/o projections,
        which joint attention does not have, and the text stream's own projections and FFN (constant in L) are
        left out: both shift the FLOP density slightly, never the token density. Tokens are counted on
        ``ceil(T / patch_size_t)`` temporal patches, which is what the padded stage inputs run."""
        hidden = int(transformer.get("num_attention_heads", 48)) * int(transformer.get("attention_head_dim", 64))
        p = int(transformer.get("patch_size", 2))
        pt = int(transformer.get("patch_size_t") or 1)
        # FeedForward's default inner width is 4·dim.
        return CostModel.from_arch(hidden, 4 * hidden, MAX_SEQUENCE_LENGTH, (pt, p, p))

    # -- conditioning --------------------------------------------------------------------------------

    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        sampling: SamplingConfig,
        image: Any | None,
        grid: Grid,
        generators: list[torch.Generator] | None = None,
    ) -> Conditioning:
        pipe = self.pipe
        self.check_image(image)
        do_cfg = sampling.guidance_scale > 1.0  # as the pipelines
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(
                prompt=prompts,
                negative_prompt=negative_prompts,
                do_classifier_free_guidance=do_cfg,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
        dtype = self.transformer_dtype
        spec = self.spec
        assert isinstance(spec, CogVideoXSpec)
        unpadded = (sampling.frame_num - 1) // spec.vae_scale[0] + 1
        pad = grid.t - unpadded
        if pad != spec.pad_frames(unpadded):
            raise InputError(f"CogVideoX: latent grid {grid} does not fit {sampling.frame_num} frames")
        cond_kwargs: dict[str, Any] = {"encoder_hidden_states": cond.to(dtype), PAD_FRAMES: pad}
        uncond_kwargs: dict[str, Any] | None = None
        if do_cfg:
            uncond_kwargs = {"encoder_hidden_states": uncond.to(dtype), PAD_FRAMES: pad}
        if pipe.transformer.config.ofs_embed_dim is not None:
            ofs = torch.full((1,), OFS, dtype=dtype, device=self.device)
            for kwargs in (cond_kwargs, uncond_kwargs):
                if kwargs is not None:
                    kwargs["ofs"] = ofs
        if not self.is_i2v:
            return Conditioning(cond_kwargs, uncond_kwargs)
        if generators is None:  # a direct call: the run's seed, as the engine's request generators
            generators = [torch.Generator().manual_seed(sampling.seed) for _ in prompts]
        latent_condition = self._image_condition(image, len(prompts), grid, generators)
        return Conditioning(cond_kwargs, uncond_kwargs, latent_condition, [g.get_state() for g in generators])

    def _image_condition(self, image: Any, batch: int, grid: Grid, generators: list[torch.Generator]) -> torch.Tensor:
        """The I2V pipeline's condition latents ``[B, C, T, H, W]`` at full size over the padded frames, from its own
        ``video_processor.preprocess`` and ``prepare_latents``: image b's latent sampled from ``generators[b]`` (the
        pipeline's list of generators), which the DPM steps then continue."""
        pipe = self.pipe
        st, sh, sw = self.spec.vae_scale
        height, width, frames = grid.h * sh, grid.w * sw, (grid.t - 1) * st + 1
        dtype, device = self.transformer_dtype, self.device
        with torch.no_grad():
            pixels = pipe.video_processor.preprocess([image] * batch, height=height, width=width).to(device, dtype)
            placeholder = torch.zeros(batch, grid.t, self.spec.latent_channels, grid.h, grid.w, dtype=dtype)
            _, image_latents = pipe.prepare_latents(
                pixels, batch, self.spec.latent_channels, frames, height, width, dtype, device, list(generators),
                placeholder.to(device),
            )  # fmt: skip
        return image_latents.permute(0, 2, 1, 3, 4).contiguous()

    # -- one transformer pass ------------------------------------------------------------------------

    def guidance_for(self, timestep: float, sampling: SamplingConfig) -> float:
        """``guidance_scale``; with ``sampling.use_dynamic_cfg`` the pipelines' schedule
        ``1 + g·(1 - cos(π·((N - t) / N)^5)) / 2`` with N the step count and t the current timestep, as they
        compute it in Python floats."""
        g = sampling.guidance_scale
        if not sampling.use_dynamic_cfg:
            return g
        n = sampling.steps
        return 1 + g * ((1 - math.cos(math.pi * ((n - timestep) / n) ** 5.0)) / 2)

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # ``t.expand(B)`` of the scheduler's int64 timesteps.
        return torch.full((batch,), round(timestep), device=self.device, dtype=torch.int64)

    def rotary(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_rotary_emb`` for a ``[frames, height, width]`` latent input: the pipeline's own
        ``_prepare_rotary_positional_embeddings`` at that grid's pixel size, kept per grid (a run has at most four)."""
        key = (frames, height, width)
        if key not in self._rotary:
            _, sh, sw = self.spec.vae_scale
            self._rotary[key] = self.pipe._prepare_rotary_positional_embeddings(
                height * sh, width * sw, frames, self.device
            )
        return self._rotary[key]

    def forward(
        self, module: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer on ``[B, F, C, H, W]`` as the pipelines call it, with this grid's rotary table; a stage
        grid with a frame count that is not a multiple of ``patch_size_t`` gets its first frame repeated in front
        (the padding is dropped from the output). Returns float32 ``[B, C, T, H, W]``, as the pipelines take
        ``noise_pred.float()``."""
        kwargs = dict(kwargs)
        kwargs.pop(PAD_FRAMES, None)
        pad = -x_in.shape[2] % self.spec.patch[0]
        if pad:
            x_in = torch.cat([x_in[:, :, :1].expand(-1, -1, pad, -1, -1), x_in], dim=2)
        frames, height, width = x_in.shape[2:]
        out = module(
            hidden_states=x_in.permute(0, 2, 1, 3, 4),
            timestep=t,
            image_rotary_emb=self.rotary(frames, height, width),
            return_dict=False,
            **kwargs,
        )[0]
        return out.float().permute(0, 2, 1, 3, 4)[:, :, pad:]

    # -- decode --------------------------------------------------------------------------------------

    def final_latent(self, latent: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The pipelines' ``latents[:, additional_frames:]``: the padding frames in front are dropped."""
        return latent[:, :, int(conditioning.cond.get(PAD_FRAMES, 0)) :]

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        # The pipelines' decode_latents: ``1 / vae_scaling_factor_image * latents`` (not a division: bit for bit).
        return 1 / self.pipe.vae_scaling_factor_image * latents
