"""Benchmark: per-request overhead of the Ray executor over the local executor, same tiny job, same machine.

    python bench/ray_overhead.py [--requests 8] [--out bench/results/ray.json]

Both executors run as their command-line tools, each in a fresh process, on the tiny random-weight Wan 2.1
checkpoint (``configs/tiny-wan.yaml``: 17 frames at 64x64 -> latent 5x8x8, 12 steps, DVG budget 0.5, CFG 5),
CPU, gloo, OMP_NUM_THREADS=1 for every rank of both (what Ray gives a 1-CPU actor):

    local  launch/generate.py      --prompts FILE [--nproc K]
    ray    launch/ray_generate.py  --prompts FILE --workers K --sp K   (starts its own local Ray)

for K = 1 and 2 (one group: requests run one after another), N requests with distinct seeds, outputs and
latents written. Both tools print ``wrote <video>`` as each request finishes; the bench stamps each such line
as it arrives (unbuffered pipes). **Per request** = the median gap between consecutive ``wrote`` lines: the
steady-state wall time of one request, set-up excluded (for Ray: the driver's dispatch to every rank, the
result's round trip, the manifest line). **Start-up** = time from launch to the first ``wrote`` minus one
request: interpreter, process group, model load (and for Ray: starting Ray, placement group, actors).
Wall times on a shared 2-core machine are noisy: read differences below ~0.03 s per request as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-wan.yaml"


def _checkpoint(path: Path) -> Path:
    if not (path / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT))
        from dvg_dist.models.tiny import build_tiny_checkpoint

        build_tiny_checkpoint("wan", path, seed=0)
    return path


def _run(cmd: list[str], threads: int) -> tuple[float, list[float]]:
    """(total wall, the times since launch at which each ``wrote`` line arrived)."""
    # Ray sets OMP_NUM_THREADS to an actor's CPUs (1) unless it is set; the local ranks get the same, or the
    # comparison would measure torch's thread pool (2 ranks x 2 threads on 2 cores), not the executor.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env.pop("RAY_ADDRESS", None)
    stamps: list[float] = []
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("wrote "):
                stamps.append(time.perf_counter() - t0)
        code = proc.wait(timeout=600)
        wall = time.perf_counter() - t0
        if code != 0:
            err.seek(0)
            raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{err.read()[-3000:]}")
    return wall, stamps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="N requests per run (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank (default 1)")
    parser.add_argument("--checkpoint", default=str(ROOT / "build" / "tiny-wan"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray.json"))
    args = parser.parse_args()
    n = args.requests
    ckpt = _checkpoint(Path(args.checkpoint))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": "a red ball", "seed": s}) + "\n" for s in range(n)))
        common = ["--config", str(CONFIG), "--model", str(ckpt), "--prompts", str(prompts), "--save-latent",
                  "--no-progress"]  # fmt: skip
        for k in (1, 2):
            row: dict[str, object] = {"ranks_per_request": k}
            for executor in ("local", "ray"):
                out = str(Path(tmp) / f"{executor}-{k}")
                if executor == "local":
                    cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), *common, "--nproc", str(k)]
                else:
                    cmd = [sys.executable, str(ROOT / "launch" / "ray_generate.py"), *common,
                           "--workers", str(k), "--sp", str(k)]  # fmt: skip
                wall, stamps = _run([*cmd, "--out", out], args.threads)
                if len(stamps) != n:
                    raise SystemExit(f"{executor}: expected {n} 'wrote' lines, got {len(stamps)}")
                gaps = [b - a for a, b in zip(stamps, stamps[1:])]
                per = statistics.median(gaps)
                row[executor] = {"per_request_s": round(per, 4), "gaps_s": [round(g, 4) for g in gaps],
                                 "startup_s": round(stamps[0] - per, 3), "wall_s": round(wall, 3)}  # fmt: skip
                print(f"  {executor} K={k}: per request {per:.3f}s, first output at {stamps[0]:.2f}s, "
                      f"total {wall:.2f}s", file=sys.stderr, flush=True)  # fmt: skip
            local, ray_ = row["local"], row["ray"]
            assert isinstance(local, dict) and isinstance(ray_, dict)
            overhead = round(ray_["per_request_s"] - local["per_request_s"], 4)
            row["overhead_per_request_s"] = overhead
            row["overhead_per_request_pct"] = round(100 * overhead / local["per_request_s"], 1)
            row["overhead_startup_s"] = round(ray_["startup_s"] - local["startup_s"], 3)
            rows.append(row)
    result = {
        "what": "per-request and start-up wall time, Ray executor vs local executor, tiny Wan (latent 5x8x8, "
        "12 steps, CFG 5), CPU/gloo, one group",
        "method": "per_request = median gap between consecutive outputs; startup = first output - per_request; "
        "fresh process per run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "requests": n,
        "omp_num_threads_per_rank": args.threads,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ranks':>5} | {'local/req':>9} | {'ray/req':>9} | {'overhead/req':>16} | {'local start':>11} | "
          f"{'ray start':>9} | {'overhead start':>14}")  # fmt: skip
    for r in rows:
        lo, ra = r["local"], r["ray"]
        assert isinstance(lo, dict) and isinstance(ra, dict)
        print(f"{r['ranks_per_request']:>5} | {lo['per_request_s']:>8.3f}s | {ra['per_request_s']:>8.3f}s | "
              f"{r['overhead_per_request_s']:>+7.3f}s ({r['overhead_per_request_pct']:>+5.1f}%) | "
              f"{lo['startup_s']:>10.2f}s | {ra['startup_s']:>8.2f}s | {r['overhead_startup_s']:>+13.2f}s")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
