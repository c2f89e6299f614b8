"""Tiny random-weight diffusers checkpoints, one per supported family, for tests and demos.

Each checkpoint is a complete pipeline directory written by ``save_pretrained`` with the *real* diffusers and
transformers classes at tiny sizes, so it loads through the same ``DiffusionPipeline.from_pretrained(dir)`` path a
user's real checkpoint takes. Nothing is downloaded: tokenizers are built from in-memory vocabularies (a
character / byte alphabet, no merges). Weights are seeded per component, so the same seed gives byte-identical
safetensors files.

Besides the pipeline, every directory holds ``dvg_tiny.json`` (:data:`TINY_META_FILE`): the family, the seed,
the call arguments the tiny tokenizers need (HunyuanVideo's ``prompt_template``) and a note. Latent shapes at
17 frames × 64×64 pixels: Wan ``[B, 16, 5, 8, 8]``, HunyuanVideo ``[B, 16, 5, 8, 8]``, HV-1.5 ``[B, 16, 5, 4, 4]``,
Wan 2.2 TI2V ``[B, 48, 5, 4, 4]``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = (
    "wan",
    "wan-moe",
    "wan-i2v",
    "wan-ti2v",
    "hunyuan",
    "hunyuan15",
    "hunyuan15-i2v",
    "hunyuan15-meanflow",
    "hunyuan15-meanflow-i2v",
    "cogvideox",
    "cogvideox-i2v",
    "ltx",
)
"""Families :func:`build_tiny_checkpoint` writes. The ``-meanflow`` ones are HV-1.5 step-distilled checkpoints:
``use_meanflow=True`` (the transformer takes ``timestep_r``) and a guider at scale 1 (guidance-distilled: one pass).
``wan-ti2v`` is Wan 2.2 TI2V-5B's layout: the Wan 2.2 VAE (48 channels, 4×16×16) and per-token timesteps.
``cogvideox`` / ``cogvideox-i2v`` are CogVideoX 1.5's layout: patch 2×2×2, rotary positions, the v-prediction
``CogVideoXDPMScheduler``; I2V concatenates the image latents on channels and embeds ``ofs``.
``ltx`` is LTX-Video's layout (``LTXPipeline``): patch 1, the 1×32×32 / 8× VAE, the dynamic-shifting FlowMatch
scheduler."""

TINY_META_FILE = "dvg_tiny.json"
"""The per-checkpoint JSON file with what a caller must pass (``prompt_template`` for HunyuanVideo)."""

# Wan: 2 heads × head dim 12 (rotary splits 12 into t/h/w = 4/4/4); UMT5 d_model = transformer text_dim.
_WAN_HEADS, _WAN_HEAD_DIM, _UMT5_DIM = 2, 12, 32
# HunyuanVideo / HV-1.5: 2 heads × head dim 12, rope axes (4, 4, 4) sum to the head dim.
_HV_HEADS, _HV_HEAD_DIM, _HV_ROPE = 2, 12, (4, 4, 4)
_LLM_DIM = 32  # Llama / Qwen hidden size = transformer text_embed_dim
_IMAGE_SIZE = 32  # CLIP / SigLIP vision input (pixels), patch 8 → 16 patches
_HV_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Fork the CPU RNG and seed it from ``(seed, name)``: each component's weights depend only on those two."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield


def _eval(module: Any) -> Any:
    """Inference mode (no dropout) for in-memory use, as ``from_pretrained`` leaves a loaded model."""
    return module.eval()


def _printable() -> list[str]:
    """Printable ASCII without the space (spaces become the Metaspace ``▁`` or byte tokens)."""
    return [chr(i) for i in range(33, 127)]


# --- tokenizers ---------------------------------------------------------------------------------------------


def _umt5_tokenizer() -> Any:
    """A Unigram ``T5Tokenizer`` over ``▁`` + printable ASCII; other characters map to ``<unk>``."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in _printable()]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _llama_tokenizer() -> Any:
    """A sentencepiece-style ``LlamaTokenizer``: ``▁`` + printable ASCII, byte fallback, Llama-3 header tokens."""
    from transformers import LlamaTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]
    headers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokens = specials + headers + ["▁", *_printable()] + [f"<0x{b:02X}>" for b in range(256)]
    return LlamaTokenizerFast(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<unk>",
        padding_side="right",
        additional_special_tokens=headers,
    )


def _clip_tokenizer() -> Any:
    """A byte-level ``CLIPTokenizer``: every byte symbol, alone and with the ``</w>`` word end; no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def _qwen_tokenizer() -> Any:
    """A byte-level ``Qwen2Tokenizer`` (no merges) with the ChatML tokens and a minimal chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet())
    return Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        chat_template=_QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        additional_special_tokens=specials[1:],
    )


