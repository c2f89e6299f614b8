"""Sequence-parallel transformers (``dvg_dist.parallel.hooks``) equal the single-process model, per family.

For each layout (2 ranks Ulysses, 3 ranks ring, 4 ranks Ulysses 2 × ring 2) one spawned job loads every tiny
checkpoint's transformer(s) on every rank, computes the unmodified model's output, parallelizes it with the
family's ``SequencePlan`` and runs three token counts in a row (uneven shards at every layout; a new count
re-partitions). Every rank must get the full single-process output (relative max diff < 1e-5, fp32) and the ranks
must agree with each other bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_distributed

from dvg_dist.models.base import SequencePlan
from dvg_dist.models.hunyuan import HUNYUAN_SEQUENCE_PLAN
from dvg_dist.models.hunyuan15 import HUNYUAN15_SEQUENCE_PLAN
from dvg_dist.models.wan import WAN_SEQUENCE_PLAN

pytest_plugins = ["conftest_tiny"]
pytestmark = pytest.mark.slow

TOL = 1e-5
# Latent (T, H, W) grids, patch 1×2×2 (Wan, HunyuanVideo) → 80, 27, 30 tokens: uneven at 2, 3 and 4 ranks.
WAN_GRIDS = ((5, 8, 8), (3, 6, 6), (2, 6, 10))
# HunyuanVideo-1.5 tiny: patch 1×1×1 → 80, 27, 30 tokens as well.
HV15_GRIDS = ((5, 4, 4), (3, 3, 3), (2, 3, 5))
LAYOUTS = {"ulysses2": (2, 2, 1), "ring3": (3, 1, 3), "ulysses2xring2": (4, 2, 2)}
"""name → (world size, ulysses degree, ring degree)."""

# family → (plan, transformer subfolders, latent grids)
FAMILIES: dict[str, tuple[SequencePlan, tuple[str, ...], tuple[tuple[int, int, int], ...]]] = {
    "wan": (WAN_SEQUENCE_PLAN, ("transformer",), WAN_GRIDS),
    "wan-moe": (WAN_SEQUENCE_PLAN, ("transformer", "transformer_2"), WAN_GRIDS),
    "wan-i2v": (WAN_SEQUENCE_PLAN, ("transformer",), WAN_GRIDS),
    "hunyuan": (HUNYUAN_SEQUENCE_PLAN, ("transformer",), WAN_GRIDS),
    "hunyuan15": (HUNYUAN15_SEQUENCE_PLAN, ("transformer",), HV15_GRIDS),
}


def _load(family: str, path: str, sub: str) -> torch.nn.Module:
    import diffusers

    cls = {
        "wan": diffusers.WanTransformer3DModel,
        "hunyuan": diffusers.HunyuanVideoTransformer3DModel,
        "hunyuan15": diffusers.HunyuanVideo15Transformer3DModel,
    }[family.split("-")[0]]
    model: torch.nn.Module = cls.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32)
    return model.eval()


def _inputs(family: str, model: Any, grid: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """Deterministic transformer kwargs (the same on every rank): random latent, text and image tokens, padded
    text masks for the joint-attention families."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    kwargs: dict[str, Any] = {"hidden_states": randn(1, cfg.in_channels, *grid), "return_dict": False}
    if family.startswith("wan"):
        kwargs["timestep"] = torch.tensor([500.0 + seed])
        kwargs["encoder_hidden_states"] = randn(1, 512, cfg.text_dim)  # the I2V processor assumes 512 text tokens
        if cfg.image_dim is not None:
            kwargs["encoder_hidden_states_image"] = randn(1, 17, cfg.image_dim)
    elif family == "hunyuan":
        mask = torch.zeros(1, 12)
        mask[:, :9] = 1  # 9 valid tokens, 3 padding
        kwargs.update(
            timestep=torch.tensor([500.0 + seed]),
            encoder_hidden_states=randn(1, 12, cfg.text_embed_dim),
            encoder_attention_mask=mask,
            pooled_projections=randn(1, cfg.pooled_projection_dim),
            guidance=torch.tensor([6000.0]),
        )
    elif family == "hunyuan15":
        mask, mask_2 = torch.zeros(1, 12), torch.zeros(1, 6)
        mask[:, :8], mask_2[:, :2] = 1, 1
        kwargs.update(
            timestep=torch.tensor([500.0 + seed]),
            encoder_hidden_states=randn(1, 12, cfg.text_embed_dim),
            encoder_attention_mask=mask,
            encoder_hidden_states_2=randn(1, 6, cfg.text_embed_2_dim),
            encoder_attention_mask_2=mask_2,
            image_embeds=torch.zeros(1, 5, cfg.image_embed_dim),  # T2V: all-zero image tokens, masked out
        )
    return kwargs


