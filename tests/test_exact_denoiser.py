"""The exact denoiser (dvg_dist/data/exact.py): its velocity against a brute-force reference, its limit at σ → 0,
the closed-form VAE against the real one, and full and DVG runs through the real WanPipeline + engine that end on
a dataset clip of the caption; plus the benchmark's smoke run (bench/fidelity_exact.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from dvg_dist.config import load_config
from dvg_dist.data import procedural
from dvg_dist.data.exact import (
    DatasetSpec,
    ExactDenoiser,
    Variant,
    block_decode,
    block_encode,
    build_dataset,
    exact_pipeline,
    frames_of,
    render_variant,
    sample_variants,
)
from dvg_dist.dvg.planner import Grid
from dvg_dist.dvg.resize import resize
from dvg_dist.runtime.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "dvg-demo-wan"
CONFIG = ROOT / "configs" / "demo-wan.yaml"


@pytest.fixture(scope="module")
def base() -> DiffusionPipeline:
    torch.set_num_threads(1)  # the shared 2-core CI machine: 1 thread is the fastest here
    pipe = DiffusionPipeline.from_pretrained(str(DEMO), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def small(base):
    """4 captions (texture, motion, mix, texture) x 4 variants, encoded with the VAE's closed form."""
    spec = DatasetSpec(tuple(procedural.held_out_captions(4)), variants=4, encoder="block")
    dataset = build_dataset(spec, base.vae)
    return dataset, exact_pipeline(base, dataset)


def _toy(n: int = 5, k: int = 2, seed: int = 0) -> tuple[ExactDenoiser, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 3, 2, 4, 4, generator=g)
    embeds = torch.randn(k, 4, 3, generator=g)
    clip_caption = torch.tensor([i % k for i in range(n)])
    return ExactDenoiser.from_dataset(latents, clip_caption, embeds), latents, embeds


def _brute_velocity(x: torch.Tensor, sigma: float, data: list[list[float]]) -> list[float]:
    """``v = (x - Σ w_i y_i) / σ`` with ``w ∝ exp(-|x - (1-σ) y_i|² / (2σ²))``, element by element in float64."""
    xs = [float(v) for v in x.flatten()]
    logits = []
    for y in data:
        d = 0.0
        for xv, yv in zip(xs, y):
            d += (xv - (1 - sigma) * yv) ** 2
        logits.append(-d / (2 * sigma * sigma))
    top = max(logits)
    w = [math.exp(v - top) for v in logits]
    total = sum(w)
    mean = [sum(w[i] * data[i][j] for i in range(len(data))) / total for j in range(len(xs))]
    return [(xs[j] - mean[j]) / sigma for j in range(len(xs))]


@pytest.mark.parametrize("grid", [(2, 4, 4), (1, 2, 2)])
def test_velocity_equals_a_brute_force_reference(grid):
    model, latents, embeds = _toy()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *grid, generator=g, dtype=torch.float64)
    # element 0 conditioned on caption 1 (clips 1, 3); element 1 an unknown prompt: every clip
    prompts = torch.stack([embeds[1], torch.randn(4, 3, generator=g)])
    timestep = torch.tensor([700.0, 250.0])
    v = model(hidden_states=x, timestep=timestep, encoder_hidden_states=prompts, return_dict=False)[0]
    assert v.dtype == torch.float64 and v.shape == x.shape
    assert model.last_match == [1, -1]
    data = resize(latents.double(), Grid(*grid)).flatten(1).tolist()  # the dataset at this grid, DVG's resize
    for b, (sigma, clips) in enumerate([(0.7, [1, 3]), (0.25, [0, 1, 2, 3, 4])]):
        want = _brute_velocity(x[b], sigma, [data[i] for i in clips])
        assert v[b].flatten().tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_sigma_is_read_from_the_timestep_as_the_adapter_passes_it():
    model, _, _ = _toy()
    # UniPC's int64 timesteps are floor(1000 σ): the middle of the interval; FlowMatchEuler's floats: exact
    ints = model.sigmas_of(torch.tensor([999, 12, 0]), 3)
    assert ints.tolist() == pytest.approx([0.9995, 0.0125, 0.0005], abs=1e-12)
    floats = model.sigmas_of(torch.tensor([880.5, 1.0]), 2)
    assert floats.tolist() == pytest.approx([0.8805, 0.001], abs=1e-7)
    assert model.sigmas_of(torch.tensor(500.0), 4).tolist() == pytest.approx([0.5] * 4)


