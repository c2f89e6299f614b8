"""External attention backends (``xfuser`` = yunchang USP, ``deepspeed`` = DeepSpeed-Ulysses) against native.

For every backend × layout it supports (yunchang: Ulysses 2, ring 2, USP 2 × 2; DeepSpeed: Ulysses 2 and 4):

- attention level, random q/k/v with a divisible token count: the backend serves the call and equals native
  (and single-process attention) within 1e-5;
- the cases it cannot do exactly — an uneven token count, joint text tokens with a key mask, a ring axis for
  DeepSpeed — are handed to native, counted per reason, and give native's result bit for bit (also through the
  Hunyuan families' real joint-attention processors);
- end to end, the tiny Wan checkpoint through the engine with ``parallel.attention_backend``: the final latent
  equals native's on the same layout (relative max diff < 1e-4) and the backend served some calls;
- a missing extra is one line naming it, at startup (before any process or weight).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_distributed

pytest.importorskip("yunchang", reason="the xfuser extra (yunchang) is part of the test environment")
pytest.importorskip("deepspeed", reason="the deepspeed extra is part of the test environment")

pytest_plugins = ["conftest_tiny"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOL_ATTENTION = 1e-5
TOL_LATENT = 1e-4

# backend → layouts (ulysses, ring) it serves; (world size) is their product.
SUPPORTED = {"xfuser": [(2, 1), (1, 2), (2, 2)], "deepspeed": [(2, 1), (4, 1)]}
UNSUPPORTED_LAYOUTS = {"deepspeed": [(1, 2), (2, 2)]}
"""Layouts a backend hands entirely to native (DeepSpeed-Ulysses has no ring)."""


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------- attention level


def _qkv(num_tokens: int, num_text: int = 0, heads: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Full q/k/v ``[B, S + T, H, D]`` (identical on every rank) and a text key mask ``[B, T]`` (last key padded)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, num_tokens + num_text, heads, 16, generator=gen) for _ in range(3))
    mask = torch.ones(2, num_text, dtype=torch.bool)
    if num_text:
        mask[:, -1] = False
    return q, k, v, mask


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Single-process attention over [video, text] keys (text keys masked by ``mask``), fp32 math."""
    from dvg_dist.parallel.attention import _math_attention

    key_mask = torch.cat([torch.ones(q.shape[0], num_tokens, dtype=torch.bool), mask], dim=1)
    return _math_attention(q, k, v, q.shape[-1] ** -0.5, key_mask)[0]


def _one_call(state: Any, num_tokens: int, num_text: int, heads: int = 4) -> dict[str, Any]:
    """One diffusers-backend call with this rank's shard (+ the replicated text tail): output vs native and the
    single-process reference, and which backend served it."""
    from dvg_dist.parallel.attention import usp_attention
    from dvg_dist.parallel.diffusers_backend import _usp_backend
    from dvg_dist.parallel.shard import split

    q, k, v, mask = _qkv(num_tokens, num_text, heads)
    state.num_tokens = num_tokens
    plan = state.current()

    def local(x: torch.Tensor) -> torch.Tensor:  # [this rank's video shard, text]
        return torch.cat([split(x[:, :num_tokens], 1, plan), x[:, num_tokens:]], dim=1)

    attn_mask = None
    if num_text:  # HunyuanVideo's processor mask: [B, 1, 1, local video + text] keys
        attn_mask = torch.cat([torch.ones(2, plan.length, dtype=torch.bool), mask], dim=1)[:, None, None, :]
    before = dict(state.served)
    with torch.no_grad():
        out = _usp_backend(local(q), local(k), local(v), attn_mask=attn_mask, _parallel_config=state)
        native = usp_attention(
            split(q[:, :num_tokens], 1, plan),
            split(k[:, :num_tokens], 1, plan),
            split(v[:, :num_tokens], 1, plan),
            state.ulysses_group,
            state.ring_group,
            num_tokens=num_tokens,
            text_q_BTHD=q[:, num_tokens:] if num_text else None,
            text_k_BTHD=k[:, num_tokens:] if num_text else None,
            text_v_BTHD=v[:, num_tokens:] if num_text else None,
            text_key_mask_BT=mask if num_text else None,
        )
    native_out = native.out_BSHD if native.text_out_BTHD is None else torch.cat(native, dim=1)
    served = [name for name, n in state.served.items() if n > before.get(name, 0)]
    return {
        "served": served,
        "vs_native": _rel(out, native_out),
        "equal_native": bool(torch.equal(out, native_out)),
        "vs_reference": _rel(out, local(_reference(q, k, v, mask, num_tokens))),
    }


