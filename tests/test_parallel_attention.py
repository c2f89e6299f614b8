"""Parity of the sequence-parallel collectives with single-process SDPA on the full sequence (fp32, gloo, CPU).

Each world size is spawned once (module-scoped fixtures); a job runs many checks and returns
``{check name: max |parallel - reference|}`` per rank, so the tests below read like single-process tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import DistributedTestError, run_distributed

from dvg_dist.parallel import (
    Axis,
    ParallelLayout,
    ShardPlan,
    build_groups,
    default_backend,
    default_layout,
    gather,
    ring_attention,
    sdpa_with_lse,
    shard_sizes,
    split,
    ulysses_attention,
    usp_attention,
)

pytestmark = pytest.mark.slow

TOL = 1e-5
B, D, T = 2, 16, 5

# ----------------------------------------------------------------------------------- helpers run in ranks


def _inputs(S: int, H: int, seed: int, text: bool) -> dict[str, torch.Tensor]:
    """Full tensors, identical on every rank (same seed); a text key mask with padding on batch 1."""
    gen = torch.Generator().manual_seed(seed)
    x = {name: torch.randn(B, S, H, D, generator=gen) for name in ("q", "k", "v")}
    if text:
        x |= {f"t{name}": torch.randn(B, T, H, D, generator=gen) for name in ("q", "k", "v")}
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, -2:] = False  # padded text keys must get zero weight
        x["mask"] = mask
    return x


def _sdpa_BSHD(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)


def _reference(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Single-process SDPA over concat(video, text) with a key-padding mask; outputs split back."""
    q, k, v = x["q"], x["k"], x["v"]
    S = q.shape[1]
    mask = None
    if "tq" in x:
        q, k, v = (torch.cat([x[n], x["t" + n]], dim=1) for n in ("q", "k", "v"))
        mask = torch.cat([torch.ones(B, S, dtype=torch.bool), x["mask"]], dim=1)[:, None, None, :]
    out = _sdpa_BSHD(q, k, v, attn_mask=mask)
    return out[:, :S], (out[:, S:] if "tq" in x else None)


def _parity(fn: Any, group_args: tuple[Any, ...], S: int, H: int, sp_rank: int, sp: int, text: bool, **kw: Any):
    """Run ``fn`` on this rank's ShardPlan shard; return (max diff video, max diff text, text output)."""
    x = _inputs(S, H, seed=S * 100 + H, text=text)
    ref_out, ref_text = _reference(x)
    plan = ShardPlan(S, sp, sp_rank)
    q, k, v = (split(x[n], 1, plan) for n in ("q", "k", "v"))
    if text:
        kw |= dict(text_q_BTHD=x["tq"], text_k_BTHD=x["tk"], text_v_BTHD=x["tv"], text_key_mask_BT=x["mask"])
    res = fn(q, k, v, *group_args, **kw)
    diff = (res.out_BSHD - split(ref_out, 1, plan)).abs().max().item() if plan.length else 0.0
    assert res.out_BSHD.shape == (B, plan.length, H, D)
    if not text:
        return diff, None, None
    assert res.text_out_BTHD is not None and ref_text is not None
    return diff, (res.text_out_BTHD - ref_text).abs().max().item(), res.text_out_BTHD


def _gather_checks(rank: int, world: int, out: dict[str, Any]) -> None:
    for S in (27, world - 1):  # uneven, and one with an empty shard
        full = torch.randn(3, S, 4, generator=torch.Generator().manual_seed(S))
        local = split(full, 1, ShardPlan(S, world, rank))
        out[f"gather S={S} plan"] = (gather(local, 1, None, num_tokens=S) - full).abs().max().item()
        out[f"gather S={S} exchanged"] = (gather(local, -2) - full).abs().max().item()


def _job_world2(rank: int, world: int) -> dict[str, Any]:
    wg = dist.group.WORLD
    out: dict[str, Any] = {}
    for S in (27, 1):  # S=1: rank 1 holds zero tokens
        for name, fn in (("ulysses", ulysses_attention), ("ring", ring_attention)):
            for text in (False, True):
                for num_tokens in (S, None):
                    kw = {"num_tokens": num_tokens}
                    key = f"{name} S={S} text={text} plan={num_tokens is not None}"
                    d, dt, t_out = _parity(fn, (wg,), S, 4, rank, world, text, **kw)
                    out[key] = d
                    if text:
                        out[key + " text"] = dt
                        out[key + " text_out"] = t_out
    _gather_checks(rank, world, out)
    return out


