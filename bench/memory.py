"""Benchmark: peak memory of each phase (load, encode, each DVG stage, decode) with and without each memory option,
measured, plus an analytic table for the real models at sp = 8.

    python bench/memory.py [--size 1280x720 --frames 9 --steps 8] [--configs NAME,...] [--out bench/results/memory.json]
    python bench/memory.py --smoke --out /tmp/memory.json     # ~30 s: tiny video and widths, two configurations

**Measured** (CPU, fp32): a Wan 2.1 T2V pipeline of diffusers' own classes with random weights, 720p-shaped and
narrow — transformer 2 heads × 64 (hidden 128), FFN 512, 2 layers, patch 1×2×2; umT5 encoder d_model 1024, 4 layers,
FFN 2560 (48M parameters, the largest component, so the encoder options show); Wan VAE with the real layout
(dim_mult 1,2,4,4, 2 res blocks, temporal downsampling) at base_dim 4 instead of 96. Video 1280×720 × 9 frames →
latent 3×90×160 (10,800 tokens at full size; 81 frames would be 75,600 tokens, hours of CPU attention), 8 steps,
guidance 5 (two passes per step), DVG budget 0.5. Every configuration runs in fresh processes (1 or 2 gloo ranks
via ``torch.distributed.run``) through :class:`~dvg_dist.executors.worker.Worker` / ``Engine.generate``; the phases
are delimited by hooks (the transformer's pre-forward hook counts model calls against the plan's executed step
counts; the decode by wrapping the engine's decode function) and each phase's peak is
``dvg_dist.runtime.memory.peak_memory`` after ``reset_peak_memory`` at its start: the RSS high-water mark on CPU
(reset through ``/proc/self/clear_refs``), CUDA max allocated on a GPU. One row per rank is printed, and
``memory.component_bytes`` — the bytes of each component this rank holds — shows the weight effects exactly (on
CPU, ``offload`` and ``text_encoder_offload`` move nothing: the compute device *is* the CPU).

**Analytic** (bf16 = 2 bytes, sp = 8, 720p; every formula in ``FORMULAS``):
weights per rank with and without FSDP sharding (parameter counts of the released configs, built on the meta
device: :data:`dvg_dist.runtime.check_gpu.REAL_ARCHS`); text encoders per rank with ``text_encoder=each`` /
``rank0`` / offload; activations per rank of one block, for the full grid and each stage of the DVG plan at budget
0.5; VAE decode peak untiled / tiled / distributed, from a bytes-per-decoded-pixel coefficient measured here on
the real VAE architectures (random weights, one small latent each, fresh processes): the peak of *live tensors*
during an untiled decode (:class:`LiveTensorPeak`), because the CPU's ``slow_conv3d`` im2col workspaces — which a
GPU's kernels do not allocate — would inflate an RSS-based value (``k_fp32_rss`` in the JSON: 1.5–3.7× the
live-tensor value here).

    python bench/memory.py --analytic-only      # redo the VAE probes and the analytic table, keep the measured part
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import cpu_model  # noqa: E402

from dvg_dist.dvg.planner import Grid, Planner  # noqa: E402
from dvg_dist.models import FAMILIES  # noqa: E402
from dvg_dist.parallel import shard_sizes  # noqa: E402
from dvg_dist.runtime.check_gpu import REAL_ARCHS, materialize_random_, param_counts  # noqa: E402

GiB = 2**30
PROMPT = "a red ball rolling over green grass"

# -- measured: the pipeline and the configurations ---------------------------------------------------------------

ARCH = {
    "transformer": {"num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 512, "num_layers": 2,
                    "freq_dim": 64},
    "text_encoder": {"d_model": 1024, "d_kv": 64, "d_ff": 2560, "num_layers": 4, "num_heads": 16},
    "vae": {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "temperal_downsample": [False, True, True]},
}  # fmt: skip
SMOKE_ARCH = {
    "transformer": {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 48, "num_layers": 1, "freq_dim": 32},
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "vae": {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]},
}  # fmt: skip

BASE = ["model.vae_tiling=false"]
"""Every option off; each configuration switches some on."""
CONFIGS: list[tuple[str, int, list[str]]] = [
    ("baseline", 1, []),
    ("vae_tiling", 1, ["model.vae_tiling=true"]),
    ("offload", 1, ["model.offload=true"]),
    ("text_encoder_offload", 1, ["model.text_encoder_offload=true"]),
    ("baseline", 2, []),
    ("shard_weights", 2, ["parallel.shard_weights=true"]),
    ("text_encoder_rank0", 2, ["parallel.text_encoder=rank0"]),
    ("vae_tiling", 2, ["model.vae_tiling=true"]),
    ("vae_tiling+vae_parallel", 2, ["model.vae_tiling=true", "parallel.vae_parallel=true"]),
    ("all", 2, ["parallel.shard_weights=true", "model.offload=true", "parallel.text_encoder=rank0",
                "model.vae_tiling=true", "parallel.vae_parallel=true"]),
]  # fmt: skip
SMOKE_CONFIGS = [CONFIGS[0], CONFIGS[1]]
PHASES = ("load", "encode", "stage1", "stage2", "stage3", "stage4", "decode")


def build_checkpoint(out: Path, arch: dict[str, Any]) -> Path:
    """The narrow 720p-shaped Wan pipeline as a diffusers directory (the tiny Wan pipeline's tokenizer and scheduler,
    wider components); reused while its ``bench_arch.json`` matches."""
    marker = out / "bench_arch.json"
    if marker.is_file() and json.loads(marker.read_text()) == arch:
        return out
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from dvg_dist.models.tiny import build_tiny_pipeline

    pipe, _ = build_tiny_pipeline("wan", 0)
    torch.manual_seed(0)
    te = arch["text_encoder"]
    pipe.text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(pipe.tokenizer), relative_attention_num_buckets=32, **te)
    ).eval()
    transformer: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=te["d_model"], **arch["transformer"]
    )
    vae: Any = AutoencoderKLWan(**arch["vae"])
    pipe.transformer, pipe.vae = transformer.eval(), vae.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-memory-", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "bench_arch.json").write_text(json.dumps(arch))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class Phases:
    """Peak memory per phase, phases entered in order from hooks (entering the current one again is a no-op)."""

    def __init__(self) -> None:
        from dvg_dist.runtime import memory

        self.memory = memory
        self.name: str | None = None
        self.peak: dict[str, int] = {}
        self.before: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.t0 = 0.0

    def enter(self, name: str) -> None:
        if name == self.name:
            return
        self.close()
        self.memory.reset_peak_memory()
        self.before[name] = self.memory.current_memory()
        self.name, self.t0 = name, time.perf_counter()

    def close(self) -> None:
        if self.name is not None:
            self.peak[self.name] = self.memory.peak_memory()
            self.seconds[self.name] = time.perf_counter() - self.t0
            self.name = None


def run_worker(spec_path: str) -> int:
    """One configuration, one rank (under ``torch.distributed.run`` or alone): phases → ``rank{R}.json``."""
    from dvg_dist.config import load_config
    from dvg_dist.executors.worker import Worker
    from dvg_dist.runtime import engine as engine_module
    from dvg_dist.runtime import memory
    from dvg_dist.runtime.distributed import env_world
    from dvg_dist.runtime.engine import Request

    spec = json.loads(Path(spec_path).read_text())
    rank, world, _ = env_world()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    config = load_config(ROOT / "configs" / "tiny-wan.yaml", spec["overrides"])
    phases = Phases()
    worker = Worker(config)
    worker.init_distributed()
    phases.enter("load")
    worker.load()
    phases.close()
    engine = worker.engine
    grid = engine.spec.latent_grid(*config.sampling.pixel_size(), config.sampling.frame_num)
    counts = engine.sampler_config(grid).planner().executed_counts
    passes = 2 if config.sampling.guidance_scale > 1 and not config.parallel.cfg_parallel else 1
    stage_of_call = [k for k, n in enumerate(counts) for _ in range(n * passes)]
    calls = [0]
    grids: list[list[int]] = [[] for _ in counts]

    def on_transformer(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        k = stage_of_call[min(calls[0], len(stage_of_call) - 1)]
        calls[0] += 1
        grids[k] = list(kwargs["hidden_states"].shape[2:])
        phases.enter(f"stage{k + 1}")

    for module in engine.adapter.transformers():
        module.register_forward_pre_hook(on_transformer, with_kwargs=True)
    _wrap_decode(engine, phases)
    phases.enter("encode")
    result = worker.execute(Request(PROMPT, seed=0), progress=False)
    phases.close()
    record = {
        "rank": rank,
        "world_size": world,
        "peak_bytes": phases.peak,
        "before_bytes": phases.before,
        "seconds": phases.seconds,
        "components": memory.component_bytes(engine.adapter.pipe),
        "timings": result.timings,
        "grids": grids,
        "calls": calls[0],
        "memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "rss_high_water",
        "engine": engine_module.__name__,
    }
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(record))
    worker.shutdown()
    return 0


def _wrap_decode(engine: Any, phases: Phases) -> None:
    """Enter the ``decode`` phase when the engine decodes: its VAE path (``runtime.vae.decode_latent``, looked up at
    call time) or the adapter's own ``decode``."""
    adapter_decode = engine.adapter.decode

    def decode(*a: Any, **k: Any) -> Any:
        phases.enter("decode")
        return adapter_decode(*a, **k)

    engine.adapter.decode = decode
    try:
        from dvg_dist.runtime import vae
    except ImportError:
        return
    latent_decode = vae.decode_latent

    def decode_latent(*a: Any, **k: Any) -> Any:
        phases.enter("decode")
        return latent_decode(*a, **k)

    vae.decode_latent = decode_latent  # type: ignore[assignment]


