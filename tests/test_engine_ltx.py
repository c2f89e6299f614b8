"""LTX-Video (``LTXPipeline``: packed ``[B, S, C]`` latents, patch 1, the 8×32×32 VAE, CFG as one batch, the
dynamically shifted FlowMatch schedule with ``shift_terminal``) on the tiny checkpoint: ``full`` equals the pipeline
bit for bit, DVG runs reduced stages with every transition on the scheduler's own σ, bad sizes are refused with the
nearest valid ones before any weight loads, the tiled decode equals diffusers', and sequence parallelism (uneven
shards, the batched CFG conditioning broadcast from rank 0) gives the one-process latent."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed

from dvg_dist.config import ConfigError, load_config
from dvg_dist.dvg import DVGOptions, Grid, Mode, Planner, SamplerConfig, flow_sigmas, hash_noise, sample
from dvg_dist.dvg.planner import CostModel
from dvg_dist.models import ADAPTERS, InputError, LTXVideoAdapter, read_model_index
from dvg_dist.models.ltx import LTX_SEQUENCE_PLAN, pack, unpack
from dvg_dist.runtime.engine import Engine, Request, validate
from dvg_dist.runtime.solver import DynamicShiftSolver, dynamic_mu, make_solver, scheduler_shift
from dvg_dist.runtime.vae import TileSettings, check_tiling, decode_video

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
CONFIG = ROOT / "configs" / "tiny-ltx.yaml"
FULL = Grid(5, 8, 8)  # 33 frames at 256x256 under the 8x32x32 VAE
C = 16


def _config(path: Path | str, *overrides: str) -> Any:
    return load_config(CONFIG, [f"model.path={path}", *overrides])


@pytest.fixture(scope="module")
def ltx(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("ltx")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_adapter_declares_the_ltx_layout(ltx):
    path, pipe = ltx
    assert ADAPTERS[read_model_index(path)["_class_name"]] is LTXVideoAdapter
    adapter = LTXVideoAdapter(pipe)
    assert adapter.spec.latent_channels == C and adapter.spec.vae_scale == (8, 32, 32)
    assert adapter.spec.patch == (1, 1, 1) and adapter.spec.spatial_multiple == 1 and adapter.fps == 25
    assert adapter.rope_interpolation_scale == (8 / 25, 32, 32)  # the pipeline's, at its default frame_rate 25
    assert adapter.sequence_plan is LTX_SEQUENCE_PLAN
    # Cross-attention is flagged, so the sequence-parallel hooks leave it local; self-attention is not.
    blocks = pipe.transformer.transformer_blocks
    assert all(b.attn2.is_cross_attention and not getattr(b.attn1, "is_cross_attention", False) for b in blocks)
    assert LTXVideoAdapter.cost_model_from_config(dict(pipe.transformer.config)) == CostModel.from_arch(
        32, 128, 128, (1, 1, 1)
    )
    # The JSON configs alone give the same geometry (the VAE's saved ratios are null: derived as the class does).
    assert json.loads((path / "vae" / "config.json").read_text())["spatial_compression_ratio"] is None
    assert LTXVideoAdapter.read_spec(path) == adapter.spec
    # Packing is the pipeline's own, a permutation: one token per latent voxel in (T, H, W) order.
    x = torch.randn(2, C, *FULL.as_list())
    tokens = pack(x)
    assert tokens.shape == (2, FULL.t * FULL.h * FULL.w, C) and torch.equal(tokens[1, 9], x[1, :, 0, 1, 1])
    assert torch.equal(unpack(tokens, FULL), x)
    # One checkpoint for both tasks: as LTXPipeline the image is optional; as LTXImageToVideoPipeline it is needed.
    assert LTXVideoAdapter.image_use(read_model_index(path)) == "optional" and adapter.accepts_image
    twin = LTXVideoAdapter(_i2v_pipeline(pipe))
    assert twin.is_i2v and not adapter.is_i2v
    assert LTXVideoAdapter.image_use({"_class_name": "LTXImageToVideoPipeline"}) == "required"
    with pytest.raises(InputError, match=r"image-to-video checkpoint \(LTXImageToVideoPipeline\): pass --image") as err:
        twin.encode([PROMPT], None, _config(path).sampling, image=None, grid=FULL)
    assert "\n" not in str(err.value)
    assert "LTXConditionPipeline" not in ADAPTERS, "LTXConditionPipeline's conditions do not fit DVG's stage grids"


def _i2v_pipeline(pipe: Any) -> Any:
    """The tiny checkpoint's modules in ``LTXImageToVideoPipeline``, as diffusers runs image-to-video."""
    from diffusers import LTXImageToVideoPipeline

    i2v = LTXImageToVideoPipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        transformer=pipe.transformer,
    )  # fmt: skip
    i2v.set_progress_bar_config(disable=True)
    return i2v