def _rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _parity_job(rank: int, world: int, ulysses: int, ring: int, checkpoints: dict[str, str]) -> dict[str, Any]:
    """Per model: single-process reference, then the parallelized model at every grid; diffs, outputs, calls."""
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.parallel.hooks import parallelize_transformer, sequence_parallel_state, unparallelize_transformer

    groups = build_groups(ParallelLayout(world, ulysses, ring))
    report: dict[str, Any] = {}
    for family, path in checkpoints.items():
        plan, subs, grids = FAMILIES[family]
        for sub in subs:
            model = _load(family, path, sub)
            inputs = [_inputs(family, model, g, seed) for seed, g in enumerate(grids)]
            with torch.no_grad():
                refs = [model(**kw)[0] for kw in inputs]
                parallelize_transformer(model, plan, groups)
                outs = [model(**kw)[0] for kw in inputs]
                state = sequence_parallel_state(model)
                assert state is not None
                calls = state.calls
                unparallelize_transformer(model)
                again = model(**inputs[0])[0]  # unparallelized again: the local model, bit for bit
            report[f"{family}/{sub}"] = {
                "diffs": [_rel_diff(o, r) for o, r in zip(outs, refs)],
                "shapes_ok": all(o.shape == r.shape for o, r in zip(outs, refs)),
                "outs": outs,
                "calls": calls,
                "undone": bool(torch.equal(again, refs[0])),
            }
    return report


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Callable[[str], Path]) -> dict[str, str]:
    return {family: str(tiny_checkpoint(family)) for family in FAMILIES}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_transformer_matches_single_process(layout: str, checkpoints: dict[str, str]) -> None:
    world, ulysses, ring = LAYOUTS[layout]
    reports = run_distributed(_parity_job, world, ulysses, ring, checkpoints, timeout=240.0)
    for name, r0 in reports[0].items():
        assert r0["shapes_ok"], f"{name} @ {layout}: output shape differs from the single-process model"
        worst = max(r0["diffs"])
        assert worst < TOL, f"{name} @ {layout}: relative max diff per grid {r0['diffs']} (tolerance {TOL})"
        assert r0["calls"] > 0, f"{name} @ {layout}: the sequence-parallel attention backend was never called"
        assert r0["undone"], f"{name} @ {layout}: unparallelize_transformer did not restore the local model"
        for rank, rep in enumerate(reports[1:], start=1):
            for i, (a, b) in enumerate(zip(rep[name]["outs"], r0["outs"])):
                assert torch.equal(a, b), f"{name} @ {layout}, grid {i}: rank {rank} differs from rank 0"
        print(f"{name} @ {layout}: relative max diffs {[f'{d:.2e}' for d in r0['diffs']]}")


# ----------------------------------------------------------------------------------- hooks bookkeeping


def _bookkeeping_job(rank: int, world: int, path: str) -> dict[str, Any]:
    """Idempotence, removal, and the single-rank no-op, checked on one rank set."""
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.parallel.hooks import parallelize_transformer, sequence_parallel, unparallelize_transformer

    def hook_count(model: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def backends(model: torch.nn.Module) -> list[Any]:
        return [getattr(m.processor, "_attention_backend", None) for m in model.modules() if hasattr(m, "processor")]

    model = _load("wan", path, "transformer")
    base_hooks, base_backends = hook_count(model), backends(model)
    kw = _inputs("wan", model, WAN_GRIDS[1], 0)
    with torch.no_grad():
        ref = model(**kw)[0]
    groups = build_groups(ParallelLayout(world, world, 1))
    parallelize_transformer(model, WAN_SEQUENCE_PLAN, groups)
    once = hook_count(model)
    parallelize_transformer(model, WAN_SEQUENCE_PLAN, groups)
    twice = hook_count(model)
    with torch.no_grad():
        par = model(**kw)[0]
    unparallelize_transformer(model)
    unparallelize_transformer(model)  # a second removal is a no-op
    removed = hook_count(model) == base_hooks and backends(model) == base_backends
    with sequence_parallel(model, WAN_SEQUENCE_PLAN, groups):
        in_ctx = hook_count(model) == once
    after_ctx = hook_count(model) == base_hooks and backends(model) == base_backends

    # A one-rank sp group (every rank its own group, the cfg axis carrying the rest) adds nothing at all.
    solo_groups = build_groups(ParallelLayout(world, 1, 1, cfg_degree=world))
    parallelize_transformer(model, WAN_SEQUENCE_PLAN, solo_groups)
    solo_noop = hook_count(model) == base_hooks and backends(model) == base_backends
    with torch.no_grad():
        solo_equal = torch.equal(model(**kw)[0], ref)
    return {
        "idempotent": once == twice and once > base_hooks,
        "parity": _rel_diff(par, ref),
        "removed": removed,
        "context_manager": in_ctx and after_ctx,
        "solo_noop": solo_noop and solo_equal,
    }


def test_hooks_idempotent_removable_and_single_rank_noop(tiny_checkpoint: Callable[[str], Path]) -> None:
    (r0, r1) = run_distributed(_bookkeeping_job, 2, str(tiny_checkpoint("wan")), timeout=120.0)
    for rank, r in enumerate((r0, r1)):
        assert r["idempotent"], f"rank {rank}: parallelizing twice changed the hooks"
        assert r["parity"] < TOL, f"rank {rank}: relative max diff {r['parity']:.2e}"
        assert r["removed"], f"rank {rank}: unparallelize_transformer left hooks or attention backends behind"
        assert r["context_manager"], f"rank {rank}: sequence_parallel() did not apply and undo the hooks"
        assert r["solo_noop"], f"rank {rank}: a one-rank sp group changed the model"
