"""Train the demo model: a small Wan 2.1-class text-to-video pipeline on the procedural clips, on CPU.

The result is a plain diffusers ``WanPipeline`` directory (``AutoencoderKLWan`` + ``WanTransformer3DModel`` +
``UMT5EncoderModel`` + a local word-level ``T5Tokenizer`` + ``UniPCMultistepScheduler`` in flow mode), so it
loads and samples through the same ``from_pretrained`` → engine path as a real Wan checkpoint.

Recipe (each choice is about a 2-core CPU and a 30-minute budget):

1. **VAE: a fixed, hand-set** ``AutoencoderKLWan`` (:func:`fixed_vae`), not a trained one. ``dim_mult=[1, 1, 1]``
   with both down-sampling levels temporal compresses 4× in time and 4× in space, so 33 frames × 64×64
   pixels give a 9 × 16 × 16 latent (576 transformer tokens at patch 1×2×2): room for DVG's stages (at
   budget 0.5 and 24 steps its sketch is 4 × 8 × 8 and five actions are feasible, s from 0.5 to 0.9 and T₂₃
   from 4 to 6; 5 latent frames left two) at a size a CPU can train on; the standard Wan VAE (8× spatial)
   would leave 8×8. The
   weights make the encoder the 4×4 mean of each pixel frame, the four frames of a latent frame side by side
   in ``z_dim = 12`` channels (RGB × 4 frames), and the decoder its exact inverse up to the pooling
   (nearest up-sampling): reconstruction = the 4×4 block mean, exact in time. Every residual branch and the
   attention projections are zero; the heads' RMS norm and SiLU are made linear (a large constant channel
   fixes the norm, tiny gains keep SiLU in its linear range; error < 1e-3). *Why not train it*: a learnt
   Wan VAE was tried first — the deep, narrow causal VAE reached 8.7 dB reconstruction PSNR after 378 steps
   (6 minutes of the budget), useless as a latent space; 4×4 pooling is exact for the procedural
   backgrounds (their cells are 4 or 8 pixels on the 4-pixel grid) and blurs only the object's edge.
2. **Latents**: every training clip is encoded once and normalised per channel with the dataset's mean / std,
   which are stored as the VAE's ``latents_mean`` / ``latents_std`` — the pipeline un-normalises with exactly
   those before decoding, as for real Wan checkpoints.
3. **Transformer + text encoder**, trained together by rectified flow in WanPipeline's convention:
   ``x_σ = (1-σ)·x0 + σ·ε``, target ``v = ε - x0``, timestep ``1000·σ`` (UniPC's ``flow_prediction`` step takes
   ``x0 = x_σ - σ·v``). σ is uniform, pushed to high noise by the sampler's own shift 3. Captions are dropped
   to ``""`` 10% of the time, so classifier-free guidance works. The text encoder is tiny.py's UMT5 (d_model
   32, dropout off) with a word-level vocabulary over the caption grammar (one token per word), trained jointly.
   The EMA of the weights is saved.
4. **At DVG's grids, not only the full one.** 75% of the batches are trained at one of the reduced grids DVG's
   stages run at (:func:`stage_grids`: every grid of every action the planner keeps at budgets 0.30–0.95),
   the clean latent resized there with the sampler's own ``resize``; 25% at the full grid. DVG runs 17 of its
   24 steps at such grids, and a model trained only at the full size gets them wrong: the first demo model
   (full size only) drew a white-on-black caption in orange-brown at the sketch's size, and its DVG runs
   scored 9.9 / 20.8 / 10.2 dB (texture / motion / mix) against full where the same recipe with stage grids
   scored 16.1 / 29.8 / 18.0 (GPU recipe check, 4.9 k steps, 17 frames; docs/demo-model.md).

Cross-attention padding: ``WanPipeline`` pads every prompt embedding with zeros to 512 tokens, and those
padding tokens *are attended* (they all give one identical key/value). Training with 512 tokens would double
the cost, so training pads to the batch's longest caption + 1 and adds ``log(copies)`` to the padding
columns' attention logits (:class:`_PaddingBias`) — exactly the softmax over 512 tokens, at a fraction of the
cost (tested against the 512-token forward).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..dvg.options import Mode
from ..dvg.planner import Grid, InfeasibleBudget, Planner
from ..dvg.resize import resize
from . import procedural
from .procedural import (
    COLOURS,
    DIRECTIONS,
    KINDS,
    SCALES,
    SHAPES,
    SPEEDS,
    ClipParams,
    make_clip,
    object_coverage,
    training_params,
)

logger = logging.getLogger(__name__)

META_FILE = "dvg_demo.json"
"""Training metadata written next to the pipeline."""
TEXT_LENGTH = 512
"""WanPipeline's ``max_sequence_length``: prompt embeddings are zero-padded to this many tokens."""
FRAMES, HEIGHT, WIDTH = 33, 64, 64
GROUPS = 4
"""Pixel frames per latent frame; each is one RGB group of the latent's channels."""
Z_DIM = 3 * GROUPS
_K, _EPS = 1000.0, 1e-3  # the fixed VAE's constant channel and SiLU gain (see fixed_vae)
GRAMMAR_WORDS = (
    *("a", "moving", "over", "background", "and", "plain", "fine", "coarse", "checkered", "striped"),
    *COLOURS,
    *SHAPES,
    *SPEEDS,
    *DIRECTIONS,
    *SCALES,
)