def _attention_job(rank: int, world: int, cases: list[tuple[str, int, int]]) -> dict[Any, Any]:
    """Per (backend, ulysses, ring): a divisible call, an uneven call, a joint-text call; fallback counts."""
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.parallel.backends import make_attention
    from dvg_dist.parallel.diffusers_backend import SequenceParallelState

    report: dict[Any, Any] = {}
    for backend, ulysses, ring in cases:
        groups = build_groups(ParallelLayout(world, ulysses, ring))
        state = SequenceParallelState(groups, attention=make_attention(backend, groups))
        key = (backend, ulysses, ring)
        report[key] = {
            "divisible": _one_call(state, 24, 0),  # 24 tokens: 12 or 6 per rank
            "uneven": _one_call(state, 27, 0),
            "text": _one_call(state, 24, 5),
            "fallbacks": dict(state.fallbacks),
        }
    return report


@pytest.fixture(scope="module")
def attention_reports() -> dict[Any, Any]:
    """One spawn per world size covers every backend × layout (process start-up dominates on 2 cores)."""
    by_world: dict[int, list[tuple[str, int, int]]] = {}
    for backend, layouts in SUPPORTED.items():
        for u, r in [*layouts, *UNSUPPORTED_LAYOUTS.get(backend, [])]:
            by_world.setdefault(u * r, []).append((backend, u, r))
    reports: dict[Any, Any] = {}
    for world, cases in sorted(by_world.items()):
        results = run_distributed(_attention_job, world, cases, timeout=300.0)
        for key in results[0]:
            reports[key] = [res[key] for res in results]
    return reports


@pytest.mark.parametrize(("backend", "layout"), [(b, lay) for b, lays in SUPPORTED.items() for lay in lays])
def test_backend_serves_divisible_calls_and_equals_native(attention_reports, backend, layout):
    for rank, rep in enumerate(attention_reports[(backend, *layout)]):
        r = rep["divisible"]
        assert r["served"] == [backend], f"{backend} {layout} rank {rank}: served by {r['served']}, not {backend}"
        assert r["vs_native"] < TOL_ATTENTION, f"{backend} {layout} rank {rank}: rel diff to native {r['vs_native']}"
        assert r["vs_reference"] < TOL_ATTENTION, f"{backend} {layout} rank {rank}: to one process {r['vs_reference']}"
    worst = max(rep["divisible"]["vs_native"] for rep in attention_reports[(backend, *layout)])
    print(f"{backend} ulysses×ring {layout}: relative max diff to native {worst:.2e}")


@pytest.mark.parametrize(("backend", "layout"), [(b, lay) for b, lays in SUPPORTED.items() for lay in lays])
def test_backend_hands_uneven_and_joint_text_calls_to_native(attention_reports, backend, layout):
    for rank, rep in enumerate(attention_reports[(backend, *layout)]):
        for case in ("uneven", "text"):
            r = rep[case]
            assert r["served"] == ["native"], f"{backend} {layout} rank {rank}, {case}: served by {r['served']}"
            assert r["equal_native"], f"{backend} {layout} rank {rank}, {case}: differs from native by {r['vs_native']}"
            assert r["vs_reference"] < TOL_ATTENTION, f"{backend} {layout} {case}: to one process {r['vs_reference']}"
        reasons = " | ".join(rep["fallbacks"])
        assert "not divisible by the sp degree" in reasons and "joint text" in reasons, rep["fallbacks"]