# --- components ---------------------------------------------------------------------------------------------


def _umt5(seed: int, vocab_size: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=_UMT5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
    )
    with _seeded(seed, "text_encoder"):
        return _eval(UMT5EncoderModel(cfg))


def _wan_transformer(seed: int, name: str, image: bool) -> Any:
    from diffusers import WanTransformer3DModel

    inner = _WAN_HEADS * _WAN_HEAD_DIM
    with _seeded(seed, name):
        return _eval(
            WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=_WAN_HEADS,
                attention_head_dim=_WAN_HEAD_DIM,
                in_channels=36 if image else 16,  # I2V: 16 noise + 4 mask + 16 condition latents
                out_channels=16,
                text_dim=_UMT5_DIM,
                freq_dim=32,
                ffn_dim=48,
                num_layers=2,
                image_dim=_LLM_DIM if image else None,  # = CLIP vision hidden size
                added_kv_proj_dim=inner if image else None,
            )
        )


def _wan_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLWan

    with _seeded(seed, "vae"):
        return _eval(
            AutoencoderKLWan(
                base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            )
        )


def _clip_vision(seed: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=_LLM_DIM,
        intermediate_size=64,
        projection_dim=_LLM_DIM,
        num_hidden_layers=2,  # Wan takes hidden_states[-2]
        num_attention_heads=2,
        image_size=_IMAGE_SIZE,
        patch_size=8,
    )
    with _seeded(seed, "image_encoder"):
        model = _eval(CLIPVisionModel(cfg))
    proc = CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    return model, proc


def _wan(seed: int, variant: str) -> tuple[Any, dict[str, Any]]:
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    tokenizer = _umt5_tokenizer()
    parts: dict[str, Any] = dict(
        tokenizer=tokenizer,
        text_encoder=_umt5(seed, len(tokenizer)),
        vae=_wan_vae(seed),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=_wan_transformer(seed, "transformer", image=variant == "wan-i2v"),
    )
    if variant == "wan-moe":
        # Wan 2.2 A14B: a high-noise expert (transformer) and a low-noise one (transformer_2), switched at t=875.
        parts.update(transformer_2=_wan_transformer(seed, "transformer_2", image=False), boundary_ratio=0.875)
    if variant == "wan-i2v":
        parts["image_encoder"], parts["image_processor"] = _clip_vision(seed)
        return WanImageToVideoPipeline(**parts), {"notes": "Wan 2.1 I2V: pass image= (PIL); CLIP image encoder."}
    notes = "Wan 2.2 A14B-style MoE, boundary_ratio 0.875." if variant == "wan-moe" else "Wan 2.1 T2V."
    return WanPipeline(**parts), {"notes": notes}


def _wan22_vae(seed: int) -> Any:
    """The Wan 2.2 VAE layout at a tiny width: 48 latent channels, residual blocks, and a 2×2 pixel patchify in
    front (12 = 3 × 2 × 2 input channels), so 4×16×16 compression; per-channel statistics are fixed made-up
    values (not the released ones), so the un-normalisation is exercised."""
    from diffusers import AutoencoderKLWan

    with _seeded(seed, "vae"):
        return _eval(
            AutoencoderKLWan(
                base_dim=4,
                z_dim=48,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[round(0.1 * (i % 7 - 3), 4) for i in range(48)],
                latents_std=[round(1.0 + 0.05 * (i % 5), 4) for i in range(48)],
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_temporal=4,
                scale_factor_spatial=16,
            )
        )


def _wan_ti2v(seed: int) -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 TI2V-5B's layout: ``WanPipeline(expand_timesteps=True)``, a 48-channel transformer, the Wan 2.2 VAE."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _umt5_tokenizer()
    with _seeded(seed, "transformer"):
        transformer = _eval(
            WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=_WAN_HEADS,
                attention_head_dim=_WAN_HEAD_DIM,
                in_channels=48,
                out_channels=48,
                text_dim=_UMT5_DIM,
                freq_dim=32,
                ffn_dim=48,
                num_layers=2,
            )
        )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5(seed, len(tokenizer)),
        vae=_wan22_vae(seed),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        transformer=transformer,
        expand_timesteps=True,
    )
    return pipe, {"notes": "Wan 2.2 TI2V-5B layout: per-token timesteps (expand_timesteps); sizes multiples of 32."}


