"""``launch/generate.py``'s body: validate everything, load once per rank, generate each request, rank 0 writes."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..dvg.planner import Grid
from ..models import InputError
from .cli import OneLineParser, add_generation_args, config_from_args, read_requests
from .distributed import validate_layout
from .engine import Request, validate
from .versions import check_versions

logger = logging.getLogger("dvg_dist.generate")


def describe_plan(plan: dict[str, Any]) -> str:
    """The plan in words, a few lines."""
    lines = []
    demands = plan.get("demands")
    if demands:
        lines.append(
            f"demands: spatial {demands['spatial']:.3f}, temporal {demands['temporal']:.3f} -> "
            f"weights w_s {demands['w_s']:.3f}, w_t {demands['w_t']:.3f}"
        )
    chosen = plan["chosen"]
    if plan["mode"] != "full":
        lines.append(f"chose s={chosen['s']:g}, T23={chosen['t23']} among {len(plan['feasible']) or 1} feasible")
    for k, st in enumerate(plan["stages"]):
        t, h, w = st["grid"]
        time_s = st.get("time_s")
        took = f", {time_s:.2f}s" if time_s is not None else ""
        lines.append(
            f"stage {k + 1}: {t}x{h}x{w} latent, steps {st['steps'][0]}-{st['steps'][1]}, shift {st['shift']:g}{took}"
        )
    lines.append(
        f"density {chosen['density']:.3f} (executed {chosen['executed_density']:.3f}, "
        f"FLOPs {chosen['flop_density']:.3f} -> bound {1 / chosen['flop_density']:.2f}x)"
    )
    return "\n".join(lines)


def build_parser(prog: str = "generate.py") -> argparse.ArgumentParser:
    """generate.py's flags (shared definitions in ``cli``), plus outputs and launching."""
    parser = OneLineParser(prog=prog, description="Generate videos with DVG on a diffusers checkpoint.")
    add_generation_args(parser)
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument(
        "--save-latent", "--save_latent", action="store_true", help="also write <name>.latent.safetensors"
    )
    parser.add_argument("--nproc", type=int, default=1, help="spawn N worker processes (no torchrun needed)")
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=1,
        help="prompts per batch (default 1): each model call runs them together, and a dpN stage layout splits "
        "them over ranks; a batch shares one DVG plan",
    )
    parser.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (the whole candidate table)")
    return parser


@dataclass
class Job:
    """A validated run: what every rank needs, checked before any process or weight."""

    config: Config
    requests: list[Request]
    grid: Grid
    out: Path
    save_latent: bool
    progress: bool
    batches: list[list[int]] = field(default_factory=list)
    """Indices into ``requests``, one list per engine call (``--batch_size``); empty: one request per call."""

    def request_batches(self) -> list[list[int]]:
        return self.batches or [[k] for k in range(len(self.requests))]


def make_batches(requests: list[Request], size: int) -> list[list[int]]:
    """Consecutive requests in batches of up to ``size``; a batch holds one first frame, so a request whose image
    differs from the one before starts a new batch."""
    out: list[list[int]] = []
    for k, request in enumerate(requests):
        if out and len(out[-1]) < size and requests[out[-1][0]].image == request.image:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def prepare(args: argparse.Namespace, world_size: int) -> Job:
    """Every check that needs no weights, including the parallel layout for ``world_size`` ranks."""
    check_versions()
    config = config_from_args(args)
    requests = read_requests(args, config)
    grid = validate(config, requests)
    if world_size < 1:
        raise InputError(f"--nproc must be >= 1; got {world_size}")
    size = getattr(args, "batch_size", 1)
    if size < 1:
        raise InputError(f"--batch_size must be >= 1; got {size}")
    batches = make_batches(requests, size)
    validate_layout(config, world_size, batch=min(len(b) for b in batches))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    return Job(config, requests, grid, out, bool(args.save_latent), not args.no_progress, batches)