@pytest.mark.parametrize(("backend", "layout"), [(b, lay) for b, lays in UNSUPPORTED_LAYOUTS.items() for lay in lays])
def test_layouts_a_backend_lacks_run_native(attention_reports, backend, layout):
    for rank, rep in enumerate(attention_reports[(backend, *layout)]):
        for case in ("divisible", "uneven", "text"):
            r = rep[case]
            assert r["served"] == ["native"] and r["equal_native"], f"{backend} {layout} rank {rank}, {case}: {r}"
        assert any("no ring" in reason for reason in rep["fallbacks"]), rep["fallbacks"]


def test_fallback_decision_uses_only_what_every_rank_knows():
    """The reasons, per backend, from :class:`CallShape` alone (no shard length exists in it)."""
    from types import SimpleNamespace

    from dvg_dist.parallel import ParallelLayout
    from dvg_dist.parallel.backends import CallShape, DeepSpeedUlyssesAttention, ExternalAttention, YunchangAttention

    def backend(cls: type, u: int, r: int) -> ExternalAttention:
        obj = object.__new__(cls)
        ExternalAttention.__init__(obj, SimpleNamespace(layout=ParallelLayout(u * r, u, r)))  # type: ignore[arg-type]
        return obj

    def shape(tokens: int, heads: int = 4, text: int = 0, masked: bool = False) -> CallShape:
        return CallShape(tokens, heads, text, masked, torch.float32, "cpu")

    usp = backend(YunchangAttention, 2, 2)
    assert usp.fallback_reason(shape(24)) is None
    assert "not divisible by the sp degree 4" in str(usp.fallback_reason(shape(26)))
    assert "not divisible by the sp degree" in str(usp.fallback_reason(shape(0)))
    assert "heads not divisible by the Ulysses degree 2" in str(usp.fallback_reason(shape(24, heads=3)))
    assert "joint text" in str(usp.fallback_reason(shape(24, text=5)))
    assert "joint text" in str(usp.fallback_reason(shape(24, masked=True)))
    assert backend(YunchangAttention, 1, 2).fallback_reason(shape(24, heads=3)) is None  # ring: any heads
    assert backend(DeepSpeedUlyssesAttention, 2, 1).fallback_reason(shape(24)) is None
    assert "no ring" in str(backend(DeepSpeedUlyssesAttention, 2, 2).fallback_reason(shape(24)))


# ------------------------------------------------------------------------------------------------ end to end


