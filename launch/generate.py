"""Generate videos with DVG on a diffusers checkpoint.

python launch/generate.py --config configs/tiny-wan.yaml --prompt "a red ball" --budget 0.5 --out out/
"""

from __future__ import annotations

import argparse
import sys

from dvg_dist.runtime.cli import OneLineParser, add_generation_args
from dvg_dist.runtime.generate import run


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    add_generation_args(parser)
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument(
        "--save-latent", "--save_latent", action="store_true", help="also write <name>.latent.safetensors"
    )
    parser.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (the whole candidate table)")
    args: argparse.Namespace = parser.parse_args(argv)
    return run(args, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
