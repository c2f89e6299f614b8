"""Train the demo Wan model on procedural clips (the recipe: dvg_dist/data/train.py).

    python launch/train_demo.py --out models/dvg-demo-wan-cpu --minutes 29.5     # the CPU model, 2 cores
    python launch/train_demo.py --out models/dvg-demo-wan --device cuda --steps 1906 --minutes 30 --batch 128 \
        --lr 3e-3 --layers 8 --heads 4 --ffn_dim 512 --weights_dtype float16   # the default model, on a GPU
    python launch/train_demo.py --out /tmp/smoke --smoke               # seconds: toy sizes, nothing learnt

Writes a diffusers WanPipeline directory (replacing ``--out``) with ``dvg_demo.json`` (steps, losses, wall
time, dataset seed) and prints its path. Bad flags exit 2 with one ``train_demo.py: error:`` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from dvg_dist.data.train import Architecture, TrainConfig, smoke_config, train

PROG = "train_demo.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", required=True, help="pipeline directory to write (replaced if it exists)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the whole run")
    p.add_argument("--seed", type=int, default=0, help="dataset and initialisation seed")
    p.add_argument("--clips", type=int, default=800, help="distinct training clips")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--frames", type=int, default=TrainConfig.frames, help="pixel frames per clip (4k+1)")
    p.add_argument("--steps", type=int, help="a fixed number of transformer steps instead of the time budget")
    p.add_argument("--stage_fraction", type=float, default=TrainConfig.stage_fraction,
                   help="share of batches at DVG's reduced stage grids (0: full size only)")  # fmt: skip
    p.add_argument("--object_weight", type=float, default=TrainConfig.object_weight,
                   help="extra loss weight on the object's latent pixels (0: plain MSE)")  # fmt: skip
    p.add_argument("--object_weight_max_sigma", type=float, default=TrainConfig.object_weight_max_sigma,
                   help="apply the object weight only at noise levels sigma <= this (1: all)")  # fmt: skip
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="clips per step")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--layers", type=int, default=Architecture.layers, help="transformer blocks")
    p.add_argument("--heads", type=int, default=Architecture.heads, help="attention heads")
    p.add_argument("--head_dim", type=int, default=Architecture.head_dim, help="channels per head (even)")
    p.add_argument("--ffn_dim", type=int, default=Architecture.ffn_dim, help="feed-forward width")
    p.add_argument("--weights_dtype", choices=("float32", "float16"), default=TrainConfig.weights_dtype,
                   help="dtype of the saved transformer weights (float16: half the size)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the transformer trains (cpu, cuda)")
    p.add_argument("--smoke", action="store_true", help="a few steps at toy sizes (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    try:
        if args.smoke:
            cfg = smoke_config(out, args.seed)
            cfg.threads = args.threads
        else:
            cfg = TrainConfig(
                out, minutes=args.minutes, seed=args.seed, clips=args.clips, threads=args.threads,
                frames=args.frames, steps=args.steps, stage_fraction=args.stage_fraction, device=args.device,
                batch=args.batch, lr=args.lr, object_weight=args.object_weight,
                object_weight_max_sigma=args.object_weight_max_sigma,
                weights_dtype=args.weights_dtype,
                arch=Architecture(heads=args.heads, head_dim=args.head_dim, layers=args.layers, ffn_dim=args.ffn_dim),
            )  # fmt: skip
        cfg.progress = not args.quiet
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(train(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