def _engine_job(rank: int, world: int, path: str, cases: list[tuple[str, int, int, str]]) -> dict[Any, Any]:
    """Per (backend, ulysses, ring, mode): the final latent with native, then with the backend, on one layout."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import DiffusionPipeline

    from dvg_dist.config import load_config
    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.runtime.distributed import ParallelContext
    from dvg_dist.runtime.engine import Engine, Request

    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    out: dict[Any, Any] = {}
    for backend, u, r, mode in cases:
        par = ParallelContext(build_groups(ParallelLayout(world, u, r, 1, num_heads=2)))
        latents, served = {}, {}
        for name in ("native", backend):
            cfg = load_config(
                ROOT / "configs" / "tiny-wan.yaml",
                [f"model.path={path}", f"sampling.mode={mode}", f"parallel.attention_backend={name}"],
            )
            engine = Engine(cfg, pipe, parallel=par)
            latents[name] = engine.generate([Request("a red ball", seed=3)], decode=False, progress=False).latent
            state = sequence_parallel_state(pipe.transformer)
            assert state is not None
            served[name] = dict(state.served)
        out[(backend, u, r, mode)] = {
            "rel": _rel(latents[backend], latents["native"]),
            "served": served[backend],
            "native_served": served["native"],
        }
    return out if rank == 0 else {}


E2E = {
    2: [("xfuser", 2, 1, "dvg"), ("xfuser", 1, 2, "dvg"), ("deepspeed", 2, 1, "dvg"), ("xfuser", 2, 1, "full")],
    4: [("xfuser", 2, 2, "dvg")],
}


@pytest.mark.parametrize("world", sorted(E2E))
def test_engine_final_latent_equals_native(tiny_checkpoint, world):
    got = run_distributed(_engine_job, world, str(tiny_checkpoint("wan")), E2E[world], timeout=600.0)[0]
    for (backend, u, r, mode), rep in got.items():
        where = f"{backend} ulysses {u} × ring {r}, {mode}"
        assert rep["served"].get(backend, 0) > 0, f"{where}: the backend served no call ({rep['served']})"
        assert rep["native_served"].get(backend, 0) == 0, f"{where}: the native run used {backend}"
        assert rep["rel"] < TOL_LATENT, f"{where}: final latent differs from native's by {rep['rel']:.2e} (relative)"
        if mode == "full":  # 80 tokens at every step: divisible by 2, nothing falls back
            assert set(rep["served"]) == {backend}, f"{where}: {rep['served']}"
        print(f"{where}: latent relative max diff to native {rep['rel']:.2e}; calls served {rep['served']}")


def _joint_model_job(rank: int, world: int, checkpoints: dict[str, str]) -> dict[Any, Any]:
    """The Hunyuan families' real processors (joint text tail + text key mask) under each backend vs native."""
    from test_parallel_models import FAMILIES, _inputs, _load

    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.parallel.hooks import parallelize_transformer, sequence_parallel_state

    groups = build_groups(ParallelLayout(world, world, 1))
    report: dict[Any, Any] = {}
    for family, path in checkpoints.items():
        plan, _, grids = FAMILIES[family]
        model = _load(family, path, "transformer")
        kw = _inputs(family, model, grids[0], 0)  # 80 tokens: divisible, so only the text tail can force native
        outs = {}
        for backend in ("native", *SUPPORTED):
            parallelize_transformer(model, plan, groups, backend)
            with torch.no_grad():
                outs[backend] = model(**kw)[0]
            state = sequence_parallel_state(model)
            assert state is not None
            if backend != "native":
                report[(family, backend)] = {
                    "equal_native": bool(torch.equal(outs[backend], outs["native"])),
                    "served": dict(state.served),
                    "fallbacks": dict(state.fallbacks),
                }
    return report


def test_joint_text_models_run_native_under_every_backend(tiny_checkpoint):
    checkpoints = {family: str(tiny_checkpoint(family)) for family in ("hunyuan", "hunyuan15")}
    for rank, report in enumerate(run_distributed(_joint_model_job, 2, checkpoints, timeout=300.0)):
        for (family, backend), rep in report.items():
            where = f"{family} under {backend}, rank {rank}"
            assert set(rep["served"]) == {"native"} and rep["served"]["native"] > 0, f"{where}: {rep['served']}"
            assert all("joint text" in reason for reason in rep["fallbacks"]), f"{where}: {rep['fallbacks']}"
            assert rep["equal_native"], f"{where}: the transformer output differs from native's"


# -------------------------------------------------------------------------------------------- missing extra


@pytest.mark.parametrize(
    ("backend", "module", "extra"), [("xfuser", "yunchang", "xfuser"), ("deepspeed", "deepspeed", "deepspeed")]
)
def test_missing_extra_is_one_line_naming_it(monkeypatch, backend, module, extra):
    from dvg_dist.parallel.backends import BackendUnavailableError, check_backend_available

    check_backend_available(backend)  # installed here
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent
    with pytest.raises(BackendUnavailableError) as info:
        check_backend_available(backend)
    message = str(info.value)
    assert "\n" not in message and f"pip install 'dvg_dist[{extra}]'" in message, message
    check_backend_available("native")  # native never needs an extra


def test_missing_extra_refuses_the_run_at_startup(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from dvg_dist.executors.local import main as generate_main

    monkeypatch.setitem(sys.modules, "yunchang", None)
    argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(tiny_checkpoint("wan")),
            "--prompt", "x", "--out", str(tmp_path / "o"), "--nproc", "2", "--attention_backend", "xfuser"]  # fmt: skip
    assert generate_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "pip install 'dvg_dist[xfuser]'" in errors[0], errors
    assert not (tmp_path / "o").exists()