def _job_world3(rank: int, world: int) -> dict[str, Any]:
    wg = dist.group.WORLD
    out: dict[str, Any] = {}
    for S in (31, 29, 2):  # S=2: rank 2 holds zero tokens
        for text in (False, True):
            key = f"ring S={S} text={text}"
            d, dt, t_out = _parity(ring_attention, (wg,), S, 4, rank, world, text, num_tokens=S)
            out[key] = d
            if text:
                out[key + " text"], out[key + " text_out"] = dt, t_out
    d, dt, _ = _parity(ulysses_attention, (wg,), 31, 3, rank, world, True)
    out["ulysses H=3 S=31 text=True"], out["ulysses H=3 S=31 text=True text"] = d, dt
    _gather_checks(rank, world, out)
    return out


def _job_world4(rank: int, world: int) -> dict[str, Any]:
    groups = build_groups(ParallelLayout(world, ulysses_degree=2, ring_degree=2, num_heads=4))
    sp_rank = groups.coords[Axis.SP]
    uly, ring = groups.ulysses, groups.ring
    out: dict[str, Any] = {
        "coords": dict(groups.coords),
        "group sizes": {a.value: dist.get_world_size(g) for a, g in groups.groups.items()},
        "ulysses peers": dist.get_process_group_ranks(uly),
    }
    for S in (27, 10, 3):  # new token counts re-partition; S=3: sp rank 3 holds zero tokens
        for text in (False, True):
            for num_tokens in (S, None):
                key = f"usp S={S} text={text} plan={num_tokens is not None}"
                d, dt, t_out = _parity(usp_attention, (uly, ring), S, 4, sp_rank, world, text, num_tokens=num_tokens)
                out[key] = d
                if text:
                    out[key + " text"], out[key + " text_out"] = dt, t_out
    # Ring over the 4-rank sp group (ulysses degree 1 there): a 4-rank ring with uneven shards.
    d, dt, _ = _parity(ring_attention, (groups.sp,), 29, 4, sp_rank, world, True)
    out["ring-4 S=29 text=True"], out["ring-4 S=29 text=True text"] = d, dt
    return out


def _job_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world2() -> list[dict[str, Any]]:
    return run_distributed(_job_world2, 2, timeout=120)


@pytest.fixture(scope="module")
def world3() -> list[dict[str, Any]]:
    return run_distributed(_job_world3, 3, timeout=120)


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    return run_distributed(_job_world4, 4, timeout=120)


def _assert_close(results: list[dict[str, Any]], prefix: str) -> int:
    """Every numeric check whose name starts with ``prefix`` is within TOL on every rank; returns the count."""
    bad, n = [], 0
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key.startswith(prefix) and isinstance(value, float):
                n += 1
                if not value <= TOL:
                    bad.append(f"rank {rank} {key}: max diff {value:.3g}")
    assert n, f"no checks named {prefix!r}"
    assert not bad, f"parallel differs from single-process SDPA by more than {TOL}: " + "; ".join(bad)
    return n


def _assert_text_identical(results: list[dict[str, Any]]) -> None:
    keys = [k for k in results[0] if k.endswith("text_out")]
    assert keys
    for key in keys:
        for rank, res in enumerate(results[1:], start=1):
            assert torch.equal(res[key], results[0][key]), f"{key}: rank {rank} differs from rank 0"


# -------------------------------------------------------------------------------- multi-process tests


def test_ulysses_two_ranks_uneven_matches_sdpa(world2):
    _assert_close(world2, "ulysses S=27")


def test_ring_two_ranks_uneven_matches_sdpa(world2):
    _assert_close(world2, "ring S=27")


def test_ring_three_ranks_uneven_matches_sdpa(world3):
    _assert_close(world3, "ring S=31")
    _assert_close(world3, "ring S=29")


def test_ulysses_three_ranks_three_heads_with_text(world3):
    _assert_close(world3, "ulysses H=3")


def test_usp_2x2_uneven_and_repartitioned_matches_sdpa(world4):
    _assert_close(world4, "usp S=27")
    _assert_close(world4, "usp S=10")
    _assert_close(world4, "ring-4")


def test_joint_text_outputs_correct_masked_and_identical_on_every_rank(world2, world3, world4):
    for results in (world2, world3, world4):
        for rank, res in enumerate(results):
            assert any(k.endswith(" text") for k in res), f"rank {rank}: no text checks"
        _assert_text_identical(results)
    _assert_close(world2, "ulysses S=27 text=True")
    _assert_close(world2, "ring S=27 text=True")
    _assert_close(world4, "usp S=27 text=True")


def test_zero_length_shards_are_handled(world2, world3, world4):
    _assert_close(world2, "ulysses S=1")
    _assert_close(world2, "ring S=1")
    _assert_close(world3, "ring S=2")
    _assert_close(world4, "usp S=3")


def test_gather_uneven_and_empty_shards_is_exact(world2, world3):
    assert _assert_close(world2, "gather") == 2 * 4
    for res in world3:
        assert all(res[k] == 0.0 for k in res if k.startswith("gather"))


