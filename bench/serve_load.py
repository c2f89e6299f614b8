"""Benchmark: the video server under a small load vs the same jobs as one ``launch/ray_generate.py`` batch.

    python bench/serve_load.py [--jobs 8] [--clients 4] [--replicas 2] [--nproc 1] [--rounds 2] [--poll 0.5]

The tiny random-weight Wan 2.1 checkpoint at 128x128, 33 frames (latent 9x16x16), 12 steps, DVG budget 0.5, CFG 5,
on CPU; every rank is a 1-CPU Ray actor (OMP_NUM_THREADS=1) in both runs, ``replicas x nproc`` ranks in all.

- **serve**: a local Ray and Serve (``build_app``, HTTP on 127.0.0.1 only), ``replicas`` groups of ``nproc`` ranks.
  Once it is up (**start-up**: Ray, Serve, the ranks, the model), ``clients`` threads share the N jobs: each
  POSTs one, polls it every ``--poll`` s until it succeeds, downloads the mp4, takes the next. **Latency** = the
  job's ``created_at`` to ``finished_at`` (the job table's clock: what a client sees, less its polling interval);
  **span** = first submit to last finish; **throughput** = N / span. **run** = the generation alone
  (``timings.total`` on rank 0).
- **ray_generate**: ``launch/ray_generate.py --workers replicas*nproc --sp nproc`` on a JSONL file of the same N
  jobs, a fresh process (its own Ray). Each ``wrote`` line is stamped as it arrives; its **start-up** is the first
  stamp minus that video's generation time (``timings.total`` of its sidecar), the batch's **latency** of a job is
  its stamp minus the start-up (all jobs are handed over at once), **span** = last stamp minus start-up.

Each runs ``--rounds`` times in ABBA order (serve, ray_generate, ray_generate, serve): the table shows medians, the
JSON every run, and the cores each role used while the jobs ran (the ranks; the groups' replicas, the job board,
the HTTP ingress, Serve's proxy and controller; Ray's daemons; the driver, with the HTTP clients; ``others``: every
other process on the machine). Every run writes the same videos: the JSON records whether all are
byte-identical. Bounded: every wait has a deadline (``--timeout`` per run). Wall times on a shared 2-core machine
are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-wan.yaml"
PROMPTS = ("a red ball rolling over grass", "a blue cube spinning", "waves on a dark sea", "a yellow kite in wind",
           "a train crossing a bridge", "snow on a street", "a cat chasing a dot", "fireworks at night")  # fmt: skip


def _checkpoint(path: Path) -> Path:
    if not (path / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT))
        from dvg_dist.models.tiny import build_tiny_checkpoint

        build_tiny_checkpoint("wan", path, seed=0)
    return path


def _jobs(n: int, size: str, frames: int, steps: int) -> list[dict[str, Any]]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": size, "frames": frames, "steps": steps}
            for i in range(n)]  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (linear interpolation), q in [0, 1]."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _cpu_seconds(root: int | None = None) -> dict[str, float]:
    """CPU seconds so far, by role, of process ``root`` (default: this one: the Ray driver and the HTTP clients)
    and the processes it started (Ray's daemons and workers); ``others``: every other process on the machine."""
    import psutil

    top = psutil.Process(root)
    roles = dict.fromkeys(("ranks", "groups", "board", "ingress", "proxy", "controller", "ray", "driver_and_clients"),
                          0.0)  # fmt: skip
    serve_roles = {"GroupWorker": "groups", "JobBoard": "board", "VideoServer": "ingress", "ProxyActor": "proxy",
                   "ServeController": "controller"}  # fmt: skip
    try:
        tree = [top, *top.children(recursive=True)]
    except psutil.Error:
        tree = []
    for proc in tree:
        try:
            cmd = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except (psutil.Error, OSError):
            continue
        cpu = times.user + times.system
        if proc.pid == top.pid:
            roles["driver_and_clients"] += cpu
        elif "ServeRank" in cmd or "RankActor" in cmd:
            roles["ranks"] += cpu
        else:
            role = next((r for name, r in serve_roles.items() if name in cmd), "ray")
            roles[role] += cpu
    machine = psutil.cpu_times()
    roles["others"] = machine.user + machine.nice + machine.system - sum(roles.values())
    return roles


def _cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / seconds, 3) for k in before}


def _summary(latencies: list[float], span: float, startup: float) -> dict[str, float]:
    return {"startup_s": round(startup, 2), "span_s": round(span, 2),
            "jobs_per_min": round(60 * len(latencies) / span, 2), "latency_p50_s": round(_pct(latencies, 0.5), 2),
            "latency_p95_s": round(_pct(latencies, 0.95), 2), "latency_max_s": round(max(latencies), 2)}  # fmt: skip