@dataclass
class Architecture:
    """Component sizes (the smoke run shrinks them; the GPU-trained model is 4 heads × 32, 8 layers, FFN 512)."""

    heads: int = 3
    head_dim: int = 32
    """Rotary splits the head dim into t/h/w = 12/10/10."""
    layers: int = 4
    ffn_dim: int = 256
    flow_shift: float = 3.0

    def __post_init__(self) -> None:
        if min(self.heads, self.layers, self.ffn_dim) < 1 or self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(
                f"heads, layers and ffn_dim must be positive and head_dim an even number >= 6 (Wan's rotary "
                f"splits it in three); got heads {self.heads}, head_dim {self.head_dim}, layers {self.layers}, "
                f"ffn_dim {self.ffn_dim}"
            )


@dataclass
class TrainConfig:
    """One training run. The budget is wall-clock; ``steps`` fixes the step count instead."""

    out: Path
    minutes: float = 25.0
    """Total wall-clock budget: rendering and encoding the clips, then the transformer for the rest (also a cap
    when ``steps`` is set)."""
    seed: int = 0
    """Dataset and initialisation seed."""
    clips: int = 800
    """Distinct training clips (each is encoded once)."""
    steps: int | None = None
    batch: int = 16
    lr: float = 1.5e-3
    cfg_dropout: float = 0.1
    ema: float = 0.995
    object_weight: float = 8.0
    """Extra loss weight on latent pixels the object covers (weight ``1 + object_weight·coverage``): the object is
    under 10% of the pixels, and with a plain MSE a small model learns the backgrounds and never draws it."""
    object_weight_max_sigma: float = 0.8
    """The object weight applies only at noise levels σ ≤ this. A weight that depends on the clean clip biases the
    denoiser toward the object's colour wherever the object *might* be, which is everywhere at high σ."""
    stage_fraction: float = 0.75
    """Share of batches trained at one of DVG's reduced stage grids (:func:`stage_grids`) instead of the full
    latent; 0 trains at the full size only."""
    sample_steps: int = 24
    """Denoising steps the stage grids are planned for (the demo config's)."""
    device: str = "cpu"
    """Where the transformer trains (``cuda`` to try a recipe quickly; the committed model is CPU-trained)."""
    threads: int = 2
    """torch CPU threads. On a CPU shared with other busy processes, 1 can be several times faster than 2
    (OpenMP threads spin-waiting on an oversubscribed core)."""
    weights_dtype: str = "float32"
    """``float16`` stores the transformer's weights in half precision (half the size; diffusers loads them back as
    float32, so only the rounding of the weights, at most 5e-4 here, changes)."""
    progress: bool = True
    frames: int = FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    arch: Architecture = field(default_factory=Architecture)

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.clips < 1 or self.batch < 1 or self.object_weight < 0:
            raise ValueError(
                f"minutes, clips and batch must be positive and object_weight >= 0; got {self.minutes}, "
                f"{self.clips}, {self.batch}, {self.object_weight}"
            )
        unit = (self.stage_fraction, self.object_weight_max_sigma)
        if not 0 <= self.cfg_dropout < 1 or not all(0 <= v <= 1 for v in unit):
            raise ValueError(
                f"cfg_dropout must be in [0, 1), stage_fraction and object_weight_max_sigma in [0, 1]; got "
                f"{self.cfg_dropout}, {self.stage_fraction}, {self.object_weight_max_sigma}"
            )
        if self.weights_dtype not in ("float32", "float16"):
            raise ValueError(f"weights_dtype must be float32 or float16; got {self.weights_dtype}")
        if self.height % 4 or self.width % 4 or (self.frames - 1) % 4:
            raise ValueError("clips must be 4k+1 frames of a multiple of 4 pixels (the VAE's 4x4x4 grid)")