def run_config(name: str, world: int, options: list[str], base: list[str], ckpt: Path) -> dict[str, Any]:
    """One configuration in fresh processes; every rank's record."""
    with tempfile.TemporaryDirectory(prefix="dvg-memory-") as tmp:
        spec = {"overrides": [f"model.path={ckpt}", *base, *BASE, *options], "out": tmp}
        spec_path = Path(tmp, "spec.json")
        spec_path.write_text(json.dumps(spec))
        script = [str(Path(__file__).resolve()), "--worker", str(spec_path)]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *script]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"configuration {name} ({world} ranks) failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "name": name,
        "world_size": world,
        "options": options,
        "wall_s": time.perf_counter() - t0,
        "peak_bytes": {p: max(r["peak_bytes"].get(p, 0) for r in ranks) for p in PHASES},
        "ranks": ranks,
    }


# -- VAE decode: bytes per decoded pixel, measured on the real VAE architectures ---------------------------------

# The released VAE configs (diffusers defaults of each class = the checkpoints' vae/config.json).
REAL_VAES: dict[str, dict[str, Any]] = {
    "AutoencoderKLWan": {},
    "AutoencoderKLHunyuanVideo": {},
    "AutoencoderKLHunyuanVideo15": {},
}
VAE_PROBE = {  # latent [C, T, h, w] decoded untiled: T = 2 → 5 pixel frames
    "AutoencoderKLWan": (16, 2, 16, 16),
    "AutoencoderKLHunyuanVideo": (16, 2, 16, 16),
    "AutoencoderKLHunyuanVideo15": (32, 2, 8, 8),
}
SMOKE_VAE_PROBE = {"AutoencoderKLWan": (16, 2, 2, 2)}
UNIT_FRAMES_PROBE = {"AutoencoderKLWan": 4, "AutoencoderKLHunyuanVideo": 5, "AutoencoderKLHunyuanVideo15": 5}
"""Pixel frames decoded at once in the probe: Wan's causal decoder runs one latent frame (4 pixel frames) at a time;
the other two decode the probe's 5 frames together."""