def run_serve(args: argparse.Namespace, ckpt: Path, jobs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    import ray
    import requests
    from ray import serve

    from dvg_dist.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"config": str(CONFIG), "model": str(ckpt), "nproc": args.nproc, "replicas": args.replicas,
                         "max_queue": max(8, len(jobs)), "out": str(out), "cpus_per_rank": 1.0})  # fmt: skip
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.timeout
        while len(requests.get(f"{url}/health", timeout=10).json()["replicas"]) < args.replicas:
            if time.monotonic() > deadline:
                raise SystemExit("serve: not every replica took jobs within --timeout")
            time.sleep(0.2)
        startup = time.perf_counter() - t0
        print(f"  serve: up in {startup:.1f}s ({args.replicas} replica(s) x {args.nproc} rank(s))", file=sys.stderr)
        records: list[dict[str, Any] | None] = [None] * len(jobs)
        lock, nxt = threading.Lock(), [0]
        errors: list[str] = []

        def client() -> None:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(jobs) or errors:
                    return
                sent = time.perf_counter()
                r = requests.post(f"{url}/v1/videos", json=jobs[i], timeout=30)
                if r.status_code != 202:
                    errors.append(f"job {i}: {r.status_code} {r.text}")
                    return
                job_id = r.json()["id"]
                while True:
                    view = requests.get(f"{url}/v1/videos/{job_id}", timeout=30).json()
                    if view["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    if time.monotonic() > deadline:
                        errors.append(f"job {i}: still {view['status']} at --timeout")
                        return
                    time.sleep(args.poll)
                done = time.perf_counter()
                if view["status"] != "succeeded":
                    errors.append(f"job {i}: {view['status']}: {view['error']}")
                    return
                video = requests.get(f"{url}/v1/videos/{job_id}/content", timeout=60).content
                records[i] = {"sent": sent, "done": done, "created": view["created_at"],
                              "finished": view["finished_at"], "run_s": view["result"]["seconds"],
                              "video": video}  # fmt: skip

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        cpu0, t1 = _cpu_seconds(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.timeout)
        cpu1, busy = _cpu_seconds(), time.perf_counter() - t1
        if errors or any(r is None for r in records):
            raise SystemExit(f"serve: {errors or 'a client did not finish'}")
    finally:
        serve.shutdown()
        ray.shutdown()
    done_records = [r for r in records if r is not None]
    # The job table's own clock: submitted -> finished, without the clients' polling interval.
    span = max(r["finished"] for r in done_records) - min(r["created"] for r in done_records)
    latencies = [r["finished"] - r["created"] for r in done_records]
    polled = [r["done"] - r["sent"] for r in done_records]
    row = {"runner": "serve", "concurrency": f"{args.clients} clients", **_summary(latencies, span, startup),
           "run_p50_s": round(statistics.median(r["run_s"] for r in done_records), 3),
           "client_latency_p50_s": round(_pct(polled, 0.5), 2), "client_poll_s": args.poll,
           "cores_used": _cores(cpu0, cpu1, busy)}  # fmt: skip
    row["videos"] = [r["video"] for r in done_records]
    return row


def run_ray_generate(args: argparse.Namespace, ckpt: Path, jobs: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    prompts = tmp / "jobs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": j["prompt"], "seed": j["seed"], "name": f"job{i:02d}"}) + "\n"
                               for i, j in enumerate(jobs)))  # fmt: skip
    out = tmp / "ray-out"
    j0 = jobs[0]
    cmd = [sys.executable, str(ROOT / "launch" / "ray_generate.py"), "--config", str(CONFIG), "--model", str(ckpt),
           "--prompts", str(prompts), "--size", j0["size"], "--frame_num", str(j0["frames"]), "--steps",
           str(j0["steps"]), "--workers", str(args.replicas * args.nproc), "--sp", str(args.nproc),
           "--cpus-per-worker", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    stamps: list[tuple[float, str]] = []
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        assert proc.stdout is not None
        cpu: list[dict[str, float]] = []
        for line in proc.stdout:
            if line.startswith("wrote "):
                stamps.append((time.perf_counter() - t0, Path(line.split()[1]).stem))
                if len(stamps) in (1, len(jobs)):  # the cores used between the first and the last video
                    cpu.append(_cpu_seconds(proc.pid))
        code = proc.wait()
        timer.cancel()
        wall = time.perf_counter() - t0
        if code != 0 or len(stamps) != len(jobs):
            err.seek(0)
            raise SystemExit(
                f"ray_generate failed ({code}, {len(stamps)} videos): {shlex.join(cmd)}\n{err.read()[-3000:]}"
            )
    runs = {name: json.loads((out / f"{name}.json").read_text())["timings"]["total"] for _, name in stamps}
    startup = stamps[0][0] - runs[stamps[0][1]]
    latencies = [t - startup for t, _ in stamps]
    row = {"runner": "ray_generate", "concurrency": f"{args.replicas} group(s), batch",
           **_summary(latencies, stamps[-1][0] - startup, startup),
           "run_p50_s": round(statistics.median(runs.values()), 3), "wall_s": round(wall, 2)}  # fmt: skip
    if len(cpu) == 2 and stamps[-1][0] > stamps[0][0]:
        row["cores_used"] = _cores(cpu[0], cpu[1], stamps[-1][0] - stamps[0][0])
    row["videos"] = [(out / f"job{i:02d}.mp4").read_bytes() for i in range(len(jobs))]
    words = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c.replace(str(tmp), "$TMP")
             for c in cmd[1:]]  # fmt: skip
    row["command"] = shlex.join(["python", *words])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="N jobs (default 8)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--replicas", type=int, default=2, help="groups (default 2)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per group (default 1)")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between a client's polls (default 0.5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, in ABBA order (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take (default 600)")
    parser.add_argument("--checkpoint", default=str(ROOT / "build" / "tiny-wan"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if not (1 <= args.jobs <= 64 and 1 <= args.clients <= 16 and 1 <= args.rounds <= 4):
        parser.error("--jobs must be in 1-64, --clients in 1-16, --rounds in 1-4 (a small, bounded load test)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    ckpt = _checkpoint(Path(args.checkpoint).resolve())
    jobs = _jobs(args.jobs, args.size, args.frames, args.steps)
    runs: list[dict[str, Any]] = []
    reference: list[bytes] | None = None
    identical: list[bool] = []
    command = ""
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):  # ABBA: serve, ray_generate, ray_generate, serve, ... (drift cancels out)
            for runner in ("serve", "ray_generate") if k % 2 == 0 else ("ray_generate", "serve"):
                where = Path(tmp) / f"{runner}-{k}"
                where.mkdir()
                if runner == "serve":
                    row = run_serve(args, ckpt, jobs, where / "out")
                else:
                    row = run_ray_generate(args, ckpt, jobs, where)
                    command = row.pop("command")
                reference = reference or row["videos"]
                identical.append(row.pop("videos") == reference)
                runs.append({"round": k + 1, **row})
                print(f"  round {k + 1} {runner}: {row['jobs_per_min']:.1f} jobs/min, generation p50 "
                      f"{row['run_p50_s']:.2f}s", file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    for runner in ("serve", "ray_generate"):
        mine = [r for r in runs if r["runner"] == runner]
        row = {"runner": runner, "concurrency": mine[0]["concurrency"], "rounds": len(mine)}
        for key, value in mine[0].items():
            if isinstance(value, int | float) and key != "round":
                row[key] = round(statistics.median(r[key] for r in mine), 3)
        rows.append(row)
    result = {
        "command": ("python bench/serve_load.py " + shlex.join(sys.argv[1:])).strip(),
        "what": f"{args.jobs} jobs, tiny Wan {args.size}x{args.frames} frames, {args.steps} steps, DVG 0.5, CPU/gloo: "
        f"the server ({args.replicas} replica(s) x {args.nproc} rank(s), {args.clients} HTTP clients polling every "
        f"{args.poll:g} s) vs one launch/ray_generate.py batch on the same ranks; {args.rounds} round(s) each",
        "method": "serve: latency = created_at to finished_at of the job, span = first submit to last finish, "
        "start-up once; ray_generate: start-up = first output - its generation time, latency = output - start-up "
        "(all jobs handed over at once), span = last output - start-up; throughput = jobs / span; rows = medians "
        "over the rounds (ABBA order); cores_used = CPU seconds / span of each role during the serve run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "ray_generate_command": command,
        "videos_identical": all(identical),
        "rows": rows,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    head = f"{'runner':<13} | {'concurrency':<20} | {'start-up':>8} | {'span':>7} | {'jobs/min':>8} | " \
           f"{'p50 lat':>7} | {'p95 lat':>7} | {'run p50':>7}"  # fmt: skip
    print(f"medians of {args.rounds} round(s)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['runner']:<13} | {r['concurrency']:<20} | {r['startup_s']:>7.1f}s | {r['span_s']:>6.1f}s | "
              f"{r['jobs_per_min']:>8.1f} | {r['latency_p50_s']:>6.2f}s | {r['latency_p95_s']:>6.2f}s | "
              f"{r['run_p50_s']:>6.2f}s")  # fmt: skip
    for runner in ("serve", "ray_generate"):
        cores = [r["cores_used"] for r in runs if r["runner"] == runner and "cores_used" in r]
        if cores:
            used = {k: statistics.median(c[k] for c in cores) for k in cores[0]}
            print(
                f"{runner}: cores used while the jobs ran: " + ", ".join(f"{k} {v:.2f}" for k, v in used.items() if v)
            )
    print(f"videos byte-identical across all runs: {result['videos_identical']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
