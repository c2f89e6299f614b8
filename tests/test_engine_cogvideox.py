"""CogVideoX 1.5 (``CogVideoXPipeline`` / ``CogVideoXImageToVideoPipeline``: patch 2×2×2, rotary positions, joint
text+video attention, the v-prediction ``CogVideoXDPMScheduler``) on the tiny checkpoints: geometry and refusals from
the JSON configs, the adapter's forward equals the transformer called the pipeline's way on every stage grid, ``full``
mode equals the pipelines (latents and frames), DVG runs with each stage's own rotary table, and sequence parallelism
(rotary tuple split at the root, text tokens replicated, the processor's own SDPA call routed to the sharded
attention) gives the one-process forward and final latent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed

from dvg_dist.config import load_config
from dvg_dist.dvg import hash_noise
from dvg_dist.dvg.planner import CostModel, Grid
from dvg_dist.models import FAMILIES, CogVideoXAdapter, InputError, adapter_class
from dvg_dist.models.cogvideox import COGVIDEOX_SEQUENCE_PLAN, PAD_FRAMES
from dvg_dist.runtime.engine import Engine, Request, validate

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
CONFIGS = {
    "cogvideox": ROOT / "configs" / "tiny-cogvideox.yaml",
    "cogvideox-i2v": ROOT / "configs" / "tiny-cogvideox-i2v.yaml",
}
# 17 frames → 5 latent frames, padded in front to 6 (patch_size_t 2); 64x64 → 8x8 latent pixels.
FULL = Grid(6, 8, 8)


def _config(family: str, path: Path | str, *overrides: str) -> Any:
    return load_config(CONFIGS[family], [f"model.path={path}", *overrides])


def _load(path: Path | str) -> Any:
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2v(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("cogvideox")
    return path, _load(path)


@pytest.fixture(scope="module")
def i2v(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("cogvideox-i2v")
    return path, _load(path)


def _image() -> Any:
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pipeline_latents(seed: int) -> torch.Tensor:
    """The engine's first noise (the hash field at the full grid, padding frame included) in the pipelines'
    ``[B, F, C, H, W]`` layout."""
    return hash_noise(seed, 16, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w)).permute(0, 2, 1, 3, 4)


# -- geometry, refusals, cost: from the JSON configs ------------------------------------------------------------


def test_geometry_cost_and_plan_from_the_checkpoint(t2v, i2v):
    (path, pipe), (i2v_path, i2v_pipe) = t2v, i2v
    assert adapter_class(path) is CogVideoXAdapter and adapter_class(i2v_path) is CogVideoXAdapter
    assert FAMILIES["cogvideox"] is CogVideoXAdapter
    spec = CogVideoXAdapter.read_spec(path)
    assert (spec.latent_channels, spec.patch, spec.vae_scale, spec.spatial_multiple) == (16, (2, 2, 2), (4, 8, 8), 2)
    assert CogVideoXAdapter.read_spec(i2v_path).latent_channels == 16  # the transformer's 32 inputs are 2·C
    # The pipelines' additional_frames: an odd latent frame count gets one padding frame in front.
    assert spec.latent_grid(64, 64, 17) == FULL and spec.latent_grid(64, 64, 13) == Grid(4, 8, 8)
    cost = CogVideoXAdapter.cost_model_from_config(dict(pipe.transformer.config))
    assert cost == CostModel.from_arch(32, 128, 226, (2, 2, 2))
    assert cost.cost(FULL) == cost.linear * 48 + cost.quadratic * 48**2  # 3 x 4 x 4 tokens
    # Every module the plan names exists, and the processors are the SDPA-calling ones the plan routes.
    names = {name for name, _ in pipe.transformer.named_modules()}
    plan = COGVIDEOX_SEQUENCE_PLAN
    assert set(plan.split_inputs) | set(plan.replicated_inputs) | set(plan.gather_outputs) <= names
    assert plan.direct_sdpa_text == "first"
    assert type(pipe.transformer.transformer_blocks[0].attn1.processor).__name__ == "CogVideoXAttnProcessor2_0"
    adapter = CogVideoXAdapter(i2v_pipe)
    assert adapter.is_i2v and adapter.fps == 16 and not CogVideoXAdapter(pipe).is_i2v


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.size=72x64", "width must be a multiple of 16 and height of 16 (nearest valid: 64x64)"),
        ("sampling.size=64x44", "nearest valid: 64x48"),
        ("sampling.frame_num=18", "frame count 18 is not 4k+1 for this model; nearest valid: 17 or 21"),
        ("sampling.size=272x64", "rotary positions reach at most 256x256 (transformer sample_width x sample_height); "
         "nearest valid: 256x64"),
    ],
)  # fmt: skip
def test_bad_sizes_are_refused_before_any_weight_loads(t2v, override, message):
    path, _ = t2v
    with pytest.raises(InputError) as err:
        validate(_config("cogvideox", path, override), [Request(PROMPT)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_image_arguments_are_checked(t2v, i2v, tmp_path):
    image = tmp_path / "first.png"
    _image().save(image)
    with pytest.raises(InputError, match="text-to-video checkpoint"):
        validate(_config("cogvideox", t2v[0]), [Request(PROMPT, image=str(image))])
    with pytest.raises(InputError, match="image-to-video checkpoint: pass --image"):
        validate(_config("cogvideox-i2v", i2v[0]), [Request(PROMPT)])
    validate(_config("cogvideox-i2v", i2v[0]), [Request(PROMPT, image=str(image))])


# -- one forward ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["cogvideox", "cogvideox-i2v"])
def test_forward_equals_the_transformer_called_as_the_pipeline_calls_it(t2v, i2v, family):
    """On a reduced and on the full grid: the engine-layout input permuted to ``[B, F, C, H, W]``, ``t.expand(B)``
    int64, the pipeline's own rotary table for that grid, ``ofs`` = 2 for I2V — bit for bit. A grid with an odd
    frame count runs with its first frame repeated in front, and that frame is dropped from the output."""
    _, pipe = i2v if family == "cogvideox-i2v" else t2v
    adapter = CogVideoXAdapter(pipe)
    channels = pipe.transformer.config.in_channels
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 226, 32, generator=gen)
    kwargs: dict[str, Any] = {"encoder_hidden_states": text, PAD_FRAMES: 1}
    direct: dict[str, Any] = {"encoder_hidden_states": text}
    if family == "cogvideox-i2v":
        kwargs["ofs"] = torch.full((1,), 2.0)
        direct["ofs"] = torch.ones(1).new_full((1,), fill_value=2.0)
    t = adapter.timestep_tensor(916.0, 1)
    assert t.dtype == torch.int64 and t.tolist() == [916]
    with torch.no_grad():
        for grid in (Grid(2, 4, 4), FULL):
            x = torch.randn(1, channels, grid.t, grid.h, grid.w, generator=gen)
            ours = adapter.forward(pipe.transformer, x, t, kwargs)
            rotary = pipe._prepare_rotary_positional_embeddings(grid.h * 8, grid.w * 8, grid.t, torch.device("cpu"))
            ref = pipe.transformer(
                hidden_states=x.permute(0, 2, 1, 3, 4), timestep=torch.tensor(916).expand(1),
                image_rotary_emb=rotary, return_dict=False, **direct,
            )[0].float().permute(0, 2, 1, 3, 4)  # fmt: skip
            assert ours.shape == (1, 16, *grid.as_list()) and torch.equal(ours, ref), f"grid {grid}"
        odd = torch.randn(1, channels, 3, 8, 8, generator=gen)
        padded = torch.cat([odd[:, :, :1], odd], dim=2)
        ours = adapter.forward(pipe.transformer, odd, t, kwargs)
        ref = adapter.forward(pipe.transformer, padded, t, kwargs)[:, :, 1:]
        assert ours.shape == (1, 16, 3, 8, 8) and torch.equal(ours, ref)


def test_guidance_follows_the_pipelines(t2v):
    """Plain CFG by default; with ``use_dynamic_cfg`` the pipelines' cosine schedule, computed from the timestep
    and the step count as they compute it."""
    import math

    adapter = CogVideoXAdapter(t2v[1])
    s = _config("cogvideox", t2v[0], "sampling.steps=50").sampling
    assert adapter.guidance_for(999.0, s) == 6.0
    s.use_dynamic_cfg = True
    for t in (999, 500, 20):
        expected = 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - torch.tensor(t).item()) / 50) ** 5.0)) / 2)
        assert adapter.guidance_for(float(t), s) == expected


# -- full mode equals the pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("guidance", "dynamic"), [(1.0, False), (6.0, False), (6.0, True)])
def test_full_mode_equals_cogvideox_pipeline(t2v, guidance, dynamic):
    """Same first noise (padding frame included), same per-request generator for the DPM scheduler's noise: the
    final latent (padding dropped) equals ``CogVideoXPipeline``'s, with CFG as one batch and with the dynamic
    guidance schedule too; the decoded frames equal its ``np`` output."""
    path, pipe = t2v
    steps = 6
    cfg = _config(
        "cogvideox", path, "sampling.mode=full", f"sampling.steps={steps}", f"sampling.guidance_scale={guidance}",
        f"sampling.use_dynamic_cfg={str(dynamic).lower()}",
    )  # fmt: skip
    engine = Engine(cfg, pipe)
    ours = engine.generate([Request(PROMPT, seed=3)], decode=False, progress=False)
    kw: dict[str, Any] = dict(
        prompt=PROMPT, negative_prompt="", latents=_pipeline_latents(3), num_inference_steps=steps,
        guidance_scale=guidance, use_dynamic_cfg=dynamic, height=64, width=64, num_frames=17,
    )  # fmt: skip
    last: dict[str, torch.Tensor] = {}

    def keep(_: Any, __: int, ___: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        last["latents"] = tensors["latents"]  # after the step: the final latent at the last one
        return {}

    decode = guidance == 1.0  # the frames once: the pipeline's own VAE decode and postprocess
    out = pipe(**kw, output_type="np" if decode else "latent", generator=torch.Generator().manual_seed(3),
               callback_on_step_end=keep).frames  # fmt: skip
    ref = last["latents"]
    assert ref.shape == (1, 6, 16, 8, 8) and ours.latent.shape == (1, 16, 5, 8, 8)
    rel = _rel(ours.latent, ref[:, 1:].permute(0, 2, 1, 3, 4))
    assert rel == 0.0, f"full mode (guidance {guidance}) differs from CogVideoXPipeline by {rel:.2e}"
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]
    if decode:
        expected = (np.clip(np.asarray(out), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        decoded = engine.adapter.decode(ours.latent)
        assert decoded.shape == (1, 17, 64, 64, 3) and np.array_equal(decoded, expected), "frames differ"
        # The engine's decode (runtime/vae.py: the VAE's own decode as one unit, tiling as configured) too.
        frames = engine.generate([Request(PROMPT, seed=3)], decode=True, progress=False).frames
        assert frames is not None and np.array_equal(frames, expected), "the engine's decode differs"


def test_i2v_full_mode_equals_cogvideox_image_to_video_pipeline(i2v, tmp_path):
    """The I2V layout (condition latents over the padded frames on the channels, ``ofs``) under the checkpoint's
    stochastic ``CogVideoXDPMScheduler`` with CFG: the image latent is sampled from the request's generator and the
    DPM steps continue it, as the pipeline's ``generator``; both branches run as one batch, as the pipeline."""
    path, pipe = i2v
    assert type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    steps = 6
    cfg = _config("cogvideox-i2v", path, "sampling.mode=full", f"sampling.steps={steps}", "sampling.guidance_scale=6",
                  "sampling.seed=4")  # fmt: skip
    request = Request(PROMPT, seed=4, image=str(image_path))
    validate(cfg, [request])
    ours = Engine(cfg, pipe).generate([request], decode=False, progress=False)
    ref = pipe(
        image=_image(), prompt=PROMPT, negative_prompt="", latents=_pipeline_latents(4), num_inference_steps=steps,
        guidance_scale=6.0, height=64, width=64, num_frames=17, output_type="latent",
        generator=torch.Generator().manual_seed(4),
    ).frames  # fmt: skip
    rel = _rel(ours.latent, ref[:, 1:].permute(0, 2, 1, 3, 4))
    assert rel == 0.0, f"full mode differs from CogVideoXImageToVideoPipeline by {rel:.2e}"
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (128, 30, 200)).save(other)
    flat = Engine(cfg, pipe).generate([Request(PROMPT, seed=4, image=str(other))], decode=False, progress=False)
    assert _rel(flat.latent, ours.latent) > 0.01, "the image must change the video"


