"""External sequence-parallel attention backends behind the one interface (``parallel.attention_backend``).

- ``native`` — :func:`dvg_dist.parallel.attention.usp_attention`: every case (uneven and empty shards, joint text
  tokens, text key masks, any Ulysses × ring layout). The reference, and the fallback of the others.
- ``xfuser`` — yunchang's ``LongContextAttention`` (the USP kernel xDiT / xfuser runs): Ulysses all-to-all and
  ring over *our* Ulysses and ring groups; local kernel ``flash_attn`` (``AttnType.FA``) on CUDA in fp16 / bf16 when
  it is importable, else torch SDPA with log-sum-exp (see :func:`_sdpa_lse_kernel`).
- ``deepspeed`` — DeepSpeed-Ulysses ``DistributedAttention`` over our Ulysses group, torch SDPA inside.

Both external ones assume equal shards (``S_LOCAL × P`` tokens), so a call they cannot do *exactly* runs native
instead — never padded into the attended sequence: a token count not divisible by the sp degree (DVG's stage grids
give such counts all the time), heads not divisible by the Ulysses degree, joint text tokens or a text key mask
(the HunyuanVideo families), a ring axis with DeepSpeed (Ulysses only). Each reason is logged once per process.

Hazard: the fallback decision must be the same on every rank, or some ranks enter yunchang's / DeepSpeed's
collectives while the others enter native's and the job hangs. :class:`CallShape` therefore holds only what every
rank of the sp group knows identically (the *global* token count, the heads, the text length, the dtype); never a
rank's own shard length.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dvg_dist.parallel.attention import sdpa_with_lse
from dvg_dist.parallel.mesh import ParallelGroups

logger = logging.getLogger(__name__)

NATIVE = "native"
EXTERNAL_BACKENDS: dict[str, tuple[str, str]] = {
    "xfuser": ("yunchang", "pip install 'dvg_dist[xfuser]'"),
    "deepspeed": ("deepspeed", "DS_BUILD_OPS=0 pip install 'dvg_dist[deepspeed]'"),
}
"""backend name → (the module it imports, the install command naming its extra)."""


class BackendUnavailableError(ImportError):
    """The configured attention backend's extra is not installed (or does not import); the message is one line."""


