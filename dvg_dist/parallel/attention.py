"""Sequence-parallel attention collectives over a local SDPA kernel. Layout everywhere: ``[B, S, H, D]``.

- :func:`sdpa_with_lse` — the local kernel, returning the log-sum-exp needed to merge partial results.
- :func:`ulysses_attention` — all-to-all heads↔sequence (uneven split sizes), attention over the whole sequence
  with ``H / P`` heads, all-to-all back.
- :func:`ring_attention` — K/V blocks passed around the ring with ``batch_isend_irecv``, partial outputs merged
  by log-sum-exp (exact, no K/V all-gather).
- :func:`usp_attention` — Ulysses inside the ring (the other two are its 1-D special cases).

Joint attention (HunyuanVideo appends text tokens after the video tokens): pass ``text_q/k/v`` ``[B, T, H, D]``,
*replicated* (identical) on every rank. The result is exactly attention over ``concat(video, text)``: every
video and text query attends every video token and every (unmasked) text token once; ``text_key_mask_BT``
(``True`` = attend) masks padded text keys. The text queries' output comes back in full on every rank and is
bitwise identical across ranks (partials are merged in a rank-independent order).

Hazards shared by every function here:
- All ranks of a group must call the same function with the same kind of arguments (text or not, ``num_tokens``
  or not), in the same order — each enters collectives the others must match, or the job hangs.
- Sequence shards are contiguous and ordered by sp rank ``ring_rank * ulysses_degree + ulysses_rank``
  (:mod:`dvg_dist.parallel.mesh`); shards may be uneven or empty. No padding token ever enters attention.
- Split sizes are re-derived on every call (from ``num_tokens`` via :class:`ShardPlan`, or by exchanging the
  local lengths); never cache them by local shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dvg_dist.parallel.shard import all_shard_lengths, shard_sizes

NEG_INF = float("-inf")


class AttentionOutput(NamedTuple):
    """Output of the parallel attention functions."""

    out_BSHD: torch.Tensor
    """This rank's video tokens' output (same shard as the input queries)."""
    text_out_BTHD: torch.Tensor | None
    """The text tokens' output, full and identical on every rank; ``None`` without text tokens."""


# --------------------------------------------------------------------------------------------- local kernel


def _math_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    scale: float,
    key_mask_BK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 reference kernel with an optional key mask; fully masked rows give out 0, lse -inf."""
    s_BHQK = torch.einsum("bqhd,bkhd->bhqk", q_BSHD.float(), k_BSHD.float()) * scale
    if key_mask_BK is not None:
        s_BHQK = s_BHQK.masked_fill(~key_mask_BK[:, None, None, :], NEG_INF)
    lse_BHQ = torch.logsumexp(s_BHQK, dim=-1)
    finite_BHQ = torch.isfinite(lse_BHQ)
    p_BHQK = torch.exp(s_BHQK - torch.where(finite_BHQ, lse_BHQ, 0.0)[..., None])  # -inf - -inf would be nan
    out_BQHD = torch.einsum("bhqk,bkhd->bqhd", p_BHQK, v_BSHD.float())
    return out_BQHD.to(q_BSHD.dtype), lse_BHQ.transpose(1, 2).contiguous()


def _pick_kernel(q: torch.Tensor, head_dim: int) -> str:
    if q.device.type == "cpu":
        return "flash_cpu" if q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else "math"
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
            return "flash_cuda"
        if q.dtype in (torch.float32, torch.float16, torch.bfloat16) and head_dim % 4 == 0:
            return "efficient_cuda"
    return "math"


def sdpa_with_lse(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    scale: float | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention returning ``(out_BSHD, lse_BSH)``; ``lse`` is fp32, natural log, scaled scores.

    ``kernel``: ``auto`` | ``flash_cpu`` (``aten._scaled_dot_product_flash_attention_for_cpu``) | ``flash_cuda`` |
    ``efficient_cuda`` (the CUDA SDPA aten ops that return LSE) | ``math`` (exact fp32 einsum).

    Empty inputs are answered here, never passed to a kernel: the CPU flash kernel dies with SIGFPE (the whole
    process, no exception) on a zero-length query or key sequence, which zero-length shards produce.
    An empty key sequence gives out 0 and lse -inf, the neutral element of :func:`merge_attention`.
    """
    B, S_Q, H, D = q_BSHD.shape
    S_K, D_V = k_BSHD.shape[1], v_BSHD.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if S_Q == 0 or S_K == 0:
        out = q_BSHD.new_zeros(B, S_Q, H, D_V)
        return out, torch.full((B, S_Q, H), NEG_INF, dtype=torch.float32, device=q_BSHD.device)
    kernel = _pick_kernel(q_BSHD, D) if kernel == "auto" else kernel
    if kernel == "math":
        return _math_attention(q_BSHD, k_BSHD, v_BSHD, scale)
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))  # kernels take [B, H, S, D]
    if kernel == "flash_cpu":
        out_BHSD, lse_BHS = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    elif kernel == "flash_cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        out_BHSD, lse_BHS = res[0], res[1]
    elif kernel == "efficient_cuda":
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        out_BHSD, lse_BHS = res[0], res[1][..., :S_Q]  # the efficient kernel pads lse's S to a multiple of 32
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return out_BHSD.transpose(1, 2), lse_BHS.transpose(1, 2).float()