def _hunyuan(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = _llama_tokenizer(), _clip_tokenizer()
    llama_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LLM_DIM,
        intermediate_size=64,
        num_hidden_layers=3,  # the pipeline takes hidden_states[-3]
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer_2),
        hidden_size=_LLM_DIM,
        intermediate_size=64,
        projection_dim=_LLM_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id,
    )
    with _seeded(seed, "text_encoder"):
        text_encoder = _eval(LlamaModel(llama_cfg))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = _eval(CLIPTextModel(clip_cfg))
    with _seeded(seed, "transformer"):
        transformer = _eval(
            HunyuanVideoTransformer3DModel(
                in_channels=16,
                out_channels=16,
                num_attention_heads=_HV_HEADS,
                attention_head_dim=_HV_HEAD_DIM,
                num_layers=1,
                num_single_layers=1,
                num_refiner_layers=1,
                mlp_ratio=2.0,
                patch_size=2,
                patch_size_t=1,
                text_embed_dim=_LLM_DIM,
                pooled_projection_dim=_LLM_DIM,
                rope_axes_dim=_HV_ROPE,
                guidance_embeds=True,
            )
        )
    with _seeded(seed, "vae"):
        vae = _eval(
            AutoencoderKLHunyuanVideo(
                latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
            )
        )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    # The built-in template crops a fixed 95 tokens: with this character-level tokenizer that would cut the user
    # prompt away silently. Crop exactly the tokens before "{}".
    crop_start = len(tokenizer(_HV_TEMPLATE.split("{}")[0]).input_ids)
    meta = {
        "prompt_template": {"template": _HV_TEMPLATE, "crop_start": crop_start},
        "notes": "Pass prompt_template= to every call; guidance_scale is embedded guidance, real CFG is "
        "true_cfg_scale > 1 with a negative_prompt.",
    }
    return pipe, meta


def _hunyuan15(seed: int, image: bool, meanflow: bool = False) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _qwen_tokenizer(), ByT5Tokenizer()
    qwen_cfg = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LLM_DIM,
        intermediate_size=64,
        num_hidden_layers=3,  # the pipeline takes hidden_states[-3]
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,  # prompts are padded to 1000 + 108 tokens
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    byt5_cfg = T5Config(vocab_size=len(tokenizer_2), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    with _seeded(seed, "text_encoder"):
        text_encoder = _eval(Qwen2_5_VLTextModel(qwen_cfg))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = _eval(T5EncoderModel(byt5_cfg))
    with _seeded(seed, "transformer"):
        transformer = _eval(
            HunyuanVideo15Transformer3DModel(
                in_channels=2 * 16 + 1,  # noise + condition latents + mask
                out_channels=16,
                num_attention_heads=_HV_HEADS,
                attention_head_dim=_HV_HEAD_DIM,
                num_layers=1,
                num_refiner_layers=1,
                mlp_ratio=2.0,
                text_embed_dim=_LLM_DIM,
                text_embed_2_dim=byt5_cfg.d_model,
                image_embed_dim=_LLM_DIM,  # = SigLIP hidden size
                rope_axes_dim=_HV_ROPE,
                target_size=64,
                task_type="i2v" if image else "t2v",
                use_meanflow=meanflow,
            )
        )
    with _seeded(seed, "vae"):
        # The encoder's last block must have ≥ 2 × latent channels (mean + logvar by channel grouping).
        vae = _eval(
            AutoencoderKLHunyuanVideo15(latent_channels=16, block_out_channels=(8, 8, 8, 16, 32), layers_per_block=1)
        )
    parts: dict[str, Any] = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=1.0 if meanflow else 6.0),
    )
    notes = "No guidance_scale argument: replace pipe.guider (ClassifierFreeGuidance). ByT5 runs on quoted text."
    if meanflow:
        notes += " MeanFlow: the transformer takes timestep_r (the next timestep; 0 at the last step)."
    if not image:
        return HunyuanVideo15Pipeline(**parts), {"notes": notes}
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    siglip_cfg = SiglipVisionConfig(
        hidden_size=_LLM_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=_IMAGE_SIZE,
        patch_size=8,
    )
    with _seeded(seed, "image_encoder"):
        parts["image_encoder"] = _eval(SiglipVisionModel(siglip_cfg))
    parts["feature_extractor"] = SiglipImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    return HunyuanVideo15ImageToVideoPipeline(**parts), {"notes": notes + " Size comes from the image."}


