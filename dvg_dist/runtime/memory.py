"""Memory for very large models: FSDP2 weight sharding over the sp group, model CPU offload, where the conditioning
encoders live, and the probes a memory benchmark reads.

- **Weight sharding** (``parallel.shard_weights``): every transformer the adapter may call is sharded with FSDP2
  (``fully_shard``) over the sequence-parallel group — each top-level block, then the root — so a rank keeps 1/sp
  of the parameters and all-gathers one block's just before it runs (``reshard_after_forward=True``: freed again
  right after). FSDP2 swaps each sharded module's class for a subclass and keeps the instance, so the sequence-
  parallel forward hooks and attention processors registered on it keep working.
- **Model CPU offload** (``model.offload``): :class:`ModelOffload` keeps every component on the CPU and moves the
  ones the engine is about to run onto the compute device, the previous ones back — diffusers'
  ``enable_model_cpu_offload`` idea, done here because the engine calls the components itself (not the pipeline's
  ``__call__``, whose hook chain assumes ``model_cpu_offload_seq`` order: a DVG stage can go back to the high-noise
  expert after the low-noise one ran, which accelerate's chain would leave both on the device), and because the
  same code must run on CPU. With weight sharding, the transformers' shards live on the CPU instead (FSDP2's
  ``CPUOffloadPolicy``), copied to the device block by block.
- **Encoders** (``parallel.text_encoder=rank0``, ``model.text_encoder_offload``): ranks other than 0 never load
  the text / image encoders (:func:`skipped_components`); offload after encoding is :class:`ModelOffload`
  restricted to them.
- **Probes**: :func:`peak_memory` / :func:`reset_peak_memory` / :func:`current_memory`, :func:`component_bytes`,
  :class:`PhaseMemory`.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..models import InputError

if TYPE_CHECKING:
    from ..config import Config
    from ..parallel import ParallelGroups, ParallelLayout

logger = logging.getLogger(__name__)

ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder")
"""Pipeline components only the adapter's ``encode`` runs (prompt and image conditioning)."""
TRANSFORMERS = ("transformer", "transformer_2")

CPU = torch.device("cpu")


def check_options(config: Config, layout: ParallelLayout | None) -> None:
    """One-line errors for memory options this run cannot honour, before any weight loads. ``layout`` is None for
    a single process."""
    if config.parallel.shard_weights and config.model.compile != "none":
        raise InputError("--compile with --shard_weights is not supported yet: FSDP2's hooks are not traced here")
    if not config.parallel.shard_weights:
        return
    if layout is None or layout.world_size == 1:
        raise InputError(
            "--shard_weights shards the transformer over the sequence-parallel ranks: run on 2 or more ranks "
            "(--nproc N or torchrun), or use --offload on one process"
        )
    if layout.sp_degree == 1:
        raise InputError(
            f"--shard_weights shards over the sequence-parallel group, which has 1 rank in this layout (cfg "
            f"{layout.cfg_degree} × ulysses 1 × ring 1): use more ranks than the CFG halves, or drop it"
        )


def skipped_components(config: Config, rank: int, world_size: int, present: Iterable[str]) -> tuple[str, ...]:
    """Components this rank does not load: with ``parallel.text_encoder=rank0`` on several ranks, the encoders of
    every rank but 0 (only rank 0 encodes; the others receive the broadcast conditioning)."""
    if config.parallel.text_encoder != "rank0" or world_size == 1 or rank == 0:
        return ()
    return tuple(name for name in ENCODERS if name in set(present))


def encoder_names(pipe: Any) -> list[str]:
    """The encoders this pipeline holds (loaded, not None)."""
    return [name for name in ENCODERS if getattr(pipe, name, None) is not None]


def modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's ``nn.Module`` components by name (tokenizers, schedulers and None left out)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def places_components(config: Config) -> bool:
    """Whether :func:`place` decides where the components live (the pipeline then loads on the CPU)."""
    m = config.model
    return config.parallel.shard_weights or m.offload or m.text_encoder_offload


def encode_components(adapter: Any) -> list[str]:
    """What the adapter's ``encode`` runs: the encoders, and the VAE of image-to-video checkpoints (it encodes the
    first frame)."""
    return encoder_names(adapter.pipe) + (["vae"] if adapter.accepts_image else [])


