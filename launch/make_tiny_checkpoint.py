"""Write a tiny random-weight diffusers checkpoint of one family (tests and demos; see dvg_dist/models/tiny.py).

    python launch/make_tiny_checkpoint.py --family wan --out /tmp/tiny-wan
    python launch/make_tiny_checkpoint.py --family hunyuan --out /tmp/tiny-hv --seed 1 --overwrite
    python launch/make_tiny_checkpoint.py --lora-of /tmp/tiny-wan --out /tmp/tiny-lora.safetensors

With ``--lora-of CHECKPOINT`` it writes a random LoRA for that tiny Wan checkpoint instead (``--component
transformer_2`` for the low-noise expert of ``wan-moe``; ``--lora-format wan`` for the original Wan key names), to
try ``--lora`` / ``--lora_2`` with.

Prints the directory written. It loads with ``DiffusionPipeline.from_pretrained(DIR)``; its ``dvg_tiny.json``
says what a call must pass (HunyuanVideo's ``prompt_template``). Bad flags, an unknown family or an existing
non-empty ``--out`` without ``--overwrite`` exit 2 with one ``make_tiny_checkpoint.py: error:`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from dvg_dist.models.tiny import FAMILIES, LORA_FORMATS, build_tiny_checkpoint, build_tiny_lora

PROG = "make_tiny_checkpoint.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, ``make_tiny_checkpoint.py: error: …``, exit 2 (argparse's code), no usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The flags; its ``error`` prints one line and exits 2."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--family", choices=FAMILIES, help="which pipeline family")
    what.add_argument("--lora-of", metavar="CHECKPOINT", help="write a random LoRA for this tiny Wan checkpoint")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty); a .safetensors "
                   "file with --lora-of")  # fmt: skip
    p.add_argument("--component", default="transformer", choices=["transformer", "transformer_2"],
                   help="--lora-of: which transformer the LoRA is for")  # fmt: skip
    p.add_argument("--lora-format", default="diffusers", choices=LORA_FORMATS, help="--lora-of: key names")
    p.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives identical files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, build, print the directory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally (diffusers is imported lazily)
    try:
        if args.lora_of is not None:
            if Path(args.out).exists() and not args.overwrite:
                raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
            out = build_tiny_lora(args.lora_of, args.out, args.seed, args.component, fmt=args.lora_format)
        else:
            out = build_tiny_checkpoint(args.family, args.out, seed=args.seed, overwrite=args.overwrite)
    except ValueError as err:
        parser.error(str(err))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