def _cogvideox(seed: int, image: bool) -> tuple[Any, dict[str, Any]]:
    """CogVideoX 1.5 (``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline``) at tiny sizes, with the released
    1.5 settings where they shape the computation: ``patch_size_t=2``, rotary positions, no patch bias, the
    ``CogVideoXDPMScheduler`` in v-prediction with trailing spacing and zero-terminal-SNR betas, VAE scaling 0.7 with
    ``invert_scale_latents`` (the 1.5 I2V convention), and for I2V 2·16 input channels plus the ``ofs`` embedding."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = _umt5_tokenizer()
    t5_cfg = T5Config(vocab_size=len(tokenizer), d_model=_LLM_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    with _seeded(seed, "text_encoder"):
        text_encoder = _eval(T5EncoderModel(t5_cfg))
    with _seeded(seed, "transformer"):
        transformer = _eval(
            CogVideoXTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=16,  # rotary splits 16 into t/h/w = 4/6/6
                in_channels=32 if image else 16,
                out_channels=16,
                time_embed_dim=32,
                ofs_embed_dim=32 if image else None,  # added to the time embedding: the same width
                text_embed_dim=_LLM_DIM,
                num_layers=2,
                sample_width=32,  # the rotary table: up to 16x16 patches = 256x256 pixels
                sample_height=32,
                sample_frames=81,
                patch_size=2,
                patch_size_t=2,
                max_text_seq_length=226,
                use_rotary_positional_embeddings=True,
                patch_bias=False,
            )
        )
    with _seeded(seed, "vae"):
        vae = _eval(
            AutoencoderKLCogVideoX(
                block_out_channels=(8, 8, 8, 8),  # 2^3 = 8x spatial, as the released VAE
                latent_channels=16,
                layers_per_block=1,
                norm_num_groups=4,
                temporal_compression_ratio=4,
                sample_height=480,  # the released VAE's: tiles of 240x360 px, so the tiny videos decode untiled
                sample_width=720,
                scaling_factor=0.7,
                invert_scale_latents=True,
            )
        )
    scheduler = CogVideoXDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    notes = (
        "CogVideoX 1.5 layout: sizes multiples of 16 up to 256x256, 4k+1 frames (an odd latent frame count is padded "
        "in front by one frame and dropped after denoising)."
    )
    if image:
        return CogVideoXImageToVideoPipeline(**parts), {"notes": notes + " I2V: image latents on channels, ofs."}
    return CogVideoXPipeline(**parts), {"notes": notes}


def _ltx(seed: int) -> tuple[Any, dict[str, Any]]:
    """LTX-Video (``LTXPipeline``) at tiny sizes with the released layout where it shapes the computation: patch 1
    (one token per latent voxel), hidden 2 × 16 = 32 (like the released 2048, not a multiple of 6: the rotary table
    is padded), cross-attention width = hidden, a T5 encoder; the VAE's 4-pixel patchify and three 2× space-time
    stages (32×32 spatial, 8× temporal), timestep-conditioned as from 0.9.1, made-up per-channel statistics (so the
    normalisation is exercised); the scheduler config LTX-Video ships (dynamic shifting, ``shift_terminal`` 0.1)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = _umt5_tokenizer()
    t5_cfg = T5Config(vocab_size=len(tokenizer), d_model=_LLM_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    with _seeded(seed, "text_encoder"):
        text_encoder = _eval(T5EncoderModel(t5_cfg))
    with _seeded(seed, "transformer"):
        transformer = _eval(
            LTXVideoTransformer3DModel(
                in_channels=16,
                out_channels=16,
                num_attention_heads=2,
                attention_head_dim=16,
                cross_attention_dim=32,
                num_layers=2,
                caption_channels=_LLM_DIM,
            )
        )
    with _seeded(seed, "vae"):
        vae = _eval(
            AutoencoderKLLTXVideo(
                latent_channels=16,
                block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8),
                layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1),
                timestep_conditioning=True,
            )
        )
        vae.latents_mean.copy_(torch.tensor([0.1 * (i % 7 - 3) for i in range(16)]))
        vae.latents_std.copy_(torch.tensor([1.0 + 0.05 * (i % 5) for i in range(16)]))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    notes = "LTX-Video layout: sizes multiples of 32, 8k+1 frames; the pipeline takes packed [B, S, C] latents."
    return pipe, {"notes": notes}