def place(
    pipe: Any, adapter: Any, config: Config, groups: ParallelGroups | None, device: torch.device
) -> tuple[ModelOffload | None, dict[str, ShardReport]]:
    """Apply the memory options to a loaded pipeline, in place: shard the transformers (``shard_weights``; their
    shards on the CPU too with ``offload``), hand the offloaded components to a :class:`ModelOffload`, move every
    other component to ``device``, and make ``device`` the adapter's execution device. Returns the offload (None
    without one) and a :class:`ShardReport` per sharded transformer."""
    reports: dict[str, ShardReport] = {}
    if config.parallel.shard_weights and groups is not None and groups.layout.sp_degree > 1:
        for name in TRANSFORMERS:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            report = shard_transformer(module, groups, device, cpu_offload=config.model.offload)
            reports[name] = report
            logger.info(
                "%s sharded with FSDP2 over the sp group of %d ranks (%d blocks + root%s): parameters on rank %d "
                "%d -> %d (%.1f%%)", name, report.sp_degree, report.blocks,
                ", shards on the CPU" if report.cpu_offload else "", groups.rank, report.params_before,
                report.params_after, 100.0 * report.params_after / max(report.params_before, 1),
            )  # fmt: skip
    names = offloaded_components(config, pipe)
    offload = ModelOffload(pipe, device, names) if names else None
    if offload is not None:
        where = "the compute device is the CPU: nothing moves" if device.type == "cpu" else f"each moved to {device}"
        logger.info("CPU offload: %s kept on the CPU (%s while it runs)", ", ".join(sorted(names)), where)
    if places_components(config):  # loaded on the CPU: the rest goes to the device (else it already is there)
        for name, module in modules(pipe).items():
            if name not in names and not is_sharded(module):
                module.to(device)
    adapter.execution_device = device
    return offload, reports


# -- weight sharding ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardReport:
    """What :func:`shard_transformer` did on this rank."""

    blocks: int
    """Modules sharded before the root (the elements of the transformer's top-level ``ModuleList``\\s)."""
    sp_degree: int
    params_before: int
    """Parameter elements this rank held before sharding (the whole model)."""
    params_after: int
    """Parameter elements this rank holds after (its shards; about ``params_before / sp_degree``)."""
    cpu_offload: bool


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements held by this process: a sharded (DTensor) parameter counts its local shard only."""
    return sum(_local(p).numel() for p in module.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_transformer(
    module: torch.nn.Module, groups: ParallelGroups, device: torch.device, *, cpu_offload: bool = False
) -> ShardReport:
    """Shard ``module``'s parameters over ``groups.sp`` with FSDP2: every element of its top-level ``ModuleList``s
    (the blocks), then the root (embeddings, norms, output projection). Inference only: each block's parameters are
    all-gathered just before it runs and freed right after. ``cpu_offload`` keeps the shards on the CPU (FSDP2's
    ``CPUOffloadPolicy``; pinned on CUDA) and copies each block's to ``device`` for its all-gather.

    Hazards: the mesh is built from the sp group's own ranks, so with CFG-parallel each half shards over its own
    group and the cfg all-gather never meets an FSDP collective. Every rank of the sp group must run the same
    transformer at the same step (true: all follow the same timesteps), or their all-gathers would pair with the
    wrong module's and hang. Idempotent: a module already sharded is left as it is.
    """
    from torch.distributed import get_process_group_ranks
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    sp = groups.layout.sp_degree
    before = local_numel(module)
    if is_sharded(module):
        return ShardReport(0, sp, before, before, cpu_offload)
    if sp == 1:
        raise ValueError("shard_transformer needs an sp group of 2 or more ranks")
    mesh = DeviceMesh.from_group(
        groups.sp, device.type, mesh=get_process_group_ranks(groups.sp), mesh_dim_names=("sp",)
    )
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    blocks = [b for child in module.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    # Inference: nothing trains. FSDP2 asks the trainable parameters of one group to share a dtype, which a bfloat16
    # Wan's blocks do not (diffusers keeps their norms and scale_shift_table in float32).
    module.requires_grad_(False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    # The root too (FSDP2 would leave a root unsharded after forward, a training heuristic we do not want).
    fully_shard(module, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    return ShardReport(len(blocks), sp, before, local_numel(module), cpu_offload)


# -- model CPU offload -------------------------------------------------------------------------------------------


class ModelOffload:
    """Component-level CPU offload: the managed components live on the CPU; :meth:`use` puts exactly the named
    ones on ``device`` (the other managed ones back on the CPU), :meth:`release` puts all back.

    Unmanaged names passed to :meth:`use` are ignored, so the engine can name what it runs whatever is managed.
    ``moves`` records every move made after construction, ``(component, "on" | "off")`` — onto the device or back
    to the CPU — for logs and tests (on a CPU run both are the same place, and the record is the proof).
    """

    def __init__(self, pipe: Any, device: torch.device, names: Iterable[str]) -> None:
        available = modules(pipe)
        self.pipe = pipe
        self.device = device
        self.managed: tuple[str, ...] = tuple(n for n in names if n in available)
        self.active: set[str] = set()
        self.moves: list[tuple[str, str]] = []
        for name in self.managed:
            getattr(pipe, name).to(CPU)

    def _move(self, name: str, on: bool) -> None:
        getattr(self.pipe, name).to(self.device if on else CPU)
        self.moves.append((name, "on" if on else "off"))

    def use(self, *names: str) -> None:
        """Exactly the managed components among ``names`` on the device; the rest of the managed ones on the CPU."""
        wanted = {n for n in names if n in self.managed}
        leaving = self.active - wanted
        for name in sorted(leaving):
            self._move(name, False)
        if leaving and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back before the next component arrives
        for name in sorted(wanted - self.active):
            self._move(name, True)
        self.active = wanted

    def release(self) -> None:
        """Every managed component back on the CPU (device memory freed)."""
        self.use()

    def placements(self) -> dict[str, str]:
        """Where each managed component's parameters are now (``"cpu"``, ``"cuda:0"``…)."""
        return {name: str(next(getattr(self.pipe, name).parameters()).device) for name in self.managed}


