"""Memory options for very large models (``dvg_dist/runtime/memory.py``): FSDP2 weight sharding over the sp group,
model CPU offload, encoders on rank 0 only or offloaded after encoding — each gives the plain run's final latent,
and does what it says to the weights (parameters per rank, where each component is while it runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import run_distributed
from PIL import Image

from dvg_dist.config import load_config
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import InputError
from dvg_dist.runtime import memory
from dvg_dist.runtime.distributed import validate_layout
from dvg_dist.runtime.engine import Engine, Request

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
TOL = 1e-5


def _config(yaml: str, path: Path | str, *overrides: str):
    return load_config(ROOT / "configs" / yaml, [f"model.path={path}", "sampling.steps=6", *overrides])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -------------------------------------------------------------------------------- one process: CPU offload


def _record_active(engine: Engine, names: list[str]) -> list[tuple[str, set[str]]]:
    """Pre-hooks on the named components: which components the offload had on the device when each one ran."""
    seen: list[tuple[str, set[str]]] = []
    assert engine.offload is not None
    offload = engine.offload
    for name in names:
        module = getattr(engine.adapter.pipe, name)
        module.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, set(offload.active))))
    return seen


def test_offload_moves_each_component_on_only_while_it_runs_and_keeps_the_latent(tiny_checkpoint):
    path = tiny_checkpoint("wan-moe")
    plain = Engine(_config("tiny-wan-moe.yaml", path, "sampling.mode=full", "sampling.steps=10"))
    ref = plain.generate([Request(PROMPT, seed=5)], decode=False, progress=False)

    engine = Engine(_config("tiny-wan-moe.yaml", path, "sampling.mode=full", "sampling.steps=10", "model.offload=true"))
    assert engine.offload is not None
    assert set(engine.offload.managed) == {"text_encoder", "transformer", "transformer_2", "vae"}
    seen = _record_active(engine, ["text_encoder", "transformer", "transformer_2"])
    result = engine.generate([Request(PROMPT, seed=5)], decode=True, progress=False)

    assert torch.equal(result.latent, ref.latent), f"offload changed the latent by {_rel(result.latent, ref.latent)}"
    assert seen and all(active == {name} for name, active in seen), f"not alone on the device while running: {seen}"
    assert {name for name, _ in seen} == {"text_encoder", "transformer", "transformer_2"}
    on = [name for name, way in engine.offload.moves if way == "on"]
    # One move per phase: encoder, the high-noise expert, the low-noise one (MoE boundary), the VAE to decode.
    assert on == ["text_encoder", "transformer", "transformer_2", "vae"], engine.offload.moves
    assert engine.offload.active == set() and set(engine.offload.placements().values()) == {"cpu"}
    assert result.frames is not None and result.frames.shape == (1, 17, 64, 64, 3)


def test_text_encoder_offload_moves_only_the_encoder_and_keeps_the_latent(tiny_checkpoint):
    path = tiny_checkpoint("wan")
    ref = Engine(_config("tiny-wan.yaml", path)).generate([Request(PROMPT, seed=2)], decode=False, progress=False)
    engine = Engine(_config("tiny-wan.yaml", path, "model.text_encoder_offload=true"))
    assert engine.offload is not None and engine.offload.managed == ("text_encoder",)
    seen = _record_active(engine, ["text_encoder"])
    for _ in range(2):  # back on the device for the second request, off again after it
        result = engine.generate([Request(PROMPT, seed=2)], decode=False, progress=False)
        assert torch.equal(result.latent, ref.latent), f"differs by {_rel(result.latent, ref.latent)}"
    assert seen == [("text_encoder", {"text_encoder"})] * 4  # prompt and negative prompt, two requests
    assert engine.offload.moves == [("text_encoder", "on"), ("text_encoder", "off")] * 2
    assert engine.offload.placements() == {"text_encoder": "cpu"}


def test_memory_probes_report_bytes_and_phases(tiny_checkpoint):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_checkpoint("wan"), use_safetensors=True)
    sizes = memory.component_bytes(pipe)
    assert set(sizes) == {"text_encoder", "transformer", "transformer_2", "vae"}
    assert sizes["transformer_2"] == 0  # not in a Wan 2.1 checkpoint
    expected = sum(p.numel() * 4 for p in pipe.transformer.parameters()) + sum(
        b.numel() * b.element_size() for b in pipe.transformer.buffers()
    )
    assert sizes["transformer"] == expected
    assert memory.component_devices(pipe) == {"text_encoder": "cpu", "transformer": "cpu", "vae": "cpu"}

    # The phase probe in a fresh process: in this long-lived one, freed pages may be reused without the RSS moving.
    code = (
        "import torch; from dvg_dist.runtime import memory\n"
        "probe = memory.PhaseMemory()\n"
        "with probe.phase('alloc'):\n"
        "    block = torch.ones(64 * 2**20 // 4); del block\n"
        "with probe.phase('idle'):\n"
        "    pass\n"
        "p = probe.peaks\n"
        "print(p['alloc'] - probe.before['alloc'], probe.resettable, p['idle'] < p['alloc'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    grew, resettable, idle_lower = out.stdout.split()
    assert int(grew) >= 60 * 2**20  # the touched 64 MiB block shows in the phase's peak
    if resettable == "True":  # Linux: the high-water mark starts again at each phase
        assert idle_lower == "True"
    now = memory.current_memory()
    assert memory.peak_memory() >= now > 0


# ----------------------------------------------------------------------------------------- refused combinations


def test_bad_combinations_are_refused_in_one_line_before_loading(tiny_checkpoint, capsys):
    path = tiny_checkpoint("wan")
    with pytest.raises(InputError, match="shard_weights shards the transformer over the sequence-parallel ranks"):
        validate_layout(_config("tiny-wan.yaml", path, "parallel.shard_weights=true"), 1)
    with pytest.raises(InputError, match="sequence-parallel group, which has 1 rank"):
        validate_layout(_config("tiny-wan.yaml", path, "parallel.shard_weights=true", "parallel.cfg_parallel=true"), 2)
    validate_layout(_config("tiny-wan.yaml", path, "parallel.shard_weights=true"), 2)  # sp 2: fine
    # The API refuses it too, before any weight loads (the path does not even exist).
    with pytest.raises(InputError, match="run on 2 or more ranks"):
        Engine(_config("tiny-wan.yaml", "/nonexistent/checkpoint", "parallel.shard_weights=true"))

    for args in (["--shard_weights"], ["--nproc", "2", "--use_cfg_parallel", "--use_fsdp"]):
        code = generate_main(["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(path),
                              "--prompt", "x", "--out", "/nonexistent/never-written", *args])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "--shard_weights" in err, (args, code, err)


# -------------------------------------------------------------------------------- several processes (gloo)


def _aligned(pipe: Any) -> Any:
    """Every weight in its own (64-byte aligned) storage. ``from_pretrained`` leaves some at 4-byte offsets of the
    safetensors buffer, where MKL's float32 GEMV sums in another order; FSDP2's all-gathered weights are aligned."""
    for module in memory.modules(pipe).values():
        for p in module.parameters():
            p.data = p.data.clone()
    return pipe


def _shard_job(rank: int, world: int, path: str, layout: tuple[int, int, int]) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import DiffusionPipeline

    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.runtime.distributed import ParallelContext

    ulysses, ring, cfg_degree = layout
    par = ParallelContext(build_groups(ParallelLayout(world, ulysses, ring, cfg_degree, num_heads=2)))
    extra = ["parallel.cfg_parallel=true"] if cfg_degree == 2 else []

    def config(*more: str):
        return _config("tiny-wan-moe.yaml", path, "sampling.steps=10", *extra, *more)

    def run(engine: Engine) -> torch.Tensor:
        return engine.generate([Request(PROMPT, seed=4)], decode=False, progress=False).latent

    out: dict[str, Any] = {"plain": run(Engine(config(), parallel=par))}
    sharded = Engine(config("parallel.shard_weights=true"), parallel=par)
    out["sharded"] = run(sharded)
    out["reports"] = sharded.shard_reports
    out["fsdp"] = all(memory.is_sharded(m) for m in sharded.adapter.transformers())
    state = sequence_parallel_state(sharded.adapter.pipe.transformer)
    out["sp_attention_calls"] = 0 if state is None else state.calls
    out["bytes"] = memory.component_bytes(sharded.adapter.pipe)
    if cfg_degree == 1:
        both = Engine(config("parallel.shard_weights=true", "model.offload=true"), parallel=par)
        out["sharded_offload"] = run(both)
        out["offload_reports"] = both.shard_reports
        assert both.offload is not None
        out["offload_managed"] = both.offload.managed
        # The same weights in aligned storage, plain then sharded in place: the very same arithmetic.
        pipe = _aligned(DiffusionPipeline.from_pretrained(path, use_safetensors=True))
        out["aligned_plain"] = run(Engine(config(), pipe, parallel=par))
        out["aligned_sharded"] = run(Engine(config("parallel.shard_weights=true"), pipe, parallel=par))
    return out


@pytest.mark.slow
def test_shard_weights_over_two_ranks_keeps_the_latent_and_halves_the_parameters(tiny_checkpoint):
    path = str(tiny_checkpoint("wan-moe"))
    results = run_distributed(_shard_job, 2, path, (2, 1, 1), timeout=300)
    for rank, r in enumerate(results):
        rel = _rel(r["sharded"], r["plain"])
        print(f"rank {rank}: sharded vs plain relative max diff {rel:.2e}")
        assert rel < TOL, f"rank {rank}: sharded latent differs from the plain run by {rel:.2e}"
        assert torch.equal(r["aligned_sharded"], r["aligned_plain"]), (
            f"rank {rank}: with aligned weights sharding must not change a bit; "
            f"differs by {_rel(r['aligned_sharded'], r['aligned_plain']):.2e}"
        )
        rel_off = _rel(r["sharded_offload"], r["plain"])
        print(f"rank {rank}: sharded + offload vs plain relative max diff {rel_off:.2e}")
        assert rel_off < TOL, f"rank {rank}: sharded + offload differs by {rel_off:.2e}"
        assert r["fsdp"] and r["sp_attention_calls"] > 0, "FSDP2 must wrap both experts and keep the sp hooks"
        assert set(r["reports"]) == {"transformer", "transformer_2"}, "both experts of the MoE are sharded"
        assert all(rep.cpu_offload for rep in r["offload_reports"].values())
        assert set(r["offload_managed"]) == {"text_encoder", "vae"}, "sharded transformers are FSDP2's to offload"
    for name in ("transformer", "transformer_2"):
        reports = [r["reports"][name] for r in results]
        before = reports[0].params_before
        after = [rep.params_after for rep in reports]
        print(f"{name}: {before} parameters; per rank after sharding {after}")
        assert sum(after) == before, f"{name}: shards {after} do not add up to the model's {before} parameters"
        assert all(abs(a - before / 2) <= 0.02 * before for a in after), f"{name}: {after} is not about half"
        assert all(rep.blocks == 2 for rep in reports)
    # component_bytes counts local shards (plus the unsharded rotary buffers, as big as this tiny model's weights).
    assert results[0]["bytes"]["transformer"] < memory.module_bytes(_unsharded(path))


def _unsharded(path: str) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(path, subfolder="transformer")


@pytest.mark.slow
def test_shard_weights_with_cfg_parallel_shards_each_half_over_its_own_sp_group(tiny_checkpoint):
    path = str(tiny_checkpoint("wan-moe"))
    results = run_distributed(_shard_job, 4, path, (2, 1, 2), timeout=400)
    for rank, r in enumerate(results):
        rel = _rel(r["sharded"], r["plain"])
        print(f"rank {rank} (cfg 2 × ulysses 2): sharded vs plain relative max diff {rel:.2e}")
        assert rel < TOL, f"rank {rank}: sharded latent differs from the plain run by {rel:.2e}"
        assert all(rep.sp_degree == 2 for rep in r["reports"].values())
    before = results[0]["reports"]["transformer"].params_before
    halves = [[results[k]["reports"]["transformer"].params_after for k in ks] for ks in ((0, 1), (2, 3))]
    assert all(sum(h) == before for h in halves), f"each cfg half must hold the model once: {halves} vs {before}"


def _rank0_job(rank: int, world: int, path: str, image: str) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext

    par = ParallelContext(build_groups(ParallelLayout(world, world, 1, num_heads=2)))
    req = Request(PROMPT, seed=7, image=image)
    each = Engine(_config("tiny-wan-i2v.yaml", path), parallel=par)
    rank0 = Engine(_config("tiny-wan-i2v.yaml", path, "parallel.text_encoder=rank0", "model.text_encoder_offload=true"),
                   parallel=par)  # fmt: skip
    pipe = rank0.adapter.pipe
    return {
        "each": each.generate([req], decode=False, progress=False).latent,
        "rank0": rank0.generate([req], decode=False, progress=False).latent,
        "encoders": {name: getattr(pipe, name) is not None for name in ("text_encoder", "image_encoder")},
        "bytes": memory.component_bytes(pipe),
        "moves": None if rank0.offload is None else rank0.offload.moves,
    }


@pytest.mark.slow
def test_text_encoder_on_rank0_only_is_not_loaded_elsewhere_and_keeps_the_latent(tiny_checkpoint, tmp_path):
    image = tmp_path / "first.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype("uint8")).save(image)
    results = run_distributed(_rank0_job, 2, str(tiny_checkpoint("wan-i2v")), str(image), timeout=300)
    for rank, r in enumerate(results):
        assert torch.equal(r["rank0"], r["each"]), (
            f"rank {rank}: rank0 encoding differs by {_rel(r['rank0'], r['each'])}"
        )
    r0, r1 = results
    assert r0["encoders"] == {"text_encoder": True, "image_encoder": True}
    assert r1["encoders"] == {"text_encoder": False, "image_encoder": False}, "rank 1 must not load the encoders"
    assert r1["bytes"]["text_encoder"] == r1["bytes"]["image_encoder"] == 0 < r0["bytes"]["text_encoder"]
    # Rank 0 offloads what it encoded with (I2V: the VAE encodes the image) back to the CPU; rank 1 has none.
    assert r0["moves"] == [("image_encoder", "on"), ("text_encoder", "on"), ("image_encoder", "off"),
                           ("text_encoder", "off")], r0["moves"]  # fmt: skip
    assert r1["moves"] is None


def _family_job(rank: int, world: int, checkpoints: dict[str, str]) -> dict[str, Any]:
    """Each family's transformer(s): sequence-parallel output, then sharded in place, same inputs."""
    from test_parallel_models import FAMILIES, _inputs, _load

    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.parallel.hooks import parallelize_transformer

    groups = build_groups(ParallelLayout(world, world, 1))
    out = {}
    for family, path in checkpoints.items():
        plan, subs, grids = FAMILIES[family]
        for sub in subs:
            model = _load(family, path, sub)
            parallelize_transformer(model, plan, groups)
            kwargs = _inputs(family, model, grids[0], 0)
            with torch.no_grad():
                ref = model(**kwargs)[0]
                report = memory.shard_transformer(model, groups, torch.device("cpu"))
                sharded = model(**kwargs)[0]
            out[f"{family}/{sub}"] = (_rel(sharded, ref), report)
    return out


@pytest.mark.slow
def test_shard_transformer_every_family(tiny_checkpoint):
    checkpoints = {family: str(tiny_checkpoint(family)) for family in ("wan-i2v", "hunyuan", "hunyuan15")}
    results = run_distributed(_family_job, 2, checkpoints, timeout=300)
    for name, (rel, report) in results[0].items():
        after = [r[name][1].params_after for r in results]
        print(f"{name}: {report.blocks} blocks + root, parameters {report.params_before} -> per rank {after}, "
              f"relative max diff {rel:.2e}")  # fmt: skip
        assert rel < TOL, f"{name}: sharded output differs from the unsharded one by {rel:.2e}"
        assert report.blocks > 0 and sum(after) == report.params_before, f"{name}: {after} vs {report}"
