"""DVG speed-up over the full run, side by side, on attention-dominated transformers of each family (random weights).

    python bench/speedup.py [--steps 20] [--budgets 0.4,0.5,0.6,0.8] [--frames 49 --size 640x384] [--repeats 3]
    python bench/speedup.py --steps 8,12,50 --budgets 0.5,0.6,0.7 --out bench/results/speedup_steps.json
    python bench/speedup.py --family wan,wan-ti2v,hunyuan,hunyuan15,ltx,cogvideox --budgets 0.5 --steps 20

Architecture (``--family wan``, the default): diffusers' ``WanTransformer3DModel`` with 2 heads × 64 (hidden 128),
FFN 256, 1 layer, patch (1, 2, 2), inside the tiny Wan pipeline (its umT5 text encoder and VAE). At 49 frames ×
640×384 the latent is 13×48×80 = 12,480 tokens per call, and self-attention (∝ tokens²·hidden) is ~92 % of a step's
FLOPs: more attention-heavy than a 720p Wan 14B (75,600 tokens, hidden 5,120: ~72 %) or HunyuanVideo (118,800
tokens: ~85 %), so its FLOP bound at a given density is somewhat higher than theirs. The other families run their
own transformer class at the same width (2 heads × 64, FFN 256, one block of each kind) inside their tiny pipeline,
at a default size giving the same 12,480 tokens through their own VAE and patch (:data:`FAMILIES`). Guidance 1 (one
pass per step). Speed-up = denoising-loop time of ``full`` / ``dvg`` at the same step count (transitions included;
text encoding and VAE decode excluded, reported end-to-end too). ``--steps`` takes a list: each step count gets its
own full run and rows, all in one process (few-step distilled models run 4-12 steps); a budget the planner cannot
reach at a step count is a row saying so. ``--family`` takes a list too: one table per family, side by side in one
process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DiffusionPipeline

from dvg_dist.config import load_config
from dvg_dist.dvg import InfeasibleBudget
from dvg_dist.models.tiny import build_tiny_checkpoint
from dvg_dist.runtime.cli import setup_logging
from dvg_dist.runtime.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
_WIDTH = {"num_attention_heads": 2, "attention_head_dim": 64}


@dataclass(frozen=True)
class BenchFamily:
    """One family's benchmark shape: its tiny checkpoint with the transformer rebuilt from the tiny config plus
    ``overrides`` (attention-dominated, one block of each kind), at a size of 12,480 tokens."""

    tiny: str
    config: str
    overrides: dict[str, Any]
    frames: int
    size: str
    patch: tuple[int, int, int] = (1, 2, 2)
    extra: tuple[str, ...] = field(default_factory=tuple)
    """Config overrides besides size and guidance (the Hunyuan families' embedded / guider scales)."""


_HUNYUAN_WIDTH = {**_WIDTH, "num_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "rope_axes_dim": (16, 24, 24)}
FAMILIES: dict[str, BenchFamily] = {
    "wan": BenchFamily("wan", "tiny-wan.yaml", {**_WIDTH, "ffn_dim": 256, "num_layers": 1}, 49, "640x384"),
    # The Wan 2.2 VAE compresses 16x spatially: twice the pixels per side for the same tokens.
    "wan-ti2v": BenchFamily(
        "wan-ti2v", "tiny-wan-ti2v.yaml", {**_WIDTH, "ffn_dim": 256, "num_layers": 1}, 49, "1280x768"
    ),
    "hunyuan": BenchFamily("hunyuan", "tiny-hunyuan.yaml", {**_HUNYUAN_WIDTH, "num_single_layers": 0}, 49, "640x384"),
    # HV-1.5: VAE 16x, patch 1.
    "hunyuan15": BenchFamily("hunyuan15", "tiny-hunyuan15.yaml", _HUNYUAN_WIDTH, 49, "640x384", (1, 1, 1)),
    # LTX-Video: VAE 8x32x32, patch 1, so 97 frames x 1280x768 are 13x24x40 = 12,480 tokens; FFN fixed at 4 x hidden.
    "ltx": BenchFamily(
        "ltx", "tiny-ltx.yaml", {**_WIDTH, "num_layers": 1, "cross_attention_dim": 128}, 97, "1280x768", (1, 1, 1)
    ),
    # CogVideoX 1.5: VAE 4x8x8, patch 2x2x2; 101 frames -> 26 latent frames (13 temporal patches) x 24 x 40 = 12,480
    # tokens at 640x384. The rotary table must reach 40x24 patches (sample_width/height in latent pixels); the FFN is
    # 4 x hidden (not configurable); the T5 tokens join every attention.
    "cogvideox": BenchFamily(
        "cogvideox",
        "tiny-cogvideox.yaml",
        {**_WIDTH, "num_layers": 1, "sample_width": 80, "sample_height": 48},
        101,
        "640x384",
        (2, 2, 2),
    ),
}
"""The families ``--family`` takes."""


def build_pipe(family: str = "wan", seed: int = 0, root: Path | None = None) -> Any:
    """The tiny ``family`` checkpoint, written and loaded back through ``from_pretrained`` (a real checkpoint's path,
    so family metadata such as HunyuanVideo's prompt template is read), with the benchmark's transformer."""
    bench = FAMILIES[family]
    path = build_tiny_checkpoint(bench.tiny, Path(root or tempfile.mkdtemp()) / bench.tiny, seed, overwrite=True)
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    pipe.transformer = type(pipe.transformer).from_config({**config, **bench.overrides}).eval()
    return pipe


def run_once(engine: Engine, seed: int) -> dict:
    t0 = time.perf_counter()
    result = engine.generate([Request(PROMPT, seed=seed)], decode=True, progress=False)
    end_to_end = time.perf_counter() - t0
    return {"result": result, "denoise_s": result.timings["denoise"], "end_to_end_s": end_to_end}


def bench_family(name: str, args: argparse.Namespace, step_counts: list[int], budgets: list[float]) -> dict[str, Any]:
    """Full and DVG runs of one family side by side; its JSON record (rows, full-run times, shape)."""
    bench = FAMILIES[name]
    frames, size = args.frames or bench.frames, args.size or bench.size
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipe(name, root=Path(tmp))
    base = [
        f"sampling.frame_num={frames}", f"sampling.size={size}", "sampling.guidance_scale=1.0",
        "sampling.true_cfg_scale=1.0", "model.path=in-memory", "dvg.stage_shifts=[null, null, null, null]",
        *bench.extra,
    ]  # fmt: skip

    def engine(*overrides: str) -> Engine:
        return Engine(load_config(ROOT / "configs" / bench.config, [*base, *overrides]), pipe)

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
    pt, ph, pw = bench.patch
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    return {
        "family": name,
        "architecture": {"class": type(pipe.transformer).__name__, **{k: config[k] for k in sorted(bench.overrides)}},
        "frames": frames,
        "size": size,
        "latent": list(grid),
        "tokens_full": int((grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)),
        "steps": step_counts if len(step_counts) > 1 else step_counts[0],
        "full_step_s": statistics.median(v["full_step_s"] for v in full_steps.values()),
        "full": full_steps,
        "rows": rows,
    }


def print_table(record: dict[str, Any]) -> None:
    arch = record["architecture"]
    hidden = arch["num_attention_heads"] * arch["attention_head_dim"]
    print(
        f"DVG speed-up, {record['family']}: {arch['class']} (hidden {hidden}"
        f", 1 block), latent {'x'.join(map(str, record['latent']))} = {record['tokens_full']} tokens, "
        f"{torch.get_num_threads()} threads; full step {record['full_step_s']:.2f} s"
    )
    head = f"{'steps':>5} {'budget':>6} {'density':>8} {'exec':>6} {'flops':>7} {'speedup':>8} {'bound':>6} " \
           f"{'of bound':>9} {'e2e':>6} {'full s':>7} {'dvg s':>7} {'trans ms':>9}"  # fmt: skip
    print(head)
    for r in record["rows"]:
        if "infeasible" in r:
            print(f"{r['steps']:>5} {r['budget']:>6.2f}  infeasible: {r['infeasible'].split(': ', 1)[1]}")
            continue
        print(
            f"{r['steps']:>5} {r['budget']:>6.2f} {r['density']:>8.3f} {r['executed_density']:>6.3f} "
            f"{r['flop_density']:>7.3f} {r['speedup']:>7.2f}x {r['flop_bound']:>5.2f}x {100 * r['of_bound']:>8.0f}% "
            f"{r['speedup_end_to_end']:>5.2f}x {r['full_s']:>7.2f} {r['dvg_s']:>7.2f} {r['transition_ms']:>9.1f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="wan", help=f"family or families, comma-separated: {', '.join(FAMILIES)}")
    p.add_argument("--steps", default="20", help="step count(s), comma-separated, e.g. 8,12,50")
    p.add_argument("--budgets", default="0.4,0.5,0.6,0.8")
    p.add_argument("--frames", type=int, default=None, help="default: the family's (49)")
    p.add_argument("--size", default=None, help="WxH; default: the family's 12,480-token size (Wan 640x384)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (median)")
    p.add_argument("--out", default=None, help="default bench/results/speedup.json (one family: speedup_FAMILY.json)")
    args = p.parse_args()
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        p.error(f"unknown family {', '.join(unknown) or '(none)'}; choose from {', '.join(FAMILIES)}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setup_logging()
    import logging

    logging.getLogger("dvg_dist").setLevel(logging.WARNING)
    budgets = [float(b) for b in args.budgets.split(",")]
    step_counts = [int(n) for n in str(args.steps).split(",")]

    records = []
    for name in families:
        records.append(bench_family(name, args, step_counts, budgets))
        print_table(records[-1])
    machine = {
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    command = "python bench/speedup.py " + " ".join(sys.argv[1:])
    if len(records) == 1:  # one family: the record itself (the shape of the earlier single-family results)
        out: dict[str, Any] = {"command": command, **records[0], "machine": machine}
        default = "speedup.json" if families == ["wan"] else f"speedup_{families[0]}.json"
    else:
        out = {"command": command, "families": {r["family"]: r for r in records}, "machine": machine}
        default = "speedup_families.json"
    path = Path(args.out or ROOT / "bench" / "results" / default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
