"""``launch/check_gpu.py``'s body: real-size transformers with random weights — per-stage step time, tokens per
rank, memory and DVG's speed-up.

    python launch/check_gpu.py --family wan --nproc 8                       # GPU machine: the real Wan2.1 14B
    python launch/check_gpu.py --family wan --layers 1 --size 256x256 --frame_num 17 --text_len 16   # CPU / CI

Builds the published diffusers transformer architecture of a family (:data:`REAL_ARCHS`) with deterministic
random weights — parameters are created on the meta device and materialised straight in the target dtype on the
target device, so the 14B model needs no download and no fp32 copy — plans one DVG run with the planner and the
family's FLOP cost model, and for each stage grid of that plan runs ``--steps-per-stage`` transformer forwards (one
untimed warm-up first) on a random latent and random text embeddings of the real shapes. Under ``--nproc N`` (or
``torchrun``) the forwards are sequence-parallel through the family's :class:`SequencePlan`, exactly as the engine
runs them. The projected speed-up is ``N × t_full / Σ_k n_k × t_k`` (the model calls each stage runs times its
measured forward) next to the FLOP model's ``1 / flop_density``.

One forward is timed: a CFG step is two of them, which changes no ratio. Depth is reduced with ``--layers`` (the
layers cancel out of every ratio; the fixed per-call cost of the embedders weighs more at reduced depth).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ATTENTION_BACKENDS, DTYPES, ConfigError, load_config
from ..dvg.planner import Grid, InfeasibleBudget, Planner
from ..models import FAMILIES, FamilySpec, InputError, SequencePlan
from ..models.ltx import LTXVideoAdapter, ltx_vae_scale, mark_cross_attention, pack, unpack
from ..models.wan import WAN_TI2V_SEQUENCE_PLAN, check_ti2v_shards
from ..parallel import shard_sizes
from .cli import OneLineParser, _flag

ROOT = Path(__file__).resolve().parents[2]
PROG = "check_gpu.py"
PROMPT_TOKENS = 60
"""Valid (unpadded) text tokens of the masked text streams: a typical prompt; the rest is padding, as in the
pipelines (the masks never shorten the computation)."""


@dataclass(frozen=True)
class RealArch:
    """A released transformer: its diffusers class and ``config.json``, its VAE geometry, its paper config."""

    family: str
    """Adapter family (``dvg_dist.models.FAMILIES``)."""
    model_class: str
    config: dict[str, Any]
    vae: dict[str, Any]
    """The VAE ``config.json`` keys the adapter's ``spec_from_configs`` reads (compression, latent channels)."""
    run_config: str
    """``configs/*.yaml`` with the paper's settings: size, frames, steps, budget, DVG options."""
    depth: tuple[tuple[str, int], ...]
    """Config keys that set the depth and their multiple of ``--layers`` (HunyuanVideo: L dual + 2L single)."""
    source: str
    sequence_plan: SequencePlan | None = None
    """The plan when it is not the family's class default (Wan 2.2 TI2V: the per-token timestep is split too)."""

    @property
    def full_layers(self) -> int:
        key, mult = self.depth[0]
        return int(self.config[key]) // mult

    def config_at(self, layers: int) -> dict[str, Any]:
        return {**self.config, **{key: mult * layers for key, mult in self.depth}}