def _image() -> Any:
    from PIL import Image

    yy, xx = np.mgrid[0:128, 0:128]
    rgb = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb)


def _first_frame(i2v: Any, seed: int) -> torch.Tensor:
    """The image latent ``LTXImageToVideoPipeline.prepare_latents`` puts in frame 0, drawn from ``generator=[seed]``."""
    pixels = i2v.video_processor.preprocess(_image(), height=256, width=256)
    generator = [torch.Generator().manual_seed(seed)]
    packed, mask = i2v.prepare_latents(pixels, 1, C, 256, 256, 33, torch.float32, torch.device("cpu"), generator)
    assert torch.equal(unpack(mask.unsqueeze(-1), FULL)[:, 0, 0], torch.ones(1, 8, 8)), "mask 1 on frame 0 only"
    return unpack(packed, FULL)[:, :, :1]


def test_i2v_full_mode_equals_ltx_image_to_video_pipeline(ltx, tmp_path):
    """Image-to-video on the same checkpoint, loaded as LTXPipeline (the image optional) or LTXImageToVideoPipeline:
    full mode equals diffusers' I2V pipeline bit for bit with CFG — the image latent in frame 0 (sampled from the
    request's generator), per-token timesteps 0 on it, frame 0 never moving."""
    path, pipe = ltx
    i2v = _i2v_pipeline(pipe)
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    steps = 6
    cfg = _config(path, "sampling.mode=full", f"sampling.steps={steps}")
    first = _first_frame(i2v, seed=5)
    latents = hash_noise(5, C, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w))
    latents[:, :, :1] = first  # what the pipeline's prepare_latents would hand its loop
    seen: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _, __, k: seen.append(k["timestep"]), with_kwargs=True)
    try:
        ref = i2v(
            image=_image(), prompt=PROMPT, negative_prompt="", latents=pack(latents), num_inference_steps=steps,
            guidance_scale=3.0, height=256, width=256, num_frames=33, output_type="latent",
        ).frames  # fmt: skip
        reference_calls = len(seen)
        request = Request(PROMPT, seed=5, image=str(image_path))
        validate(cfg, [request])  # the LTXPipeline checkpoint takes --image
        results = [Engine(cfg, loaded).generate([request], decode=False, progress=False) for loaded in (pipe, i2v)]
    finally:
        hook.remove()
    ref = unpack(ref, FULL)
    for loaded, ours in zip(("LTXPipeline", "LTXImageToVideoPipeline"), results):
        assert _rel(ours.latent, ref) == 0.0, f"{loaded}: differs from the I2V pipeline by {_rel(ours.latent, ref):.2e}"
        assert torch.equal(ours.latent[:, :, :1], first), "frame 0 must be the image latent"
    # The engine's calls pass the pipeline's timesteps: [uncond, cond] per token, 0 on frame 0's 64 tokens.
    assert reference_calls == steps and len(seen) == 3 * steps
    assert all(torch.equal(a, b) for a, b in zip(seen[:steps], seen[steps : 2 * steps]))
    assert seen[0].shape == (2, 5 * 8 * 8) and bool((seen[0][:, :64] == 0).all()) and bool((seen[0][:, 64:] > 0).all())
    t2v = Engine(cfg, pipe).generate([Request(PROMPT, seed=5)], decode=False, progress=False).latent
    assert _rel(t2v, ref) > 0.05, "the image must change the video"


