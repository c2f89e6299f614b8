"""The Wan 2.1 / 2.2 adapter (T2V, I2V, the two-expert A14B MoE, and TI2V-5B text- and image-to-video with per-token
timesteps) and its sequence plans, on diffusers' own Wan classes."""

from __future__ import annotations

from typing import Any

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
    pin_first_frame,
    with_first_frame,
)

# The context-parallel layout diffusers itself declares for WanTransformer3DModel (``_cp_plan``): rotary
# cos/sin split after ``rope``, hidden states split before the first block, ``proj_out`` gathered so every
# rank unpatchifies the whole output. Text tokens only enter cross-attention, which stays local. Wan 2.1 / A14B
# pass a 1-D timestep ([B]; ``temb`` is [B, 6, D]): it must never be split, so this plan has no root entry.
WAN_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"rope": {"0": 1, "1": 1}, "blocks.0": {"hidden_states": 1}},
    replicated_inputs={"blocks.0": ("encoder_hidden_states",)},
    gather_outputs={"proj_out": 1},
)

# Wan 2.2 TI2V (``expand_timesteps``): the timestep is per token ([B, S], in the hidden states' token order), so
# diffusers' ``_cp_plan`` also splits the transformer's own ``timestep`` input along dim 1. Listed first, it is
# the forward's first split and fixes the token count; the rotary tables and hidden states then split with the
# same partition (uneven shards included), and every rank's ``temb`` / ``timestep_proj`` / output-norm
# modulation covers exactly its own tokens.
WAN_TI2V_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"": {"timestep": 1}, **WAN_SEQUENCE_PLAN.split_inputs},
    replicated_inputs=WAN_SEQUENCE_PLAN.replicated_inputs,
    gather_outputs=WAN_SEQUENCE_PLAN.gather_outputs,
)


def check_ti2v_shards(tokens: int, sp_degree: int) -> None:
    """Refuse a TI2V forward that would leave a rank without tokens (:func:`check_token_shards`)."""
    check_token_shards("Wan 2.2 TI2V", tokens, sp_degree)


