"""Train the demo Wan model on procedural clips, on CPU (the recipe: dvg_dist/data/train.py).

    python launch/train_demo.py --out models/dvg-demo-wan              # ~25 minutes on 2 cores
    python launch/train_demo.py --out /tmp/demo --minutes 10 --seed 1
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

from dvg_dist.data.train import TrainConfig, smoke_config, train

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
    p.add_argument("--smoke", action="store_true", help="a few steps at toy sizes (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    try:
        if args.smoke:
            cfg = smoke_config(out, args.seed)
            cfg.threads = args.threads
        else:
            cfg = TrainConfig(out, minutes=args.minutes, seed=args.seed, clips=args.clips, threads=args.threads)
        cfg.progress = not args.quiet
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(train(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
