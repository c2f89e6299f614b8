"""The Ray executor (docs/parallel.md): the same :class:`Worker` as the local executor, one Ray actor
per rank, each sp group in its own placement group; several groups are data-parallel over requests.

Ray places the processes and carries control messages (the request, a small result dict); tensors go
through torch.distributed inside a group. Rank 0 of a group picks a free TCP port on its node and
publishes ``tcp://<ip>:<port>``; every actor of the group sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
and calls ``Worker.init_distributed()`` + ``load()``. Rank 0 writes each request's outputs atomically
(mp4 + sidecar + optional latent, the local executor's helpers and schema); the driver appends one
``manifest.jsonl`` line per finished request and is the manifest's only writer.

Hazards:
- Output paths are resolved by the driver and written by rank 0's actor: on a multi-node cluster ``--out``
  must be on a filesystem both see (as with torchrun). Under ``ray job submit`` the driver's working
  directory is Ray's copy of ``--working-dir``: pass absolute ``--out``/``--model`` paths.
- The free port is found by binding port 0 and closing the socket; another process could take it before
  torch binds it (then the group's set-up fails with a clear error and can be retried).
- A rank that dies leaves its peers blocked inside a collective until the process-group timeout: the
  driver does not wait for them — it kills the whole group and rebuilds it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..dvg.planner import InfeasibleBudget
from ..models import InputError
from ..runtime.cli import OneLineParser, add_generation_args, config_from_args, setup_logging
from ..runtime.distributed import validate_layout
from ..runtime.engine import sidecar, validate
from ..runtime.generate import describe_plan
from ..runtime.outputs import write_json, write_latent, write_video
from ..runtime.versions import check_versions
from .requests import BatchItem, append_manifest, finished, item_config, read_batch
from .worker import Worker

logger = logging.getLogger("dvg_dist.ray")
USER_ERRORS = (ConfigError, InputError, InfeasibleBudget)
# Environment the actors need from the driver (Ray workers inherit the raylet's environment, not ours).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "DVG_FAULT_INJECT")


class GroupFailed(RuntimeError):
    """A group could not finish a request: a rank died, raised, or the request timed out."""


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (see the module's hazard note)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RankActor:
    """One rank of one sp group, as a Ray actor (wrapped by ``ray.remote`` in :func:`actor_class`)."""

    def __init__(self, config: Config, rank: int, world: int, verbose: bool = False) -> None:
        setup_logging(verbose)
        if rank != 0:
            logging.getLogger("dvg_dist").setLevel(logging.WARNING)  # INFO logs from rank 0 only
        self.config, self.rank, self.world = config, rank, world
        self.worker: Worker | None = None

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free port on it, for ``tcp://<ip>:<port>``."""
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the group's process group and load the model (the local executor's code path)."""
        # One visible device per actor (Ray sets CUDA_VISIBLE_DEVICES), hence LOCAL_RANK 0.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world), LOCAL_RANK="0",
        )  # fmt: skip
        worker = Worker(self.config)
        worker.init_distributed()
        worker.load()
        self.worker = worker

    def execute(self, item: BatchItem, out: str, save_latent: bool, progress: bool) -> dict[str, Any] | None:
        """Generate one request (every rank of the group enters); rank 0 writes the outputs and returns
        ``{"files", "time_s", "plan"}``, the other ranks None."""
        worker = self.worker
        if worker is None:
            raise InputError("RankActor.setup() must run before execute()")
        # A JSONL line may carry its own budget / mode: this request's config, the same model and layout.
        config = item_config(self.config, item)
        result = worker.execute(item.request, progress=progress, config=config)
        if not worker.is_main:
            return None
        assert result.frames is not None
        root, name = Path(out), item.name
        files = {"video": f"{name}.mp4", "sidecar": f"{name}.json"}
        write_video(root / files["video"], result.frames[0], worker.engine.adapter.fps)
        if save_latent:
            files["latent"] = f"{name}.latent.safetensors"
            write_latent(root / files["latent"], result.latent[0:1])
        record = sidecar(result, 0, config, files, worker.layout_record())
        write_json(root / files["sidecar"], record)  # last: its presence means the request is complete
        return {"files": files, "time_s": result.timings["total"], "plan": describe_plan(record["plan"])}


_ACTORS: dict[type, Any] = {}


def actor_class(cls: type | None = None) -> Any:
    """``ray.remote`` of a rank class (default :class:`RankActor`; the server's subclass too), made once per class:
    never restarted, no task retries (a dead rank fails its group; the driver rebuilds it)."""
    cls = RankActor if cls is None else cls
    if cls not in _ACTORS:
        import ray

        _ACTORS[cls] = ray.remote(max_restarts=0, max_task_retries=0)(cls)
    return _ACTORS[cls]


@dataclass
class Group:
    """One sp group: a placement group and its actors (index = rank)."""

    index: int
    placement: Any
    actors: list[Any]
    pids: list[int]
    generation: int = 0


@dataclass
class Flight:
    """A request in flight on a group."""

    item: BatchItem
    attempt: int
    refs: list[Any]
    started: float
    done: dict[int, Any] = field(default_factory=dict)


@dataclass
class ExecutorOptions:
    """How the executor places and supervises its actors."""

    workers: int = 1
    sp: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "PACK"
    placement_timeout_s: float = 60.0
    setup_timeout_s: float = 600.0
    request_timeout_s: float = 1800.0
    retries: int = 1
    verbose: bool = False


class RayExecutor:
    """``workers // sp`` groups of ``sp`` actors. Requires ``ray.init()`` to have run.

    Contract: :meth:`run` returns one manifest entry per item (status ``ok`` or ``failed``) and appends it to
    ``out/manifest.jsonl`` as it finishes; a failed attempt (a rank died, raised, or exceeded
    ``request_timeout_s``) names the rank, the group is rebuilt and the request retried up to ``retries``
    times. ``on_dispatch(group, item, attempt)`` is a test hook called right after a request is sent.
    """

    def __init__(
        self,
        config: Config,
        out: Path,
        options: ExecutorOptions,
        *,
        save_latent: bool = False,
        progress: bool = False,
        on_dispatch: Callable[[Group, BatchItem, int], None] | None = None,
    ) -> None:
        if options.workers < 1 or options.sp < 1 or options.workers % options.sp:
            raise InputError(f"--workers {options.workers} must be a positive multiple of --sp {options.sp}")
        if options.strategy not in ("PACK", "STRICT_PACK"):
            raise InputError(f"placement strategy must be PACK or STRICT_PACK; got {options.strategy}")
        self.config, self.out, self.options = config, out, options
        self.save_latent, self.progress, self.on_dispatch = save_latent, progress, on_dispatch
        self.groups: list[Group] = []
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}

    # -- groups ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build every group (placement group ready, actors set up) before any request."""
        for g in range(self.options.workers // self.options.sp):
            self.groups.append(self._build(g))

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.options.cpus_per_worker}
        if self.options.gpus_per_worker:
            bundle["GPU"] = self.options.gpus_per_worker
        return bundle

    def _build(self, index: int, generation: int = 0) -> Group:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        o, bundle = self.options, self._bundle()
        pg = placement_group(
            [dict(bundle) for _ in range(o.sp)], strategy=o.strategy, name=f"dvg-g{index}-{generation}"
        )
        try:
            ray.get(pg.ready(), timeout=o.placement_timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise InputError(
                f"group {index}: placement group of {o.sp} x {bundle} ({o.strategy}) not ready after "
                f"{o.placement_timeout_s:g}s: the cluster lacks the resources — check `ray status`"
            ) from None
        cls = actor_class()
        actors = [
            cls.options(
                num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker, runtime_env={"env_vars": self.env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(self.config, r, o.sp, o.verbose)
            for r in range(o.sp)
        ]  # fmt: skip
        try:
            ip, port = ray.get(actors[0].rendezvous.remote(), timeout=o.setup_timeout_s)
            pids = ray.get([a.pid.remote() for a in actors], timeout=o.setup_timeout_s)
            logger.info("group %d: %d rank(s), rendezvous tcp://%s:%d, pids %s", index, o.sp, ip, port, pids)
            ray.get([a.setup.remote(ip, port) for a in actors], timeout=o.setup_timeout_s)
        except Exception as e:
            self._kill(Group(index, pg, actors, []))
            raise GroupFailed(f"group {index}: set-up failed: {_describe(e)}") from None
        return Group(index, pg, actors, pids, generation)

    def _kill(self, group: Group) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in group.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        try:
            remove_placement_group(group.placement)
        except Exception:
            pass

    def shutdown(self) -> None:
        for group in self.groups:
            self._kill(group)
        self.groups = []

    # -- requests -------------------------------------------------------------------------------------
    def _dispatch(self, group: Group, item: BatchItem, attempt: int) -> Flight:
        refs = [a.execute.remote(item, str(self.out), self.save_latent, self.progress) for a in group.actors]
        flight = Flight(item, attempt, refs, time.monotonic())
        logger.info("group %d: %s (attempt %d)", group.index, item.name, attempt + 1)
        if self.on_dispatch is not None:
            self.on_dispatch(group, item, attempt)
        return flight

    def _poll(self, group: Group, flight: Flight) -> dict[str, Any] | None:
        """rank 0's result once every rank is done; None while running; raises GroupFailed."""
        import ray

        for rank, ref in enumerate(flight.refs):
            if rank in flight.done:
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                flight.done[rank] = ray.get(ref)
            except Exception as e:
                raise GroupFailed(
                    f"group {group.index}: rank {rank} (pid {group.pids[rank]}) failed: {_describe(e)}"
                ) from None
        if len(flight.done) == len(flight.refs):
            result: dict[str, Any] = flight.done[0]
            return result
        elapsed = time.monotonic() - flight.started
        if elapsed > self.options.request_timeout_s:
            waiting = [r for r in range(len(flight.refs)) if r not in flight.done]
            raise GroupFailed(
                f"group {group.index}: request timed out after {elapsed:.0f}s; rank(s) {waiting} still running"
            )
        return None

    def run(self, items: list[BatchItem]) -> list[dict[str, Any]]:
        """Run ``items`` over the groups (each request to one group); returns their manifest entries."""
        import ray

        if not self.groups:
            self.start()
        pending: deque[tuple[BatchItem, int]] = deque((it, 0) for it in items)
        idle = list(self.groups)
        flights: dict[int, Flight] = {}
        entries: list[dict[str, Any]] = []
        while pending or flights:
            while idle and pending:
                group = idle.pop(0)
                item, attempt = pending.popleft()
                flights[group.index] = self._dispatch(group, item, attempt)
            refs = [r for f in flights.values() for i, r in enumerate(f.refs) if i not in f.done]
            if refs:
                ray.wait(refs, num_returns=1, timeout=0.5)
            for index in list(flights):
                group, flight = self.groups[index], flights[index]
                try:
                    result = self._poll(group, flight)
                except GroupFailed as e:
                    del flights[index]
                    error = str(e)
                    logger.error("%s: %s", flight.item.name, error)
                    if flight.attempt < self.options.retries:
                        pending.appendleft((flight.item, flight.attempt + 1))
                    else:
                        entries.append(self._record(flight, "failed", group, error=error))
                    self._kill(group)
                    if pending:  # rebuild only when there is work left for it
                        self.groups[index] = self._build(index, group.generation + 1)
                        idle.append(self.groups[index])
                    continue
                if result is None:
                    continue
                del flights[index]
                entries.append(self._record(flight, "ok", group, result=result))
                print(f"wrote {self.out / result['files']['video']} ({result['time_s']:.2f}s)", flush=True)
                idle.append(group)
        return entries

    def _record(
        self, flight: Flight, status: str, group: Group, *, result: dict[str, Any] | None = None, error: str = ""
    ) -> dict[str, Any]:
        req = flight.item.request
        entry: dict[str, Any] = {
            "name": flight.item.name, "prompt": req.prompt, "seed": req.seed, "status": status,
            "files": result["files"] if result else {}, "attempts": flight.attempt + 1, "group": group.index,
            "wall_s": round(time.monotonic() - flight.started, 3),
        }  # fmt: skip
        if error:
            entry["error"] = error
        append_manifest(self.out, entry)
        return entry


def _describe(e: BaseException) -> str:
    """One line for a Ray error: the actor died, or the task raised ``Type: message``."""
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    if isinstance(e, RayTaskError):
        cause = e.cause if isinstance(e.cause, BaseException) else None
        if cause is not None and not isinstance(cause, RayActorError):
            return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    if isinstance(e, (ActorDiedError, RayActorError)):
        return "the actor process died"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# -- command line ---------------------------------------------------------------------------------------
def build_parser(prog: str = "ray_generate.py") -> argparse.ArgumentParser:
    """generate.py's generation flags (shared definitions), plus the Ray executor's."""
    parser = OneLineParser(prog=prog, description="Generate a batch of videos with DVG on a Ray cluster.")
    add_generation_args(parser)
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument("--save-latent", "--save_latent", action="store_true", help="also write latents")
    parser.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    parser.add_argument("--workers", type=int, default=1, help="actors in all (one per GPU, or per CPU worker)")
    parser.add_argument("--sp", type=int, default=1, help="ranks per group (workers/sp groups, data-parallel)")
    parser.add_argument("--address", help="Ray cluster: auto, ray://host:port (default: RAY_ADDRESS or local)")
    parser.add_argument("--cpus-per-worker", "--cpus_per_worker", type=float, default=1.0,
                        help="CPUs each actor reserves (fractions allowed)")  # fmt: skip
    parser.add_argument("--gpus-per-worker", "--gpus_per_worker", type=float, default=None,
                        help="GPUs each actor reserves (default: 1 when the cluster has GPUs and the device "
                        "is auto/cuda, else 0)")  # fmt: skip
    parser.add_argument("--strict-pack", "--strict_pack", action="store_true",
                        help="STRICT_PACK placement: each group on one node")  # fmt: skip
    parser.add_argument("--placement-timeout", "--placement_timeout", type=float, default=60.0,
                        help="seconds to wait for a group's resources")  # fmt: skip
    parser.add_argument("--request-timeout", "--request_timeout", type=float, default=1800.0,
                        help="seconds one request may take before its group is rebuilt")  # fmt: skip
    parser.add_argument("--retries", type=int, default=1, help="retries of a request whose group failed")
    return parser


def _absolute_model(config: Config) -> Config:
    """A local checkpoint path made absolute (actors may run in another working directory)."""
    path = config.model.path
    if path and Path(path).exists():
        return replace(config, model=replace(config.model, path=str(Path(path).resolve())))
    return config


def _init_ray(address: str | None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray with this machine's CPUs and GPUs. True
    when this call started (and must shut down) the session."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        import torch

        # "local": a new instance even when a `ray start` head runs here (address=None would join it).
        ray.init(
            address="local", num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), include_dashboard=False
        )
    return True


def main(argv: list[str] | None = None) -> int:
    """``launch/ray_generate.py``: validate, skip finished requests, run the rest over the groups.
    Exit 0 when every request is done, 1 when some failed, 2 on a usage error (before any actor)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        check_versions()
        config = _absolute_model(config_from_args(args))
        items, skipped = read_batch(args, config)
        for message in skipped:
            logger.warning("%s", message)
        if not items:
            raise InputError("no valid requests to run")
        validate(config, [it.request for it in items])
        for it in items:
            if it.budget is not None or it.mode is not None:
                validate(item_config(config, it), [it.request])
        if args.workers < 1 or args.sp < 1 or args.workers % args.sp:
            raise InputError(f"--workers {args.workers} must be a positive multiple of --sp {args.sp}")
        validate_layout(config, args.sp)
        out = Path(args.out).resolve()
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
    except USER_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    done = finished(out)
    todo = [it for it in items if it.name not in done]
    if len(todo) < len(items):
        logger.info("resuming: %d of %d request(s) already done in %s", len(items) - len(todo), len(items), out)
    if not todo:
        return 0
    started = _init_ray(args.address)
    import ray

    gpus = args.gpus_per_worker
    if gpus is None:
        wants_gpu = config.model.device in ("auto", "cuda") or config.model.device.startswith("cuda:")
        gpus = 1.0 if wants_gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    options = ExecutorOptions(
        workers=args.workers, sp=args.sp, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus,
        strategy="STRICT_PACK" if args.strict_pack else "PACK", placement_timeout_s=args.placement_timeout,
        request_timeout_s=args.request_timeout, retries=args.retries, verbose=args.verbose,
    )  # fmt: skip
    executor = RayExecutor(config, out, options, save_latent=args.save_latent, progress=not args.no_progress)
    try:
        entries = executor.run(todo)
    except (InputError, GroupFailed) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        executor.shutdown()
        if started:
            ray.shutdown()
    failed = [entry for entry in entries if entry["status"] != "ok"]
    for entry in failed:
        print(f"{parser.prog}: error: {entry['name']}: {entry['error']}", file=sys.stderr)
    print(f"{len(entries) - len(failed)} done, {len(failed)} failed, {len(done)} skipped (already done)")
    return 1 if failed else 0
