"""The HunyuanVideo-1.5 adapter (T2V and I2V) and its sequence plan, on diffusers' own ``HunyuanVideo15*`` classes.

What the two pipelines' ``__call__`` do, and how this adapter reproduces it with their own functions:

- Prompts: ``pipe.encode_prompt`` — Qwen2.5-VL hidden states (``hidden_states[-3]``, chat template, padded
  to 1000 tokens after cropping the 108-token system prompt) plus ByT5 embeddings of the quoted text in
  the prompt (zeros and an all-zero mask when there is none). The negative prompt is encoded the same way
  only when the guider runs an unconditional pass.
- Image tokens: T2V passes 729 all-zero SigLIP tokens (the transformer sees ``all(image_embeds == 0)`` and
  masks them out); I2V passes ``pipe.encode_image`` of the resized first frame.
- Condition channels (transformer ``in_channels = 2·C + 1``): ``[latent, condition latents, mask]`` —
  zeros for T2V; for I2V the VAE latent of the image in frame 0 (zeros after) and a mask that is 1 on
  frame 0. ``pipe.prepare_cond_latents_and_mask`` builds them once at full size; the base
  ``Adapter.model_input`` samples them at each DVG stage's coordinates. Frame 0 is always a temporal
  anchor, so at every stage the image latent sits in the first latent frame with mask 1.
- Guidance: the pipelines have no ``guidance_scale`` argument; ``pipe.guider`` (``ClassifierFreeGuidance``)
  combines ``pred_uncond + g·(pred_cond - pred_uncond)`` — the engine's own formula. See
  :meth:`HunyuanVideo15Adapter.guidance_for` for how ``sampling.guidance_scale`` maps onto it.
- Timestep: the scheduler's timestep expanded over the batch in the transformer's dtype.
- MeanFlow (step-distilled, ``use_meanflow``) checkpoints also take ``timestep_r``, the end of the interval whose
  average velocity they return: the I2V pipeline's ``timesteps[i + 1]`` (0 at the last step), here the next
  timestep of the current DVG stage's schedule (:meth:`HunyuanVideo15Adapter.step_kwargs`). diffusers' T2V
  pipeline passes none; the same rule is used for T2V. Only Euler steps are allowed (one step = one interval).
- Decode: ``vae.decode(latents / scaling_factor)`` then ``video_processor.postprocess_video``.

I2V size: the I2V pipeline derives its size from the image's aspect ratio and the transformer's
``target_size`` bucket and resizes the image to it (``video_processor.resize(..., resize_mode="crop")``).
Here the configured ``sampling.size`` is the size: the image is resized and centre-cropped to it with that
same call, so a configured size equal to the pipeline's bucket for the image reproduces the pipeline
exactly (the bucket is logged when it differs).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from ..dvg.sampler import StageContext
from .base import Adapter, Conditioning, FamilySpec, InputError, SequencePlan

logger = logging.getLogger(__name__)

# Text tokens every forward carries in its joint attention, padded or not (the masks do not shorten the
# computation): the pipelines' ``tokenizer_max_length`` (Qwen, after the template crop),
# ``tokenizer_2_max_length`` (ByT5) and ``vision_num_semantic_tokens`` (SigLIP; zeros for T2V).
QWEN_TOKENS, BYT5_TOKENS, IMAGE_TOKENS = 1000, 256, 729

# HunyuanVideo15Transformer3DModel has no diffusers ``_cp_plan``; this is the same idea from its module
# names: the rotary tables ``rope`` returns — ``(freqs_cos, freqs_sin)``, each ``[T·H·W, D/2]`` — split on
# dim 0; the video tokens split before the first dual-stream block (``hidden_states [B, L, D]``); the text
# stream (Qwen + ByT5 + image tokens, reordered valid-first by the transformer) and its mask are kept whole
# on every rank because every block runs *joint* attention over [video, text]; ``proj_out`` is gathered so
# every rank unpatchifies the whole output. Note for sequence parallelism: the attention processor
# left-pads the text mask with True up to the local query length, so the sharded attention must build it
# against the gathered key length.
HUNYUAN15_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"rope": {"0": 0, "1": 0}, "transformer_blocks.0": {"hidden_states": 1}},
    replicated_inputs={"transformer_blocks.0": ("encoder_hidden_states", "attention_mask")},
    gather_outputs={"proj_out": 1},
)


class HunyuanVideo15Adapter(Adapter):
    """``HunyuanVideo15Pipeline`` / ``HunyuanVideo15ImageToVideoPipeline`` (``HunyuanVideo15Transformer3DModel``)."""

    family = "hunyuanvideo15"
    pipeline_classes = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
    i2v_pipeline_classes = ("HunyuanVideo15ImageToVideoPipeline",)
    sequence_plan = HUNYUAN15_SEQUENCE_PLAN
    fps = 24

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.meanflow = bool(getattr(pipe.transformer.config, "use_meanflow", False))
        if self.meanflow:
            _check_meanflow_scheduler(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
        guider: Any = getattr(pipe, "guider", None)
        if type(guider).__name__ != "ClassifierFreeGuidance":
            raise InputError(f"HunyuanVideo-1.5: expected a ClassifierFreeGuidance guider; got {type(guider).__name__}")
        cfg = guider.config
        if cfg.guidance_rescale > 0 or cfg.start != 0.0 or cfg.stop != 1.0:
            # The engine combines the two passes with the plain CFG formula at every step.
            raise InputError(
                "HunyuanVideo-1.5: the checkpoint's guider uses guidance_rescale/start/stop, which are not supported"
            )
        self.original_formulation = bool(cfg.use_original_formulation)

    # -- geometry ------------------------------------------------------------------------------------

    @staticmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Latent channels and compression from the VAE config, patch ``(patch_size_t, patch_size, patch_size)``
        from the transformer config (diffusers' defaults where a key is missing)."""
        p, pt = int(transformer.get("patch_size", 1)), int(transformer.get("patch_size_t", 1))
        spatial = int(vae.get("spatial_compression_ratio", 16))
        return FamilySpec(
            latent_channels=int(vae.get("latent_channels", 32)),
            patch=(pt, p, p),
            vae_scale=(int(vae.get("temporal_compression_ratio", 4)), spatial, spatial),
        )

    @staticmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        hidden = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
        ffn = int(hidden * float(transformer.get("mlp_ratio", 4.0)))
        p, pt = int(transformer.get("patch_size", 1)), int(transformer.get("patch_size_t", 1))
        # Joint attention: each video token attends to all 1985 text/image tokens (the 4d·L_text term). The
        # text stream's own projections and FFN cost the same at every stage and are left out.
        return CostModel.from_arch(hidden, ffn, QWEN_TOKENS + BYT5_TOKENS + IMAGE_TOKENS, (pt, p, p))

    # -- conditioning --------------------------------------------------------------------------------

    def do_cfg(self, sampling: SamplingConfig) -> bool:
        """Whether the unconditional pass runs: as ``ClassifierFreeGuidance._is_cfg_enabled`` decides for
        ``guidance_scale = sampling.guidance_scale`` (off at 1, or at 0 in the original formulation)."""
        off = 0.0 if self.original_formulation else 1.0
        return not math.isclose(sampling.guidance_scale, off)

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
        batch, dtype, device = len(prompts), self.transformer_dtype, self.device
        do_cfg = self.do_cfg(sampling)
        own = float(pipe.guider.config.guidance_scale)
        if do_cfg and math.isclose(own, 0.0 if self.original_formulation else 1.0):
            logger.warning(
                "the checkpoint's guider is at %g (a guidance-distilled checkpoint: one pass per step); running CFG at "
                "%g as configured doubles the passes (--guidance_scale %g runs one)",
                own, sampling.guidance_scale, own,
            )  # fmt: skip
        with torch.no_grad():
            cond = self._prompt_kwargs(prompts, batch)
            uncond = self._prompt_kwargs(negative_prompts, batch) if do_cfg else None
            _, sh, sw = self.spec.vae_scale
            height, width = grid.h * sh, grid.w * sw
            placeholder = torch.zeros(
                batch, self.spec.latent_channels, grid.t, grid.h, grid.w, dtype=dtype, device=device
            )
            if self.is_i2v:
                image = self._resize_image(image, height, width)
                image_embeds = pipe.encode_image(image=image, batch_size=batch, device=device, dtype=dtype)
                cond_latents, mask = pipe.prepare_cond_latents_and_mask(
                    latents=placeholder, image=image, batch_size=batch, height=height, width=width,
                    dtype=dtype, device=device,
                )  # fmt: skip
            else:
                # T2V: 729 zero image tokens (the transformer masks them out) and all-zero condition channels.
                image_embeds = torch.zeros(
                    batch, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, dtype=dtype, device=device
                )
                cond_latents, mask = pipe.prepare_cond_latents_and_mask(placeholder, dtype, device)
        # The image tokens go to both passes, as in the pipelines (they are not a guider input).
        cond["image_embeds"] = image_embeds
        if uncond is not None:
            uncond["image_embeds"] = image_embeds
        return Conditioning(cond, uncond, torch.cat([cond_latents, mask], dim=1))

    def _prompt_kwargs(self, prompts: list[str] | None, batch: int) -> dict[str, Any]:
        """The guider inputs of one pass (``None`` prompts encode as empty strings, as the pipelines do)."""
        embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, dtype=self.transformer_dtype, batch_size=batch
        )
        return {
            "encoder_hidden_states": embeds,
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": embeds_2,
            "encoder_attention_mask_2": mask_2,
        }

    def _resize_image(self, image: Any, height: int, width: int) -> Any:
        """The first frame at the configured size, resized and centre-cropped by the pipeline's own call."""
        pipe = self.pipe
        bucket = pipe.video_processor.calculate_default_height_width(
            height=image.size[1], width=image.size[0], target_size=pipe.target_size
        )
        if tuple(bucket) != (height, width):
            logger.info(
                "image %dx%d: the I2V pipeline would generate %dx%d (its target_size bucket); using the configured "
                "%dx%d", image.size[0], image.size[1], bucket[1], bucket[0], width, height,
            )  # fmt: skip
        return pipe.video_processor.resize(image, height=height, width=width, resize_mode="crop")

    # -- one transformer pass ------------------------------------------------------------------------

    def guidance_for(self, timestep: float, sampling: SamplingConfig) -> float:
        """``sampling.guidance_scale`` *is* the guider's ``guidance_scale``. With the diffusers-native
        formulation (the checkpoints' default) the guider computes ``uncond + g·(cond - uncond)``, the
        engine's formula with the same ``g``; with ``use_original_formulation`` it computes
        ``cond + g·(cond - uncond)``, i.e. the engine's formula with ``g + 1``."""
        g = sampling.guidance_scale
        return g + 1.0 if self.original_formulation else g

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # ``t.expand(B).to(latent_model_input.dtype)``: the latent input is in the transformer's dtype.
        return torch.full((batch,), timestep, device=self.device, dtype=self.transformer_dtype)

    def step_kwargs(self, ctx: StageContext, batch: int) -> dict[str, Any]:
        """MeanFlow checkpoints: ``timestep_r``, the end of the interval whose average velocity the model returns.
        The I2V pipeline passes ``timesteps[i + 1]`` (0 at the last call) in the latents' dtype, which is the
        transformer's; under DVG it is the next timestep of the *current stage's* schedule (each stage has its own
        shift), and at a stage's last call what ``dvg.meanflow_switch_end`` says (:class:`StageContext`)."""
        if not self.meanflow:
            return {}
        return {"timestep_r": self.timestep_tensor(ctx.next_timestep, batch)}

    @classmethod
    def check_checkpoint(cls, path: str | Path, config: Any) -> None:
        transformer, _ = cls.read_json_configs(path)
        if not transformer.get("use_meanflow", False):
            return
        try:
            scheduler = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read the scheduler config ({e})") from None
        _check_meanflow_scheduler(str(scheduler.get("_class_name")), scheduler)


def _check_meanflow_scheduler(name: str, config: dict[str, Any]) -> None:
    """A MeanFlow model returns the *average* velocity over [timestep_r, timestep]: exactly what one Euler step of
    that length needs, and what a multistep or stochastic solver (which treats its inputs as instantaneous
    velocities at one point) must not be given."""
    if name != "FlowMatchEulerDiscreteScheduler":
        raise InputError(
            f"HunyuanVideo-1.5 MeanFlow (use_meanflow) checkpoints need FlowMatchEulerDiscreteScheduler: each call "
            f"returns an average velocity over one step; the checkpoint's scheduler is {name}"
        )
    if config.get("stochastic_sampling", False):
        raise InputError(
            "HunyuanVideo-1.5 MeanFlow (use_meanflow) checkpoints need deterministic Euler steps; the scheduler "
            "sets stochastic_sampling"
        )