def test_at_small_sigma_the_posterior_mean_is_the_nearest_dataset_latent():
    model, latents, _ = _toy(n=8, k=1)
    g = torch.Generator().manual_seed(3)
    for k in range(8):
        # a point nearer to clip k than to any other (a small step from it towards another clip)
        x = latents[k] + 0.2 * (latents[(k + 1) % 8] - latents[k]) + 0.01 * torch.randn(latents[k].shape, generator=g)
        nearest = int(((latents - x) ** 2).flatten(1).sum(1).argmin())
        assert nearest == k
        weights, mean = model.posterior(x[None], torch.tensor([1e-4]))
        assert int(weights[0].argmax()) == k and float(weights[0, k]) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(mean[0], latents[k].double(), atol=1e-12)


def test_variants_render_the_caption_with_an_offset_path_and_phase():
    caption = "a white square moving slowly up-right over a fine blue and yellow checkered background"
    p = procedural.parse_caption(caption)
    canonical = procedural.make_clip(p, 9, 64, 64)
    same = render_variant(p, Variant(), 9, 64, 64)
    assert np.array_equal(same.frames, canonical.frames) and np.allclose(same.trajectory, canonical.trajectory)
    moved = render_variant(p, Variant(5.0, -3.0, 4, 0), 9, 64, 64)
    assert np.allclose(moved.trajectory - canonical.trajectory, [5.0, -3.0])
    assert not np.array_equal(moved.frames[0, :4, :4], canonical.frames[0, :4, :4])  # the checker's phase flipped
    variants = sample_variants(p, 12, 10.0, np.random.default_rng(0))
    assert variants[0] == Variant() and len(set(variants)) == 12
    assert all(abs(v.offset_x) <= 10 and abs(v.offset_y) <= 10 and v.phase_x in (0, 4) for v in variants)