def merge_attention(
    out_a_BSHD: torch.Tensor, lse_a_BSH: torch.Tensor, out_b_BSHD: torch.Tensor, lse_b_BSH: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union (fp32 out, fp32 lse).

    ``(0, -inf)`` (an empty key set) is neutral; two empty sets give ``(0, -inf)`` rather than nan.
    """
    lse_BSH = torch.logaddexp(lse_a_BSH, lse_b_BSH)
    ref_BSH = torch.where(torch.isfinite(lse_BSH), lse_BSH, 0.0)
    w_a = torch.exp(lse_a_BSH - ref_BSH)[..., None]
    w_b = torch.exp(lse_b_BSH - ref_BSH)[..., None]
    return w_a * out_a_BSHD.float() + w_b * out_b_BSHD.float(), lse_BSH


def _block(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    scale: float,
    key_mask_BK: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The fast kernels take no mask; a masked block (text keys only: T is small) goes through the exact math path.
    if key_mask_BK is None or q_BSHD.shape[1] == 0:
        return sdpa_with_lse(q_BSHD, k_BSHD, v_BSHD, scale)
    return _math_attention(q_BSHD, k_BSHD, v_BSHD, scale, key_mask_BK)


# ------------------------------------------------------------------------------------- Ulysses all-to-alls


def _group_size_rank(group: ProcessGroup | None) -> tuple[int, int]:
    """``(size, rank)`` of an axis group; ``None`` means the axis has degree 1 (no collective at all)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _seq_to_heads(x_BSHD: torch.Tensor, group: ProcessGroup, sizes_S: list[int]) -> torch.Tensor:
    """``[B, S_LOCAL, H, D]`` → ``[B, sum(sizes_S), H / P, D]``: this rank's head slice of the group's sequence.

    Uneven shards go through ``all_to_all_single`` with explicit split sizes (works on gloo and NCCL); the
    received chunks arrive in source-rank order = sequence order because shards are contiguous in rank order.
    """
    P, _ = _group_size_rank(group)
    B, S_LOCAL, H, D = x_BSHD.shape
    H_LOCAL = H // P
    send_PSBHD = x_BSHD.reshape(B, S_LOCAL, P, H_LOCAL, D).permute(2, 1, 0, 3, 4).contiguous()
    recv_SBHD = x_BSHD.new_empty(sum(sizes_S), B, H_LOCAL, D)
    dist.all_to_all_single(
        recv_SBHD,
        send_PSBHD.reshape(P * S_LOCAL, B, H_LOCAL, D),
        output_split_sizes=sizes_S,
        input_split_sizes=[S_LOCAL] * P,
        group=group,
    )
    return recv_SBHD.permute(1, 0, 2, 3)


def _heads_to_seq(x_BSHD: torch.Tensor, group: ProcessGroup, sizes_S: list[int]) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: ``[B, sum(sizes_S), H / P, D]`` → ``[B, S_LOCAL, H, D]``."""
    P, rank = _group_size_rank(group)
    B, _, H_LOCAL, D = x_BSHD.shape
    S_LOCAL = sizes_S[rank]
    recv_PSBHD = x_BSHD.new_empty(P * S_LOCAL, B, H_LOCAL, D)
    dist.all_to_all_single(
        recv_PSBHD,
        x_BSHD.permute(1, 0, 2, 3).contiguous(),
        output_split_sizes=[S_LOCAL] * P,
        input_split_sizes=sizes_S,
        group=group,
    )
    return recv_PSBHD.reshape(P, S_LOCAL, B, H_LOCAL, D).permute(2, 1, 0, 3, 4).reshape(B, S_LOCAL, P * H_LOCAL, D)


# ------------------------------------------------------------------------------------------------- ring


def _ring(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    group: ProcessGroup | None,
    sizes_S: list[int],
    scale: float,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of the local queries over every rank's K/V block (+ text), merged by log-sum-exp.

    Returns fp32 ``(out_BSHD, text_out_BTHD)``. With ``group=None`` it is plain local attention (+ text).
    """
    P, rank = _group_size_rank(group)
    D_K = k_BSHD.shape[-1]
    out_BSHD: torch.Tensor | None = None
    lse_BSH: torch.Tensor | None = None

    def add(o: torch.Tensor, lse: torch.Tensor) -> None:
        nonlocal out_BSHD, lse_BSH
        if out_BSHD is None or lse_BSH is None:
            out_BSHD, lse_BSH = o.float(), lse
        else:
            out_BSHD, lse_BSH = merge_attention(out_BSHD, lse_BSH, o, lse)

    # K and V travel as one buffer: one send and one receive per step. Every rank posts exactly the same ops at
    # every step, even for empty blocks (zero-numel P2P is fine on gloo) — skipping a message on one side only is
    # a hang, and the lengths are known to everyone (sizes_S) so receive buffers are sized without a handshake.
    kv_cur = torch.cat([k_BSHD, v_BSHD], dim=-1).contiguous()
    B, _, H, D_KV = kv_cur.shape
    if group is not None and P > 1:
        next_peer = dist.get_global_rank(group, (rank + 1) % P)
        prev_peer = dist.get_global_rank(group, (rank - 1) % P)
    for step in range(P):
        src = (rank - step) % P  # the rank whose block kv_cur is
        reqs = []
        if step < P - 1:
            kv_next = kv_cur.new_empty(B, sizes_S[(src - 1) % P], H, D_KV)
            reqs = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, kv_cur, next_peer, group),
                    dist.P2POp(dist.irecv, kv_next, prev_peer, group),
                ]
            )
        add(*sdpa_with_lse(q_BSHD, kv_cur[..., :D_K], kv_cur[..., D_K:], scale))  # overlaps the transfer
        for req in reqs:
            req.wait()
        if step < P - 1:
            kv_cur = kv_next
    assert out_BSHD is not None and lse_BSH is not None

    if text is None:
        return out_BSHD, None
    tq_BTHD, tk_BTHD, tv_BTHD, mask_BT = text
    add(*_block(q_BSHD, tk_BTHD, tv_BTHD, scale, mask_BT))  # video queries × text keys: once, locally
    # Text queries × video keys: each rank covers its own block only, then the partials are all-gathered
    # (equal sizes: T is the same everywhere) and merged in rank order, so every rank computes bitwise the same
    # text output. Merging along the ring order instead would differ per rank by round-off.
    t_out_BTHD, t_lse_BTH = sdpa_with_lse(tq_BTHD, k_BSHD, v_BSHD, scale)
    t_out_BTHD = t_out_BTHD.float()
    if group is not None and P > 1:
        packed = torch.cat([t_out_BTHD, t_lse_BTH[..., None]], dim=-1).contiguous()
        parts = [torch.empty_like(packed) for _ in range(P)]
        dist.all_gather(parts, packed, group=group)
        t_out_BTHD, t_lse_BTH = parts[0][..., :-1], parts[0][..., -1]
        for part in parts[1:]:
            t_out_BTHD, t_lse_BTH = merge_attention(t_out_BTHD, t_lse_BTH, part[..., :-1], part[..., -1])
    t_self_out, t_self_lse = _block(tq_BTHD, tk_BTHD, tv_BTHD, scale, mask_BT)
    t_out_BTHD, _ = merge_attention(t_out_BTHD, t_lse_BTH, t_self_out, t_self_lse)
    return out_BSHD, t_out_BTHD