# -- DVG ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["cogvideox", "cogvideox-i2v"])
def test_dvg_runs_each_stage_with_its_own_rotary_table(t2v, i2v, family, tmp_path):
    """DVG at budget 0.5 with the DPM scheduler: every call's rotary table has one row per token of the grid it
    runs (padded frames included), the plan uses more than one grid, and the final latent drops the padding frame.
    Every stage's frame count is a whole number of temporal patches (the planner's temporal multiple 2), so the
    transformer runs each stage's own grid: ``--fixed 1,0.5`` rounds T₂₃ = 3 to 4."""
    path, pipe = i2v if family == "cogvideox-i2v" else t2v
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    image = str(image_path) if family == "cogvideox-i2v" else None
    seen: list[tuple[tuple[int, ...], int]] = []

    def record(_: Any, __: Any, kwargs: dict[str, Any]) -> None:
        seen.append((tuple(kwargs["hidden_states"].shape), int(kwargs["image_rotary_emb"][0].shape[0])))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = Engine(_config(family, path), pipe).generate([Request(PROMPT, seed=2, image=image)], decode=False,
                                                              progress=False)  # fmt: skip
        fixed = Engine(_config(family, path, "sampling.mode=fixed", "dvg.fixed=[1.0, 0.5]"), pipe).generate(
            [Request(PROMPT, seed=2, image=image)], decode=False, progress=False
        )
    finally:
        hook.remove()
    grids = [tuple(g) for g in result.record.chosen["grids"]]
    assert len(set(grids)) > 1 and grids[-1] == (6, 8, 8), grids
    assert result.latent.shape == (1, 16, 5, 8, 8) and torch.isfinite(result.latent).all()
    assert [b for (b, *_), _ in seen] == [2] * len(seen), "both guidance branches in one batch, as the pipelines"
    for (_, f, _, h, w), rows in seen:
        assert rows == (f // 2) * (h // 2) * (w // 2), "a rotary table for another grid"
    fixed_grids = [tuple(g) for g in fixed.record.chosen["grids"]]
    assert fixed_grids[1][0] == 4, f"r 0.5 of 6 frames is 3, to the nearest whole temporal patch 4: {fixed_grids}"
    assert all(g[0] % 2 == 0 for g in grids + fixed_grids), "every stage runs whole temporal patches"
    ran = [(f, h, w) for (_, f, _, h, w), _ in seen]
    assert ran == [g for run in (result, fixed) for g in _call_grids(run)], "a stage's input was padded"
    assert torch.isfinite(fixed.latent).all() and fixed.latent.shape == (1, 16, 5, 8, 8)


def _call_grids(result: Any) -> list[tuple[int, int, int]]:
    """The stage grid of every model call of a run, in order (from its trace)."""
    return [tuple(t.grid) for t in result.trace]


# -- sequence parallel ----------------------------------------------------------------------------------------------


SP_STEPS = ("sampling.steps=8",)  # DVG at budget 0.5 is feasible there (s=0.7, T23=2)
# world → (ulysses, ring, the family whose DVG run goes through the engine at that layout): Ulysses over both heads,
# and a ring of 3 with uneven shards (16, 27 and 48 tokens over 3 ranks) for I2V.
SP_LAYOUTS = {2: (2, 1, "cogvideox"), 3: (1, 3, "cogvideox-i2v")}


def _sp_job(
    rank: int, world: int, ulysses: int, ring: int, paths: dict[str, str], engine_family: str, image: str
) -> dict[str, Any]:
    """On this sp group: the sharded transformer forward of both checkpoints on a reduced, an odd and the full grid vs
    the same rank's unsharded one; then DVG at budget 0.5 through the engine with the sharded transformer."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.parallel.hooks import parallelize_transformer, unparallelize_transformer
    from dvg_dist.runtime.distributed import ParallelContext

    groups = build_groups(ParallelLayout(world, ulysses, ring, num_heads=2))
    report: dict[str, Any] = {"rank": rank, "forward": []}
    for family, path in paths.items():
        pipe = _load(path)
        adapter = CogVideoXAdapter(pipe)
        gen = torch.Generator().manual_seed(1)
        kwargs = {"encoder_hidden_states": torch.randn(1, 226, 32, generator=gen)}
        if family == "cogvideox-i2v":
            kwargs["ofs"] = torch.full((1,), 2.0)
        channels = pipe.transformer.config.in_channels
        xs = [torch.randn(1, channels, *g, generator=gen) for g in ((2, 4, 4), (3, 6, 6), (6, 8, 8))]
        t = adapter.timestep_tensor(500.0, 1)
        with torch.no_grad():
            refs = [adapter.forward(pipe.transformer, x, t, kwargs) for x in xs]
            parallelize_transformer(pipe.transformer, adapter.sequence_plan, groups)
            outs = [adapter.forward(pipe.transformer, x, t, kwargs) for x in xs]
            state = sequence_parallel_state(pipe.transformer)
            calls = 0 if state is None else state.calls
            unparallelize_transformer(pipe.transformer)
        report["forward"] += [(family, float((o - r).abs().max() / r.abs().max()), calls) for o, r in zip(outs, refs)]
        if family == engine_family:
            engine = Engine(_config(family, path, *SP_STEPS), pipe, parallel=ParallelContext(groups))
            request = Request(PROMPT, seed=11, image=image if family == "cogvideox-i2v" else None)
            report["latent"] = engine.generate([request], decode=False, progress=False).latent
    return report


@pytest.mark.slow
@pytest.mark.parametrize("world", list(SP_LAYOUTS))
def test_sequence_parallel_equals_one_process(t2v, i2v, world, tmp_path):
    ulysses, ring, family = SP_LAYOUTS[world]
    image = tmp_path / "first.png"
    _image().save(image)
    path, pipe = i2v if family == "cogvideox-i2v" else t2v
    request = Request(PROMPT, seed=11, image=str(image) if family == "cogvideox-i2v" else None)
    one = Engine(_config(family, path, *SP_STEPS), pipe).generate([request], decode=False, progress=False).latent
    paths = {"cogvideox": str(t2v[0]), "cogvideox-i2v": str(i2v[0])}
    reports = run_distributed(_sp_job, world, ulysses, ring, paths, family, str(image), timeout=300.0)
    for r in reports:
        for name, rel, calls in r["forward"]:
            assert calls > 0, f"rank {r['rank']}: the sharded attention never ran"
            assert rel < 1e-5, f"rank {r['rank']} of {world}: {name} forward differs by {rel:.2e}"
        rel = float((r["latent"] - one).abs().max() / one.abs().max())
        assert rel < 1e-4, f"rank {r['rank']} of {world}: {family} latent differs from one process by {rel:.2e}"
    assert all(torch.equal(r["latent"], reports[0]["latent"]) for r in reports), f"ranks disagree ({family})"
    rel = float((reports[0]["latent"] - one).abs().max() / one.abs().max())
    print(f"{world} ranks: forward {[f'{d:.1e}' for _, d, _ in reports[0]['forward']]}, {family} latent {rel:.1e}")
