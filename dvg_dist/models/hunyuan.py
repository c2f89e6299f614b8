"""The HunyuanVideo (T2V) adapter and its sequence plan, on diffusers' own ``HunyuanVideoPipeline`` /
``HunyuanVideoTransformer3DModel``.

HunyuanVideo's ``guidance_scale`` is *embedded* (distilled) guidance: a tensor the transformer embeds, one pass
per step. Real classifier-free guidance is the pipeline's ``true_cfg_scale > 1`` with a negative prompt, which
adds the unconditional pass; that scale is what combines the two passes here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import SamplingConfig
from ..dvg.planner import CostModel, Grid
from .base import Adapter, Conditioning, FamilySpec, InputError, SequencePlan
from .tiny import TINY_META_FILE

# The sequence-parallel layout of HunyuanVideoTransformer3DModel (diffusers declares no ``_cp_plan`` for it).
# Its forward: ``rope(latent)`` → (cos, sin), each ``[N, head_dim]`` with the video tokens on dim 0;
# ``x_embedder`` (the patch embedding) → ``[B, N, D]``; ``context_embedder`` → the text tokens; the attention
# mask ``[B, 1, 1, N + L_text]`` is then built from ``x_embedder``'s output length; 20 dual-stream
# ``transformer_blocks`` and 40 single-stream ``single_transformer_blocks`` run joint attention over
# ``[video tokens, text tokens]``; ``norm_out`` → ``proj_out`` → unpatchify.
# - Split the video tokens at ``x_embedder``'s output (its only output, key "0"), not at the first block's
#   input: the mask is built between the two, so a split there makes it ``[local video, text]`` — the layout
#   each rank's tokens actually have (the mask only hides the padded tail of the text).
# - Split the rotary cos/sin (``rope`` outputs 0 and 1) on dim 0, the same token order.
# - Text tokens are REPLICATED: in joint attention they are appended to the video tokens of every rank, and
#   the attention must attend them once (not once per rank); they flow through every block as
#   ``encoder_hidden_states``, so they are declared where they enter the first block.
# - Gather ``proj_out``'s output on dim 1 so every rank unpatchifies the whole velocity.
HUNYUAN_SEQUENCE_PLAN = SequencePlan(
    split_inputs={"rope": {"0": 0, "1": 0}, "x_embedder": {"0": 1}},
    replicated_inputs={"transformer_blocks.0": ("encoder_hidden_states",)},
    gather_outputs={"proj_out": 1},
)

MAX_SEQUENCE_LENGTH = 256
"""Llama prompt tokens after the template crop: ``HunyuanVideoPipeline``'s ``max_sequence_length`` default."""


def prompt_template_of(path: str | Path | None) -> dict[str, Any] | None:
    """The ``prompt_template`` a tiny checkpoint directory declares in its ``dvg_tiny.json``; None otherwise
    (a real checkpoint, a hub id, or no path) — the pipeline's own default template then applies.

    The tiny checkpoints' character-level tokenizer makes the default template far longer than its fixed
    95-token crop, which would cut the user prompt away silently; they ship a template sized for themselves.
    """
    if path is None:
        return None
    meta = Path(path) / TINY_META_FILE
    if not meta.is_file():
        return None
    try:
        template = json.loads(meta.read_text()).get("prompt_template")
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{meta}: cannot read it ({e})") from None
    if template is None:
        return None
    if not isinstance(template, dict) or "template" not in template:
        raise InputError(f"{meta}: prompt_template must be a mapping with a 'template' key")
    return dict(template)