class LiveTensorPeak:
    """Peak bytes of the tensor storages alive at once among those created while active (a ``TorchDispatchMode``
    watching every op's outputs; a storage counts until the last tensor on it dies). Kernels' internal workspaces —
    the CPU's ``slow_conv3d`` im2col buffers, cuDNN's — are not tensors and are not counted: what is left is the
    activation working set a GPU decode holds in ``memory_allocated``."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list[int]] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode = _Mode()

    def track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]


def run_vae_probe(cls_name: str, shape: list[int]) -> int:
    """Fresh process: the VAE at its released config, random weights (fp32, CPU); decode one latent untiled; print
    its weights, the peak of live tensors during the decode, the RSS before and at the peak, and the output (JSON)."""
    import diffusers
    from accelerate import init_empty_weights

    from dvg_dist.runtime import memory

    torch.set_num_threads(os.cpu_count() or 1)
    with init_empty_weights(include_buffers=False):
        vae = getattr(diffusers, cls_name)(**REAL_VAES[cls_name])
    materialize_random_(vae, torch.float32, torch.device("cpu"))
    vae.eval()
    z = torch.randn(1, *shape)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    live = LiveTensorPeak()
    memory.reset_peak_memory()
    before = memory.current_memory()
    t0 = time.perf_counter()
    with torch.no_grad(), live.mode:
        video = vae.decode(z, return_dict=False)[0]
    seconds = time.perf_counter() - t0
    peak = memory.peak_memory()
    out = video.numel() * video.element_size()
    print(json.dumps({"weights": weights, "live_peak": live.peak, "rss_before": before, "rss_peak": peak,
                      "output": out, "shape": list(video.shape), "seconds": seconds}))  # fmt: skip
    return 0


def vae_coefficients(probes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """``k``: bytes per decoded pixel-frame of one decode unit (fp32), ``(live tensor peak - output) / (frames at
    once × H × W)``, each VAE in a fresh process (the RSS-based value, CPU conv workspaces included, rides along)."""
    out = {}
    for cls_name, shape in probes.items():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--vae-probe", cls_name, ",".join(map(str, shape))]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"VAE probe {cls_name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        height, width = r["shape"][-2:]
        unit = UNIT_FRAMES_PROBE[cls_name] * height * width
        r["k_fp32"] = max(0.0, (r["live_peak"] - r["output"]) / unit)
        r["k_fp32_rss"] = max(0.0, (r["rss_peak"] - r["rss_before"] - r["output"]) / unit)
        r["unit_pixel_frames"] = unit
        out[cls_name] = r
    return out


# -- analytic -----------------------------------------------------------------------------------------------------

TEXT_ENCODERS = {  # parameters of the released configs (built on the meta device; shared embeddings counted once)
    "umT5-XXL encoder": 5.681e9,  # d 4096, FFN 10240 gated, 24 layers, vocab 256,384
    "Llama-3-8B (LLaVA text model, no LM head)": 7.505e9,  # d 4096, FFN 14336, 32 layers, 8 KV heads
    "CLIP ViT-L/14 text": 0.123e9,
    "Qwen2.5-VL-7B text model": 7.071e9,  # d 3584, FFN 18944, 28 layers, 4 KV heads (vision tower not loaded)
    "ByT5-small encoder": 0.218e9,  # d 1472, FFN 3584 gated, 12 layers
}
MODELS: list[dict[str, Any]] = [
    {"name": "Wan2.1-T2V-14B", "arch": "wan", "experts": 1, "size": (1280, 720), "frames": 81,
     "text": ["umT5-XXL encoder"], "vae": "AutoencoderKLWan", "joint_text": 0},
    {"name": "Wan2.2-T2V-A14B", "arch": "wan", "experts": 2, "size": (1280, 720), "frames": 81,
     "text": ["umT5-XXL encoder"], "vae": "AutoencoderKLWan", "joint_text": 0},
    {"name": "HunyuanVideo-1.5 (720p)", "arch": "hunyuan15", "experts": 1, "size": (1280, 720), "frames": 121,
     "text": ["Qwen2.5-VL-7B text model", "ByT5-small encoder"], "vae": "AutoencoderKLHunyuanVideo15",
     "joint_text": 1000 + 256 + 729},
    {"name": "HunyuanVideo (13B)", "arch": "hunyuan", "experts": 1, "size": (1280, 720), "frames": 129,
     "text": ["Llama-3-8B (LLaVA text model, no LM head)", "CLIP ViT-L/14 text"], "vae": "AutoencoderKLHunyuanVideo",
     "joint_text": 256},
]  # fmt: skip
VAE_UNIT_FRAMES = {"AutoencoderKLWan": 4, "AutoencoderKLHunyuanVideo": 16, "AutoencoderKLHunyuanVideo15": None}
"""Pixel frames one decode unit holds at real size: Wan one latent frame (4); HunyuanVideo its framewise chunk (16,
diffusers' default, spatially untiled or not); HunyuanVideo-1.5 every frame (no temporal tiling)."""
TILE = 256
"""diffusers' default tile edge in pixels (stride 192) for all three VAE classes."""

FORMULAS = {
    "weights_replicated": "P × E × b (every rank holds every expert)",
    "weights_fsdp": "P × E × b / sp + (P_root + P_block) × b (the rank's shards, plus the root's parameters and one "
    "block's, all-gathered while they run; FSDP2 reshards after each forward)",
    "text_encoder": "each: T × b on every rank; rank0: T × b on rank 0, 0 elsewhere; offload: T × b during encode, 0 "
    "on the device after",
    "activations_per_block": "b × (S_r × (2d + max(7d, 2f)) + L_text × 7d): residual + block input, then the wider "
    "of attention (q, k, v, their all-to-all copies, output: 7d) and the FFN (hidden and activation: 2f); joint-"
    "attention text tokens are replicated on every rank; flash / memory-efficient attention (no S² matrix)",
    "vae_untiled": "W_vae + k × F_unit × H × W + O",
    "vae_tiled": "W_vae + k × F_unit × 256² + O",
    "vae_distributed": "rank 0: as tiled (it blends and holds the output O); other ranks: W_vae + k × F_unit × 256² "
    "(one tile at a time, sent to rank 0)",
    "vae_terms": "k = bytes of live tensors per decoded pixel-frame, measured on the real VAE architecture (fp32 on "
    "CPU, kernels' workspaces excluded; halved for bf16); F_unit = pixel frames decoded at once (Wan 4, HunyuanVideo "
    "16, HunyuanVideo-1.5 all F); O = F × 3 × H × W × b",
}


def block_param_split(model: torch.nn.Module) -> tuple[int, int]:
    """(root parameters outside the block stacks, the largest block's parameters)."""
    stacks = [c for c in model.children() if isinstance(c, torch.nn.ModuleList)]
    in_blocks = sum(p.numel() for s in stacks for p in s.parameters())
    largest = max(sum(p.numel() for p in b.parameters()) for s in stacks for b in s)
    return sum(p.numel() for p in model.parameters()) - in_blocks, largest


def meta_model(arch_name: str) -> tuple[Any, int]:
    """The released transformer at 1 layer on the meta device, and its parameters at full depth."""
    import diffusers
    from accelerate import init_empty_weights

    arch = REAL_ARCHS[arch_name]
    with init_empty_weights():
        model = getattr(diffusers, arch.model_class)(**arch.config_at(1))
    return model, param_counts(model, arch, 1)[1]


def activation_bytes(tokens_per_rank: int, hidden: int, ffn: int, text: int, b: int = 2) -> int:
    """One block's working set on one rank (``FORMULAS['activations_per_block']``)."""
    return b * (tokens_per_rank * (2 * hidden + max(7 * hidden, 2 * ffn)) + text * 7 * hidden)


def analytic(sp: int, budget: float, k: dict[str, float], b: int = 2) -> list[dict[str, Any]]:
    rows = []
    for m in MODELS:
        arch = REAL_ARCHS[m["arch"]]
        model, params = meta_model(m["arch"])
        root, block = block_param_split(model)
        cfg = arch.config
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        ffn = int(cfg.get("ffn_dim", float(cfg.get("mlp_ratio", 4.0)) * hidden))
        adapter = FAMILIES[arch.family]
        spec = adapter.spec_from_configs(cfg, arch.vae)
        width, height = m["size"]
        full = spec.latent_grid(width, height, m["frames"])
        planner = Planner(full, 50, budget, spatial_multiple=spec.spatial_multiple,
                          cost_model=adapter.cost_model_from_config(cfg),
                          temporal_multiple=spec.temporal_multiple)  # fmt: skip
        chosen = planner.choose(0.5)[0]
        stages = []
        for i, g in enumerate(chosen.grids):
            tokens = g.tokens(spec.patch)
            per_rank = max(shard_sizes(tokens, sp))
            stages.append({"stage": i + 1, "grid": g.as_list(), "tokens": tokens, "tokens_per_rank": per_rank,
                           "bytes_per_block": activation_bytes(per_rank, hidden, ffn, m["joint_text"], b)})  # fmt: skip
        text = sum(TEXT_ENCODERS[t] for t in m["text"])
        weights = params * m["experts"] * b
        vae = _vae_estimate(m, k.get(m["vae"]), b)
        rows.append(
            {
                "name": m["name"], "video": f"{width}x{height}x{m['frames']}", "latent": full.as_list(),
                "params": params, "experts": m["experts"], "root_params": root, "block_params": block,
                "weights_replicated_bytes": weights,
                "weights_fsdp_bytes": weights / sp + (root + block) * b,
                "text_encoders": m["text"], "text_params": text,
                "text_bytes": {"each": text * b, "rank0_on_rank0": text * b, "rank0_on_others": 0,
                               "offload_after_encode": 0},
                "plan": {"s": chosen.s, "t23": chosen.t23, "density": chosen.density},
                "stages": stages, "vae": vae,
            }
        )  # fmt: skip
    return rows


def _vae_estimate(m: dict[str, Any], k_fp32: float | None, b: int) -> dict[str, Any]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = getattr(diffusers, m["vae"])(**REAL_VAES[m["vae"]])
    w_vae = sum(p.numel() for p in vae.parameters()) * b
    width, height = m["size"]
    frames = m["frames"]
    unit_frames = VAE_UNIT_FRAMES[m["vae"]] or frames
    out = frames * 3 * height * width * b
    result: dict[str, Any] = {
        "class": m["vae"],
        "weights_bytes": w_vae,
        "output_bytes": out,
        "unit_frames": unit_frames,
    }
    if k_fp32 is None:
        return result
    k = k_fp32 * b / 4
    tile = min(TILE * TILE, height * width)
    result.update(
        k_bytes_per_pixel_frame=k,
        untiled_bytes=w_vae + k * unit_frames * height * width + out,
        tiled_bytes=w_vae + k * unit_frames * tile + out,
        distributed_rank0_bytes=w_vae + k * unit_frames * tile + out,
        distributed_other_bytes=w_vae + k * unit_frames * tile,
    )
    return result


# -- output ------------------------------------------------------------------------------------------------------


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def print_measured(configs: list[dict[str, Any]], phases: tuple[str, ...]) -> None:
    head = "".join(f"{p:>8}" for p in phases)
    print(f"{'configuration':<24}{'rank':>5}{head}{'tf MiB':>8}{'te MiB':>8}")
    for c in configs:
        for r in c["ranks"]:
            peaks = "".join(f"{_g(r['peak_bytes'][p]) if p in r['peak_bytes'] else '-':>8}" for p in phases)
            comps = r["components"]
            tf, te = comps.get("transformer", 0) / 2**20, comps.get("text_encoder", 0) / 2**20
            rank = f"{r['rank']}/{c['world_size']}"
            print(f"{c['name']:<24}{rank:>5}{peaks}{tf:>8.1f}{te:>8.1f}")


def print_analytic(rows: list[dict[str, Any]], sp: int) -> None:
    print(f"\nanalytic, bf16, sp = {sp} (GiB per rank)")
    print(
        "(text_encoder=rank0: the encoders are 0 on ranks other than 0; text_encoder_offload / offload: 0 on the"
        " device after encoding)"
    )
    print(f"{'model':<26}{'params':>8}{'weights':>9}{'FSDP':>7}{'text enc':>10}"
          f"{'VAE untiled':>13}{'tiled':>7}{'dist. rank0/others':>20}")  # fmt: skip
    for r in rows:
        v = r["vae"]
        vae = (
            f"{_g(v['untiled_bytes']):>13}{_g(v['tiled_bytes']):>7}"
            f"{_g(v['distributed_rank0_bytes']) + '/' + _g(v['distributed_other_bytes']):>20}"
            if "untiled_bytes" in v
            else f"{'-':>13}{'-':>7}{'-':>20}"
        )
        print(
            f"{r['name']:<26}{r['params'] * r['experts'] / 1e9:>7.1f}B{_g(r['weights_replicated_bytes']):>9}"
            f"{_g(r['weights_fsdp_bytes']):>7}{_g(r['text_bytes']['each']):>10}{vae}"
        )
    print(f"\nactivations of one block per rank, DVG plan at budget 0.5 (GiB), sp = {sp}")
    print(f"{'model':<26}{'stage':>6}{'grid':>12}{'tokens':>9}{'per rank':>10}{'GiB':>7}")
    for r in rows:
        for s in r["stages"]:
            grid = "x".join(map(str, s["grid"]))
            print(
                f"{r['name']:<26}{s['stage']:>6}{grid:>12}{s['tokens']:>9,}{s['tokens_per_rank']:>10,}"
                f"{_g(s['bytes_per_block']):>7}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1280x720")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--sp", type=int, default=8, help="sequence-parallel size of the analytic table")
    p.add_argument("--smoke", action="store_true", help="tiny video and widths, two configurations (tests)")
    p.add_argument(
        "--analytic-only",
        action="store_true",
        help="rerun the VAE probes and the analytic table; keep the measured section of an existing --out",
    )
    p.add_argument("--configs", help="comma-separated names of the measured configurations to run (default: all)")
    p.add_argument("--checkpoint", default=str(ROOT / "build" / "bench-memory-wan"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--vae-probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args.worker)
    if args.vae_probe:
        return run_vae_probe(args.vae_probe[0], [int(x) for x in args.vae_probe[1].split(",")])

    size, frames, arch = (args.size, args.frames, ARCH) if not args.smoke else ("64x64", 9, SMOKE_ARCH)
    ckpt = Path(args.checkpoint + ("-smoke" if args.smoke else ""))
    base = [f"sampling.size={size}", f"sampling.frame_num={frames}", f"sampling.steps={args.steps}",
            f"sampling.budget={args.budget}", "sampling.guidance_scale=5.0", "model.dtype=float32",
            "dvg.stage_shifts=[null, null, null, null]"]  # fmt: skip
    configs: list[dict[str, Any]] = []
    measured_command = "python bench/memory.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    if args.analytic_only and out.is_file():
        previous = json.loads(out.read_text())
        configs = previous["measured"]["configs"]
        measured_command = previous["measured"].get("command", previous["command"])
    if not args.analytic_only:
        build_checkpoint(ckpt, arch)
        wanted = None if not args.configs else set(args.configs.split(","))
        for name, world, options in SMOKE_CONFIGS if args.smoke else CONFIGS:
            if wanted is not None and f"{name}/{world}" not in wanted and name not in wanted:
                continue
            configs.append(run_config(name, world, options, base, ckpt))
            print(f"measured {name} ({world} ranks) in {configs[-1]['wall_s']:.0f} s", file=sys.stderr)
    coeffs = vae_coefficients(SMOKE_VAE_PROBE if args.smoke else VAE_PROBE)
    rows = analytic(args.sp, args.budget, {c: v["k_fp32"] for c, v in coeffs.items()})

    if configs:
        grid = Grid(*configs[0]["ranks"][0]["grids"][-1])
        print(f"measured: Wan pipeline {size} x {frames} frames -> latent {grid}, {args.steps} steps, guidance 5, "
              f"budget {args.budget}; peak per phase (GiB, largest rank; {configs[0]['ranks'][0]['memory_kind']}); "
              f"tf/te = transformer / text-encoder weights held per rank")  # fmt: skip
        print_measured(configs, PHASES)
    print_analytic(rows, args.sp)
    result = {
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
        "measured": {
            "command": measured_command,
            "architecture": arch,
            "video": {"size": size, "frames": frames, "steps": args.steps, "budget": args.budget, "guidance": 5.0},
            "phases": list(PHASES),
            "configs": configs,
        },
        "vae_coefficients": coeffs,
        "analytic": {"sp": args.sp, "bytes_per_element": 2, "budget": args.budget, "formulas": FORMULAS,
                     "models": rows},
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(), "torch": torch.__version__,
                    "python": platform.python_version(), "cuda": torch.cuda.is_available()},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