def test_build_groups_puts_ulysses_partners_adjacent(world4):
    for rank, res in enumerate(world4):
        assert res["coords"] == ParallelLayout(4, 2, 2).coords(rank)
        assert res["group sizes"] == {"cfg": 1, "ring": 2, "ulysses": 2, "sp": 4}
        assert res["ulysses peers"] == [rank - rank % 2, rank - rank % 2 + 1]


def test_run_distributed_names_the_failing_rank():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed: ValueError: boom on purpose"):
        run_distributed(_job_raises, 2, timeout=60)


# -------------------------------------------------------------------------------- single-process tests


@pytest.mark.parametrize("S,sp", [(27, 2), (29, 3), (31, 3), (49290, 8), (3, 4), (0, 2), (8, 8)])
def test_shard_plan_balanced_contiguous_and_covering(S, sp):
    plans = [ShardPlan(S, sp, r) for r in range(sp)]
    sizes = [p.length for p in plans]
    assert sum(sizes) == S and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True), "the first S % sp ranks get the extra token"
    assert [p.start for p in plans] == [sum(sizes[:r]) for r in range(sp)]
    assert tuple(sizes) == shard_sizes(S, sp) == plans[0].sizes
    x = torch.arange(S)
    assert torch.equal(torch.cat([split(x, 0, p) for p in plans]), x)


def test_shard_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank must be in"):
        ShardPlan(10, 2, 2)
    with pytest.raises(ValueError, match="sp_size must be >= 1"):
        ShardPlan(10, 0, 0)
    with pytest.raises(ValueError, match="plan shards 10 tokens"):
        split(torch.zeros(9), 0, ShardPlan(10, 2, 0))


def test_layout_validation_messages():
    with pytest.raises(ValueError, match=r"= 6, but world_size is 8"):
        ParallelLayout(8, ulysses_degree=3, ring_degree=2)
    with pytest.raises(ValueError, match=r"cfg_degree must be 1 or 2, got 4"):
        ParallelLayout(8, ulysses_degree=2, ring_degree=1, cfg_degree=4)
    with pytest.raises(ValueError, match=r"does not divide num_heads=24.*use ulysses_degree in \[1, 2, 4, 8\]"):
        ParallelLayout(16, ulysses_degree=16, ring_degree=1, num_heads=24)
    with pytest.raises(ValueError, match=r"use ulysses_degree in \[1, 2, 4\]"):
        ParallelLayout(8, ulysses_degree=8, ring_degree=1, cfg_degree=1, num_heads=12)


def test_default_layout_prefers_ulysses_then_ring():
    assert default_layout(8, 24) == ParallelLayout(8, 8, 1, 1, 24)
    assert default_layout(8, 12) == ParallelLayout(8, 4, 2, 1, 12)  # Wan 1.3B
    assert default_layout(8, 30, use_cfg_parallel=True) == ParallelLayout(8, 2, 2, 2, 30)  # CogVideoX-2B
    assert default_layout(3, 16) == ParallelLayout(3, 1, 3, 1, 16)
    with pytest.raises(ValueError, match="even world_size"):
        default_layout(3, 16, use_cfg_parallel=True)
    assert default_backend("mpi") == "mpi"
    assert default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_layout_groups_partition_the_world_with_ulysses_innermost():
    layout = ParallelLayout(8, ulysses_degree=2, ring_degree=2, cfg_degree=2)
    for axis in Axis:
        groups = layout.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(8)), axis
    assert layout.axis_groups(Axis.ULYSSES) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.axis_groups(Axis.RING) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.axis_groups(Axis.CFG) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coords(7) == {Axis.CFG: 1, Axis.RING: 1, Axis.ULYSSES: 1, Axis.SP: 3}


@pytest.mark.parametrize("kernel", ["auto", "math"])
def test_sdpa_with_lse_matches_sdpa_and_logsumexp(kernel):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=gen) for n in (7, 11, 11))
    out, lse = sdpa_with_lse(q, k, v, scale=0.3, kernel=kernel)
    ref = _sdpa_BSHD(q, k, v, scale=0.3)
    ref_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3, dim=-1).transpose(1, 2)
    assert (out - ref).abs().max() <= TOL
    assert (lse - ref_lse).abs().max() <= TOL


def test_sdpa_with_lse_empty_sequences_never_reach_the_kernel():
    # The CPU flash kernel kills the process (SIGFPE) on zero-length inputs; these must be answered before it.
    q = torch.randn(1, 0, 2, 8)
    k = torch.randn(1, 5, 2, 8)
    out, lse = sdpa_with_lse(q, k, k)
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 0, 2)
    out, lse = sdpa_with_lse(k, q, q)
    assert torch.equal(out, torch.zeros(1, 5, 2, 8)) and bool(torch.isneginf(lse).all())
