"""The engine's distributed context: process group from the launcher's environment, the validated layout,
rank 0's decision broadcast, and the CFG-parallel exchange. Tensors go through torch.distributed only.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config
from ..dvg.sampler import DecideFn, Decision
from ..models import Conditioning, InputError, adapter_class, resolve_model_path
from ..parallel import Axis, ParallelGroups, ParallelLayout, build_groups, default_backend
from ..parallel.backends import BackendUnavailableError, check_backend_available

logger = logging.getLogger(__name__)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / the elastic launcher set them; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_layout(config: Config, world_size: int, num_heads: int, guidance_on: bool) -> ParallelLayout:
    """The layout for ``world_size`` ranks from the config's degrees (defaults: all sp ranks in Ulysses when
    the heads allow, the rest in ring). One-line errors for every impossible combination — before weights."""
    p = config.parallel
    if world_size > 1 and p.backend == "nccl" and not torch.cuda.is_available():
        raise InputError("backend nccl needs CUDA, which is not available here; use --backend gloo (or auto)")
    cfg = 2 if p.cfg_parallel else 1
    if p.cfg_parallel and not guidance_on:
        raise InputError("CFG-parallel needs guidance (an unconditional pass): raise the guidance scale or drop it")
    if world_size % cfg:
        raise InputError(f"CFG-parallel splits the world in two halves; world size {world_size} is odd")
    sp = world_size // cfg
    ulysses, ring = p.ulysses_degree, p.ring_degree
    if ulysses is None and ring is None:
        import math

        ulysses = math.gcd(sp, num_heads)
        ring = sp // ulysses
    elif ulysses is None:
        assert ring is not None
        ulysses = sp // ring if sp % ring == 0 else 0
    elif ring is None:
        ring = sp // ulysses if sp % ulysses == 0 else 0
    if not ulysses or not ring or cfg * ulysses * ring != world_size:
        raise InputError(
            f"world size {world_size} != cfg {cfg} × ulysses {p.ulysses_degree or '?'} × ring "
            f"{p.ring_degree or '?'}: set --ulysses_degree and --ring_degree so their product is {sp}"
        )
    try:
        layout = ParallelLayout(world_size, ulysses, ring, cfg, num_heads)
    except ValueError as e:
        raise InputError(str(e)) from None
    if layout.sp_degree > 1:  # the attention backend's extra, checked here: at startup, not mid-run
        try:
            check_backend_available(p.attention_backend)
        except BackendUnavailableError as e:
            raise InputError(str(e)) from None
    return layout


def guidance_on(config: Config) -> bool:
    """Whether the run has an unconditional pass (what CFG-parallel splits)."""
    s = config.sampling
    return s.guidance_scale > 1.0 or s.true_cfg_scale > 1.0


def num_heads(config: Config) -> int:
    """The checkpoint's attention heads, from its transformer config (no weights loaded)."""
    assert config.model.path
    path = resolve_model_path(config.model.path)
    cls = adapter_class(path)
    return cls.num_heads_from_config(cls.read_json_configs(path)[0])


def validate_layout(config: Config, world_size: int) -> None:
    """Refuse an impossible layout (or memory option) for ``world_size`` ranks before any process starts or weight
    loads."""
    from .memory import check_options

    layout = None
    if world_size > 1 or config.parallel.ulysses_degree or config.parallel.ring_degree or config.parallel.cfg_parallel:
        layout = resolve_layout(config, world_size, num_heads(config), guidance_on(config))
    check_options(config, layout)


def _to(c: Conditioning | None, device: torch.device) -> Conditioning | None:
    """A copy of ``c`` with every tensor on ``device`` (kwargs values that are not tensors kept as they are)."""
    if c is None:
        return None

    def move(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}

    lc = c.latent_condition
    return Conditioning(move(c.cond) or {}, move(c.uncond), None if lc is None else lc.to(device))


@dataclass
class ParallelContext:
    """What the engine needs to run on several processes."""

    groups: ParallelGroups

    @property
    def layout(self) -> ParallelLayout:
        return self.groups.layout

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def is_main(self) -> bool:
        return self.groups.rank == 0

    @property
    def cfg_rank(self) -> int:
        return self.groups.coords[Axis.CFG]

    def broadcast_decider(self, local: DecideFn) -> DecideFn:
        """Rank 0 analyses the sketch and chooses; every rank follows rank 0's choice, even where its own
        floats would have chosen differently (a rank-local decision is how "static noise" bugs start).
        Every rank enters the broadcast; only rank 0 runs ``local``."""

        def decide(x0_hat: torch.Tensor) -> Decision:
            box: list[Decision | None] = [local(x0_hat) if self.is_main else None]
            dist.broadcast_object_list(box, src=0)
            assert box[0] is not None
            return box[0]

        return decide

    def broadcast_conditioning(self, mine: Conditioning | None, device: torch.device) -> Conditioning:
        """Rank 0's prompt (and image) conditioning to every rank: moved to CPU for the object broadcast, back
        to ``device`` after. Every rank enters the broadcast; only rank 0 passes a value."""
        box: list[Conditioning | None] = [_to(mine, torch.device("cpu")) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        received = _to(box[0], device)
        assert received is not None
        return received

    def exchange_cfg(self, v_mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG-parallel: this half computed one branch; one all-gather over the cfg pair gives both,
        ``(v_cond, v_uncond)``, identical on both halves. Equal shapes, so a plain all_gather is safe."""
        parts = [torch.empty_like(v_mine) for _ in range(2)]
        dist.all_gather(parts, v_mine.contiguous(), group=self.groups.cfg)
        return parts[0], parts[1]


def init_distributed(config: Config, num_heads: int, guidance_on: bool) -> ParallelContext | None:
    """Join the process group the launcher prepared (``env://``) and build the layout's sub-groups; None when
    running alone."""
    rank, world, local_rank = env_world()
    if world == 1:
        return None
    layout = resolve_layout(config, world, num_heads, guidance_on)
    backend = default_backend(None if config.parallel.backend == "auto" else config.parallel.backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=config.parallel.timeout_s), rank=rank, world_size=world
        )
    groups = build_groups(layout, backend)
    if rank == 0:
        logger.info(
            "%d ranks: cfg %d × ring %d × ulysses %d on %s", world, layout.cfg_degree, layout.ring_degree,
            layout.ulysses_degree, backend,
        )  # fmt: skip
    return ParallelContext(groups)