_BUILDERS: dict[str, Callable[[int], tuple[Any, dict[str, Any]]]] = {
    "wan": lambda s: _wan(s, "wan"),
    "wan-moe": lambda s: _wan(s, "wan-moe"),
    "wan-i2v": lambda s: _wan(s, "wan-i2v"),
    "wan-ti2v": _wan_ti2v,
    "hunyuan": _hunyuan,
    "hunyuan15": lambda s: _hunyuan15(s, image=False),
    "hunyuan15-i2v": lambda s: _hunyuan15(s, image=True),
    "hunyuan15-meanflow": lambda s: _hunyuan15(s, image=False, meanflow=True),
    "hunyuan15-meanflow-i2v": lambda s: _hunyuan15(s, image=True, meanflow=True),
    "cogvideox": lambda s: _cogvideox(s, image=False),
    "cogvideox-i2v": lambda s: _cogvideox(s, image=True),
    "ltx": _ltx,
}


def build_tiny_pipeline(family: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The in-memory tiny pipeline of ``family`` and its ``dvg_tiny.json`` metadata (without ``family``/``seed``)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(FAMILIES)}")
    return _BUILDERS[family](seed)


def read_tiny_meta(path: str | Path) -> dict[str, Any]:
    """The ``dvg_tiny.json`` of a tiny checkpoint directory."""
    return json.loads((Path(path) / TINY_META_FILE).read_text())


def build_tiny_checkpoint(family: str, out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny ``family`` pipeline to ``out`` (a diffusers pipeline directory) and return its path.

    Deterministic: the same ``(family, seed)`` gives byte-identical safetensors. Atomic: the pipeline is written
    into a temporary directory next to ``out`` and renamed into place, so a crash leaves no half checkpoint.
    Raises ``ValueError`` for an unknown family or an existing non-empty ``out`` without ``overwrite``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe, meta = build_tiny_pipeline(family, seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta = {"family": family, "seed": seed, **meta}
        (tmp / TINY_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- LoRAs ------------------------------------------------------------------------------------------------

LORA_FORMATS = ("diffusers", "wan")
"""``diffusers``: PEFT names under ``transformer.`` (what ``save_lora_weights`` writes); ``wan``: the original Wan
names under ``diffusion_model.`` with ``lora_down``/``lora_up`` and an ``alpha`` per layer (the layout of the
published distillation LoRAs), which diffusers' ``lora_state_dict`` converts on load."""

# diffusers module name → original Wan name, per block.
_WAN_LORA_NAMES = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo", strict=True)},
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def build_tiny_lora(
    checkpoint: str | Path,
    out: str | Path,
    seed: int = 0,
    component: str = "transformer",
    rank: int = 4,
    fmt: str = "diffusers",
) -> Path:
    """Write a random LoRA (one ``.safetensors`` file) for ``component`` of the Wan checkpoint at ``checkpoint``:
    rank ``rank`` on every attention projection and feed-forward layer of every block.

    ``diffusers``: made the way diffusers' training scripts make one — PEFT's ``LoraConfig`` added to the transformer
    (``add_adapter``), its state dict (``get_peft_model_state_dict``) saved with ``WanPipeline.save_lora_weights``
    (adapter metadata included). ``wan``: the same factors written under the original Wan names. Both factors are
    random (a trained LoRA's ``lora_B`` is not zero), scaled so the adapted model differs clearly from the base one
    and stays well-behaved; the two formats of one ``(seed, component)`` are the same adapter."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {', '.join(LORA_FORMATS)}")
    config_file = Path(checkpoint) / component / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{checkpoint} has no {component} (no {config_file})")
    with _seeded(seed, f"lora-{component}-base"):  # the base weights are not saved; only the LoRA factors are
        model = WanTransformer3DModel.from_config(json.loads(config_file.read_text()))
    targets = list(_WAN_LORA_NAMES)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True))
    with _seeded(seed, f"lora-{component}"), torch.no_grad():
        for module in model.modules():
            if "default" in getattr(module, "lora_A", {}):
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
                down.copy_(torch.randn(down.shape) / down.shape[1] ** 0.5)
                up.copy_(torch.randn(up.shape) * (0.5 / rank**0.5))
    layers = get_peft_model_state_dict(model)  # "blocks.0.attn1.to_q.lora_A.weight": ...
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        WanPipeline.save_lora_weights(
            out.parent, transformer_lora_layers=layers, weight_name=out.name,
            transformer_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": targets},
        )  # fmt: skip
        return out
    alpha = 2.0 * rank  # the wan format's per-layer alpha: scale alpha / rank = 2, folded in by diffusers' converter
    tensors: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        block, rest = key.removeprefix("blocks.").split(".", 1)
        name, factor = rest.rsplit(".lora_", 1)
        stem = f"diffusion_model.blocks.{block}.{_WAN_LORA_NAMES[name]}"
        if factor == "A.weight":
            tensors[f"{stem}.lora_down.weight"] = value.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"{stem}.lora_up.weight"] = (value / 2.0).contiguous()
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out