def offloaded_components(config: Config, pipe: Any) -> list[str]:
    """What :class:`ModelOffload` manages under ``config``: every module component with ``model.offload`` (minus the
    FSDP-sharded transformers, whose shards FSDP2 offloads itself); the encoders with ``text_encoder_offload``."""
    if config.model.offload:
        return [name for name, m in modules(pipe).items() if not is_sharded(m)]
    if config.model.text_encoder_offload:
        return encoder_names(pipe)
    return []


# -- probes for a memory benchmark -------------------------------------------------------------------------------


def _on_cuda(device: torch.device | str | None) -> torch.device | None:
    d = torch.device(device) if device is not None else None
    if d is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return d if d.type == "cuda" else None


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(device: torch.device | str | None = None) -> int:
    """Peak bytes since the last :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` on a CUDA device
    (``None``: the current one when CUDA is available), else this process's resident-set high-water mark:
    ``VmHWM`` of ``/proc/self/status`` (Linux; ``getrusage``'s ``ru_maxrss`` can lag the current RSS, it is updated
    lazily), else ``ru_maxrss``; since process start where the reset is not possible."""
    cuda = _on_cuda(device)
    if cuda is not None:
        return int(torch.cuda.max_memory_allocated(cuda))
    hwm = _rss_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS reports bytes, Linux KiB


def current_memory(device: torch.device | str | None = None) -> int:
    """Bytes in use now: CUDA allocated on a CUDA device, else the process's resident set (0 if unreadable)."""
    cuda = _on_cuda(device)
    if cuda is not None:
        return int(torch.cuda.memory_allocated(cuda))
    kib = _rss_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def reset_peak_memory(device: torch.device | str | None = None) -> bool:
    """Start a new peak window; returns whether it could (CUDA always; CPU where ``/proc/self/clear_refs`` takes
    ``5``, which resets the RSS high-water mark — Linux)."""
    cuda = _on_cuda(device)
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of parameters and buffers this process holds for ``module`` (sharded parameters: the local shard)."""
    if module is None:
        return 0
    tensors = [_local(p) for p in module.parameters()] + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def component_bytes(pipe: Any) -> dict[str, int]:
    """``{component: bytes held by this process}`` for every model component of the pipeline (0 for one not loaded,
    e.g. the encoders on ranks ≠ 0 under ``text_encoder=rank0``; local shards under ``shard_weights``)."""
    return {
        name: module_bytes(c if isinstance(c, torch.nn.Module) else None)
        for name, c in pipe.components.items()
        if c is None or isinstance(c, torch.nn.Module)
    }


def component_devices(pipe: Any) -> dict[str, str]:
    """``{component: device of its first parameter}`` for the model components that are loaded."""
    out = {}
    for name, module in modules(pipe).items():
        p = next(module.parameters(), None)
        if p is not None:
            out[name] = str(p.device)
    return out


@dataclass
class PhaseMemory:
    """Peak memory per named phase: ``with probe.phase("encode"): ...`` then ``probe.peaks["encode"]`` (bytes).

    Each phase resets the peak window first (:func:`reset_peak_memory`); ``resettable`` says whether that worked
    (where it did not, a CPU phase's peak is the process's since start). Phases must not nest.
    """

    device: torch.device | str | None = None
    peaks: dict[str, int] = field(default_factory=dict)
    """Phase name → peak bytes during it."""
    before: dict[str, int] = field(default_factory=dict)
    """Phase name → bytes in use when it started."""
    seconds: dict[str, float] = field(default_factory=dict)
    resettable: bool = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = _on_cuda(self.device)
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        self.resettable = reset_peak_memory(self.device) and self.resettable
        self.before[name] = current_memory(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda is not None:
                torch.cuda.synchronize(cuda)
            self.seconds[name] = time.perf_counter() - t0
            self.peaks[name] = peak_memory(self.device)