def check_backend_available(name: str) -> None:
    """Raise :class:`BackendUnavailableError` (one line naming the extra) if backend ``name`` cannot be used here.

    Called where the layout is validated, before any process starts or weight loads: a missing extra must stop the
    run at startup, never mid-run. It really imports the package, so a broken install is caught too.
    """
    if name == NATIVE:
        return
    if name not in EXTERNAL_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {NATIVE}, {', '.join(EXTERNAL_BACKENDS)}")
    module, install = EXTERNAL_BACKENDS[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever a broken install raises on import
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendUnavailableError(
            f"attention backend {name!r} needs {module}, which cannot be imported ({reason}): {install}"
        ) from None


@dataclass(frozen=True)
class CallShape:
    """One attention call as every rank of the sp group sees it — the only input of the fallback decision."""

    num_tokens: int
    """Video tokens of the whole sequence (before sharding)."""
    num_heads: int
    num_text: int
    """Replicated joint-attention text tokens after the video tokens (0 for Wan)."""
    masked: bool
    """Whether the processor passed an attention mask (the text key mask of the Hunyuan families)."""
    dtype: torch.dtype
    device_type: str


class ExternalAttention:
    """An external backend bound to one transformer's groups: :meth:`fallback_reason`, then :meth:`__call__`."""

    name: str = ""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups
        self.sp_degree = groups.layout.sp_degree
        self.ulysses_degree = groups.layout.ulysses_degree

    def fallback_reason(self, call: CallShape) -> str | None:
        """Why this call must run native (a fixed phrase per reason, so it is logged once), or None."""
        if call.num_text or call.masked:
            return "joint text tokens / text key mask (HunyuanVideo families): not supported"
        if call.num_tokens == 0 or call.num_tokens % self.sp_degree:
            return f"token count not divisible by the sp degree {self.sp_degree} (shards would be unequal)"
        if call.num_heads % self.ulysses_degree:
            return f"heads not divisible by the Ulysses degree {self.ulysses_degree}"
        return None

    def __call__(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, scale: float) -> torch.Tensor:
        """This rank's equal shard in, its attention output out (``[B, S_LOCAL, H, D]``)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ yunchang (xfuser)

_LSE_KERNEL = "dvg_sdpa_lse"
"""Our ``attn_type`` for yunchang: a value matching no ``AttnType`` member makes ``select_flash_attn_impl`` return
the ``attn_processor`` we pass, and yunchang's ring loop merges its output by the LSE it returns."""


def _sdpa_lse_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Any = None, **_: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """yunchang's fwd-only kernel contract: ``[B, S, H, D]`` in, ``(out_BSHD, lse_BHS)`` out (non-causal).

    Why not yunchang's own ``AttnType.TORCH_*`` kernels: on CPU, ``TORCH_FLASH`` / ``TORCH_EFFICIENT`` call the CUDA
    aten ops (no CPU kernel), and ``TORCH_MATH`` returns an all-zero LSE — exact with one ring rank, but with a ring
    it silently averages the blocks. On CUDA, ``TORCH_EFFICIENT`` pads the LSE to a multiple of 32 queries, which
    yunchang's merge does not trim. :func:`sdpa_with_lse` is torch's SDPA (the CPU flash op, the CUDA flash /
    efficient ops) with an exact fp32 LSE.
    """
    if dropout_p:
        raise ValueError("sequence-parallel attention has no dropout")
    out_BSHD, lse_BSH = sdpa_with_lse(q, k, v, softmax_scale)
    return out_BSHD, lse_BSH.transpose(1, 2).contiguous()


class YunchangAttention(ExternalAttention):
    """yunchang ``LongContextAttention`` (Ulysses inside the ring) over this transformer's groups."""

    name = "xfuser"

    def __init__(self, groups: ParallelGroups) -> None:
        super().__init__(groups)
        from yunchang.globals import HAS_FLASH_ATTN

        self._has_flash_attn = bool(HAS_FLASH_ATTN)
        self._layers: dict[str, torch.nn.Module] = {}

    def _layer(self, kernel: str) -> torch.nn.Module:
        if kernel not in self._layers:
            from yunchang import LongContextAttention
            from yunchang.globals import PROCESS_GROUP
            from yunchang.kernels import AttnType

            # LongContextAttention copies yunchang's process-group singleton in __init__. yunchang's own
            # set_seq_parallel_pg would create *new* groups (a world-wide collective every rank must join) whose
            # rank order may differ from ours; instead it gets our groups — the same ranks in the same order, so
            # shard i of the sequence is where native expects it — and the singleton is restored right after.
            # Degree-1 axes get our one-rank groups, never None (yunchang reads None as the whole world).
            saved = PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG
            PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = self.groups.ulysses, self.groups.ring
            try:
                if kernel == "fa":
                    layer = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.FA)
                else:
                    layer = LongContextAttention(
                        ring_impl_type="basic", attn_type=_LSE_KERNEL, attn_processor=_sdpa_lse_kernel
                    )
            finally:
                PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = saved
            if layer.ulysses_pg is not self.groups.ulysses or layer.ring_pg is not self.groups.ring:
                raise RuntimeError("this yunchang version does not take its process groups from PROCESS_GROUP")
            self._layers[kernel] = layer
        return self._layers[kernel]

    def __call__(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, scale: float) -> torch.Tensor:
        # The kernel depends on the device and dtype only: the same on every rank.
        fa = (
            self._has_flash_attn
            and q_BSHD.device.type == "cuda"
            and q_BSHD.dtype in (torch.float16, torch.bfloat16)
            and q_BSHD.shape[-1] <= 256
        )
        layer = self._layer("fa" if fa else "sdpa")
        return layer(q_BSHD, k_BSHD, v_BSHD, softmax_scale=scale, causal=False)