# ------------------------------------------------------------------------------------------- public API


def _check_text(
    q_BSHD: torch.Tensor,
    text_q: torch.Tensor | None,
    text_k: torch.Tensor | None,
    text_v: torch.Tensor | None,
    text_key_mask: torch.Tensor | None,
) -> None:
    given = [t is not None for t in (text_q, text_k, text_v)]
    if any(given) and not all(given):
        raise ValueError("text_q_BTHD, text_k_BTHD and text_v_BTHD must be given together")
    if text_key_mask is not None and not all(given):
        raise ValueError("text_key_mask_BT needs text tokens")
    if text_q is not None and (text_q.shape[0] != q_BSHD.shape[0] or text_q.shape[2:] != q_BSHD.shape[2:]):
        raise ValueError(f"text_q_BTHD {tuple(text_q.shape)} does not match q_BSHD {tuple(q_BSHD.shape)} in B, H, D")
    if text_key_mask is not None and text_k is not None and text_key_mask.shape != text_k.shape[:2]:
        raise ValueError(f"text_key_mask_BT {tuple(text_key_mask.shape)} must be [B, T] = {tuple(text_k.shape[:2])}")


def usp_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    ulysses_group: ProcessGroup | None,
    ring_group: ProcessGroup | None,
    *,
    scale: float | None = None,
    num_tokens: int | None = None,
    text_q_BTHD: torch.Tensor | None = None,
    text_k_BTHD: torch.Tensor | None = None,
    text_v_BTHD: torch.Tensor | None = None,
    text_key_mask_BT: torch.Tensor | None = None,
) -> AttentionOutput:
    """Exact non-causal attention of this rank's query shard over the whole (sharded) sequence.

    ``q/k/v_BSHD``: this rank's contiguous shard (``S_LOCAL`` may be uneven or 0) of a sequence sharded over the
    sp group (``ulysses × ring``, sp rank = ``ring_rank * U + ulysses_rank``). ``None`` for a group means degree
    1 on that axis. ``H`` must be divisible by the Ulysses degree.

    ``num_tokens``: the full video length when the shards follow :class:`ShardPlan` — split sizes are then
    derived locally; ``None`` exchanges the local lengths (two tiny all-gathers) and accepts any contiguous
    sharding. ``text_*``: replicated joint-attention text tokens, see the module docstring;
    ``text_key_mask_BT`` (bool, ``True`` = attend) masks padded text keys.
    """
    _check_text(q_BSHD, text_q_BTHD, text_k_BTHD, text_v_BTHD, text_key_mask_BT)
    U, u_rank = _group_size_rank(ulysses_group)
    R, r_rank = _group_size_rank(ring_group)
    _, S_LOCAL, H, D = q_BSHD.shape
    if H % U:
        # Same H on every rank, so every rank raises here before any collective: no hang.
        raise ValueError(f"num_heads={H} is not divisible by the Ulysses degree {U}")
    scale = D**-0.5 if scale is None else scale

    # Split sizes, re-derived on every call. Hazard: a cached size from the previous stage's token count makes
    # the all-to-all or the ring receive the wrong lengths (gloo errors, NCCL can hang).
    if num_tokens is not None:
        sizes = shard_sizes(num_tokens, U * R)
        if S_LOCAL != sizes[r_rank * U + u_rank]:
            raise ValueError(f"this rank holds {S_LOCAL} tokens, ShardPlan({num_tokens}, {U * R}) says otherwise")
        ulysses_sizes_S = list(sizes[r_rank * U : (r_rank + 1) * U])
        ring_sizes_S = [sum(sizes[i * U : (i + 1) * U]) for i in range(R)]
    else:
        ulysses_sizes_S = all_shard_lengths(S_LOCAL, ulysses_group) if U > 1 else [S_LOCAL]
        ring_sizes_S = all_shard_lengths(sum(ulysses_sizes_S), ring_group) if R > 1 else [sum(ulysses_sizes_S)]

    text = None
    if text_q_BTHD is not None and text_k_BTHD is not None and text_v_BTHD is not None:
        H_LOCAL = H // U
        heads = slice(u_rank * H_LOCAL, (u_rank + 1) * H_LOCAL)  # the same head slice the all-to-all gives us
        text = (text_q_BTHD[:, :, heads], text_k_BTHD[:, :, heads], text_v_BTHD[:, :, heads], text_key_mask_BT)

    if U > 1:
        assert ulysses_group is not None
        D_Q, D_K = q_BSHD.shape[-1], k_BSHD.shape[-1]
        qkv_BSHD = _seq_to_heads(torch.cat([q_BSHD, k_BSHD, v_BSHD], dim=-1), ulysses_group, ulysses_sizes_S)
        q, k, v = qkv_BSHD[..., :D_Q], qkv_BSHD[..., D_Q : D_Q + D_K], qkv_BSHD[..., D_Q + D_K :]
    else:
        q, k, v = q_BSHD, k_BSHD, v_BSHD

    out_BSHD, text_out_BTHD = _ring(q, k, v, ring_group, ring_sizes_S, scale, text)
    out_BSHD = out_BSHD.to(q_BSHD.dtype)
    if U > 1:
        assert ulysses_group is not None
        out_BSHD = _heads_to_seq(out_BSHD.contiguous(), ulysses_group, ulysses_sizes_S)
    if text_out_BTHD is not None:
        text_out_BTHD = text_out_BTHD.to(q_BSHD.dtype)
        if U > 1:
            # Equal-size all_gather of head slices (T and H / U are the same on every rank).
            parts = [torch.empty_like(text_out_BTHD) for _ in range(U)]
            dist.all_gather(parts, text_out_BTHD.contiguous(), group=ulysses_group)
            text_out_BTHD = torch.cat(parts, dim=2)
    return AttentionOutput(out_BSHD, text_out_BTHD)


