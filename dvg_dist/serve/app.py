"""The Ray Serve application (docs/serve.md), three deployments:

- ``VideoServer``: the HTTP ingress (FastAPI), light (no model): validates requests with the CLI's checks and
  answers from the job table, so it stays up while the groups are busy or restarting;
- ``JobBoard``: one replica holding the :class:`~dvg_dist.serve.jobs.JobTable` (the bounded queue and every
  job's state), so a job's state does not depend on which replica ran it, and outlives that replica;
- ``GroupWorker``: the groups. One replica = one sequence-parallel group of ``nproc`` ranks in the replica's own
  placement group (``placement_group_bundles``: one bundle, one GPU, per rank); ``replicas`` of them are
  data-parallel over the jobs. Each runs one thread that takes the oldest queued job, runs it on its ranks
  (:meth:`~dvg_dist.serve.ranks.RankGroup.run`) while reporting progress, and finishes it.

``build_app(args)`` is the application builder: ``launch/serve.py`` calls it, and a Serve config file names it
(``import_path: dvg_dist.serve.app:build_app``, ``args:`` the :class:`~dvg_dist.serve.options.ServeOptions`).

A group that loses a rank fails that job with the rank named, kills its ranks and answers Serve's health check
with the error, so Serve replaces the replica (a new placement group, new ranks, the model loaded again). A
``GroupWorker`` process that dies outright stops reporting: the board fails its job when its lease runs out.

Hazards:
- Rank 0 writes ``<out>/<id>.mp4``; the ingress serves the file from the same path: on several nodes ``out`` must
  be a filesystem every node sees (as for ``launch/ray_generate.py``).
- The job table lives in one ``JobBoard`` process, in memory: if it dies the table starts empty (running jobs are
  then stopped: their groups learn that nobody knows the job).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``request: Request``)
# at runtime, through the wrappers ``serve.ingress`` makes, whose globals are not this module's.
import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from ..config import ConfigError
from ..dvg.planner import InfeasibleBudget
from ..models import InputError
from ..runtime.cli import setup_logging
from .jobs import JobTable, RequestChecker
from .options import ServeOptions
from .ranks import Outcome, RankGroup

logger = logging.getLogger("dvg_dist.serve")
USER_ERRORS = (ConfigError, InputError, InfeasibleBudget)

api = FastAPI(title="dvg_dist video server", description="DVG video generation: POST /v1/videos, then poll.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# No access log: every group calls the board a few times a second.
@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, logging_config={"enable_access_log": False}
)
class JobBoard:
    """The application's job table, on one replica; its methods run one at a time on the replica's event loop."""

    def __init__(self, max_queue: int, lease_s: float, max_history: int) -> None:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: this process exposes only the table
        self.table = JobTable(max_queue, lease_s, max_history)
        self._submitted: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._submitted is None:  # created on the replica's event loop, at first use
            self._submitted = asyncio.Condition()
        return self._submitted

    async def submit(self, spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        view, why = self.table.submit(spec)
        if view is not None:
            async with self._condition():
                self._condition().notify_all()
        return view, why

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return self.table.get(job_id)

    async def list(self, limit: int) -> list[dict[str, Any]]:
        return self.table.list(limit)

    async def cancel(self, job_id: str) -> tuple[dict[str, Any] | None, str | None]:
        return self.table.cancel(job_id)

    async def take(
        self, replica: str, info: dict[str, Any] | None = None, wait_s: float = 0.0
    ) -> dict[str, Any] | None:
        """The next job for ``replica``; with an empty queue, waits up to ``wait_s`` for a submit (a long poll)."""
        spec = self.table.take(replica, info)
        if spec is None and wait_s > 0:
            condition = self._condition()
            async with condition:
                try:
                    await asyncio.wait_for(condition.wait(), timeout=wait_s)
                except asyncio.TimeoutError:
                    pass
            spec = self.table.take(replica, info)
        return spec

    async def report(self, job_id: str, replica: str, progress: dict[str, Any] | None) -> bool:
        return self.table.report(job_id, replica, progress)

    async def finish(self, job_id: str, replica: str, status: str, error: str | None,
                     result: dict[str, Any] | None) -> None:  # fmt: skip
        self.table.finish(job_id, replica, status, error, result)

    async def leave(self, replica: str, error: str | None = None) -> None:
        self.table.leave(replica, error)

    async def health(self) -> dict[str, Any]:
        return self.table.health()

    async def metrics(self) -> bytes:
        return self.table.metrics()


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5, max_ongoing_requests=10)
class GroupWorker:
    """One sequence-parallel group (the replica's ranks) and the thread that runs jobs on it (see the module
    docstring). It serves no HTTP: it takes jobs from the board."""

    def __init__(self, board: Any, options: dict[str, Any]) -> None:
        self.settings = o = ServeOptions.from_dict(options)
        setup_logging(o.verbose)
        self.config = o.load_config()
        self.out = Path(o.out)
        self.board = board
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.broken: str | None = None
        self.group = RankGroup(self.config, o.nproc, o.bundle(self.config), setup_timeout_s=o.setup_timeout_s,
                               verbose=o.verbose)  # fmt: skip
        self.group.start()
        self.info = {"pid": os.getpid(), "ranks": self.group.pids, "nproc": o.nproc}
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="dvg-serve-jobs", daemon=True)
        self._thread.start()
        logger.info("replica %s (pid %d): %d rank(s) %s serving %s", self.replica, os.getpid(), o.nproc,
                    self.group.pids, self.config.model.path)  # fmt: skip

    def check_health(self) -> None:
        """Serve's health check: a replica that lost a rank (or its job thread) asks to be replaced."""
        if self.broken:
            raise RuntimeError(self.broken)
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"replica {self.replica}: the job thread stopped")

    async def describe(self) -> dict[str, Any]:
        """This replica's pid, ranks, running job and health (for debugging through a handle)."""
        return {"replica": self.replica, **self.info, "job": self.current, "error": self.broken}

    def _work(self) -> None:
        """Take, run and finish jobs one at a time until stopped or broken."""
        while not self._stop.is_set() and not self.broken:
            try:
                # A long poll: the board answers at once when a job is queued, else after a few seconds (well
                # within the lease, which each call renews).
                wait_s = min(2.0, self.settings.lease_s / 4)
                spec = self.board.take.remote(self.replica, self.info, wait_s).result(timeout_s=wait_s + 30)
            except Exception as e:
                logger.warning("replica %s: the job board did not answer (%s); retrying", self.replica, _one_line(e))
                self._stop.wait(1.0)
                continue
            if spec is None:
                continue
            self._run(spec)

    def _run(self, spec: dict[str, Any]) -> None:
        job_id = spec["id"]
        self.current = job_id
        r = spec["request"]
        logger.info("job %s: %r seed %d, %s x %d frames, %d steps, mode %s, budget %g", job_id, r["prompt"],
                    r["seed"], r["size"], r["frames"], r["steps"], r["mode"], r["budget"])  # fmt: skip

        def report(progress: dict[str, Any] | None) -> bool:
            try:
                return bool(self.board.report.remote(job_id, self.replica, progress).result(timeout_s=10))
            except Exception as e:
                logger.warning("job %s: progress report failed (%s)", job_id, _one_line(e))
                return False

        t0 = time.perf_counter()
        o = self.settings
        try:
            outcome = self.group.run(spec, str(self.out), report, timeout_s=o.request_timeout_s,
                                     poll_timeout_s=min(5.0, o.lease_s / 4))  # fmt: skip
        except Exception as e:  # the loop itself failed (Ray unreachable ...): the group's state is unknown
            outcome = Outcome("failed", f"replica {self.replica}: {type(e).__name__}: {_one_line(e)}", broken=True)
        if outcome.broken:
            self.group.kill()
        for attempt in range(5):
            try:
                self.board.finish.remote(job_id, self.replica, outcome.status, outcome.error,
                                         outcome.result).result(timeout_s=10)  # fmt: skip
                break
            except Exception as e:
                logger.warning("job %s: could not record its end (%s); attempt %d", job_id, _one_line(e), attempt + 1)
                time.sleep(1.0)
        took = time.perf_counter() - t0
        if outcome.status == "succeeded":
            logger.info("job %s: succeeded in %.2fs -> %s", job_id, took, outcome.result and outcome.result["video"])
        else:
            logger.warning("job %s: %s after %.2fs: %s", job_id, outcome.status, took, outcome.error)
        self.current = None
        if outcome.broken:
            self.broken = f"replica {self.replica}: {outcome.error}; Serve must restart it"
            logger.error("%s", self.broken)
            try:
                self.board.leave.remote(self.replica, self.broken).result(timeout_s=10)
            except Exception:
                pass

    def __del__(self) -> None:
        """Serve's graceful shutdown: stop taking jobs, fail a running one, kill the ranks."""
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        current = self.current
        try:
            if current is not None:
                self.board.finish.remote(current, self.replica, "failed", f"replica {self.replica} was shut down",
                                         None).result(timeout_s=5)  # fmt: skip
            self.board.leave.remote(self.replica)
        except Exception:
            pass
        self.group.kill()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress(api)