# ------------------------------------------------------------------------------------------ DeepSpeed-Ulysses

_DS_LOCK = threading.Lock()


def _init_deepspeed_comm() -> None:
    """Point ``deepspeed.comm`` at the existing torch.distributed world, once per process.

    DeepSpeed's collectives go through ``deepspeed.comm``, which needs its backend object even when
    torch.distributed is already initialised; ``deepspeed.init_distributed`` then wraps the existing world without
    a second ``init_process_group`` or MPI discovery. On the CPU accelerator that wrapper JIT-compiles a C++
    shared-memory all-reduce (ninja + a compiler, ~2 min on first use). DistributedAttention uses only
    ``all_to_all_single``, which goes straight to torch.distributed, so that op is marked incompatible first
    (``deepspeed.ops.__compatible_ops__`` is DeepSpeed's editable probe table).
    """
    with _DS_LOCK:
        import deepspeed
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            return
        if not dist.is_initialized():
            raise RuntimeError("the deepspeed attention backend needs an initialised torch.distributed world")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def _local_sdpa(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, scale: float) -> torch.Tensor:
    """DistributedAttention's local attention: whole sequence, ``H / P`` heads, ``[B, S, H, D]``."""
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


class DeepSpeedUlyssesAttention(ExternalAttention):
    """DeepSpeed-Ulysses ``DistributedAttention`` (all-to-all heads↔sequence) over this transformer's Ulysses group."""

    name = "deepspeed"

    def __init__(self, groups: ParallelGroups) -> None:
        super().__init__(groups)
        _init_deepspeed_comm()
        from deepspeed.sequence.layer import DistributedAttention

        # [B, S, H, D]: scatter the heads (dim 2), gather the sequence (dim 1); batch_dim_idx=0 at the call.
        self._layer = DistributedAttention(_local_sdpa, groups.ulysses, scatter_idx=2, gather_idx=1)

    def fallback_reason(self, call: CallShape) -> str | None:
        if self.groups.layout.ring_degree > 1:
            return f"ring degree {self.groups.layout.ring_degree}: DeepSpeed-Ulysses has no ring"
        return super().fallback_reason(call)

    def __call__(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, scale: float) -> torch.Tensor:
        return self._layer(q_BSHD, k_BSHD, v_BSHD, 0, scale=scale)


# ------------------------------------------------------------------------------------------------- factory

_BACKENDS: dict[str, Callable[[ParallelGroups], ExternalAttention]] = {
    "xfuser": YunchangAttention,
    "deepspeed": DeepSpeedUlyssesAttention,
}
_LOGGED: set[tuple[str, str]] = set()


def make_attention(name: str, groups: ParallelGroups) -> ExternalAttention | None:
    """The external backend ``name`` bound to ``groups``; None for ``native``. Raises
    :class:`BackendUnavailableError` if its extra is missing."""
    check_backend_available(name)
    if name == NATIVE:
        return None
    attention = _BACKENDS[name](groups)
    if groups.rank == 0:
        layout = groups.layout
        logger.info(
            "attention backend %s on ulysses %d × ring %d; calls it cannot do exactly run native",
            name, layout.ulysses_degree, layout.ring_degree,
        )  # fmt: skip
    return attention


def log_fallback(backend: str, reason: str, call: CallShape, rank: int) -> None:
    """Log a fallback to native once per (backend, reason) and process, on global rank 0 only."""
    if (backend, reason) in _LOGGED:
        return
    _LOGGED.add((backend, reason))
    if rank == 0:
        logger.warning(
            "attention backend %s: %s; those calls run native (first: %d video + %d text tokens, %d heads)",
            backend, reason, call.num_tokens, call.num_text, call.num_heads,
        )  # fmt: skip
