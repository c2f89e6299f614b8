"""Wan 2.2 TI2V-5B's layout (``WanPipeline(expand_timesteps=True)``, the Wan 2.2 VAE: 48 channels, 4×16×16) on the
tiny checkpoint: ``full`` equals the pipeline bit for bit, DVG feeds every stage per-token timesteps of that stage's
length, bad sizes are refused with the nearest valid ones, and sequence parallelism (root ``timestep`` split with
uneven shards) gives the one-process latent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed

from dvg_dist.config import load_config
from dvg_dist.dvg import Planner, hash_noise
from dvg_dist.dvg.planner import CostModel
from dvg_dist.models import InputError, WanAdapter
from dvg_dist.models.wan import WAN_SEQUENCE_PLAN, WAN_TI2V_SEQUENCE_PLAN
from dvg_dist.runtime.engine import Engine, Request, validate

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
CONFIG = ROOT / "configs" / "tiny-wan-ti2v.yaml"


def _config(path: Path | str, *overrides: str) -> Any:
    return load_config(CONFIG, [f"model.path={path}", *overrides])


@pytest.fixture(scope="module")
def ti2v(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("wan-ti2v")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_adapter_takes_the_ti2v_layout(ti2v):
    _, pipe = ti2v
    adapter = WanAdapter(pipe)
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.expand_timesteps
    assert adapter.spec.latent_channels == 48 and adapter.spec.vae_scale == (4, 16, 16)
    assert adapter.spec.spatial_multiple == 2 and adapter.fps == 24
    # Per instance: the TI2V plan splits the root timestep; the class (Wan 2.1 / A14B) plan is untouched.
    assert adapter.sequence_plan is WAN_TI2V_SEQUENCE_PLAN and WanAdapter.sequence_plan is WAN_SEQUENCE_PLAN
    assert "" not in WAN_SEQUENCE_PLAN.split_inputs and WAN_TI2V_SEQUENCE_PLAN.split_inputs[""] == {"timestep": 1}
    cost = WanAdapter.cost_model_from_config(dict(pipe.transformer.config))
    assert cost == CostModel.from_arch(24, 48, 512, (1, 2, 2))
    # One model for both tasks: the WanPipeline checkpoint takes an optional image; the I2V pipeline needs one.
    index = json.loads((_checkpoint_dir(ti2v) / "model_index.json").read_text())
    assert WanAdapter.image_use(index) == "optional" and adapter.accepts_image and not adapter.is_i2v
    assert WanAdapter.image_use({"_class_name": "WanPipeline"}) == "none"
    twin = WanAdapter(_i2v_pipeline(pipe))
    assert twin.is_i2v and twin.image_use({"_class_name": "WanImageToVideoPipeline"}) == "required"


def _checkpoint_dir(ti2v: tuple[Path, Any]) -> Path:
    return Path(ti2v[0])


def _i2v_pipeline(pipe: Any) -> Any:
    """The TI2V checkpoint's modules in ``WanImageToVideoPipeline(expand_timesteps=True)``, as diffusers runs it
    for image-to-video."""
    from diffusers import WanImageToVideoPipeline

    i2v = WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=pipe.transformer, expand_timesteps=True,
    )  # fmt: skip
    i2v.set_progress_bar_config(disable=True)
    return i2v


def _image() -> Any:
    from PIL import Image

    yy, xx = np.mgrid[0:128, 0:128]
    rgb = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_full_mode_equals_wan_pipeline(ti2v, guidance):
    path, pipe = ti2v
    steps = 6
    cfg = _config(path, "sampling.mode=full", f"sampling.steps={steps}", f"sampling.guidance_scale={guidance}")
    decode = guidance > 1.0  # the frames once: the pipeline's own VAE decode and postprocess
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=3)], decode=decode, progress=False)
    latents = hash_noise(3, 48, torch.arange(5), torch.arange(8), torch.arange(8))
    kw: dict[str, Any] = dict(
        prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=steps, guidance_scale=guidance,
        height=128, width=128, num_frames=17,
    )  # fmt: skip
    ref = pipe(**kw, output_type="latent").frames
    assert _rel(ours.latent, ref) == 0.0, f"full mode differs from WanPipeline by {_rel(ours.latent, ref):.2e}"
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]
    if decode:
        frames = pipe(**kw, output_type="np").frames
        expected = (np.clip(np.asarray(frames), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        assert ours.frames is not None and ours.frames.shape == (1, 17, 128, 128, 3)
        assert np.array_equal(ours.frames, expected), "decoded frames differ from the pipeline's"


def test_dvg_per_token_timesteps_follow_each_stage_grid(ti2v):
    path, pipe = ti2v
    cfg = _config(path)  # DVG at budget 0.5, 12 steps, CFG
    seen: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, float]] = []

    def record(_: Any, __: Any, kwargs: dict[str, Any]) -> None:
        t = kwargs["timestep"]
        assert bool((t == t.flatten()[0]).all()), "T2V: every token gets the same timestep"
        seen.append((tuple(kwargs["hidden_states"].shape), tuple(t.shape), t.dtype, float(t.flatten()[0])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = Engine(cfg, pipe).generate([Request(PROMPT, seed=2)], decode=False, progress=False)
    finally:
        hook.remove()
    grids = result.record.chosen["grids"]
    assert len({tuple(g) for g in grids}) > 1, "the plan should use more than one grid"
    planner = Planner(cfg.latent_grid(), 12, 0.5, cfg.dvg, 2)
    expected = []
    for stage, count in enumerate(planner.executed_counts):
        t, h, w = grids[stage]
        expected += [((1, 48, t, h, w), (1, t * (h // 2) * (w // 2)))] * count * 2  # cond + uncond per step
    assert [(hs, ts) for hs, ts, _, _ in seen] == expected
    assert {dtype for _, _, dtype, _ in seen} == {torch.float32}, "WanPipeline passes float32 per-token timesteps"
    assert [v for _, _, _, v in seen[::2]] == [t.timestep for t in result.trace]
    assert result.latent.shape == (1, 48, 5, 8, 8) and torch.isfinite(result.latent).all()


def test_i2v_full_mode_equals_wan_image_to_video_pipeline(ti2v, tmp_path):
    """Image-to-video on the same checkpoint: loaded as WanPipeline (the image is optional) or as
    WanImageToVideoPipeline, full mode equals diffusers' I2V pipeline bit for bit — the blended model input, the
    per-token timesteps with frame 0 at 0, and the image written into frame 0 after the last step."""
    path, pipe = ti2v
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    steps = 6
    cfg = _config(path, "sampling.mode=full", f"sampling.steps={steps}")
    i2v = _i2v_pipeline(pipe)
    latents = hash_noise(5, 48, torch.arange(5), torch.arange(8), torch.arange(8))
    ref = i2v(
        image=_image(), prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=steps,
        guidance_scale=5.0, height=128, width=128, num_frames=17, output_type="latent",
    ).frames  # fmt: skip
    request = Request(PROMPT, seed=5, image=str(image_path))
    validate(cfg, [request])  # the WanPipeline checkpoint takes --image
    for loaded in (pipe, i2v):
        ours = Engine(cfg, loaded).generate([request], decode=False, progress=False)
        assert _rel(ours.latent, ref) == 0.0, f"{type(loaded).__name__}: differs by {_rel(ours.latent, ref):.2e}"
    t2v = Engine(cfg, pipe).generate([Request(PROMPT, seed=5)], decode=False, progress=False).latent
    assert _rel(t2v, ref) > 0.05, "the image must change the video"


def test_dvg_i2v_keeps_the_image_in_frame_0_of_every_stage(ti2v, tmp_path):
    """DVG image-to-video: every stage's model input holds the image latent in frame 0 (sampled at the stage's
    coordinates) with timestep 0 on its tokens; x̂0 there is the image (the pinned velocity), and the final latent's
    frame 0 is exactly the image latent."""
    from dvg_dist.dvg import StageContext, sample_at, stage_coords
    from dvg_dist.dvg.planner import Grid

    path, pipe = ti2v
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _, __, k: seen.append((k["hidden_states"][:, :, 0].clone(), k["timestep"].clone())), with_kwargs=True
    )
    try:
        engine = Engine(_config(path), pipe)
        result = engine.generate([Request(PROMPT, seed=2, image=str(image_path))], decode=False, progress=False)
    finally:
        hook.remove()
    full = Grid(5, 8, 8)
    conditioning = engine.adapter.encode([PROMPT], [""], engine.config.sampling, _image(), full)
    condition = conditioning.latent_condition
    assert condition is not None and condition.shape == (1, 48, 5, 8, 8)
    grids = [Grid(*g) for g in result.record.chosen["grids"]]
    assert len(set(grids)) > 1, "the plan should use more than one grid"
    coords = stage_coords(grids)
    assert len(seen) == 2 * 12
    for k, (trace, (frame0, t)) in enumerate(zip([t for t in result.trace for _ in (0, 1)], seen)):
        grid = grids[trace.stage]
        expected = sample_at(condition, coords[trace.stage], full)[:, :, 0]
        assert torch.equal(frame0, expected), f"call {k} (stage {trace.stage + 1}): frame 0 is not the image"
        first = (grid.h // 2) * (grid.w // 2)  # frame 0's tokens lead the per-token timestep
        assert t.shape == (1, grid.t * first) and bool((t[:, :first] == 0).all())
        assert bool((t[:, first:] == trace.timestep).all())
    assert torch.equal(result.latent[:, :, 0], condition[:, :, 0]), "final frame 0 must be the image latent"
    # The pinned velocity: x̂0 = x - σ·v is the image in frame 0, whatever the model said there.
    grid = grids[0]
    ctx = StageContext(0, grid, coords[0], 0, 0.7, 5.0)
    x = torch.randn(1, 48, grid.t, grid.h, grid.w)
    v = engine.adapter.pin_velocity(torch.randn_like(x), x, ctx, conditioning, full)
    x0 = x - 0.7 * v
    assert torch.allclose(x0[:, :, 0], sample_at(condition, coords[0], full)[:, :, 0], atol=1e-5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.size=100x128", "width must be a multiple of 32 and height of 32 (nearest valid: 96x128)"),
        ("sampling.size=128x80", "nearest valid: 128x64"),
        ("sampling.frame_num=18", "frame count 18 is not 4k+1 for this model; nearest valid: 17 or 21"),
    ],
)
def test_bad_sizes_are_refused_with_the_nearest_valid(ti2v, override, message):
    path, _ = ti2v
    with pytest.raises(InputError) as err:
        validate(_config(path, override), [Request(PROMPT)])
    assert message in str(err.value) and "\n" not in str(err.value)


# -- sequence parallel ---------------------------------------------------------------------------------------


def _sp_job(rank: int, world: int, ulysses: int, ring: int, path: str, tmp: str) -> dict[str, Any] | None:
    """DVG on the sp group: the final latents (T2V, then I2V on the same engine), the shard sizes of the per-token
    timestep on this rank (T2V)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.runtime.distributed import ParallelContext

    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    par = ParallelContext(build_groups(ParallelLayout(world, ulysses, ring, num_heads=2)))
    engine = Engine(_config(path), pipe, parallel=par)
    shards: list[int] = []
    # The condition embedder sees this rank's slice of the per-token timestep (its timestep_seq_len).
    hook = pipe.transformer.condition_embedder.register_forward_pre_hook(
        lambda _, args, kwargs: shards.append(int(kwargs["timestep_seq_len"])), with_kwargs=True
    )
    result = engine.generate([Request(PROMPT, seed=11)], decode=False, progress=False)
    hook.remove()
    state = sequence_parallel_state(pipe.transformer)
    calls = 0 if state is None else state.calls
    grids = [tuple(g) for g in result.record.chosen["grids"]]
    # Image-to-video on the same engine (the image is optional on this checkpoint).
    image = Path(tmp) / f"first-{rank}.png"
    _image().save(image)
    i2v = engine.generate([Request(PROMPT, seed=11, image=str(image))], decode=False, progress=False).latent
    return {"latent": result.latent, "i2v": i2v, "shards": shards, "calls": calls, "grids": grids, "rank": rank}


