"""Benchmark: what leaving the sketch costs on the CPU (demands, weights, action choice).

On a Wan-720p-sized sketch latent ``[1, 16, 11, 45, 80]`` of synthetic but realistic content (smooth field
plus texture, moving; ``dvg_dist.dvg.synthetic.demo_sketch``), on 2 CPU threads, time:

    spatial_demand        eq. 3
    temporal_demand_lk    eq. 4, one global Lucas–Kanade vector per frame pair (the default)
    choose                eq. 5 weights + eq. 8–10 filter and matching, for a Planner of the full grid
                          21x90x160, 50 steps, budget 0.5, spatial multiple 2 (built once, as the runtime does)
    total                 the above in one call, exactly the sampler's default decider (``local_decider``)
    temporal_demand_pyramid, total_pyramid   the optional 3-level pyramid LK, as an extra

Each part: ``--warmup`` untimed runs (≥ 5), then ``--runs`` timed ones (default 100); median and p90.
Goal: total < 20 ms (the paper reports 10 ms). Writes ``bench/results/planner.json``.

    python bench/planner.py [--runs 100] [--warmup 10] [--out bench/results/planner.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import cpu_model

from dvg_dist.dvg import (
    DVGOptions,
    Grid,
    SamplerConfig,
    TemporalDemandMethod,
    analyse,
    demand_weights,
    local_decider,
    spatial_demand,
    temporal_demand,
)
from dvg_dist.dvg.synthetic import DEMO_SPEED, DEMO_TEXTURE, demo_sketch

SHAPE = (1, 16, 11, 45, 80)
FULL = Grid(21, 90, 160)
STEPS, BUDGET, SPATIAL_MULTIPLE, THREADS, SEED = 50, 0.5, 2, 2, 0
GOAL_MS = 20.0
PAPER_MS = 10.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "planner.json"


def time_ms(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    """Median, p90, min and mean wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    p90 = statistics.quantiles(samples, n=10, method="inclusive")[-1] if runs > 1 else samples[0]
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": p90,
        "min_ms": min(samples),
        "mean_ms": statistics.fmean(samples),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planner.py", description="Time the DVG sketch analysis and choice.")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per part (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (at least 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.warmup < 5:
        parser.error("--warmup must be >= 5")

    torch.set_num_threads(THREADS)
    x = demo_sketch(SHAPE, SEED)
    options = DVGOptions()
    config = SamplerConfig(
        full=FULL, num_steps=STEPS, shift=5.0, budget=BUDGET, options=options, spatial_multiple=SPATIAL_MULTIPLE
    )
    pyramid_config = SamplerConfig(
        full=FULL,
        num_steps=STEPS,
        shift=5.0,
        budget=BUDGET,
        options=DVGOptions(temporal_demand=TemporalDemandMethod.PYRAMID),
        spatial_multiple=SPATIAL_MULTIPLE,
    )
    planner = config.planner()
    demands = analyse(x, options.alpha)
    decide = local_decider(config)
    decide_pyramid = local_decider(pyramid_config)

    def choose() -> object:
        w_s, _ = demand_weights(demands.spatial, demands.temporal, options.alpha)
        return planner.choose(w_s)

    parts: dict[str, tuple[str, Callable[[], object]]] = {
        "spatial_demand": ("(a) spatial demand", lambda: spatial_demand(x)),
        "temporal_demand_lk": ("(b) temporal demand, LK", lambda: temporal_demand(x)),
        "choose": ("(c) weights + action choice", choose),
        "total": ("(d) total: a + b + c (local_decider)", lambda: decide(x)),
        "temporal_demand_pyramid": ("    extra: temporal demand, pyramid", lambda: temporal_demand(x, "pyramid")),
        "total_pyramid": ("    extra: total with pyramid", lambda: decide_pyramid(x)),
    }
    results: dict[str, dict[str, Any]] = {}
    for key, (label, fn) in parts.items():
        results[key] = {"label": label.strip(), **time_ms(fn, args.runs, args.warmup)}

    decision = decide(x)
    chosen = planner.candidate(decision.s, decision.t23)
    total = results["total"]["median_ms"]
    width = max(len(label) for label, _ in parts.values())
    print(f"DVG planner on {'x'.join(map(str, SHAPE))} sketch, full grid {FULL}, {STEPS} steps, budget {BUDGET}")
    print(f"{THREADS} threads, {args.runs} runs after {args.warmup} warm-up, torch {torch.__version__}, {cpu_model()}")
    print()
    print(f"{'part':<{width}}  {'median ms':>10}  {'p90 ms':>8}")
    for key, (label, _) in parts.items():
        print(f"{label:<{width}}  {results[key]['median_ms']:>10.2f}  {results[key]['p90_ms']:>8.2f}")
    print()
    verdict = "met" if total < GOAL_MS else "MISSED"
    print(f"goal: total < {GOAL_MS:g} ms (paper: {PAPER_MS:g} ms): {total:.2f} ms median, {verdict}")
    print(
        f"sketch demands D_s={demands.spatial:.3f} D_t={demands.temporal:.3f} -> w_s={demands.w_s:.3f}; "
        f"chose s={chosen.s:g} T23={chosen.t23} (density {chosen.density:.3f})"
    )
    if args.runs < 50:
        print(f"note: {args.runs} runs is below the 50 the medians are meant to use", file=sys.stderr)

    report = {
        "parts": results,
        "total_median_ms": total,
        "goal_ms": GOAL_MS,
        "paper_ms": PAPER_MS,
        "goal_met": total < GOAL_MS,
        "shape": list(SHAPE),
        "content": {"generator": "demo_sketch", "seed": SEED, "texture": DEMO_TEXTURE, "speed": list(DEMO_SPEED)},
        "planner": {
            "full": FULL.as_list(),
            "steps": STEPS,
            "budget": BUDGET,
            "spatial_multiple": SPATIAL_MULTIPLE,
        },
        "demands": demands.to_dict(),
        "chosen": chosen.to_dict(),
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": "python bench/planner.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