def test_the_closed_form_vae_matches_the_demo_vae(base):
    caption = procedural.held_out_captions(1)[0]
    clip = render_variant(procedural.parse_caption(caption), Variant(2.5, 1.0, 4, 4), 9, 32, 32)
    video = torch.from_numpy(clip.video())[None]
    with torch.no_grad():
        z = base.vae.encode(video).latent_dist.mode()
    assert float((block_encode(video) - z).abs().max()) < 1e-3
    mean = torch.tensor(base.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(base.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (z - mean) / std
    from dvg_dist.models.wan import WanAdapter

    real = WanAdapter(base).decode(latents)
    fast = frames_of(latents, base.vae)
    assert real.shape == fast.shape == (1, 9, 32, 32, 3)
    assert int(np.abs(real.astype(int) - fast.astype(int)).max()) <= 1
    assert torch.allclose(block_decode(block_encode(video)), torch.nn.functional.avg_pool3d(video, (1, 4, 4))
                          .repeat_interleave(4, 3).repeat_interleave(4, 4), atol=1e-6)  # fmt: skip


def test_the_dataset_cache_round_trips(base, tmp_path):
    spec = DatasetSpec(tuple(procedural.held_out_captions(2)), variants=2, encoder="block")
    first = build_dataset(spec, base.vae, tmp_path)
    again = build_dataset(spec, base.vae, tmp_path)
    assert first.info["cache"] == "written" and again.info["cache"] == "read" and first.key == again.key
    assert torch.equal(first.latents, again.latents) and len(again) == 4
    assert again.clips_of(1) == [2, 3]
    other = DatasetSpec(spec.captions, variants=2, max_offset=6.0, encoder="block")
    assert build_dataset(other, base.vae, tmp_path).key != first.key


def test_the_denoiser_is_a_diffusers_module_that_saves_and_loads(small, tmp_path):
    _, pipe = small
    model = pipe.transformer
    assert tuple(model.config.patch_size) == (1, 2, 2) and model.config.num_attention_heads == 4
    model.save_pretrained(tmp_path)
    loaded = ExactDenoiser.from_pretrained(tmp_path)
    assert torch.equal(loaded.latents, model.latents) and torch.equal(loaded.clip_caption, model.clip_caption)
    assert loaded.dtype == torch.float32


def test_an_engine_full_run_lands_on_a_dataset_clip_of_the_caption(small):
    dataset, pipe = small
    separation = dataset.separation()
    cfg = load_config(CONFIG, ["sampling.mode=full", "sampling.steps=25", "sampling.guidance_scale=1.0"])
    engine = Engine(cfg, pipe=pipe)
    requests = [Request(dataset.captions[ci], seed=seed) for ci in (0, 1) for seed in (0, 7)]
    result = engine.generate(requests, decode=False, progress=False)
    assert pipe.transformer.last_match == [0, 0, 1, 1]
    idx, dist = dataset.nearest(result.latent)
    for k, (ci, _) in enumerate([(0, 0), (0, 7), (1, 0), (1, 7)]):
        assert int(dataset.clip_caption[idx[k]]) == ci
        assert float(dist[k] / separation[idx[k]]) < 0.01, "the run did not land on a clip"


def test_a_dvg_run_through_the_python_api_lands_on_a_clip(small):
    from dvg_dist import DVG

    dataset, pipe = small
    pipe.transformer.seen_grids.clear()
    # model.path stays the demo checkpoint: DVG validates sizes and budgets against its configs, whose geometry the
    # exact denoiser copies (the transformer that runs is the one in ``pipe``)
    dvg = DVG(pipe, config=str(CONFIG), overrides={"sampling.guidance_scale": 1.0})
    assert dvg.engine.adapter.pipe.transformer is pipe.transformer
    out = dvg.generate(dataset.captions[2], seed=3, budget=0.5, steps=25, mode="dvg", output_type="latent")
    idx, dist = dataset.nearest(out.latent)
    assert int(dataset.clip_caption[idx[0]]) == 2
    assert float(dist[0] / dataset.separation()[idx[0]]) < 0.01
    assert {st.grid for st in out.plan.stages} == pipe.transformer.seen_grids  # the model ran at every stage grid
    assert len(pipe.transformer.seen_grids) == 4


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_fidelity_exact", ROOT / "bench" / "fidelity_exact.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_smoke_run(tmp_path):
    bench = _bench()
    out = tmp_path / "fe.json"
    assert bench.main(["--smoke", "--out", str(out), "--no-progress", "--cache", str(tmp_path / "cache")]) == 0
    result = json.loads(out.read_text())
    full = next(s for s in result["summary"] if s["mode"] == "full" and s["kind"] == "all")
    assert (
        full["same_clip"] == 1.0
        and full["landing_max"] < 0.01
        and full["psnr_capped"] == pytest.approx(bench.PSNR_CAP_DB)
    )
    assert {s["mode"] for s in result["summary"]} >= {"dvg", "spatial-only", "fixed", "trilinear", "random-renoise"}
    runs = bench.rows_of(result["runs"])
    assert len(runs) == 60 and all(r["in_caption"] for r in runs)
    assert result["decode_check"]["max_abs_levels"] <= 1
    assert {p["probe"] for p in result["probes"]} == set(bench.PROBES)
    assert bench.hf_energy(np.zeros((2, 16, 16, 3), np.uint8)) == 0.0