class VideoServer:
    """The HTTP API (FastAPI): validation and the job table's views. No model, no ranks: it answers while the
    groups are busy or restarting."""

    def __init__(self, board: Any, workers: Any, options: dict[str, Any]) -> None:
        o = ServeOptions.from_dict(options)
        setup_logging(o.verbose)
        self.checker = RequestChecker(o.load_config(), Path(o.out))
        self.board, self.workers = board, workers  # ``workers``: bound so that Serve deploys the groups

    @api.post("/v1/videos")
    async def create(self, request: Request) -> Response:
        """Validate (the CLI's checks; 400 with the one-line message), then queue (429 when full)."""
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        job_id = uuid.uuid4().hex
        try:
            spec = await asyncio.to_thread(self.checker.job, body, job_id)
        except USER_ERRORS as e:
            return _error(400, _one_line(e))
        view, why = await self.board.submit.remote(spec)
        if view is None:
            if spec["image"] is not None:
                Path(spec["image"]).unlink(missing_ok=True)
            return _error(429, why or "queue full")
        location = f"{request.scope.get('root_path', '')}/v1/videos/{job_id}"
        return JSONResponse(view, status_code=202, headers={"Location": location})

    @api.get("/v1/videos")
    async def list_jobs(self, limit: int = 100) -> Response:
        return JSONResponse({"object": "list", "data": await self.board.list.remote(max(1, min(limit, 1000)))})

    @api.get("/v1/videos/{job_id}")
    async def status(self, job_id: str) -> Response:
        view = await self.board.get.remote(job_id)
        return _error(404, f"no job {job_id}") if view is None else JSONResponse(view)

    @api.get("/v1/videos/{job_id}/content")
    async def content(self, job_id: str) -> Response:
        view = await self.board.get.remote(job_id)
        if view is None:
            return _error(404, f"no job {job_id}")
        if view["status"] != "succeeded":
            return _error(409, f"job {job_id} is {view['status']}; its video exists once it has succeeded")
        path = Path(view["result"]["video"])
        if not path.is_file():
            return _error(404, f"job {job_id}: {path.name} is no longer in the output directory")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @api.delete("/v1/videos/{job_id}")
    async def cancel(self, job_id: str) -> Response:
        view, why = await self.board.cancel.remote(job_id)
        if view is None:
            return _error(404, f"no job {job_id}")
        return _error(409, why) if why else JSONResponse(view)

    @api.get("/health")
    async def health(self) -> Response:
        """200 while at least one group takes jobs (503 otherwise), with every live replica's pid and ranks."""
        body = await self.board.health.remote()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await self.board.metrics.remote(), media_type=CONTENT_TYPE_LATEST)


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``args`` (:class:`ServeOptions` fields): checked here, before any replica starts."""
    options = ServeOptions.from_dict(dict(args)).resolved()
    config = options.check()
    options = dataclasses.replace(options, gpus_per_rank=options.gpus(config))
    bundle = options.bundle(config)
    logger.info("%d replica(s) of %d rank(s) x %s, queue %d, out %s", options.replicas, options.nproc, bundle,
                options.max_queue, options.out)  # fmt: skip
    # The decorators made Serve deployments of the classes (mypy sees the classes).
    board_deployment: Any = JobBoard
    worker_deployment: Any = GroupWorker
    server_deployment: Any = VideoServer
    board = board_deployment.bind(options.max_queue, options.lease_s, options.max_history)
    workers = worker_deployment.options(
        num_replicas=options.replicas,
        placement_group_bundles=[dict(bundle) for _ in range(options.nproc)],
        placement_group_strategy="STRICT_PACK" if options.strict_pack else "PACK",
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=max(30.0, options.health_check_period_s),
    ).bind(board, options.to_dict())
    return server_deployment.bind(board, workers, options.to_dict())
