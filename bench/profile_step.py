"""Where one full-size denoising step's CPU time goes, per family: the torch profiler's top operators (self time) of
one ``--mode full`` step on the benchmark shape of ``bench/speedup.py`` (the same transformers, sizes and tokens).

    python bench/profile_step.py [--family wan,hunyuan15] [--top 8] [--out bench/results/profile_step.json]

Made to explain why HunyuanVideo-1.5's step costs five times Wan's at the same 12,480 video tokens and width:
diffusers' ``HunyuanVideo15AttnProcessor2_0`` builds a dense ``[B, 1, S, S]`` boolean mask over video + text tokens
in every attention call (``aten::bitwise_and``) and hands it to SDPA, which turns it into an additive float mask
(``aten::where``) before its kernel: both cost ∝ S², like attention itself, so DVG's savings track them and the
speed-up is unaffected; only the absolute step time is. The engine's native sequence-parallel attention (used under
``--ulysses_degree`` / ``--ring_degree``) does not build that mask: it attends video × video unmasked and the text
keys with their own mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model
from speedup import FAMILIES, PROMPT, ROOT, build_pipe
from torch.profiler import ProfilerActivity, profile

from dvg_dist.config import load_config
from dvg_dist.runtime.cli import setup_logging
from dvg_dist.runtime.engine import Engine, Request


def profile_family(name: str, top: int) -> dict[str, Any]:
    """One family's profiled full-mode step: total self CPU time and its ``top`` operators."""
    bench = FAMILIES[name]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipe(name, root=Path(tmp))
    overrides = [
        f"sampling.frame_num={bench.frames}", f"sampling.size={bench.size}", "sampling.guidance_scale=1.0",
        "sampling.true_cfg_scale=1.0", "model.path=in-memory", "sampling.mode=full", "sampling.steps=1",
        *bench.extra,
    ]  # fmt: skip
    engine = Engine(load_config(ROOT / "configs" / bench.config, overrides), pipe)
    engine.generate([Request(PROMPT)], decode=False, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = engine.generate([Request(PROMPT)], decode=False, progress=False)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "family": name,
        "step_s": result.timings["denoise"],
        "profiled_self_cpu_s": total_us / 1e6,
        "top": [
            {
                "op": e.key,
                "self_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total_us,
                "calls": e.count,
            }
            for e in ops
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="wan,hunyuan15", help=f"comma-separated: {', '.join(FAMILIES)}")
    p.add_argument("--top", type=int, default=8, help="operators listed per family")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_step.json")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        p.error(f"unknown family {', '.join(unknown) or '(none)'}; choose from {', '.join(FAMILIES)}")
    if args.top < 1:
        p.error("--top must be at least 1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setup_logging()
    import logging

    logging.getLogger("dvg_dist").setLevel(logging.WARNING)
    records = []
    for name in families:
        record = profile_family(name, args.top)
        records.append(record)
        step, profiled = record["step_s"], record["profiled_self_cpu_s"]
        print(f"{name}: one full step {step:.2f} s (profiled self CPU {profiled:.2f} s)")
        print(f"  {'operator':<52} {'self s':>7} {'share':>6} {'calls':>6}")
        for op in record["top"]:
            print(f"  {op['op'][:52]:<52} {op['self_s']:7.3f} {op['share']:6.1%} {op['calls']:6d}")
    out = {
        "command": "python bench/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "families": {r["family"]: r for r in records},
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "processor": cpu_model(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