# Published transformer configs (``transformer/config.json`` of the diffusers checkpoints named in ``source``;
# each equals the class's diffusers defaults except where written). ``target_size``/``task_type`` of HV-1.5 do not
# change the forward.
# fmt: off
# HunyuanVideo-1.5 480p's transformer; the T2V and the step-distilled I2V checkpoints differ only in task and MeanFlow.
_HV15_480P: dict[str, Any] = {
    "in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128,
    "num_layers": 54, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
    "qk_norm": "rms_norm", "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152,
    "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56], "target_size": 480,
}
REAL_ARCHS: dict[str, RealArch] = {
    "wan": RealArch(
        family="wan",
        model_class="WanTransformer3DModel",
        config={
            "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        },
        vae={"z_dim": 16, "scale_factor_temporal": 4, "scale_factor_spatial": 8},
        run_config="wan2.1-t2v-14b.yaml",
        depth=(("num_layers", 1),),
        source="Wan-AI/Wan2.1-T2V-14B-Diffusers (each expert of Wan2.2-T2V-A14B has the same config)",
    ),
    "wan-ti2v": RealArch(
        family="wan",
        model_class="WanTransformer3DModel",
        config={
            "patch_size": [1, 2, 2], "num_attention_heads": 24, "attention_head_dim": 128, "in_channels": 48,
            "out_channels": 48, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 14336, "num_layers": 30,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        },
        vae={"z_dim": 48, "scale_factor_temporal": 4, "scale_factor_spatial": 16},
        run_config="wan2.2-ti2v-5b.yaml",
        depth=(("num_layers", 1),),
        source="Wan-AI/Wan2.2-TI2V-5B-Diffusers (5B: 30 blocks, per-token timesteps; Wan 2.2 VAE 4x16x16, 48 ch)",
        sequence_plan=WAN_TI2V_SEQUENCE_PLAN,
    ),
    "hunyuan": RealArch(
        family="hunyuanvideo",
        model_class="HunyuanVideoTransformer3DModel",
        config={
            "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
            "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
            "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096,
            "pooled_projection_dim": 768, "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56],
        },
        vae={"latent_channels": 16, "temporal_compression_ratio": 4, "spatial_compression_ratio": 8},
        run_config="hunyuanvideo-t2v.yaml",
        depth=(("num_layers", 1), ("num_single_layers", 2)),
        source="hunyuanvideo-community/HunyuanVideo (13B: 20 dual-stream + 40 single-stream blocks)",
    ),
    "hunyuan15": RealArch(
        family="hunyuanvideo15",
        model_class="HunyuanVideo15Transformer3DModel",
        config={**_HV15_480P, "task_type": "t2v", "use_meanflow": False},
        vae={"latent_channels": 32, "temporal_compression_ratio": 4, "spatial_compression_ratio": 16},
        run_config="hunyuanvideo15-t2v-480p.yaml",
        depth=(("num_layers", 1),),
        source="hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v (8.3B: 54 dual-stream blocks)",
    ),
    "hunyuan15-distill": RealArch(
        family="hunyuanvideo15",
        model_class="HunyuanVideo15Transformer3DModel",
        config={**_HV15_480P, "task_type": "i2v", "use_meanflow": True},
        vae={"latent_channels": 32, "temporal_compression_ratio": 4, "spatial_compression_ratio": 16},
        run_config="hunyuanvideo15-i2v-480p-stepdistill.yaml",
        depth=(("num_layers", 1),),
        source="HunyuanVideo-1.5 480p I2V step-distilled (8.3B, MeanFlow: timestep_r; guidance 1, one pass per step)",
    ),
    "ltx": RealArch(
        family="ltx",
        model_class="LTXVideoTransformer3DModel",
        config={
            "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 32,
            "attention_head_dim": 64, "cross_attention_dim": 2048, "num_layers": 28,
            "activation_fn": "gelu-approximate", "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "caption_channels": 4096, "attention_bias": True, "attention_out_bias": True,
        },
        vae={"latent_channels": 128, "patch_size": 4, "patch_size_t": 1,
             "spatio_temporal_scaling": [True, True, True, False]},
        run_config="ltx-video.yaml",
        depth=(("num_layers", 1),),
        source="Lightricks/LTX-Video (2B, 0.9.x: 28 blocks, hidden 2048, patch 1; VAE 8x32x32, 128 channels)",
    ),
    "cogvideox": RealArch(
        family="cogvideox",
        model_class="CogVideoXTransformer3DModel",
        config={
            "num_attention_heads": 48, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
            "time_embed_dim": 512, "ofs_embed_dim": None, "text_embed_dim": 4096, "num_layers": 42,
            "attention_bias": True, "sample_width": 300, "sample_height": 300, "sample_frames": 81, "patch_size": 2,
            "patch_size_t": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 226,
            "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False, "patch_bias": False,
        },
        vae={"latent_channels": 16, "temporal_compression_ratio": 4, "block_out_channels": [128, 256, 256, 512]},
        run_config="cogvideox1.5-t2v-5b.yaml",
        depth=(("num_layers", 1),),
        source="THUDM/CogVideoX1.5-5B (42 blocks, hidden 48x64, patch 2x2x2, joint attention over 226 T5 tokens)",
    ),
}
# fmt: on

TEXT_TOKENS = {
    "wan": (512,),
    "wan-ti2v": (512,),
    "hunyuan": (256,),
    "cogvideox": (226,),
    "hunyuan15": (1000, 256, 729),
    "hunyuan15-distill": (1000, 256, 729),
    "ltx": (128,),
}
"""Text tokens per forward of each stream at real size: umT5 (Wan); Llama after the template crop (HunyuanVideo);
Qwen2.5-VL, ByT5 and SigLIP image tokens (HV-1.5); T5 padded to 128 (LTX-Video)."""


# -- the model ---------------------------------------------------------------------------------------------------


def _fill_(t: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    """Tile ``pool`` (rolled by ``offset``) over ``t``: real numbers at memory bandwidth, no RNG over 14B values."""
    flat = t.view(-1)
    n, p = flat.numel(), pool.numel()
    src = torch.roll(pool, offset % p)
    whole = n // p
    if whole:
        flat[: whole * p].view(whole, p).copy_(src.expand(whole, p))
    if n - whole * p:
        flat[whole * p :].copy_(src[: n - whole * p])


def materialize_random_(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
    """Replace every meta parameter with a deterministic random one on ``device`` in ``dtype``: matrices uniform
    with variance 1/fan_in (tiled from one seeded pool of a prime length), biases 0, norm scales 1. Buffers
    (built for real at construction, e.g. rotary tables) move to ``device`` as they are."""
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.rand(999_983, generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    for index, module in enumerate(model.modules()):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            t = torch.empty(param.shape, dtype=dtype, device=device)
            if pname.endswith("bias"):
                t.zero_()
            elif param.ndim <= 1:
                t.fill_(1.0)
            else:
                _fill_(t, pool, 7919 * index + len(pname))
                t.mul_((3.0 / max(1, param[0].numel())) ** 0.5)
            module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def build_transformer(arch: RealArch, layers: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Any:
    """The released architecture at ``layers`` depth with random weights (no download, no fp32 staging copy)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, arch.model_class)
    with init_empty_weights(include_buffers=False):
        model = cls(**arch.config_at(layers))
    materialize_random_(model, dtype, device, seed)
    return model.eval()


def param_counts(model: torch.nn.Module, arch: RealArch, layers: int) -> tuple[int, int]:
    """(parameters built, parameters at the released depth): each block stack's first block × missing blocks."""
    built = sum(p.numel() for p in model.parameters())
    full = built
    for key, mult in arch.depth:
        stack = {"num_layers": _block_stack(model), "num_single_layers": "single_transformer_blocks"}[key]
        per_block = sum(p.numel() for p in getattr(model, stack)[0].parameters())
        full += per_block * (int(arch.config[key]) - mult * layers)
    return built, full


def _block_stack(model: torch.nn.Module) -> str:
    return "blocks" if hasattr(model, "blocks") else "transformer_blocks"


def make_inputs(
    name: str, config: Any, grid: Grid, text_len: int | None, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, Any]:
    """One forward's kwargs as the family's pipeline passes them (text streams at their real lengths unless
    ``text_len`` caps them), random latent and embeddings, identical on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    lengths = [min(n, text_len) if text_len else n for n in TEXT_TOKENS[name]]

    def mask(n: int, valid: int) -> torch.Tensor:
        m = torch.zeros(1, n, device=device)
        m[:, :valid] = 1
        return m

    kwargs: dict[str, Any] = {"hidden_states": randn(1, config.in_channels, grid.t, grid.h, grid.w)}
    if name == "wan":  # UniPC's int64 timestep, umT5 states
        kwargs.update(timestep=torch.tensor([500], device=device), encoder_hidden_states=randn(1, lengths[0], 4096))
    elif name == "wan-ti2v":  # WanPipeline(expand_timesteps): one float32 timestep per token
        tokens = grid.tokens(tuple(config.patch_size))
        kwargs.update(
            timestep=torch.full((1, tokens), 500.0, device=device), encoder_hidden_states=randn(1, lengths[0], 4096)
        )
    elif name == "ltx":  # LTXPipeline: packed tokens, float32 timestep, T5 states + mask, the latent sizes, rope scale
        temporal, spatial = ltx_vae_scale(REAL_ARCHS[name].vae)
        kwargs.update(
            hidden_states=pack(kwargs["hidden_states"]),
            timestep=torch.tensor([500.0], device=device),
            encoder_hidden_states=randn(1, lengths[0], config.caption_channels),
            encoder_attention_mask=mask(lengths[0], min(PROMPT_TOKENS, lengths[0])).bool(),
            num_frames=grid.t,
            height=grid.h,
            width=grid.w,
            rope_interpolation_scale=(temporal / LTXVideoAdapter.fps, spatial, spatial),
        )
    elif name == "cogvideox":  # CogVideoXPipeline: [B, F, C, H, W] (odd frames padded in front), int64 t, rotary
        from types import SimpleNamespace

        from diffusers import CogVideoXPipeline

        x = kwargs["hidden_states"]
        x = torch.cat([x[:, :, :1].expand(-1, -1, -grid.t % config.patch_size_t, -1, -1), x], dim=2)
        owner = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=config))
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings  # the pipeline's own, on a stand-in self
        rotary = rope(owner, grid.h * 8, grid.w * 8, x.shape[2], device)
        kwargs.update(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            timestep=torch.tensor([500], device=device),
            encoder_hidden_states=randn(1, lengths[0], config.text_embed_dim),
            image_rotary_emb=rotary,
        )
    elif name == "hunyuan":  # embedded guidance 6.0 × 1000, Llama states + mask, CLIP pooled
        kwargs.update(
            timestep=torch.tensor([500.0], device=device),
            encoder_hidden_states=randn(1, lengths[0], config.text_embed_dim),
            encoder_attention_mask=mask(lengths[0], min(PROMPT_TOKENS, lengths[0])).to(dtype),
            pooled_projections=randn(1, config.pooled_projection_dim),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        )
    else:  # HV-1.5: Qwen states + mask, ByT5 zeros (no quoted text), SigLIP tokens (all-zero for T2V)
        qwen, byt5, image = lengths
        i2v = config.task_type == "i2v"
        kwargs.update(
            timestep=torch.tensor([500.0], device=device, dtype=dtype),
            encoder_hidden_states=randn(1, qwen, config.text_embed_dim),
            encoder_attention_mask=mask(qwen, min(PROMPT_TOKENS, qwen)),
            encoder_hidden_states_2=torch.zeros(1, byt5, config.text_embed_2_dim, device=device, dtype=dtype),
            encoder_attention_mask_2=mask(byt5, 0),
            image_embeds=(randn if i2v else _zeros(device, dtype))(1, image, config.image_embed_dim),
        )
        if config.use_meanflow:  # the step-distilled checkpoints' interval end (the next timestep)
            kwargs["timestep_r"] = torch.tensor([400.0], device=device, dtype=dtype)
    return kwargs


def _zeros(device: torch.device, dtype: torch.dtype) -> Any:
    return lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)


# -- memory and time ---------------------------------------------------------------------------------------------


def rss_high_water() -> int:
    """This process's resident-set high-water mark in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory of a phase: CUDA's max allocated (reset at ``start``) on a GPU, else the process's RSS
    high-water mark (monotonic: with growing stage grids, the peak up to and including the phase)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_high_water"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated()) if self.cuda else rss_high_water()

    def current(self) -> int:
        return int(torch.cuda.memory_allocated()) if self.cuda else rss_high_water()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one rank ----------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """Everything validated before any process starts."""

    name: str
    arch: RealArch
    layers: int
    dtype: torch.dtype
    device: torch.device
    world: int
    ulysses: int | None
    ring: int | None
    attention_backend: str
    spec: FamilySpec
    grid: Grid
    planner: Planner
    grids: tuple[Grid, ...]
    chosen: Any
    steps_per_stage: int
    text_len: int | None
    seed: int
    json_path: str | None
    argv: list[str]


def run_rank(check: Check, rank: int = 0, world: int = 1, local_rank: int = 0) -> dict[str, Any] | None:
    """Build, parallelize (when ``world > 1``), time every stage grid; rank 0 returns the report."""
    import torch.distributed as dist

    device = check.device
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    groups = None
    if world > 1:
        from ..parallel import build_groups
        from .distributed import resolve_layout

        config = load_config(ROOT / "configs" / check.arch.run_config, _degree_overrides(check))
        layout = resolve_layout(config, world, int(check.arch.config["num_attention_heads"]), False)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        groups = build_groups(layout, "nccl" if device.type == "cuda" else "gloo")
    memory = PeakMemory(device)
    t0 = time.perf_counter()
    model = build_transformer(check.arch, check.layers, check.dtype, device, check.seed)
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    after_build = memory.current()
    if check.arch.family == "ltx":
        mark_cross_attention(model)  # what the adapter does: its cross-attention stays local under the hooks
    if groups is not None:
        from ..parallel import parallelize_transformer

        plan = check.arch.sequence_plan or FAMILIES[check.arch.family].sequence_plan
        parallelize_transformer(model, plan, groups, check.attention_backend)
    cost = check.planner.cost_model
    stages = []
    for k, grid in enumerate(check.grids):
        kwargs = make_inputs(check.name, model.config, grid, check.text_len, check.dtype, device, check.seed + k)
        memory.start()
        times = []
        with torch.no_grad():
            for i in range(check.steps_per_stage + 1):  # the first forward warms kernels and communicators up
                if world > 1:
                    dist.barrier()
                _sync(device)
                t = time.perf_counter()
                out = model(**kwargs, return_dict=False)[0]
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t)
        if check.arch.family == "ltx":
            out = unpack(out, grid)  # LTX returns the packed [B, S, C] velocity
        if check.arch.family == "cogvideox":  # back to [B, C, T, H, W], the padding frame dropped
            out = out.permute(0, 2, 1, 3, 4)[:, :, out.shape[1] - grid.t :]
        if tuple(out.shape[2:]) != (grid.t, grid.h, grid.w) or not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"stage {k + 1} grid {grid}: output {tuple(out.shape)} is not a finite full latent")
        tokens = grid.tokens(check.spec.patch)
        stages.append(
            {
                "stage": k + 1,
                "grid": grid.as_list(),
                "calls": check.planner.executed_counts[k],
                "tokens": tokens,
                "tokens_per_rank": list(shard_sizes(tokens, groups.layout.sp_degree if groups else 1)),
                "ms_per_step": 1000 * statistics.median(times),
                "ms_all": [1000 * t for t in times],
                "peak_bytes": memory.peak(),
                "flop_ratio": cost.cost(grid) / cost.cost(check.grid),
            }
        )
        del out, kwargs
    mine = {"stages": stages, "weights_bytes": weights, "after_build_bytes": after_build, "build_s": build_s}
    ranks = [mine]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        ranks = gathered
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    return _report(check, model, ranks, memory.kind, groups.layout if groups else None)


def _degree_overrides(check: Check) -> list[str]:
    out = []
    if check.ulysses:
        out.append(f"parallel.ulysses_degree={check.ulysses}")
    if check.ring:
        out.append(f"parallel.ring_degree={check.ring}")
    return out


def _report(check: Check, model: Any, ranks: list[dict[str, Any]], memory_kind: str, layout: Any) -> dict[str, Any]:
    """Rank 0's record: the slowest rank's time and the largest rank's peak per stage, and the projection."""
    built, full_params = param_counts(model, check.arch, check.layers)
    cfg = model.config
    stages = []
    for k, stage in enumerate(ranks[0]["stages"]):
        per_rank = [r["stages"][k] for r in ranks]
        stages.append(
            {
                **stage,
                "ms_per_step": max(s["ms_per_step"] for s in per_rank),
                "ms_per_step_per_rank": [s["ms_per_step"] for s in per_rank],
                "peak_bytes": max(s["peak_bytes"] for s in per_rank),
                "peak_bytes_per_rank": [s["peak_bytes"] for s in per_rank],
            }
        )
    t_full = stages[-1]["ms_per_step"] / 1000
    for s in stages:
        s["flop_model_ms"] = 1000 * t_full * s["flop_ratio"]
    n = check.planner.num_steps
    full_s = n * t_full
    dvg_s = sum(s["calls"] * s["ms_per_step"] / 1000 for s in stages)
    c = check.chosen
    hidden = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    ffn = int(cfg.ffn_dim) if "ffn_dim" in cfg else int(float(cfg.get("mlp_ratio", 4.0)) * hidden)  # LTX: FFN 4x
    return {
        "command": "python launch/check_gpu.py " + " ".join(check.argv),
        "family": check.name,
        "class": check.arch.model_class,
        "source": check.arch.source,
        "config": dict(check.arch.config_at(check.layers)),
        "heads": int(cfg.num_attention_heads),
        "head_dim": int(cfg.attention_head_dim),
        "hidden": hidden,
        "ffn": ffn,
        "layers": check.layers,
        "layers_full": check.arch.full_layers,
        "params_built": built,
        "params_full_depth": full_params,
        "weights_bytes_per_rank": ranks[0]["weights_bytes"],
        "build_s": ranks[0]["build_s"],
        "dtype": str(check.dtype).removeprefix("torch."),
        "device": check.device.type,
        "world_size": len(ranks),
        "layout": {"ulysses": layout.ulysses_degree, "ring": layout.ring_degree} if layout else None,
        "attention_backend": check.attention_backend if layout else None,
        "latent": check.grid.as_list(),
        "patch": list(check.spec.patch),
        "steps": n,
        "steps_per_stage": check.steps_per_stage,
        "text_tokens": [min(t, check.text_len) if check.text_len else t for t in TEXT_TOKENS[check.name]],
        "plan": {
            "s": c.s,
            "t23": c.t23,
            "grids": [g.as_list() for g in c.grids],
            "density": c.density,
            "executed_density": c.executed_density,
            "flop_density": c.flop_density,
            "executed_counts": list(check.planner.executed_counts),
            "w_s": 0.5,
        },
        "memory_kind": memory_kind,
        "stages": stages,
        "projection": {
            "full_s": full_s,
            "dvg_s": dvg_s,
            "speedup_measured": full_s / dvg_s,
            "speedup_flop_model": 1.0 / c.flop_density,
        },
        "machine": _machine(check.device),
    }


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        from platform import machine, processor

        info["processor"] = processor() or machine()
    return info


# -- output ------------------------------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_report(r: dict[str, Any]) -> str:
    lay = r["layout"]
    procs = f"{r['world_size']} process" + ("es" if r["world_size"] > 1 else "")
    backend = "" if r.get("attention_backend") in (None, "native") else f", {r['attention_backend']} attention"
    layout = f" (ulysses {lay['ulysses']} × ring {lay['ring']}{backend})" if lay else ""
    p = r["plan"]
    lines = [
        f"{r['family']}: {r['class']}, hidden {r['hidden']} = {r['heads']} heads × {r['head_dim']}, ffn {r['ffn']}; "
        f"{r['layers']} of {r['layers_full']} layers ({r['params_built'] / 1e9:.2f}B of "
        f"{r['params_full_depth'] / 1e9:.2f}B parameters), {r['dtype']} on {r['device']}, {procs}{layout}",
        f"latent {'x'.join(map(str, r['latent']))}, {r['steps']} steps, plan s={p['s']:g} T23={p['t23']}: density "
        f"{p['density']:.3f}, flop density {p['flop_density']:.3f}; text tokens {r['text_tokens']}; "
        f"median of {r['steps_per_stage']} forwards per stage",
        f"{'stage':<6}{'grid':<12}{'calls':>6}{'tokens':>9}{'tokens/rank':>14}{'ms/step':>10}{'FLOP-model ms':>15}"
        f"{'peak memory':>14}",
    ]
    for s in r["stages"]:
        tpr = s["tokens_per_rank"]
        per = f"{min(tpr)}" if min(tpr) == max(tpr) else f"{min(tpr)}-{max(tpr)}"
        grid = "x".join(map(str, s["grid"]))
        lines.append(
            f"{s['stage']:<6}{grid:<12}{s['calls']:>6}{s['tokens']:>9,}{per:>14}{s['ms_per_step']:>10.1f}"
            f"{s['flop_model_ms']:>15.1f}{_bytes(s['peak_bytes']):>14}"
        )
    j = r["projection"]
    lines.append(
        f"full run {r['steps']} × {r['stages'][-1]['ms_per_step']:.1f} ms = {j['full_s']:.2f} s; DVG Σ calls × ms = "
        f"{j['dvg_s']:.2f} s -> speed-up {j['speedup_measured']:.2f}x measured, {j['speedup_flop_model']:.2f}x "
        f"FLOP model; peak = {r['memory_kind']}"
    )
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    _flag(
        p,
        "--family",
        required=True,
        choices=sorted(REAL_ARCHS),
        help="wan (2.1 14B), wan-ti2v (2.2 TI2V 5B), hunyuan (13B), hunyuan15 (8.3B), hunyuan15-distill (8.3B MeanFlow "
        "I2V), ltx (LTX-Video 2B), cogvideox (CogVideoX1.5 5B)",
    )
    _flag(p, "--nproc", type=int, default=1, help="ranks to spawn (one GPU each on CUDA)")
    _flag(p, "--layers", type=int, help="depth (default: the released one; HunyuanVideo: L dual + 2L single)")
    _flag(p, "--size", help="W x H in pixels (default: the family's config)")
    _flag(p, "--frame_num", "--num_frames", type=int, help="pixel frames (default: the family's config)")
    _flag(p, "--steps", "--sample_steps", type=int, help="denoising steps N of the plan (default 50)")
    _flag(p, "--budget", type=float, help="DVG's target density (default 0.5)")
    _flag(p, "--steps-per-stage", type=int, default=3, help="timed forwards per stage grid (after one warm-up)")
    _flag(p, "--text_len", type=int, help="cap every text stream at this many tokens (default: the real lengths)")
    _flag(p, "--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    _flag(p, "--device", default="auto", help="auto (cuda when available), cuda or cpu")
    _flag(p, "--ulysses_degree", "--ulysses_size", type=int, help="ranks in Ulysses (must divide the heads)")
    _flag(p, "--ring_degree", "--ring_size", type=int, help="ranks in ring attention")
    _flag(p, "--attention_backend", choices=list(ATTENTION_BACKENDS), default="native",
          help="sequence-parallel attention: native, xfuser (yunchang USP) or deepspeed (Ulysses)")  # fmt: skip
    _flag(p, "--seed", type=int, default=0)
    _flag(p, "--json", metavar="FILE", help="also write the report as JSON")
    return p


def prepare(args: argparse.Namespace, world: int, argv: list[str]) -> Check:
    """Every check that needs no weights, with one-line errors."""
    arch = REAL_ARCHS[args.family]
    layers = arch.full_layers if args.layers is None else args.layers
    if not 1 <= layers <= arch.full_layers:
        raise InputError(f"--layers must be in 1..{arch.full_layers} for {args.family}; got {layers}")
    if args.steps_per_stage < 1:
        raise InputError(f"--steps-per-stage must be >= 1; got {args.steps_per_stage}")
    if args.text_len is not None and args.text_len < 1:
        raise InputError(f"--text_len must be >= 1; got {args.text_len}")
    if world < 1:
        raise InputError(f"--nproc must be >= 1; got {world}")
    name = args.device
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name} requested but CUDA is not available here")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # ranks on this machine (torchrun: per node)
        if local > torch.cuda.device_count():
            raise InputError(
                f"{local} ranks need {local} GPUs (one each); this machine has {torch.cuda.device_count()}"
            )
    overrides = [
        f"{key}={value}"
        for key, value in (
            ("sampling.size", args.size), ("sampling.frame_num", args.frame_num), ("sampling.steps", args.steps),
            ("sampling.budget", args.budget), ("parallel.ulysses_degree", args.ulysses_degree),
            ("parallel.ring_degree", args.ring_degree),
        )
        if value is not None
    ]  # fmt: skip
    config = load_config(ROOT / "configs" / arch.run_config, overrides)
    adapter = FAMILIES[arch.family]
    spec = adapter.spec_from_configs(arch.config, arch.vae)
    width, height = config.sampling.pixel_size()
    grid = spec.latent_grid(width, height, config.sampling.frame_num)
    if world > 1 or args.ulysses_degree or args.ring_degree:
        from .distributed import resolve_layout

        resolve_layout(config, world, int(arch.config["num_attention_heads"]), False)
    if world > 1:
        from ..parallel.backends import check_backend_available

        check_backend_available(args.attention_backend)
    s = config.sampling
    cost = adapter.cost_model_from_config(arch.config)
    planner = Planner(grid, s.steps, s.budget, config.dvg, spec.spatial_multiple, cost, spec.temporal_multiple)
    chosen, _ = planner.choose(0.5)  # no sketch to read: equal demand weights
    if world > 1 and arch.sequence_plan is WAN_TI2V_SEQUENCE_PLAN:
        for g in chosen.grids:
            check_ti2v_shards(g.tokens(spec.patch), world)
    return Check(
        args.family, arch, layers, DTYPES[args.dtype], device, world, args.ulysses_degree, args.ring_degree,
        args.attention_backend, spec, grid, planner, chosen.grids, chosen, args.steps_per_stage, args.text_len,
        args.seed, args.json, argv,
    )  # fmt: skip


def _finish(report: dict[str, Any], check: Check) -> None:
    print(format_report(report), flush=True)
    if check.json_path:
        path = Path(check.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", flush=True)


def _rank_main(argv: list[str]) -> int:
    """One rank (spawned by ``--nproc`` or by torchrun): validate, run, rank 0 prints."""
    from .distributed import env_world

    rank, world, local_rank = env_world()
    check = prepare(build_parser().parse_args(argv), world, argv)
    if check.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    try:
        report = run_rank(check, rank, world, local_rank)
    except BaseException as e:
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    if report is not None:
        _finish(report, check)
    return 0


def _recorded_rank(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    code: int | None = record(_rank_main)(argv)
    return 0 if code is None else code


def spawn(nproc: int, argv: list[str]) -> int:
    """``nproc`` ranks with torch's elastic launcher (what torchrun uses); a failed rank is one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"check-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )  # fmt: skip
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, _recorded_rank)(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        why = str(message or "").strip().splitlines()[0] if str(message or "").strip() else f"exit {failure.exitcode}"
        print(f"{PROG}: error: rank {rank} failed: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``launch/check_gpu.py``: validate, then run here, under torchrun, or spawn ``--nproc`` ranks."""
    from .distributed import env_world

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _, env_size, _ = env_world()
    world = env_size if env_size > 1 else args.nproc
    try:
        check = prepare(args, world, argv)
    except (ConfigError, InputError, InfeasibleBudget, ValueError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if env_size > 1:
        return _rank_main(argv)
    if args.nproc > 1:
        return spawn(args.nproc, argv)
    report = run_rank(check)
    assert report is not None
    _finish(report, check)
    return 0
