"""One replica's ranks: N Ray actors in the replica's placement group (one bundle each), each holding a
:class:`dvg_dist.DVG` in one process group (gloo on CPU, NCCL on GPUs), and the loop that runs one job on all of
them.

The rendezvous is the Ray executor's (:class:`~dvg_dist.executors.ray_executor.RankActor`: rank 0 publishes
``tcp://<ip>:<free port>``, every rank sets ``MASTER_ADDR``/``RANK``/... and joins); a one-rank replica joins no
group. Every rank makes the same ``DVG.generate`` call; rank 0 writes ``<out>/<id>.mp4`` and ``<id>.json``
atomically (:meth:`dvg_dist.api.VideoOutput.save`).

Progress and cancellation: the actors are threaded (``max_concurrency=2``), so while ``run`` generates, the
replica calls rank 0's ``poll`` (the last step's progress; it also carries a cancel request). After every model
call each rank's callback enters one broadcast of rank 0's cancel flag, so all ranks raise :class:`JobCancelled`
at the same step and no rank is left inside a collective.

Failures: a rank that dies or raises fails the job with ``rank R (pid P) failed: ...``, without waiting for its
peers (they may be blocked in a collective until the process-group timeout): the group is killed and the replica
reports itself unhealthy, so Ray Serve replaces it. A job over ``request_timeout_s`` is cancelled the same way as
a DELETE, and failed; if its ranks do not stop within ``grace_s`` the group is killed too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..executors.ray_executor import FORWARDED_ENV, GroupFailed, RankActor, _describe, actor_class

logger = logging.getLogger("dvg_dist.serve")


class JobCancelled(RuntimeError):
    """Raised from the step callback on every rank when the job is cancelled (or timed out)."""


class ServeRank(RankActor):
    """One rank of a replica's group, holding a ``DVG`` (wrapped by ``ray.remote`` in ``actor_class``)."""

    def __init__(self, config: Config, rank: int, world: int, verbose: bool = False) -> None:
        super().__init__(config, rank, world, verbose)
        self.dvg: Any = None
        self._lock = threading.Lock()
        self._job: str | None = None
        self._cancel = False
        self._progress: dict[str, Any] | None = None

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the group (several ranks) and load the model through the Python API."""
        from ..api import DVG

        if self.world > 1:
            # As RankActor.setup: one visible device per actor (Ray sets CUDA_VISIBLE_DEVICES), hence LOCAL_RANK 0.
            os.environ.update(
                MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                WORLD_SIZE=str(self.world), LOCAL_RANK="0",
            )  # fmt: skip
        self.dvg = DVG(config=self.config, distributed=self.world > 1)

    def poll(self, job_id: str, cancel: bool) -> dict[str, Any] | None:
        """Rank 0: the running job's last progress; ``cancel`` asks it to stop at the next model call."""
        with self._lock:
            if job_id != self._job:
                return None
            if cancel:
                self._cancel = True
            return None if self._progress is None else dict(self._progress)

    def run(self, job: dict[str, Any], out: str) -> dict[str, Any] | None:
        """Generate ``job`` (every rank enters); rank 0 writes the video and returns what the client sees."""
        import torch.distributed as dist

        from ..api import StepInfo

        dvg = self.dvg
        if dvg is None:
            raise GroupFailed("ServeRank.setup() must run before run()")
        with self._lock:
            self._job, self._cancel, self._progress = job["id"], False, None

        def callback(info: StepInfo) -> None:
            with self._lock:
                self._progress = {
                    "stage": info.stage + 1, "num_stages": info.num_stages, "step": info.step + 1,
                    "num_steps": info.num_steps, "grid": list(info.grid),
                    "percent": round(100 * (info.step + 1) / info.num_steps, 1),
                }  # fmt: skip
                stop = self._cancel
            if self.world > 1:
                box = [stop]
                dist.broadcast_object_list(box, src=0)  # rank 0 decides; every rank stops at this step or none
                stop = bool(box[0])
            if stop:
                raise JobCancelled(f"stopped at step {info.step + 1} of {info.num_steps}")

        try:
            video = dvg.generate(job["prompt"], seed=job["seed"], image=job["image"], callback=callback,
                                 progress=False, **job["settings"])  # fmt: skip
        finally:
            with self._lock:
                self._job = None
        if not dvg.is_main:
            return None
        path = video.save(Path(out) / f"{job['id']}.mp4")
        with self._lock:
            progress = self._progress
        plan = video.sidecar["plan"]
        return {
            "video": str(path), "sidecar": str(path.with_suffix(".json")), "frames": int(video.frames.shape[0]),
            "fps": video.fps, "seconds": round(video.timings["total"], 3),
            "timings": {k: round(v, 4) for k, v in video.timings.items()},
            "plan": {"mode": plan["mode"], "chosen": plan["chosen"], "stages": plan["stages"]},
            "parallel": video.sidecar["parallel"], "progress": progress,
        }  # fmt: skip


