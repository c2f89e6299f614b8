"""``launch/serve.py``: check the settings (one line and exit 2 on a bad flag, config or checkpoint, before Ray
starts), start or join Ray, run the application with ``serve.run``, print its URL and block until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from ..config import ConfigError
from ..dvg.planner import InfeasibleBudget
from ..models import InputError
from ..runtime.cli import OneLineParser, setup_logging
from .options import ServeOptions

logger = logging.getLogger("dvg_dist.serve")
USER_ERRORS = (ConfigError, InputError, InfeasibleBudget)


def build_parser(prog: str = "serve.py") -> argparse.ArgumentParser:
    """The server's flags (dashes and underscores both accepted); ``--set`` for any config field."""
    parser = OneLineParser(prog=prog, description="Serve DVG video generation over HTTP (Ray Serve).")

    def flag(name: str, **kwargs: Any) -> None:
        twin = "--" + name[2:].replace("-", "_")
        parser.add_argument(*dict.fromkeys((name, twin)), **kwargs)

    d = ServeOptions("")
    flag("--config", required=True, help="YAML config (configs/*.yaml): the model and the default sampling")
    flag("--model", help="diffusers pipeline directory or hub id (overrides model.path)")
    flag("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, repeatable")
    flag("--nproc", type=int, default=d.nproc, help="ranks per replica: one sequence-parallel group (default 1)")
    flag("--replicas", type=int, default=d.replicas, help="replicas (groups), data-parallel over jobs (default 1)")
    flag("--max-queue", type=int, default=d.max_queue, help="jobs that may wait; one more gets 429 (default 8)")
    flag("--out", default=d.out, help="where rank 0 writes <id>.mp4 and <id>.json (default out/serve)")
    flag("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for every interface)")
    flag("--port", type=int, default=8000, help="HTTP port (default 8000)")
    flag("--name", default="dvg", help="Serve application name (default dvg)")
    flag("--route-prefix", default="/", help="URL prefix of the API (default /)")
    flag("--address", help="Ray cluster: auto, ray://host:port (default: RAY_ADDRESS or a new local Ray)")
    flag("--cpus-per-rank", type=float, default=d.cpus_per_rank, help="CPUs each rank reserves (default 1)")
    flag("--gpus-per-rank", type=float, default=None,
         help="GPUs each rank reserves (default: 1 if the device may be CUDA and a GPU is seen, else 0)")  # fmt: skip
    flag("--strict-pack", action="store_true", help="each replica's ranks on one node (STRICT_PACK placement)")
    flag("--request-timeout", type=float, default=d.request_timeout_s, help="seconds a job may run (default 1800)")
    flag("--setup-timeout", type=float, default=d.setup_timeout_s,
         help="seconds a replica may take to start its ranks and load the model (default 600)")  # fmt: skip
    flag("--lease", type=float, default=d.lease_s,
         help="a running job whose replica has not reported for this many seconds fails (default 60)")  # fmt: skip
    flag("--health-check-period", type=float, default=d.health_check_period_s,
         help="seconds between Serve's health checks of each replica (default 10)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    return parser


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions.from_dict({
        "config": args.config, "model": args.model, "set": list(args.set), "nproc": args.nproc,
        "replicas": args.replicas, "max_queue": args.max_queue, "out": args.out, "cpus_per_rank": args.cpus_per_rank,
        "gpus_per_rank": args.gpus_per_rank, "strict_pack": args.strict_pack,
        "request_timeout_s": args.request_timeout, "setup_timeout_s": args.setup_timeout, "lease_s": args.lease,
        "health_check_period_s": args.health_check_period, "verbose": args.verbose,
    })  # fmt: skip


def _check_http(args: argparse.Namespace, local: bool) -> None:
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1-65535; got {args.port}")
    if not args.route_prefix.startswith("/"):
        raise InputError(f"--route-prefix must start with /; got {args.route_prefix!r}")
    if not local:
        return  # the cluster's proxy binds the port, on its own node
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise InputError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after Ctrl-C (or SIGTERM), 1 when the application failed to start, 2 on a usage error."""
    from ..executors.ray_executor import _init_ray
    from ..runtime.versions import check_versions

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    try:
        check_versions()
        options = options_from_args(args).resolved()
        options.check()
        _check_http(args, local)
    except USER_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    from ray import serve

    from .app import build_app

    started = _init_ray(args.address)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # One HTTP proxy, on the head node (what docker/compose.ray.yaml publishes).
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options.to_dict()), name=args.name, route_prefix=args.route_prefix)
        url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        print(f"serving {options.config} at {url}: POST {url}/v1/videos, GET {url}/v1/videos/<id>, "
              f"GET {url}/health, GET {url}/metrics; Ctrl-C stops", flush=True)  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping: deleting the application")
        return 0
    except Exception as e:
        print(f"{parser.prog}: error: the application did not start: {_first_line(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(args.name)  # a cluster's Serve may hold other applications
        except Exception:
            pass
        if started:
            import ray

            ray.shutdown()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