@pytest.fixture(scope="module")
def one_process(ti2v, tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    path, pipe = ti2v
    engine = Engine(_config(path), pipe)
    image = tmp_path_factory.mktemp("ti2v") / "first.png"
    _image().save(image)
    t2v = engine.generate([Request(PROMPT, seed=11)], decode=False, progress=False).latent
    i2v = engine.generate([Request(PROMPT, seed=11, image=str(image))], decode=False, progress=False).latent
    return t2v, i2v


@pytest.mark.slow
@pytest.mark.parametrize(("world", "ulysses", "ring"), [(2, 2, 1), (3, 1, 3)])
def test_sequence_parallel_equals_one_process(ti2v, one_process, world, ulysses, ring, tmp_path):
    from dvg_dist.parallel import shard_sizes

    path, _ = ti2v
    reports = run_distributed(_sp_job, world, ulysses, ring, str(path), str(tmp_path), timeout=240.0)
    cfg = _config(path)
    counts = Planner(cfg.latent_grid(), 12, 0.5, cfg.dvg, 2).executed_counts
    tokens = [t * (h // 2) * (w // 2) for t, h, w in reports[0]["grids"]]
    if world == 3:
        assert any(n % world for n in tokens), f"no stage has uneven shards: {tokens}"
    for r in reports:
        assert r["calls"] > 0, "the sharded attention never ran"
        for key, reference in zip(("latent", "i2v"), one_process):
            rel = float((r[key] - reference).abs().max() / reference.abs().max())
            assert rel < 1e-4, f"rank {r['rank']} of {world}: {key} latent differs from one process by {rel:.2e}"
        # Every call's timestep shard is this rank's share of that stage's tokens (the hidden states' partition).
        expected = [shard_sizes(n, world)[r["rank"]] for n, k in zip(tokens, counts) for _ in range(2 * k)]
        assert r["shards"] == expected, f"rank {r['rank']}: timestep shards {r['shards']}, expected {expected}"
    assert all(torch.equal(r["latent"], reports[0]["latent"]) for r in reports), "ranks disagree"
    assert all(torch.equal(r["i2v"], reports[0]["i2v"]) for r in reports), "ranks disagree (I2V)"