class HunyuanVideoAdapter(Adapter):
    """``HunyuanVideoPipeline`` (text-to-video): embedded guidance, optional true CFG, FlowMatchEuler."""

    family = "hunyuanvideo"
    pipeline_classes = ("HunyuanVideoPipeline",)
    sequence_plan = HUNYUAN_SEQUENCE_PLAN
    fps = 24  # HunyuanVideo is trained on and shown at 24 fps
    max_sequence_length = MAX_SEQUENCE_LENGTH

    def __init__(self, pipe: Any, prompt_template: dict[str, Any] | None = None) -> None:
        """``prompt_template``: None takes the checkpoint directory's ``dvg_tiny.json`` one if there is one
        (found through the path ``from_pretrained`` loaded it from), else the pipeline's default."""
        super().__init__(pipe)
        if prompt_template is None:
            prompt_template = prompt_template_of(getattr(pipe, "name_or_path", None))
        self.prompt_template = prompt_template

    @staticmethod
    def spec_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> FamilySpec:
        """Geometry from the transformer's and VAE's configs (as loaded, or as read from their JSON files)."""
        p = int(transformer.get("patch_size", 2))
        return FamilySpec(
            latent_channels=int(vae.get("latent_channels", 16)),
            patch=(int(transformer.get("patch_size_t", 1)), p, p),
            vae_scale=(
                int(vae.get("temporal_compression_ratio", 4)),
                int(vae.get("spatial_compression_ratio", 8)),
                int(vae.get("spatial_compression_ratio", 8)),
            ),
        )

    @staticmethod
    def cost_model_from_config(transformer: dict[str, Any]) -> CostModel:
        """Per-layer FLOPs from the config (the released 13B: hidden 24×128 = 3072, FFN 4×3072, as the
        ``hunyuanvideo`` preset).

        HunyuanVideo has joint attention, not cross-attention: the 256 text tokens are appended to the video
        tokens, so each video token's attention scores reach ``L + 256`` keys — the same ``4d·L_text`` linear
        term ``CostModel.from_arch`` counts for cross-attention, plus the quadratic ``4d·L²``. ``from_arch``
        also counts cross-attention q/o projections (4d² per token), which joint attention does not have, and
        the text stream's own projections and FFN, constant in L, are left out (``CostModel`` has no constant
        term): both slightly shift the FLOP density, never the plan's token density.
        """
        hidden = int(transformer.get("num_attention_heads", 24)) * int(transformer.get("attention_head_dim", 128))
        ffn = int(float(transformer.get("mlp_ratio", 4.0)) * hidden)
        p = int(transformer.get("patch_size", 2))
        patch = (int(transformer.get("patch_size_t", 1)), p, p)
        return CostModel.from_arch(hidden, ffn, MAX_SEQUENCE_LENGTH, patch)

    def encode(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        sampling: SamplingConfig,
        image: Any | None,
        grid: Grid,
        generators: list[torch.Generator] | None = None,
    ) -> Conditioning:
        """As ``HunyuanVideoPipeline.__call__``: ``encode_prompt`` (Llama hidden states + mask, CLIP pooled),
        cast to the transformer's dtype; the embedded guidance ``guidance_scale × 1000`` in both passes; the
        negative prompt's encoding as the unconditional pass when ``true_cfg_scale > 1``."""
        self.check_image(image)
        # As the pipeline: true CFG iff true_cfg_scale > 1 and a negative prompt is given ("" counts).
        do_true_cfg = sampling.true_cfg_scale > 1.0 and negative_prompts is not None
        cond = self._encode(prompts)
        uncond = self._encode(negative_prompts) if do_true_cfg and negative_prompts is not None else None
        # The pipeline builds it in the transformer's dtype, one value per video: [g] * B * 1000.
        guidance = (
            torch.tensor([sampling.guidance_scale] * len(prompts), dtype=self.transformer_dtype, device=self.device)
            * 1000.0
        )
        cond["guidance"] = guidance
        if uncond is not None:
            uncond["guidance"] = guidance
        return Conditioning(cond, uncond)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        """One batch of prompts → the transformer's text kwargs, as the pipeline encodes and casts them."""
        kwargs: dict[str, Any] = {"prompt": prompts, "device": self.device, "max_sequence_length": MAX_SEQUENCE_LENGTH}
        if self.prompt_template is not None:
            kwargs["prompt_template"] = self.prompt_template
        with torch.no_grad():
            embeds, pooled, mask = self.pipe.encode_prompt(**kwargs)
        dtype = self.transformer_dtype
        return {
            "encoder_hidden_states": embeds.to(dtype),
            "encoder_attention_mask": mask.to(dtype),
            "pooled_projections": pooled.to(dtype),
        }

    def guidance_for(self, timestep: float, sampling: SamplingConfig) -> float:
        # guidance_scale is embedded in the cond kwargs; the two passes combine with the true-CFG scale.
        return sampling.true_cfg_scale

    def timestep_tensor(self, timestep: float, batch: int) -> torch.Tensor:
        # HunyuanVideoPipeline: ``t.expand(B).to(latents.dtype)`` with float32 latents.
        return torch.full((batch,), timestep, device=self.device, dtype=torch.float32)