@dataclass
class Outcome:
    """How one job ended on a group."""

    status: str
    """succeeded, failed or cancelled."""
    error: str | None = None
    result: dict[str, Any] | None = None
    broken: bool = False
    """The group can run no more jobs (a rank died, raised alone, or would not stop)."""


def _cancelled(e: BaseException) -> JobCancelled | None:
    """The ``JobCancelled`` a rank raised (Ray re-raises it wrapped; the wrapper's text is the whole traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, JobCancelled):
        return cause
    return e if isinstance(e, JobCancelled) else None


class RankGroup:
    """The ranks of one replica. ``start`` places them in the current placement group (the replica's, which Serve
    creates from ``placement_group_bundles`` and removes with the replica; bundle ``r`` holds rank ``r``)."""

    def __init__(self, config: Config, world: int, bundle: dict[str, float], *, setup_timeout_s: float = 600.0,
                 verbose: bool = False) -> None:  # fmt: skip
        self.config, self.world, self.bundle = config, world, bundle
        self.setup_timeout_s, self.verbose = setup_timeout_s, verbose
        self.actors: list[Any] = []
        self.pids: list[int] = []

    def start(self) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        cls = actor_class(ServeRank)
        self.actors = [
            cls.options(
                num_cpus=self.bundle.get("CPU", 1.0), num_gpus=self.bundle.get("GPU", 0.0), max_concurrency=2,
                runtime_env={"env_vars": env},
                scheduling_strategy=None if pg is None else PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=r if r < pg.bundle_count else -1),
            ).remote(self.config, r, self.world, self.verbose)
            for r in range(self.world)
        ]  # fmt: skip
        t0 = time.perf_counter()
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors], timeout=self.setup_timeout_s)
            ip, port = ("", 0)
            if self.world > 1:
                ip, port = ray.get(self.actors[0].rendezvous.remote(), timeout=self.setup_timeout_s)
            ray.get([a.setup.remote(ip, port) for a in self.actors], timeout=self.setup_timeout_s)
        except Exception as e:
            self.kill()
            raise GroupFailed(f"{self.world} rank(s): set-up failed: {_describe(e)}") from None
        where = f", rendezvous tcp://{ip}:{port}" if self.world > 1 else ""
        logger.info("%d rank(s) ready in %.1fs%s, pids %s", self.world, time.perf_counter() - t0, where, self.pids)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass

    def run(self, job: dict[str, Any], out: str, report: Callable[[dict[str, Any] | None], bool], *,
            timeout_s: float = 1800.0, poll_s: float = 0.5, poll_timeout_s: float = 5.0,
            grace_s: float = 30.0) -> Outcome:  # fmt: skip
        """Run ``job`` on every rank. ``report(progress)`` is called every ``poll_s`` with rank 0's last
        progress (None when rank 0 did not answer within ``poll_timeout_s``) and answers whether to stop."""
        import ray

        refs = [a.run.remote(job, out) for a in self.actors]
        pending = dict(enumerate(refs))
        done: dict[int, Any] = {}
        stopped: list[JobCancelled] = []
        started = time.monotonic()
        cancel, timed_out = False, False
        while True:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=poll_s)
            for rank, ref in list(pending.items()):
                if ref not in ready:
                    continue
                del pending[rank]
                try:
                    done[rank] = ray.get(ref)
                except Exception as e:
                    why = _cancelled(e)
                    if why is not None:
                        stopped.append(why)
                        continue
                    error = f"rank {rank} (pid {self.pids[rank]}) failed: {_describe(e)}"
                    # A lone failure leaves the other ranks inside a collective: do not wait for them.
                    return Outcome("failed", error, broken=True)
            if not pending:
                if stopped:
                    if timed_out:
                        return Outcome("failed", f"timed out after {timeout_s:g}s ({stopped[0]})")
                    return Outcome("cancelled", f"cancelled: {stopped[0]}")
                result = dict(done[0])
                report(result.pop("progress", None))  # the last step's progress, which no poll may have seen
                return Outcome("succeeded", result=result)
            elapsed = time.monotonic() - started
            if elapsed > timeout_s and not timed_out:
                timed_out = cancel = True
                logger.warning("job %s: over %gs; stopping it", job["id"], timeout_s)
            if timed_out and elapsed > timeout_s + grace_s:
                return Outcome("failed", f"timed out after {timeout_s:g}s and did not stop within {grace_s:g}s",
                               broken=True)  # fmt: skip
            try:
                progress = ray.get(self.actors[0].poll.remote(job["id"], cancel), timeout=poll_timeout_s)
            except Exception:  # rank 0 died or is unresponsive: its run() result says which, next round
                progress = None
            if report(progress) and not cancel:
                cancel = True
                logger.info("job %s: cancel requested; stopping at the next model call", job["id"])
