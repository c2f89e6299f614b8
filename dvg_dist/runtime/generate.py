"""``launch/generate.py``'s body: validate everything, load once, generate each request, write outputs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..dvg.planner import InfeasibleBudget
from ..models import InputError
from .cli import config_from_args, read_requests, setup_logging
from .engine import Engine, sidecar, validate
from .outputs import output_name, write_json, write_latent, write_video

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


def run(args: argparse.Namespace, prog: str) -> int:
    setup_logging(getattr(args, "verbose", False))
    try:
        config = config_from_args(args)
        requests = read_requests(args, config)
        grid = validate(config, requests)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
    except (ConfigError, InputError, InfeasibleBudget) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    s = config.sampling
    logger.info(
        "%d request(s): latent %s, %d steps, mode %s, budget %g, guidance %g; loading %s",
        len(requests), grid, s.steps, s.mode.value, s.budget, s.guidance_scale, config.model.path,
    )  # fmt: skip
    engine = Engine(config)
    for index, req in enumerate(requests):
        name = req.name or output_name(req.prompt, req.seed, s.mode.value, index if len(requests) > 1 else None)
        result = engine.generate([req], progress=not getattr(args, "no_progress", False))
        assert result.frames is not None
        files = {"video": f"{name}.mp4", "sidecar": f"{name}.json"}
        write_video(out / files["video"], result.frames[0], engine.adapter.fps)
        if getattr(args, "save_latent", False):
            files["latent"] = f"{name}.latent.safetensors"
            write_latent(out / files["latent"], result.latent[0:1])

        record = sidecar(result, 0, config, files)
        write_json(out / files["sidecar"], record)  # last: its presence means the request is complete
        print(f"wrote {out / files['video']} ({result.timings['total']:.2f}s)")
        print(describe_plan(record["plan"]))
    return 0