def ulysses_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    group: ProcessGroup | None,
    *,
    scale: float | None = None,
    num_tokens: int | None = None,
    text_q_BTHD: torch.Tensor | None = None,
    text_k_BTHD: torch.Tensor | None = None,
    text_v_BTHD: torch.Tensor | None = None,
    text_key_mask_BT: torch.Tensor | None = None,
) -> AttentionOutput:
    """Ulysses only: :func:`usp_attention` with ``ring_group=None``. ``H`` must be divisible by the group size."""
    return usp_attention(
        q_BSHD,
        k_BSHD,
        v_BSHD,
        group,
        None,
        scale=scale,
        num_tokens=num_tokens,
        text_q_BTHD=text_q_BTHD,
        text_k_BTHD=text_k_BTHD,
        text_v_BTHD=text_v_BTHD,
        text_key_mask_BT=text_key_mask_BT,
    )


def ring_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    group: ProcessGroup | None,
    *,
    scale: float | None = None,
    num_tokens: int | None = None,
    text_q_BTHD: torch.Tensor | None = None,
    text_k_BTHD: torch.Tensor | None = None,
    text_v_BTHD: torch.Tensor | None = None,
    text_key_mask_BT: torch.Tensor | None = None,
) -> AttentionOutput:
    """Ring only: :func:`usp_attention` with ``ulysses_group=None``. Any head count, any sequence lengths."""
    return usp_attention(
        q_BSHD,
        k_BSHD,
        v_BSHD,
        None,
        group,
        scale=scale,
        num_tokens=num_tokens,
        text_q_BTHD=text_q_BTHD,
        text_k_BTHD=text_k_BTHD,
        text_v_BTHD=text_v_BTHD,
        text_key_mask_BT=text_key_mask_BT,
    )
