"""The local executor: one process, ``torchrun``, or ``--nproc N`` (workers spawned by torch's elastic
launcher, no torchrun needed). Every rank runs :func:`serve`; rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from typing import Any

from ..config import ConfigError
from ..dvg.planner import InfeasibleBudget
from ..models import InputError
from ..runtime.cli import setup_logging
from ..runtime.distributed import env_world
from ..runtime.generate import Job, build_parser, describe_plan, prepare
from ..runtime.outputs import output_name, write_json, write_latent, write_video

logger = logging.getLogger("dvg_dist.generate")
USER_ERRORS = (ConfigError, InputError, InfeasibleBudget)


def serve(job: Job) -> int:
    """Generate every request on this process (one rank of a run, or the whole run) through the Python API
    (:class:`dvg_dist.api.DVG`, the one code path); rank 0 writes."""
    from ..api import DVG

    config, s = job.config, job.config.sampling
    if env_world()[0] != 0:
        logging.getLogger("dvg_dist").setLevel(logging.WARNING)  # INFO logs on rank 0 only
    logger.info(
        "%d request(s): latent %s, %d steps, mode %s, budget %g, guidance %g; loading %s",
        len(job.requests), job.grid, s.steps, s.mode.value, s.budget, s.guidance_scale, config.model.path,
    )  # fmt: skip
    dvg = DVG(config=config)
    many = len(job.requests) > 1
    for batch in job.request_batches():
        reqs = [job.requests[k] for k in batch]
        if len(reqs) == 1:
            req = reqs[0]
            outs = [dvg.generate(req.prompt, seed=req.seed, image=req.image, negative_prompt=req.negative_prompt,
                                 progress=job.progress)]  # fmt: skip
        else:
            logger.info("batch of %d: requests %d-%d in one call", len(reqs), batch[0] + 1, batch[-1] + 1)
            outs = dvg.generate_batch([r.prompt for r in reqs], seeds=[r.seed for r in reqs],
                                      negative_prompts=[r.negative_prompt for r in reqs], image=reqs[0].image,
                                      progress=job.progress)  # fmt: skip
        if not dvg.is_main:
            continue
        for index, req, out in zip(batch, reqs, outs, strict=True):
            name = req.name or output_name(req.prompt, req.seed, s.mode.value, index if many else None)
            files = {"video": f"{name}.mp4", "sidecar": f"{name}.json"}
            write_video(job.out / files["video"], out.frames, out.fps)
            if job.save_latent:
                files["latent"] = f"{name}.latent.safetensors"
                write_latent(job.out / files["latent"], out.latent[0:1])
            record = {**out.sidecar, "files": files}
            write_json(job.out / files["sidecar"], record)  # last: its presence means the request is complete
            print(f"wrote {job.out / files['video']} ({out.timings['total']:.2f}s)")
            print(describe_plan(record["plan"]))
    dvg.close()
    return 0


def worker_entry(argv: list[str]) -> int:
    return _recorded_worker(argv)


def _worker(argv: list[str]) -> int:
    """What each spawned rank runs: parse the same flags, validate (cheap), serve. Module-level so the
    elastic launcher can pickle it."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    _, world, _ = env_world()
    rank = env_world()[0]
    try:
        return serve(prepare(args, world))
    except BaseException as e:
        # Say which rank failed and why before the process group tears down the others.
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def _recorded_worker(argv: list[str]) -> int:
    # ``record`` writes the exception to the launcher's error file, so the parent can name it.
    from torch.distributed.elastic.multiprocessing.errors import record

    code: int | None = record(_worker)(argv)
    return 0 if code is None else code


def launch_local(nproc: int, argv: list[str], timeout_s: float) -> int:
    """Spawn ``nproc`` ranks on this machine with torch's elastic launcher (what torchrun uses)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dvg-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn", rdzv_configs={"timeout": int(timeout_s)},
    )  # fmt: skip
    # The launcher logs each failed child's whole traceback; the rank already said what failed, in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        results: dict[int, Any] = elastic_launch(config, worker_entry)(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"generate.py: error: rank {rank} failed: {_failure_summary(failure)}", file=sys.stderr)
        return 1
    return max((int(r or 0) for r in results.values()), default=0)


def _failure_summary(failure: Any) -> str:
    """``ExcType: message`` from the error file ``record`` wrote, else the exit code or signal."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    if text:
        return text.splitlines()[0]
    return f"exit code {failure.exitcode}" + (f" ({failure.signal_name()})" if failure.exitcode < 0 else "")


def main(argv: list[str] | None = None) -> int:
    """``launch/generate.py``: validate everything, then run here, under torchrun, or spawn ``--nproc``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args: argparse.Namespace = parser.parse_args(argv)
    setup_logging(args.verbose)
    _, env_size, _ = env_world()
    world = env_size if env_size > 1 else args.nproc
    try:
        job = prepare(args, world)
    except USER_ERRORS as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.nproc > 1 and env_size == 1:
        return launch_local(args.nproc, argv, job.config.parallel.timeout_s)
    return serve(job)