class WanAdapter(Adapter):
    """``WanPipeline`` / ``WanImageToVideoPipeline``; ``transformer_2`` + ``boundary_ratio`` for Wan 2.2 A14B;
    ``WanPipeline(expand_timesteps=True)`` for Wan 2.2 TI2V-5B (text-to-video, and image-to-video with an image;
    ``WanImageToVideoPipeline(expand_timesteps=True)`` needs one)."""

    family = "wan"
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    i2v_pipeline_classes = ("WanImageToVideoPipeline",)
    sequence_plan = WAN_SEQUENCE_PLAN
    max_sequence_length = 512

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.expand_timesteps = bool(getattr(pipe.config, "expand_timesteps", False))
        self._i2v_twin: Any = None
        if self.expand_timesteps:
            # Per instance: a TI2V checkpoint's per-token timestep is split like the hidden states; its videos are
            # 24 fps (Wan2.2-TI2V-5B's sample_fps).
            self.sequence_plan = WAN_TI2V_SEQUENCE_PLAN  # type: ignore[misc]
            self.fps = 24  # type: ignore[misc]
        ratio = getattr(pipe.config, "boundary_ratio", None)
        self.boundary_timestep = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
        if self.boundary_timestep is not None and getattr(pipe, "transformer_2", None) is None:
            raise InputError("the checkpoint sets boundary_ratio but has no transformer_2")

    @classmethod
    def image_use(cls, model_index: dict[str, Any]) -> str:
        # Wan 2.2 TI2V-5B is one model for both tasks: its WanPipeline checkpoint takes an optional first frame.
        if model_index.get("_class_name") == "WanPipeline" and model_index.get("expand_timesteps"):
            return "optional"
        return super().image_use(model_index)

    @property
    def is_moe(self) -> bool:
        return self.boundary_timestep is not None

    @staticmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Geometry from the transformer's and VAE's configs (as loaded, or as read from their JSON files)."""
        return FamilySpec(
            latent_channels=int(vae["z_dim"]),
            patch=tuple(int(p) for p in transformer["patch_size"]),  # type: ignore[arg-type]
            vae_scale=(
                int(vae.get("scale_factor_temporal", 4)),
                int(vae.get("scale_factor_spatial", 8)),
                int(vae.get("scale_factor_spatial", 8)),
            ),
        )

    @staticmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        hidden = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
        patch = tuple(int(p) for p in transformer["patch_size"])
        # Cross-attention reads the umT5 prompt, padded to 512 tokens by WanPipeline.
        return CostModel.from_arch(hidden, int(transformer["ffn_dim"]), 512, patch)  # type: ignore[arg-type]

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
        # As WanPipeline: CFG when guidance_scale > 1 (the low-noise expert's guidance_scale_2 rides along).
        do_cfg = sampling.guidance_scale > 1.0
        self.check_image(image)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(
                prompt=prompts,
                negative_prompt=negative_prompts,
                do_classifier_free_guidance=do_cfg,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
        dtype = self.transformer_dtype
        cond_kwargs: dict[str, Any] = {"encoder_hidden_states": cond.to(dtype)}
        uncond_kwargs: dict[str, Any] | None = {"encoder_hidden_states": uncond.to(dtype)} if do_cfg else None
        latent_condition = None
        if self.expand_timesteps and image is not None:
            latent_condition = self._first_frame_condition(image, len(prompts), grid)
            cond_kwargs[CLEAN_FIRST_FRAME] = True
            if uncond_kwargs is not None:
                uncond_kwargs[CLEAN_FIRST_FRAME] = True
        elif self.is_i2v:
            latent_condition, image_embeds = self._image_condition(image, len(prompts), grid)
            if image_embeds is not None:
                cond_kwargs["encoder_hidden_states_image"] = image_embeds
                if uncond_kwargs is not None:
                    uncond_kwargs["encoder_hidden_states_image"] = image_embeds
        return Conditioning(cond_kwargs, uncond_kwargs, latent_condition)

    def _image_condition(self, image: Any, batch: int, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's own image conditioning: mask + VAE latent of the first frame (full size), and the
        CLIP image embedding where the transformer takes one (Wan 2.1 I2V)."""
        pipe = self.pipe
        st, sh, sw = self.spec.vae_scale
        height, width, frames = grid.h * sh, grid.w * sw, (grid.t - 1) * st + 1
        image_embeds = None
        with torch.no_grad():
            if pipe.transformer.config.image_dim is not None:
                image_embeds = pipe.encode_image(image, self.device).repeat(batch, 1, 1).to(self.transformer_dtype)
            pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
            placeholder = torch.zeros(batch, self.spec.latent_channels, grid.t, grid.h, grid.w, device=self.device)
            _, condition = pipe.prepare_latents(
                pixels, batch, self.spec.latent_channels, height, width, frames, torch.float32, self.device,
                None, placeholder,
            )  # fmt: skip
        return condition, image_embeds

    def _first_frame_condition(self, image: Any, batch: int, grid: Grid) -> torch.Tensor:
        """Wan 2.2 TI2V image-to-video: the image's VAE latent from ``WanImageToVideoPipeline.prepare_latents`` with
        ``expand_timesteps`` (normalised like the latents), repeated over the full grid's frames so it is a full-size
        field every stage samples at its coordinates; only frame 0 is ever used (every stage's frame 0 is the full
        frame 0). A WanPipeline checkpoint borrows the I2V pipeline's function through a twin sharing its modules."""
        import diffusers

        pipe = self.pipe
        if not self.is_i2v and self._i2v_twin is None:
            self._i2v_twin = diffusers.WanImageToVideoPipeline(
                tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                transformer=pipe.transformer, transformer_2=getattr(pipe, "transformer_2", None),
                expand_timesteps=True,
            )  # fmt: skip
        i2v = pipe if self.is_i2v else self._i2v_twin
        st, sh, sw = self.spec.vae_scale
        height, width, frames = grid.h * sh, grid.w * sw, (grid.t - 1) * st + 1
        with torch.no_grad():
            pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
            placeholder = torch.zeros(batch, self.spec.latent_channels, grid.t, grid.h, grid.w, device=self.device)
            _, condition, _ = i2v.prepare_latents(
                pixels, batch, self.spec.latent_channels, height, width, frames, torch.float32, self.device,
                None, placeholder,
            )  # fmt: skip
        return condition.expand(-1, -1, grid.t, -1, -1).contiguous()

    def model_input(self, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid) -> torch.Tensor:
        if not (self.expand_timesteps and conditioning.latent_condition is not None):
            return super().model_input(x, ctx, conditioning, full)
        # As WanImageToVideoPipeline with expand_timesteps: (1 - mask)·condition + mask·latents, mask 0 on frame 0.
        condition = sample_at(conditioning.latent_condition, ctx.coords, full)
        return with_first_frame(x, condition).to(self.transformer_dtype)

    def pin_velocity(
        self, v: torch.Tensor, x: torch.Tensor, ctx: StageContext, conditioning: Conditioning, full: Grid
    ) -> torch.Tensor:
        """Wan 2.2 TI2V image-to-video: frame 0 is the image, known exactly. Its velocity is set to the one that
        points at it (:func:`pin_first_frame`); the model input never reads the latent's frame 0 (it is replaced by
        the image) and the pipeline overwrites it after the last step, so the result of a full run is unchanged —
        but DVG's sketch and its temporal upsampling see the image, not a frame 0 that ran free."""
        if not (self.expand_timesteps and conditioning.latent_condition is not None):
            return v
        return pin_first_frame(v, x, sample_at(conditioning.latent_condition, ctx.coords, full), ctx.sigma)

    def final_latent(self, latent: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if not (self.expand_timesteps and conditioning.latent_condition is not None):
            return latent
        # The pipeline after its loop: latents = (1 - mask)·condition + mask·latents.
        return with_first_frame(latent, conditioning.latent_condition)

    def transformer_for(self, timestep: float) -> tuple[torch.nn.Module, str]:
        # Wan 2.2 A14B: the high-noise expert at t ≥ boundary, decided on the current stage's schedule.
        if self.boundary_timestep is None or timestep >= self.boundary_timestep:
            return self.pipe.transformer, "transformer"
        return self.pipe.transformer_2, "transformer_2"

    def guidance_for(self, timestep: float, sampling: SamplingConfig) -> float:
        low_noise = self.boundary_timestep is not None and timestep < self.boundary_timestep
        if low_noise and sampling.guidance_scale_2 is not None:
            return sampling.guidance_scale_2
        return sampling.guidance_scale

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # WanPipeline passes the scheduler's timestep expanded over the batch: UniPC's are int64, Euler's float.
        unipc = type(self.scheduler).__name__ == "UniPCMultistepScheduler"
        return torch.full((batch,), timestep, device=self.device, dtype=torch.int64 if unipc else torch.float32)

    def forward(
        self, module: torch.nn.Module, x_in: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if self.expand_timesteps:
            kwargs = dict(kwargs)
            t = self.token_timesteps(t, x_in, clean_first_frame=bool(kwargs.pop(CLEAN_FIRST_FRAME, False)))
            from ..parallel import sequence_parallel_state

            state = sequence_parallel_state(module)
            if state is not None:
                check_ti2v_shards(t.shape[1], state.groups.layout.sp_degree)
        return super().forward(module, x_in, t, kwargs)

    def token_timesteps(self, t: torch.Tensor, x_in: torch.Tensor, clean_first_frame: bool = False) -> torch.Tensor:
        """Wan 2.2 TI2V's per-token timestep ``[B, S]`` for the latent ``x_in`` of the current stage, built as
        WanPipeline builds it: an all-ones float32 mask, one entry per patch (``[:, ::ph, ::pw]``; the pipeline
        writes ``::2``, the released patch), times the timestep, flattened in the hidden states' token order. With
        an image (``clean_first_frame``) the mask is 0 on frame 0, as WanImageToVideoPipeline's: those tokens are
        clean, at timestep 0."""
        _, ph, pw = self.pipe.transformer.config.patch_size
        mask = torch.ones(x_in.shape[2:], dtype=torch.float32, device=x_in.device)
        if clean_first_frame:
            mask[0] = 0
        per_token = mask[:, ::ph, ::pw].flatten().unsqueeze(0)
        return per_token * t.to(x_in.device).unsqueeze(1)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        # WanPipeline: un-normalise with the VAE's per-channel latents_mean / latents_std.
        vae = self.pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return latents / inv_std + mean  # the pipeline's own arithmetic, so decodes match it bit for bit
