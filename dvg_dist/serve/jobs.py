"""The server's jobs, without Ray: a ``POST /v1/videos`` body → a validated job (the CLI's checks, before any
queueing), and :class:`JobTable`, the one table of jobs an application has (the bounded FIFO queue, the five
states, progress, cancellation, the replicas' leases) with its Prometheus metrics.

A job moves ``queued → running → succeeded | failed | cancelled``; a queued job can also go straight to
``cancelled``. Replicas take jobs from the table one at a time, report progress while they run (each report
renews the replica's lease and answers whether the job should stop) and finish them; a running job whose replica
stops reporting for ``lease_s`` is failed — its replica died with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..models import InputError

FIELDS = ("prompt", "seed", "size", "frames", "seconds", "image", "budget", "mode", "steps", "guidance_scale",
          "negative_prompt")  # fmt: skip
"""The fields of a request body; any other is refused."""
SETTINGS = {"size": "size", "frames": "frame_num", "budget": "budget", "mode": "mode", "steps": "steps",
            "guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt"}  # fmt: skip
"""Body field → the :meth:`dvg_dist.DVG.generate` keyword it sets for that job."""
MAX_IMAGE_BYTES = 32 << 20

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset(("succeeded", "failed", "cancelled"))


class RequestChecker:
    """Turns request bodies into jobs with the checks ``launch/generate.py`` runs (no weights are read): the
    per-request config is built the way :meth:`dvg_dist.DVG.generate` builds it, then
    :func:`dvg_dist.runtime.engine.validate` runs on it; any failure is a one-line ``ValueError``."""

    def __init__(self, config: Config, out: Path) -> None:
        from ..models import adapter_class, resolve_model_path

        path = resolve_model_path(config.model.path or "")
        cls = adapter_class(path)
        self.config, self.inputs = config, out / "inputs"
        self.fps = cls.fps
        self.frame_step = cls.read_spec(path).vae_scale[0]

    def frames_for(self, seconds: float) -> int:
        """``seconds × fps`` frames, rounded to the nearest count the model takes (``k·step + 1``; ties up)."""
        step = self.frame_step
        k = max(0, round((seconds * self.fps - 1) / step + 1e-9))
        return k * step + 1

    def job(self, body: Any, job_id: str) -> dict[str, Any]:
        """The job for ``body``: ``{id, prompt, seed, image, settings, request}`` (``settings``: the
        ``DVG.generate`` keywords; ``request``: the settings the job will run with, for the client)."""
        from ..api import call_config
        from ..runtime.engine import Request, validate

        if not isinstance(body, dict):
            raise InputError("the body must be a JSON object")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string")
        seed = body.get("seed", self.config.sampling.seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer; got {seed!r}")
        if body.get("negative_prompt") is not None and not isinstance(body["negative_prompt"], str):
            raise InputError("negative_prompt must be a string")
        if body.get("frames") is not None and body.get("seconds") is not None:
            raise InputError("give frames or seconds, not both")
        settings = {SETTINGS[k]: v for k, v in body.items() if k in SETTINGS and v is not None}
        seconds = body.get("seconds")
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 3600:
                raise InputError(f"seconds must be a number in (0, 3600]; got {seconds!r}")
            settings["frame_num"] = self.frames_for(float(seconds))
        config = call_config(self.config, settings)
        image = self._image(body.get("image"), job_id)
        try:
            validate(config, [Request(prompt, seed, image=None if image is None else str(image))], model_checks=False)
        except BaseException:
            if image is not None:
                image.unlink(missing_ok=True)
            raise
        s = config.sampling
        request = {
            "prompt": prompt, "seed": seed, "size": s.size, "frames": s.frame_num,
            "seconds": round(s.frame_num / self.fps, 3), "steps": s.steps, "mode": s.mode.value, "budget": s.budget,
            "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt, "image": image is not None,
        }  # fmt: skip
        return {"id": job_id, "prompt": prompt, "seed": seed, "image": None if image is None else str(image),
                "settings": settings, "request": request}  # fmt: skip

    def _image(self, value: Any, job_id: str) -> Path | None:
        """A base64 image (raw, or a ``data:image/...;base64,`` URL) decoded and written as ``inputs/<id>.png``."""
        if value is None:
            return None
        if not isinstance(value, str):
            raise InputError("image must be a base64 string (raw, or a data:image/...;base64, URL)")
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image must be a base64 string (raw, or a data:image/...;base64, URL)") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise InputError(f"image is larger than {MAX_IMAGE_BYTES >> 20} MiB")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InputError(f"image is not a readable image ({type(e).__name__})") from None
        from ..runtime.outputs import atomic_write

        path = self.inputs / f"{job_id}.png"
        atomic_write(path, lambda tmp: rgb.save(tmp, format="PNG"), ".png")
        return path


@dataclass
class Job:
    """One job as the table holds it."""

    id: str
    spec: dict[str, Any]
    created_at: float
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    """The replica running (or that ran) the job."""
    progress: dict[str, Any] | None = None
    cancel_requested: bool = False
    error: str | None = None
    result: dict[str, Any] | None = None

    def view(self, position: int | None = None) -> dict[str, Any]:
        """What ``GET /v1/videos/{id}`` answers."""
        view: dict[str, Any] = {
            "id": self.id, "object": "video", "status": self.status, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "request": self.spec.get("request"),
            "progress": self.progress, "cancel_requested": self.cancel_requested, "error": self.error,
            "replica": self.owner, "result": self.result,
        }  # fmt: skip
        if position is not None:
            view["queue_position"] = position
        return view


JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class JobTable:
    """All jobs of one application (see the module docstring). Not thread-safe: one owner calls it (the
    ``JobBoard`` deployment runs its methods on one event loop)."""

    def __init__(self, max_queue: int, lease_s: float, max_history: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.max_queue, self.lease_s, self.max_history, self.clock = max_queue, lease_s, max_history, clock
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.seen: dict[str, float] = {}
        """Replica → when it last called the table."""
        self.replicas: dict[str, dict[str, Any]] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=10)
        self._init_metrics()

    # -- clients ----------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """Queue a job: ``(view, None)``, or ``(None, "queue full (N jobs)")`` when ``max_queue`` jobs wait."""
        self._reap()
        if len(self.queue) >= self.max_queue:
            self._rejected.labels(reason="queue_full").inc()
            return None, f"queue full ({len(self.queue)} jobs)"
        job = Job(spec["id"], spec, self.clock())
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self._forget()
        return job.view(len(self.queue) - 1), None

    def get(self, job_id: str) -> dict[str, Any] | None:
        self._reap()
        job = self.jobs.get(job_id)
        return None if job is None else job.view(self._position(job))

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs, newest first."""
        self._reap()
        jobs = list(self.jobs.values())[-limit:][::-1]
        return [j.view(self._position(j)) for j in jobs]

    def cancel(self, job_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """A queued job is cancelled at once; a running one is asked to stop (its replica stops it at the next
        model call and finishes it as ``cancelled``). ``(view, None)``; ``(view, why)`` for a finished job;
        ``(None, None)`` for an unknown id."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None, None
        if job.status in FINISHED:
            return job.view(), f"job {job_id} already {job.status}"
        job.cancel_requested = True
        if job.status == "queued":
            self.queue.remove(job_id)
            self._finish(job, "cancelled", "cancelled while queued", None)
        return job.view(self._position(job)), None

    # -- replicas ---------------------------------------------------------------------------------------

    def take(self, replica: str, info: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The oldest queued job, now running on ``replica`` (None when the queue is empty). ``info``: what
        ``/health`` shows of the replica (its pid, its ranks' pids)."""
        now = self.clock()
        self.seen[replica] = now
        if info is not None:
            self.replicas[replica] = info
        self._reap()
        for job in self.jobs.values():  # a replica asks only when idle: a job it still "runs" never reached it
            if job.status == "running" and job.owner == replica:
                self._finish(job, "failed", f"replica {replica} never received the job (it asked for another)", None)
        if not self.queue:
            return None
        job = self.jobs[self.queue.popleft()]
        job.status, job.owner, job.started_at = "running", replica, now
        self._wait_seconds.observe(now - job.created_at)
        return job.spec

    def report(self, job_id: str, replica: str, progress: dict[str, Any] | None) -> bool:
        """A running job's progress; True when it should stop (cancelled, or no longer this replica's)."""
        self.seen[replica] = self.clock()
        self._reap()
        job = self.jobs.get(job_id)
        if job is None or job.status != "running" or job.owner != replica:
            return True
        if progress is not None:
            job.progress = progress
        return job.cancel_requested

    def finish(self, job_id: str, replica: str, status: str, error: str | None = None,
               result: dict[str, Any] | None = None) -> None:  # fmt: skip
        """The end of a job ``replica`` ran: succeeded, failed or cancelled. A job no longer running there (it
        was failed when the replica's lease ran out) keeps its state."""
        if status not in FINISHED:
            raise ValueError(f"finish: status must be one of {sorted(FINISHED)}; got {status!r}")
        self.seen[replica] = self.clock()
        job = self.jobs.get(job_id)
        if job is None or job.status != "running" or job.owner != replica:
            return
        self._finish(job, status, error, result)

    def leave(self, replica: str, error: str | None = None) -> None:
        """A replica going away (shut down, or broken: ``error``): it takes no more jobs; its running job, if any,
        it has finished itself."""
        self.seen.pop(replica, None)
        self.replicas.pop(replica, None)
        if error:
            self.failures.append({"replica": replica, "error": error, "at": self.clock()})

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers: the replicas within their lease, and the last replica failures."""
        self._reap()
        now = self.clock()
        running = {j.owner: j.id for j in self.jobs.values() if j.status == "running"}
        live = [
            {"replica": r, **self.replicas.get(r, {}), "job": running.get(r), "seen_s_ago": round(now - t, 2)}
            for r, t in self.seen.items()
            if now - t <= self.lease_s
        ]  # fmt: skip
        return {"status": "ok" if live else "unavailable", "replicas": live, "queue": len(self.queue),
                "max_queue": self.max_queue, "failures": list(self.failures)}  # fmt: skip

    # -- internals ----------------------------------------------------------------------------------------

    def _position(self, job: Job) -> int | None:
        return self.queue.index(job.id) if job.status == "queued" else None

    def _finish(self, job: Job, status: str, error: str | None, result: dict[str, Any] | None) -> None:
        job.status, job.error, job.result, job.finished_at = status, error, result, self.clock()
        self._finished.labels(state=status).inc()
        if job.started_at is not None:
            self._job_seconds.labels(state=status).observe(job.finished_at - job.started_at)
        timings = (result or {}).get("timings") or {}
        for stage, seconds in timings.items():
            if stage in ("encode", "decode") or stage.startswith("stage"):
                self._stage_seconds.labels(stage=stage).observe(float(seconds))

    def _reap(self) -> None:
        """Fail the running jobs of replicas that have not reported for ``lease_s``, and forget those replicas."""
        now = self.clock()
        for job in self.jobs.values():
            if job.status != "running" or job.owner is None:
                continue
            last = self.seen.get(job.owner, job.started_at or now)
            if now - last > self.lease_s:
                self._finish(job, "failed", f"replica {job.owner} stopped reporting for {now - last:.0f}s "
                             "(its process died?); the job was lost", None)  # fmt: skip
        for replica, last in list(self.seen.items()):
            if now - last > self.lease_s:
                self.leave(replica, f"stopped reporting for {now - last:.0f}s")

    def _forget(self) -> None:
        """Keep at most ``max_history`` finished jobs (oldest forgotten first)."""
        finished = [j.id for j in self.jobs.values() if j.status in FINISHED]
        for job_id in finished[: max(0, len(finished) - self.max_history)]:
            del self.jobs[job_id]

    def _init_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self._queue_length = Gauge("dvg_queue_length", "Jobs waiting for a replica", registry=r)
        self._queue_capacity = Gauge("dvg_queue_capacity", "Jobs that may wait before a submit gets 429", registry=r)
        self._jobs = Gauge("dvg_jobs", "Jobs the table holds, by state", ["state"], registry=r)
        self._replicas = Gauge("dvg_replicas_live", "Replicas that called the table within the lease", registry=r)
        self._finished = Counter("dvg_jobs_finished", "Jobs finished, by final state", ["state"], registry=r)
        self._rejected = Counter("dvg_jobs_rejected", "Submits refused, by reason", ["reason"], registry=r)
        self._job_seconds = Histogram("dvg_job_seconds", "Seconds from a job's start to its end, by final state",
                                      ["state"], buckets=JOB_BUCKETS, registry=r)  # fmt: skip
        self._wait_seconds = Histogram("dvg_job_wait_seconds", "Seconds a job waited in the queue",
                                       buckets=JOB_BUCKETS, registry=r)  # fmt: skip
        self._stage_seconds = Histogram("dvg_stage_seconds", "Seconds per stage of finished jobs (encode, stage1.."
                                        "stage4, decode)", ["stage"], buckets=STAGE_BUCKETS, registry=r)  # fmt: skip
        for state in FINISHED:
            self._finished.labels(state=state)
        self._rejected.labels(reason="queue_full")

    def metrics(self) -> bytes:
        """The Prometheus text exposition of the table."""
        from prometheus_client import generate_latest

        self._reap()
        now = self.clock()
        self._queue_length.set(len(self.queue))
        self._queue_capacity.set(self.max_queue)
        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs.values():
            counts[job.status] += 1
        for state, n in counts.items():
            self._jobs.labels(state=state).set(n)
        self._replicas.set(sum(1 for t in self.seen.values() if now - t <= self.lease_s))
        return bytes(generate_latest(self.registry))
