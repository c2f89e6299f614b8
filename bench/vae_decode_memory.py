"""Peak memory of one VAE decode: untiled, diffusers' tiled, ours tiled, ours split over 2 ranks (CPU).

    python bench/vae_decode_memory.py [--family wan|hunyuan] [--size 832x480] [--frames 17] [--width 32]

Random-weight VAE of the family's real architecture at a reduced channel width (``--width`` = Wan ``base_dim`` /
HunyuanVideo's first block width), real pixel size and frame count. Each mode runs in a fresh process, one thread
per process, after a small warm-up decode. Memory is
the process's resident-set high-water mark (Linux ``VmHWM``), reset just before the decode via
``/proc/self/clear_refs`` and reported above the RSS at that moment (weights, latent and libraries excluded): what
the decode itself adds. The distributed mode runs 2 ranks on gloo (``torch.distributed.run``), one row per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("untiled", "diffusers-tiled", "tiled", "distributed")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _vae(family: str, width: int) -> Any:
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan

    torch.manual_seed(0)
    # Any: for a type checker diffusers' top-level names are its torch-less placeholders
    # (diffusers/utils/dummy_pt_objects.py), classes without the nn.Module methods.
    vae: Any
    if family == "wan":  # Wan 2.1's VAE layout (dim_mult 1,2,4,4; 2 res blocks) at base_dim = width
        vae = AutoencoderKLWan(base_dim=width, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    else:  # HunyuanVideo's VAE layout (4 blocks, channels ×1,2,4,4) at a reduced width
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=16, block_out_channels=(width, 2 * width, 4 * width, 4 * width), norm_num_groups=width // 4
        )
    return vae.eval()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from dvg_dist.runtime.vae import TileSettings, decode_video

    parallel = args.worker == "distributed"
    if parallel:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)  # every mode on one thread per process: comparable, and 2 ranks fit 2 cores
    vae = _vae(args.family, args.width)
    w, h = (int(v) for v in args.size.split("x"))
    sp, st = vae.spatial_compression_ratio, 4  # both families: 8x spatial, 4x temporal
    z = torch.randn(1, 16, (args.frames - 1) // st + 1, h // sp, w // sp, generator=torch.Generator().manual_seed(0))
    settings = TileSettings(True, args.tile, args.stride)
    with torch.no_grad():  # warm-up: one-time allocations (kernels, thread pools) stay out of the measurement
        decode_video(vae, torch.randn(1, 16, 2, 8, 8), None)
    if parallel:
        dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.worker == "untiled":
            video = decode_video(vae, z, None)
        elif args.worker == "diffusers-tiled":
            vae.enable_tiling(args.tile, args.tile, tile_sample_stride_height=args.stride,
                              tile_sample_stride_width=args.stride)  # fmt: skip
            video = vae.decode(z, return_dict=False)[0]
        else:
            video = decode_video(vae, z, settings, parallel=parallel)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") - base
    rank = dist.get_rank() if parallel else 0
    out = {
        "mode": args.worker, "rank": rank, "peak_mb": peak / 1024, "seconds": seconds,
        "video_mb": None if video is None else video.numel() * video.element_size() / 2**20,
        "latent": list(z.shape),
    }  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)
    if parallel:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="wan", choices=("wan", "hunyuan"))
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--stride", type=int, default=192)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    flags = [f"--family={args.family}", f"--size={args.size}", f"--frames={args.frames}", f"--width={args.width}",
             f"--tile={args.tile}", f"--stride={args.stride}"]  # fmt: skip
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *flags, f"--worker={mode}"]
        if mode == "distributed":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        # A fixed mmap threshold makes glibc hand large freed blocks back at once, so VmHWM tracks live tensors
        # rather than heap fragmentation (the default threshold grows after the first large free).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "262144"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        found = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows += sorted(found, key=lambda r: r["rank"])
    print(f"{args.family} VAE (width {args.width}), {args.size}, {args.frames} frames, latent {rows[0]['latent']}, "
          f"tiles {args.tile} px stride {args.stride}; decoded video {rows[0]['video_mb']:.0f} MB (fp32)")  # fmt: skip
    print(f"{'mode':<16} {'rank':>4} {'peak above baseline (MB)':>25} {'time (s)':>9}")
    for r in rows:
        print(f"{r['mode']:<16} {r['rank']:>4} {r['peak_mb']:>25.0f} {r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