def test_dvg_i2v_keeps_the_image_in_frame_0_of_every_stage(ltx, tmp_path):
    """DVG image-to-video: every stage's packed model input holds the image latent (sampled at the stage's
    coordinates) on frame 0's tokens with timestep 0 there, and the final latent's frame 0 is the image latent."""
    from dvg_dist.dvg import sample_at, stage_coords

    path, pipe = ltx
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    seen: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]] = []

    def record(_: Any, __: Any, k: dict[str, Any]) -> None:
        seen.append((k["hidden_states"].clone(), k["timestep"].clone(), (k["num_frames"], k["height"], k["width"])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine = Engine(_config(path), pipe)
        result = engine.generate([Request(PROMPT, seed=2, image=str(image_path))], decode=False, progress=False)
    finally:
        hook.remove()
    first = _first_frame(_i2v_pipeline(pipe), seed=2)
    assert torch.equal(result.latent[:, :, :1], first)
    grids = [Grid(*g) for g in result.record.chosen["grids"]]
    assert len(set(grids)) > 2, f"the plan should reduce the early stages: {grids}"
    coords = stage_coords(grids)
    condition = first.expand(-1, -1, FULL.t, -1, -1)
    assert len(seen) == len(result.trace) == 12
    for trace, (tokens, t, grid) in zip(result.trace, seen):
        g = grids[trace.stage]
        assert grid == (g.t, g.h, g.w)
        expected = sample_at(condition, coords[trace.stage], FULL)[:, :, :1]
        frame0 = g.h * g.w
        assert torch.equal(unpack(tokens[1:, :frame0], Grid(1, g.h, g.w)), expected), f"stage {trace.stage + 1}"
        assert t.shape == (2, g.t * frame0) and bool((t[:, :frame0] == 0).all())
        assert bool((t[:, frame0:] == trace.timestep).all())


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_full_mode_equals_ltx_pipeline(ltx, guidance):
    path, pipe = ltx
    steps = 6
    cfg = _config(path, "sampling.mode=full", f"sampling.steps={steps}", f"sampling.guidance_scale={guidance}")
    decode = guidance > 1.0  # the frames once: the pipeline's own denormalisation, timestep-conditioned decode
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=3)], decode=decode, progress=False)
    latents = hash_noise(3, C, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w))
    kw: dict[str, Any] = dict(
        prompt=PROMPT, negative_prompt="", latents=pack(latents), num_inference_steps=steps, guidance_scale=guidance,
        height=256, width=256, num_frames=33,
    )  # fmt: skip
    ref = unpack(pipe(**kw, output_type="latent").frames, FULL)  # the pipeline returns its packed latent
    assert _rel(ours.latent, ref) == 0.0, f"full mode differs from LTXPipeline by {_rel(ours.latent, ref):.2e}"
    # The pipeline's own dynamically shifted, terminal-stretched schedule.
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]
    assert float(pipe.scheduler.sigmas[-2]) == pytest.approx(0.1)  # shift_terminal
    assert ours.record.stages[0]["shift"] == math.exp(dynamic_mu(pipe.scheduler, FULL))
    if decode:
        frames = pipe(**kw, output_type="np").frames
        expected = (np.clip(np.asarray(frames), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        assert ours.frames is not None and ours.frames.shape == (1, 33, 256, 256, 3)
        assert np.array_equal(ours.frames, expected), "decoded frames differ from the pipeline's"


def test_decode_timestep_and_noise_equal_the_pipeline(ltx, tiny_checkpoint):
    """The 0.9.1+ recipes' decode settings: the VAE gets ``decode_timestep`` and decodes ``(1 - s)·z + s·ε`` with ε
    from the request's generator, as LTXPipeline given ``generator=`` and ``latents=``: the same frames. Refused, in
    one line, for a family whose VAE takes no timestep."""
    path, pipe = ltx
    steps = 4
    base = ["sampling.mode=full", f"sampling.steps={steps}", "sampling.guidance_scale=1.0"]
    cfg = _config(path, *base, "sampling.decode_timestep=0.05", "sampling.decode_noise_scale=0.025")
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=3)], decode=True, progress=False)
    latents = hash_noise(3, C, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w))
    frames = pipe(
        prompt=PROMPT, latents=pack(latents), num_inference_steps=steps, guidance_scale=1.0, height=256, width=256,
        num_frames=33, decode_timestep=0.05, decode_noise_scale=0.025, generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).frames  # fmt: skip
    expected = (np.clip(np.asarray(frames), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    assert ours.frames is not None and np.array_equal(ours.frames, expected), "decoded frames differ from LTXPipeline's"
    plain = Engine(_config(path, *base), pipe).generate([Request(PROMPT, seed=3)], decode=True, progress=False)
    assert torch.equal(plain.latent, ours.latent) and not np.array_equal(plain.frames, ours.frames)
    with pytest.raises(ConfigError, match=r"sampling.decode_noise_scale must be in \[0, 1\]; got 2.0"):
        _config(path, "sampling.decode_noise_scale=2")
    wan = tiny_checkpoint("wan")
    wan_cfg = load_config(ROOT / "configs" / "tiny-wan.yaml", [f"model.path={wan}", "sampling.decode_timestep=0.03"])
    with pytest.raises(InputError, match="are LTX-Video's VAE settings; this wan checkpoint has none") as err:
        validate(wan_cfg, [Request(PROMPT)])
    assert "\n" not in str(err.value)


def test_dynamic_shift_solver_owns_the_transitions(ltx):
    """DVG's stages on the scheduler's own σ: the model's own shift is e^mu at the full latent (set with that exact
    mu), an explicit one is mu = ln k, and every call's σ (what x̂0 and the re-noise read) is the stretched schedule's,
    not ``flow_sigmas``'."""
    _, pipe = ltx
    sched = pipe.scheduler
    mu = dynamic_mu(sched, FULL)
    # LTXPipeline's calculate_shift on T·H·W = 320 voxels with the released scheduler keys.
    assert mu == pytest.approx(0.95 + (320 - 1024) * (2.05 - 0.95) / (4096 - 1024))
    assert scheduler_shift(sched, FULL) == math.exp(mu)
    with pytest.raises(ValueError, match="needs the latent grid"):
        scheduler_shift(sched)
    solver = make_solver(sched, 12, grid=FULL)
    assert isinstance(solver, DynamicShiftSolver)
    solver.reset(torch.zeros(13), 9.0)
    reference = type(sched).from_config(sched.config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 12, 12), mu=math.log(9.0))
    assert torch.equal(solver.scheduler.sigmas, reference.sigmas)

    seen: list[tuple[int, int, float, float]] = []

    def velocity(x: torch.Tensor, timestep: float, ctx: Any) -> torch.Tensor:
        seen.append((ctx.step, ctx.stage, ctx.sigma, float(solver.scheduler.sigmas[ctx.step])))
        return 0.1 * x

    options = DVGOptions(fixed=(0.75, 0.6), stage_shifts=(None, 9.0, 11.0, 11.0))
    config = SamplerConfig(FULL, 12, math.exp(mu), mode=Mode.FIXED, options=options, spatial_multiple=1)
    latent, record = sample(velocity, config, [0], C, step_rule=solver)
    assert [s["shift"] for s in record.stages] == [math.exp(mu), 9.0, 11.0, 11.0]
    assert len({stage for _, stage, _, _ in seen}) == 4 and torch.isfinite(latent).all()
    assert all(sigma == mine for _, _, sigma, mine in seen), "the sampler's σ is not the scheduler's"
    plain = flow_sigmas(12, 11.0)
    assert abs(seen[-1][2] - float(plain[11])) > 0.05, "shift_terminal should move the late sigmas"


def test_dvg_runs_reduced_stages_on_each_stage_grid(ltx):
    path, pipe = ltx
    cfg = _config(path)  # DVG at budget 0.5, 12 steps, CFG 3
    seen: list[tuple[tuple[int, ...], tuple[int, int, int], Any, float]] = []

    def record(_: Any, __: Any, kwargs: dict[str, Any]) -> None:
        grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
        t = kwargs["timestep"]
        seen.append((tuple(kwargs["hidden_states"].shape), grid, kwargs["rope_interpolation_scale"], float(t[0])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = Engine(cfg, pipe).generate([Request(PROMPT, seed=2)], decode=False, progress=False)
    finally:
        hook.remove()
    grids = [tuple(g) for g in result.record.chosen["grids"]]
    assert len(set(grids)) > 2 and grids[-1] == (5, 8, 8), f"the plan should reduce the early stages: {grids}"
    assert abs(result.record.chosen["density"] - 0.5) <= 0.02
    planner = Planner(cfg.latent_grid(), 12, 0.5, cfg.dvg, 1)
    expected = []
    for stage, count in enumerate(planner.executed_counts):
        t, h, w = grids[stage]
        expected += [((2, t * h * w, C), (t, h, w))] * count  # one batched [uncond, cond] pass per step
    assert [(hs, g) for hs, g, _, _ in seen] == expected
    assert {scale for _, _, scale, _ in seen} == {(8 / 25, 32, 32)}, "every stage keeps the pipeline's rope scale"
    assert [t for _, _, _, t in seen] == [t.timestep for t in result.trace]
    assert result.latent.shape == (1, C, 5, 8, 8) and torch.isfinite(result.latent).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.size=100x256", "width must be a multiple of 32 and height of 32 (nearest valid: 96x256)"),
        ("sampling.size=256x200", "nearest valid: 256x192"),
        ("sampling.frame_num=30", "frame count 30 is not 8k+1 for this model; nearest valid: 25 or 33"),
        ("sampling.use_dynamic_cfg=true", "use_dynamic_cfg (--use_dynamic_cfg) is CogVideoX's guidance schedule"),
        ("model.vae_tile_size=500", "positive multiple of the VAE's spatial compression 32"),
    ],
)
def test_bad_input_is_refused_before_weights_load(ltx, override, message):
    path, _ = ltx
    with pytest.raises(InputError) as err:
        validate(_config(path, override), [Request(PROMPT)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tiled_decode_equals_diffusers(ltx):
    """runtime/vae.py's LTX scheme (its tiles, the decode timestep, blending) against the VAE's own ``tiled_decode``:
    128x128 pixels in 64 px tiles at stride 32 (4x4 tiles, blended)."""
    path, pipe = ltx
    vae = pipe.vae
    z = torch.randn(1, C, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    settings = TileSettings(size=64, stride=32)
    check_tiling(settings, json.loads((path / "vae" / "config.json").read_text()))  # null ratios in the JSON
    ours = decode_video(vae, z, settings)
    temb = torch.zeros(1)  # what LTXPipeline passes at decode_timestep 0
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=32,
                      tile_sample_stride_width=32)  # fmt: skip
    try:
        with torch.no_grad():
            ref = vae.decode(z, temb, return_dict=False)[0]
    finally:
        vae.disable_tiling()
    assert ours is not None and ours.shape == ref.shape == (1, 3, 9, 128, 128)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        whole = vae.decode(z, temb, return_dict=False)[0]
    assert torch.equal(decode_video(vae, z, None), whole)


# -- sequence parallel ---------------------------------------------------------------------------------------


def _sp_job(
    rank: int, world: int, ulysses: int, ring: int, cfg: int, path: str, text_encoder: str, image: str | None
) -> dict[str, Any]:
    """DVG on the group: the final latent and the token shard every call's patch embedding saw on this rank."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.runtime.distributed import ParallelContext

    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    par = ParallelContext(build_groups(ParallelLayout(world, ulysses, ring, cfg, num_heads=2)))
    overrides = [f"parallel.text_encoder={text_encoder}", f"parallel.cfg_parallel={str(cfg == 2).lower()}"]
    engine = Engine(_config(path, *overrides), pipe, parallel=par)
    shards: list[tuple[int, int]] = []
    hook = pipe.transformer.proj_in.register_forward_pre_hook(lambda _, args: shards.append(tuple(args[0].shape[:2])))
    result = engine.generate([Request(PROMPT, seed=11, image=image)], decode=False, progress=False)
    hook.remove()
    state = sequence_parallel_state(pipe.transformer)
    calls = 0 if state is None else state.calls
    grids = [tuple(g) for g in result.record.chosen["grids"]]
    return {"latent": result.latent, "shards": shards, "calls": calls, "grids": grids, "rank": rank}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ltx-image") / "first.png"
    _image().save(path)
    return str(path)


_ONE_PROCESS: dict[str | None, torch.Tensor] = {}


def _one_process(ltx: tuple[Path, Any], image: str | None) -> torch.Tensor:
    """The one-process DVG latent (computed once per image, shared by the cases)."""
    if image not in _ONE_PROCESS:
        path, pipe = ltx
        request = Request(PROMPT, seed=11, image=image)
        _ONE_PROCESS[image] = Engine(_config(path), pipe).generate([request], decode=False, progress=False).latent
    return _ONE_PROCESS[image]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "ulysses", "ring", "cfg", "text_encoder", "i2v"),
    [
        (2, 2, 1, 1, "each", False),
        (3, 1, 3, 1, "rank0", False),
        (2, 1, 1, 2, "rank0", False),
        (3, 1, 3, 1, "rank0", True),
    ],
)
def test_sequence_parallel_equals_one_process(ltx, image_file, world, ulysses, ring, cfg, text_encoder, i2v):
    """Ulysses 2 and ring 3 (uneven shards) run both guidance branches as one batch of 2, as the pipeline; CFG-parallel
    runs one branch per rank at batch 1: the same latent up to that batch's round-off. Image-to-video (ring 3): the
    per-token timestep splits with the tokens, the image latent and generator states broadcast from rank 0."""
    from dvg_dist.parallel import shard_sizes

    path, _ = ltx
    image = image_file if i2v else None
    one_process = _one_process(ltx, image)
    reports = run_distributed(_sp_job, world, ulysses, ring, cfg, str(path), text_encoder, image, timeout=240.0)
    config = _config(path)
    counts = Planner(config.latent_grid(), 12, 0.5, config.dvg, 1).executed_counts
    tokens = [t * h * w for t, h, w in reports[0]["grids"]]
    sp = world // cfg
    if world == 3:
        assert any(n % world for n in tokens), f"no stage has uneven shards: {tokens}"
    for r in reports:
        assert cfg == 2 or r["calls"] > 0, "the sharded attention never ran"
        rel = float((r["latent"] - one_process).abs().max() / one_process.abs().max())
        print(f"{world} ranks (ulysses {ulysses}, ring {ring}, cfg {cfg}), rank {r['rank']}: relative diff {rel:.1e}")
        assert rel < 1e-5, f"rank {r['rank']} of {world}: latent differs from one process by {rel:.2e}"
        # Every call embeds this rank's share of the stage's tokens: both CFG branches at once (batch 2), or this
        # rank's branch alone under CFG-parallel.
        share = [shard_sizes(n, sp)[r["rank"] % sp] for n in tokens]
        expected = [(2 // cfg, m) for m, k in zip(share, counts) for _ in range(k)]
        assert r["shards"] == expected, f"rank {r['rank']}: token shards {r['shards']}, expected {expected}"
    assert all(torch.equal(r["latent"], reports[0]["latent"]) for r in reports), "ranks disagree"
