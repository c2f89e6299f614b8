"""One rank's life: init device → process group → load model → execute requests (docs/parallel.md).

The same ``Worker`` serves a ``torchrun`` / ``--nproc`` run and a Ray actor: no duplicated set-up.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from ..config import Config
from ..models import InputError
from ..runtime.distributed import ParallelContext, guidance_on, init_distributed, num_heads
from ..runtime.engine import Engine, Request, Result

logger = logging.getLogger(__name__)


class Worker:
    """Holds this rank's process group and engine."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.parallel: ParallelContext | None = None
        self.engine: Any = None

    def init_distributed(self) -> None:
        self.parallel = init_distributed(self.config, num_heads(self.config), guidance_on(self.config))

    @property
    def is_main(self) -> bool:
        return self.parallel is None or self.parallel.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.parallel is None else self.parallel.layout.world_size

    def load(self, pipe: Any | None = None) -> None:
        self.engine = Engine(self.config, pipe, parallel=self.parallel)

    def execute(self, request: Request, progress: bool = True, config: Config | None = None) -> Result:
        """One request; ``config`` (same model and layout) overrides this worker's for this request only."""
        if self.engine is None:
            raise InputError("Worker.load() must run before execute()")
        return self.engine.generate([request], progress=progress, config=config)

    def layout_record(self) -> dict[str, int]:
        """The sidecar's ``parallel`` entry."""
        if self.parallel is None:
            return {"world_size": 1}
        lay = self.parallel.layout
        return {"world_size": lay.world_size, "ulysses": lay.ulysses_degree, "ring": lay.ring_degree,
                "cfg": lay.cfg_degree}  # fmt: skip

    def shutdown(self) -> None:
        if self.parallel is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
