"""DVG speed-up over the full run, side by side, on an attention-dominated Wan transformer (random weights).

    python bench/speedup.py [--steps 20] [--budgets 0.4,0.5,0.6,0.8] [--frames 49 --size 640x384] [--repeats 3]
    python bench/speedup.py --steps 8,12,50 --budgets 0.5,0.6,0.7 --out bench/results/speedup_steps.json

Architecture: diffusers' ``WanTransformer3DModel`` with 2 heads × 64 (hidden 128), FFN 256, 1 layer, patch
(1, 2, 2), inside the tiny Wan pipeline (its umT5 text encoder and VAE). At 49 frames × 640×384 the latent is
13×48×80 = 12,480 tokens per call, and self-attention (∝ tokens²·hidden) is ~92 % of a step's FLOPs:
more attention-heavy than a 720p Wan 14B (75,600 tokens, hidden 5,120: ~72 %) or HunyuanVideo (118,800
tokens: ~85 %), so its FLOP bound at a given density is somewhat higher than theirs. Guidance 1 (one pass
per step). Speed-up = denoising-loop time of
``full`` / ``dvg`` at the same step count (transitions included; text encoding and VAE decode excluded, reported
end-to-end too). ``--steps`` takes a list: each step count gets its own full run and rows, all in one process (few-
step distilled models run 4-12 steps); a budget the planner cannot reach at a step count is a row saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import WanTransformer3DModel

from dvg_dist.config import load_config
from dvg_dist.dvg import InfeasibleBudget
from dvg_dist.models.tiny import build_tiny_pipeline
from dvg_dist.runtime.cli import setup_logging
from dvg_dist.runtime.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"


def build_pipe(seed: int = 0) -> Any:
    pipe, _ = build_tiny_pipeline("wan", seed)
    torch.manual_seed(seed)
    # Any: for a type checker diffusers' top-level names are its torch-less placeholders
    # (diffusers/utils/dummy_pt_objects.py), classes without the nn.Module methods.
    transformer: Any = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=64, ffn_dim=256, num_layers=1,
    )  # fmt: skip
    pipe.transformer = transformer.eval()
    return pipe


def run_once(engine: Engine, seed: int) -> dict:
    t0 = time.perf_counter()
    result = engine.generate([Request(PROMPT, seed=seed)], decode=True, progress=False)
    end_to_end = time.perf_counter() - t0
    return {"result": result, "denoise_s": result.timings["denoise"], "end_to_end_s": end_to_end}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="20", help="step count(s), comma-separated, e.g. 8,12,50")
    p.add_argument("--budgets", default="0.4,0.5,0.6,0.8")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", default="640x384")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (median)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "speedup.json"))
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setup_logging()
    import logging

    logging.getLogger("dvg_dist").setLevel(logging.WARNING)
    budgets = [float(b) for b in args.budgets.split(",")]
    step_counts = [int(n) for n in str(args.steps).split(",")]

    pipe = build_pipe()
    base = [
        f"sampling.frame_num={args.frames}", f"sampling.size={args.size}", "sampling.guidance_scale=1.0",
        "model.path=in-memory", "dvg.stage_shifts=[null, null, null, null]",
    ]  # fmt: skip

    def engine(*overrides: str) -> Engine:
        return Engine(load_config(ROOT / "configs" / "tiny-wan.yaml", [*base, *overrides]), pipe)

    # Warm-up: one full step's worth of kernels at each size is cheap next to the runs.
    engine("sampling.mode=full", "sampling.steps=2").generate([Request(PROMPT)], decode=False, progress=False)

    def timed(*overrides: str) -> dict:
        runs = [run_once(engine(*overrides), seed=0) for _ in range(args.repeats)]
        best = sorted(runs, key=lambda r: r["denoise_s"])[len(runs) // 2]
        best["denoise_s"] = statistics.median(r["denoise_s"] for r in runs)
        best["end_to_end_s"] = statistics.median(r["end_to_end_s"] for r in runs)
        return best

    rows: list[dict[str, Any]] = []
    full_steps = {}
    grid: Any = None
    for steps in step_counts:
        full = timed("sampling.mode=full", f"sampling.steps={steps}")
        grid = full["result"].latent.shape[2:]
        full_steps[steps] = {"full_s": full["denoise_s"], "full_step_s": full["denoise_s"] / steps,
                             "full_end_to_end_s": full["end_to_end_s"]}  # fmt: skip
        for budget in budgets:
            try:
                run = timed("sampling.mode=dvg", f"sampling.steps={steps}", f"sampling.budget={budget}")
            except InfeasibleBudget as e:
                rows.append({"steps": steps, "budget": budget, "infeasible": str(e)})
                continue
            chosen = run["result"].record.chosen
            rows.append(
                {
                    "steps": steps,
                    "budget": budget,
                    "density": chosen["density"],
                    "executed_density": chosen["executed_density"],
                    "flop_density": chosen["flop_density"],
                    "grids": chosen["grids"],
                    "executed_counts": run["result"].record.executed_counts,
                    "speedup": full["denoise_s"] / run["denoise_s"],
                    "flop_bound": 1.0 / chosen["flop_density"],
                    "of_bound": (full["denoise_s"] / run["denoise_s"]) * chosen["flop_density"],
                    "speedup_end_to_end": full["end_to_end_s"] / run["end_to_end_s"],
                    "full_s": full["denoise_s"],
                    "dvg_s": run["denoise_s"],
                    "transition_ms": 1000 * run["result"].timings.get("transitions", 0.0),
                }
            )

    step_s = statistics.median(v["full_step_s"] for v in full_steps.values())
    print(f"DVG speed-up, Wan transformer (hidden 128, 1 layer), latent {'x'.join(map(str, grid))}, "
          f"{torch.get_num_threads()} threads; full step {step_s:.2f} s")  # fmt: skip
    head = f"{'steps':>5} {'budget':>6} {'density':>8} {'exec':>6} {'flops':>7} {'speedup':>8} {'bound':>6} " \
           f"{'of bound':>9} {'e2e':>6} {'full s':>7} {'dvg s':>7} {'trans ms':>9}"  # fmt: skip
    print(head)
    for r in rows:
        if "infeasible" in r:
            print(f"{r['steps']:>5} {r['budget']:>6.2f}  infeasible: {r['infeasible'].split(': ', 1)[1]}")
            continue
        print(
            f"{r['steps']:>5} {r['budget']:>6.2f} {r['density']:>8.3f} {r['executed_density']:>6.3f} "
            f"{r['flop_density']:>7.3f} {r['speedup']:>7.2f}x {r['flop_bound']:>5.2f}x {100 * r['of_bound']:>8.0f}% "
            f"{r['speedup_end_to_end']:>5.2f}x {r['full_s']:>7.2f} {r['dvg_s']:>7.2f} {r['transition_ms']:>9.1f}"
        )
    out = {
        "command": "python bench/speedup.py " + " ".join(sys.argv[1:]),
        "architecture": {"class": "WanTransformer3DModel", "heads": 2, "head_dim": 64, "ffn_dim": 256, "layers": 1},
        "latent": list(grid),
        "tokens_full": int(grid[0] * (grid[1] // 2) * (grid[2] // 2)),
        "steps": step_counts if len(step_counts) > 1 else step_counts[0],
        "full_step_s": step_s,
        "full": full_steps,
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