def smoke_config(out: Path, seed: int = 0) -> TrainConfig:
    """A seconds-long run at toy sizes: every phase runs and the pipeline is written, nothing is learnt."""
    arch = Architecture(heads=2, head_dim=12, layers=1, ffn_dim=32)
    return TrainConfig(
        out, minutes=1.0, seed=seed, clips=4, steps=3, batch=2, frames=5, height=32,
        width=32, threads=1, arch=arch,
    )  # fmt: skip


# --- components ---------------------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """A Unigram ``T5Tokenizer``: one piece per grammar word (``▁red``), printable ASCII for anything else."""
    from transformers import T5Tokenizer

    from ..models.tiny import _printable

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in _printable()]
    vocab += [("▁" + w, 0.0) for w in dict.fromkeys(GRAMMAR_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def fixed_vae() -> Any:
    """The hand-set ``AutoencoderKLWan``: latent frame k holds the 4×4-pooled pixel frames 4k-3 … 4k (frame 0
    for k = 0) as four RGB groups; decoding repeats each latent pixel over its 4×4 block. See the module doc."""
    from diffusers import AutoencoderKLWan

    z = Z_DIM
    vae: Any = AutoencoderKLWan(
        base_dim=16,
        decoder_base_dim=16,
        z_dim=z,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        enc, dec = vae.encoder, vae.decoder
        rgb = torch.arange(3)
        # encoder conv_in: current frame, centre pixel, RGB copied into every group; channel 12 the constant
        for g in range(GROUPS):
            enc.conv_in.weight[3 * g + rgb, rgb, 2, 1, 1] = 1.0
        enc.conv_in.bias[12] = _K
        downs = [m for m in enc.down_blocks if hasattr(m, "time_conv")]
        for level, m in enumerate(downs):
            conv = m.resample[1]
            for c in range(16):
                conv.weight[c, c, :2, :2] = 0.25  # 2x2 mean (the zero pad only touches tap 2)
            tc = m.time_conv.weight  # [out, in, 3, 1, 1]; windows (prev, a, b)
            if level == 0:  # window (f_{4k-4}, f_{4k-3}, f_{4k-2}) -> groups 0,1 = taps 1,2 (also 2,3)
                for g, tap in ((0, 1), (1, 2), (2, 1), (3, 2)):
                    tc[3 * g + rgb, 3 * g + rgb, tap, 0, 0] = 1.0
            else:  # window (prev, o1, o2): groups 0,1 from o1, groups 2,3 from o2
                for g, tap in ((0, 1), (1, 1), (2, 2), (3, 2)):
                    tc[3 * g + rgb, 3 * g + rgb, tap, 0, 0] = 1.0
            tc[12, 12, 2, 0, 0] = 1.0
        enc.norm_out.gamma[:12] = _EPS * _K / enc.norm_out.scale
        for c in range(12):
            enc.conv_out.weight[c, c, 2, 1, 1] = 2.0 / _EPS
        enc.conv_out.bias[12:] = -30.0  # log-variance at the clamp: a deterministic encoder
        for c in range(2 * z):
            vae.quant_conv.weight[c, c, 0, 0, 0] = 1.0
            if c < z:
                vae.post_quant_conv.weight[c, c, 0, 0, 0] = 1.0
        for c in range(z):
            dec.conv_in.weight[c, c, 2, 1, 1] = 1.0
        ups = [b.upsamplers[0] for b in dec.up_blocks if b.upsamplers is not None]
        # level 0: latent frame -> 2 frames carrying (group 0, 1) and (group 2, 3) at channels 0-5
        tc = ups[0].time_conv.weight  # [2*16, 16, 3, 1, 1]
        for half, groups in ((0, (0, 1)), (1, (2, 3))):
            for slot, g in enumerate(groups):
                tc[16 * half + 3 * slot + rgb, 3 * g + rgb, 2, 0, 0] = 1.0
        for c in range(6):
            ups[0].resample[1].weight[c, c, 1, 1] = 1.0
        dec.up_blocks[1].resnets[0].conv_shortcut.weight[torch.arange(6), torch.arange(6), 0, 0, 0] = 1.0
        # level 1: pair frame -> 2 frames, RGB at channels 0-2
        tc = ups[1].time_conv.weight
        for half in (0, 1):
            tc[16 * half + rgb, 3 * half + rgb, 2, 0, 0] = 1.0
        for c in range(3):
            ups[1].resample[1].weight[c, c, 1, 1] = 1.0
        sc = dec.up_blocks[2].resnets[0].conv_shortcut
        sc.weight[rgb, rgb, 0, 0, 0] = 1.0
        sc.bias[3] = _K
        dec.norm_out.gamma[:3] = _EPS * _K / dec.norm_out.scale
        for c in range(3):
            dec.conv_out.weight[c, c, 2, 1, 1] = 2.0 / _EPS
    return vae.eval()


def build_components(arch: Architecture, seed: int) -> dict[str, Any]:
    """Untrained pipeline components, seeded per component (tiny.py's ``_seeded``)."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from ..models.tiny import _seeded, _umt5

    tokenizer = build_tokenizer()
    text_encoder = _umt5(seed, len(tokenizer))
    # No dropout: the captions are a small closed grammar, and the text encoder trains for minutes.
    text_encoder.config.dropout_rate = 0.0
    for module in text_encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    vae = fixed_vae()
    with _seeded(seed, "transformer"):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=arch.heads,
            attention_head_dim=arch.head_dim,
            in_channels=Z_DIM,
            out_channels=Z_DIM,
            text_dim=text_encoder.config.d_model,
            freq_dim=64,
            ffn_dim=arch.ffn_dim,
            num_layers=arch.layers,
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=arch.flow_shift
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


class _PaddingBias:
    """Cross-attention processor wrapper: padding columns get ``log(copies)`` added to their logits.

    All padding embeddings are zero, so they give one identical key and value; attending to ``L - n`` of them
    with bias ``log((512 - n) / (L - n))`` each is exactly attending to ``512 - n`` of them.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bias: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, *_: Any) -> Any:
        return self.inner(attn, hidden_states, encoder_hidden_states, self.bias, None)


def install_padding_bias(transformer: Any) -> _PaddingBias:
    """Route every block's cross-attention through one shared :class:`_PaddingBias`; set ``.bias`` per batch."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    wrapper = _PaddingBias(WanAttnProcessor())
    for block in transformer.blocks:
        block.attn2.set_processor(wrapper)
    return wrapper


def encode_text(
    tokenizer: Any, text_encoder: Any, captions: list[str], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings as WanPipeline makes them — the encoder's states for the real tokens, zeros after —
    padded to ``length`` (default: longest + 1); and the cross-attention bias making that equal to 512 tokens."""
    ids = [tokenizer(c, add_special_tokens=True).input_ids for c in captions]
    n = torch.tensor([len(i) for i in ids])
    length = length or int(n.max()) + 1
    input_ids = torch.full((len(ids), length), tokenizer.pad_token_id, dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, : len(row)] = torch.tensor(row)
    real = torch.arange(length)[None, :] < n[:, None]
    device = next(text_encoder.parameters()).device
    states = text_encoder(input_ids.to(device), real.long().to(device)).last_hidden_state * real[..., None].to(device)
    copies = ((TEXT_LENGTH - n) / (length - n).clamp(min=1)).clamp(min=1e-30).log()
    bias = torch.where(real, torch.zeros(()), copies[:, None].float())[:, None, None, :]
    return states, bias.to(device)


def object_masks(params: list[ClipParams], frames: int, height: int, width: int) -> torch.Tensor:
    """``[N, 1, T, H/4, W/4]`` share of each latent pixel the object covers, on the fixed VAE's grid: the 4×4
    mean in space, the max over a latent frame's pixel frames (frame 0 alone, then groups of 4)."""
    out = []
    for p in params:
        cov = torch.from_numpy(object_coverage(p, frames, height, width))
        cov = F.avg_pool2d(cov[:, None], 4)[:, 0]  # [F, H/4, W/4]
        rest = cov[1:].reshape(-1, GROUPS, *cov.shape[1:]).amax(1)
        out.append(torch.cat([cov[:1], rest])[None])
    return torch.stack(out)


def object_loss_weight(masks: torch.Tensor, sigma: torch.Tensor, weight: float, max_sigma: float) -> torch.Tensor:
    """Per-pixel loss weight ``1 + weight·mask`` for the samples noised to ``σ ≤ max_sigma``, 1 for the rest.

    A weight that depends on the clean clip changes what the loss is minimised by: the weighted posterior mean
    instead of the mean. Where σ is low the object's place is already fixed by ``x_σ`` and the two agree; at high σ
    the object might be anywhere, and the weighted optimum paints its colour everywhere."""
    gate = (sigma <= max_sigma).to(masks.dtype).view(-1, *([1] * (masks.dim() - 1)))
    return 1 + weight * gate * masks


def stage_grids(full: Grid, steps: int, spatial_multiple: int = 2) -> list[Grid]:
    """Every reduced grid a DVG stage can run at for this latent: the stage grids of every action the planner
    keeps (dvg and both single-axis modes) at budgets 0.30, 0.35, …, 0.95, without the full grid. Training on
    them is what lets the early stages work: a model only ever trained at the full size produces the wrong
    colours at the sketch's size (seen on the first demo model)."""
    grids: set[Grid] = set()
    for budget in np.arange(0.30, 0.951, 0.05):
        planner = Planner(full, steps, float(round(budget, 2)), spatial_multiple=spatial_multiple)
        for mode in (Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY):
            try:
                grids.update(g for c in planner.feasible(mode) for g in c.grids)
            except InfeasibleBudget:
                continue
    grids.discard(full)
    return sorted(grids)


# --- training phases ----------------------------------------------------------------------------------------


def _bar(cfg: TrainConfig, total: float, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not cfg.progress, leave=True, dynamic_ncols=True)


@torch.no_grad()
def encode_latents(vae: Any, videos: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Posterior means of every clip, then per-channel mean/std written into the VAE config; returns the
    normalised latents ``(z - mean) / std`` and a PSNR check of the frozen VAE on the first clips."""
    start = time.perf_counter()
    bar = _bar(cfg, len(videos), "encode", "clip")
    device = torch.device(cfg.device)
    vae.to(device)  # on a GPU the encode takes seconds instead of minutes
    chunks = []
    for i in range(0, len(videos), 8):
        chunks.append(vae.encode(videos[i : i + 8].to(device)).latent_dist.mode().cpu())
        bar.update(len(chunks[-1]))
    bar.close()
    vae.to("cpu")
    z = torch.cat(chunks)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp(min=1e-4)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    rec = vae.decode(z[:4]).sample.clamp(-1, 1)
    mse = float(((rec - videos[:4]) / 2).pow(2).mean())
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    info = {"seconds": time.perf_counter() - start, "recon_psnr_db": psnr, "latent_shape": list(z.shape[1:])}
    return (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), info


def train_transformer(parts: dict[str, Any], latents: torch.Tensor, captions: list[str], cfg: TrainConfig,
                      seconds: float, masks: torch.Tensor | None = None,
                      ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """Rectified flow on the normalised latents, text encoder trained jointly; returns stats and EMA weights.
    ``masks`` (:func:`object_masks`) weight the loss by ``1 + cfg.object_weight·mask``."""
    transformer, text_encoder, tokenizer = parts["transformer"], parts["text_encoder"], parts["tokenizer"]
    device = torch.device(cfg.device)
    transformer.to(device)
    text_encoder.to(device)
    full = Grid(*latents.shape[2:])
    grids = stage_grids(full, cfg.sample_steps) if cfg.stage_fraction > 0 else []
    logger.info("training at the full latent %s and, in %.0f%% of batches, at one of DVG's %d stage grids: %s",
                full, 100 * cfg.stage_fraction * bool(grids), len(grids), ", ".join(map(str, grids)))  # fmt: skip
    bias = install_padding_bias(transformer)
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    live = [t for m in modules.values() for t in m.state_dict().values()]
    shadow = [t for d in ema.values() for t in d.values()]
    floats = [i for i, t in enumerate(live) if t.dtype.is_floating_point]
    for m in modules.values():
        m.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    shift = cfg.arch.flow_shift
    losses: list[float] = []
    start = time.perf_counter()
    total = cfg.steps
    bar = _bar(cfg, total or round(seconds), "transformer", "step" if total else "s")
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / total if total else elapsed / seconds
        if progress >= 1 or elapsed >= seconds:  # with ``steps`` set, the time budget is still a cap
            break
        # Warm-up, then cosine decay to 10% over the budget (time-based when the budget is wall-clock).
        lr = cfg.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        batch_captions = ["" if d else captions[int(i)] for i, d in zip(idx, drop)]
        x0 = latents[idx]
        noise_u = torch.rand(cfg.batch, generator=gen)
        sigma = shift * noise_u / (1 + (shift - 1) * noise_u)
        if masks is None:
            weight = torch.ones_like(x0[:, :1])
        else:
            weight = object_loss_weight(masks[idx], sigma, cfg.object_weight, cfg.object_weight_max_sigma)
        # A stage batch: the clean latent resized to the stage grid with the sampler's own resize, so the
        # model learns what a reduced stage should produce — the full video, resized.
        if grids and float(torch.rand((), generator=gen)) < cfg.stage_fraction:
            grid = grids[int(torch.randint(len(grids), (), generator=gen))]
            x0, weight = resize(x0, grid), resize(weight, grid)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = ((1 - s) * x0 + s * noise).to(device)
        states, bias.bias = encode_text(tokenizer, text_encoder, batch_captions)
        v = transformer(x_t, (sigma * 1000).to(device), states, return_dict=False)[0]
        err = (v - (noise - x0).to(device)).pow(2)
        weight = weight.to(device)
        loss = (err * weight).mean() / weight.mean()
        mse = err.detach().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():  # state_dict tensors share storage with the live parameters and buffers
            torch._foreach_lerp_([shadow[i] for i in floats], [live[i] for i in floats], 1 - decay)
        losses.append(mse.item())  # the plain flow-matching MSE, comparable across weightings
        step += 1
        bar.update(1 if total else round(time.perf_counter() - start) - bar.n)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", step=step)
    bar.close()
    for m in modules.values():
        m.eval().to("cpu")
    ema = {k: {n: t.cpu() for n, t in d.items()} for k, d in ema.items()}
    transformer.set_attn_processor(type(bias.inner)())  # back to diffusers' own processor everywhere
    stats = {"steps": step, "seconds": time.perf_counter() - start, "losses": losses, "stage_grids": grids}
    return stats, ema


def half_precision_weights(transformer: Any) -> None:
    """Cast the transformer to float16 for saving. Diffusers warns that its norms and embeddings run in float32;
    they still do, because loading upcasts every weight back to float32 (only their rounding is kept)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        transformer.to(torch.float16)
    finally:
        diffusers_logging.set_verbosity(level)


def _curve(losses: list[float], points: int = 20) -> list[float]:
    """The loss curve as ``points`` window means (the metadata stays small)."""
    if not losses:
        return []
    chunks = np.array_split(np.asarray(losses), min(points, len(losses)))
    return [round(float(c.mean()), 5) for c in chunks]


def train(cfg: TrainConfig) -> Path:
    """The whole recipe; writes the pipeline directory ``cfg.out`` atomically and returns it. Runs with
    ``cfg.threads`` torch threads and restores the caller's count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> Path:
    from diffusers import WanPipeline

    t_start = time.perf_counter()
    budget = cfg.minutes * 60
    torch.manual_seed(cfg.seed)
    params = training_params(cfg.clips, cfg.seed)
    clips = [make_clip(p, cfg.frames, cfg.height, cfg.width) for p in params]
    videos = torch.from_numpy(np.stack([c.video() for c in clips]))
    captions = [c.caption for c in clips]
    parts = build_components(cfg.arch, cfg.seed)

    parts["vae"].requires_grad_(False)
    latents, enc_stats = encode_latents(parts["vae"], videos, cfg)
    logger.info("fixed VAE: reconstruction PSNR %.1f dB on the first clips", enc_stats["recon_psnr_db"])
    masks = object_masks(params, cfg.frames, cfg.height, cfg.width) if cfg.object_weight > 0 else None
    remaining = max(budget - (time.perf_counter() - t_start) - 15, 30)
    tr_stats, ema = train_transformer(parts, latents, captions, cfg, remaining, masks)
    parts["transformer"].load_state_dict(ema["transformer"])
    parts["text_encoder"].load_state_dict(ema["text_encoder"])

    kinds = [p.kind for p in params]
    dataset = {
        "clips": cfg.clips,
        "object_radius_px": procedural.OBJECT_RADIUS,
        "kinds": {k: kinds.count(k) for k in KINDS},
        "size": [cfg.frames, cfg.height, cfg.width],
    }
    vae = {
        "kind": "fixed 4x4x4 pooling AutoencoderKLWan (not trained)",
        "recon_psnr_db": round(enc_stats["recon_psnr_db"], 2),
        "encode_seconds": round(enc_stats["seconds"], 1),
    }
    transformer = {
        "steps": tr_stats["steps"],
        "batch": cfg.batch,
        "seconds": round(tr_stats["seconds"], 1),
        "loss_last200": round(float(np.mean(tr_stats["losses"][-200:])), 5),
        "stage_grids": [str(g) for g in tr_stats["stage_grids"]],
        "device": cfg.device,
        "curve": _curve(tr_stats["losses"]),
    }
    meta: dict[str, Any] = {
        "model": "dvg-demo-wan: WanPipeline trained on dvg_dist.data.procedural clips",
        "seed": cfg.seed,
        "dataset": dataset,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")},
        "vae": vae,
        "transformer": transformer,
        "latent_shape": enc_stats["latent_shape"],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if cfg.weights_dtype == "float16":
        half_precision_weights(parts["transformer"])
    pipe: Any = WanPipeline(**parts)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
