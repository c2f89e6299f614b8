"""The staged engine drives diffusers' own HunyuanVideo-1.5 classes (T2V and I2V) exactly as their pipelines do,
and under DVG every stage sees the I2V condition sampled at its own coordinates (the image in frame 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ClassifierFreeGuidance, DiffusionPipeline
from PIL import Image

from dvg_dist.config import load_config
from dvg_dist.dvg import Grid, flow_sigmas, hash_noise
from dvg_dist.dvg.resize import sample_at, stage_coords
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import HunyuanVideo15Adapter, InputError
from dvg_dist.runtime.engine import Engine, Request

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
# Quoted text: the pipelines run ByT5 on it, so the second text encoder is exercised too.
PROMPT = 'a red ball rolling over green grass past a sign that says "GOAL"'
FULL = Grid(5, 4, 4)  # 17 frames, 64x64, VAE 4x16x16
C = 16


def _config(family: str, path: Path, *overrides: str):
    name = "tiny-hunyuan15-i2v.yaml" if family == "hunyuan15-i2v" else "tiny-hunyuan15.yaml"
    return load_config(ROOT / "configs" / name, [f"model.path={path}", *overrides])


@pytest.fixture(scope="module")
def t2v(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("hunyuan15")
    return path, DiffusionPipeline.from_pretrained(path, use_safetensors=True)


@pytest.fixture(scope="module")
def i2v(tiny_checkpoint) -> tuple[Path, Any]:
    path = tiny_checkpoint("hunyuan15-i2v")
    return path, DiffusionPipeline.from_pretrained(path, use_safetensors=True)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """An 80x64 (W x H) picture: the I2V pipeline's own bucket for it at target_size 64 is 64x64, so both it and
    the engine resize *and crop*."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    rgb = np.stack([xx * 2.6, yy * 4.0, 128 + 60 * np.sin(xx / 7.0)], axis=-1) + rng.normal(0, 20, (64, 80, 3))
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pipeline_latent(pipe: Any, seed: int, steps: int, guidance: float, **kwargs: Any) -> torch.Tensor:
    latents = hash_noise(seed, C, torch.arange(FULL.t), torch.arange(FULL.h), torch.arange(FULL.w))
    saved = pipe.guider
    pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance)  # the pipelines have no guidance_scale argument
    try:
        out = pipe(
            prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=steps, num_frames=17,
            output_type="latent", **kwargs,
        )  # fmt: skip
    finally:
        pipe.guider = saved
    return out.frames


# -- (a) full mode is the pipeline ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_t2v_full_mode_equals_the_pipeline(t2v, guidance):
    path, pipe = t2v
    cfg = _config("hunyuan15", path, "sampling.mode=full", "sampling.steps=4", f"sampling.guidance_scale={guidance}")
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=3)], decode=False, progress=False)
    ref = _pipeline_latent(pipe, 3, 4, guidance, height=64, width=64)
    diff = _rel(ours.latent, ref)
    print(f"T2V guidance {guidance}: max relative diff {diff:.2e}")
    assert diff < 1e-5, f"engine full mode differs from HunyuanVideo15Pipeline by {diff:.2e}"
    assert len(ours.trace) == 4
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]


def test_i2v_full_mode_equals_the_pipeline(i2v, image_path):
    path, pipe = i2v
    image = Image.open(image_path).convert("RGB")
    bucket = pipe.video_processor.calculate_default_height_width(64, 80, pipe.target_size)
    assert tuple(bucket) == (64, 64), "the test image should map to the configured 64x64"
    cfg = _config("hunyuan15-i2v", path, "sampling.mode=full", "sampling.steps=4")
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=5, image=str(image_path))], decode=False, progress=False)
    ref = _pipeline_latent(pipe, 5, 4, 6.0, image=image)
    diff = _rel(ours.latent, ref)
    print(f"I2V guidance 6.0: max relative diff {diff:.2e}")
    assert diff < 1e-5, f"engine full mode differs from HunyuanVideo15ImageToVideoPipeline by {diff:.2e}"


# -- (b) DVG: the condition channels follow each stage's coordinates ----------------------------------------


def _run_and_capture(cfg, pipe, request: Request) -> tuple[Any, list[torch.Tensor]]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["hidden_states"][:, C:].detach().clone())

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = Engine(cfg, pipe).generate([request], decode=True, progress=False)
    finally:
        handle.remove()
    return result, seen


def _check_stages(result, seen: list[torch.Tensor], full_condition: torch.Tensor, passes: int) -> None:
    grids = [Grid(*g) for g in result.record.chosen["grids"]]
    coords = stage_coords(grids)
    assert len({tuple(g.as_list()) for g in grids}) > 1, "the plan should use more than one grid"
    assert len(seen) == passes * len(result.trace)
    for k, trace in enumerate(result.trace):
        expected = sample_at(full_condition, coords[trace.stage], FULL)
        for got in seen[passes * k : passes * (k + 1)]:
            assert tuple(got.shape[2:]) == trace.grid, f"call {k}: condition grid {tuple(got.shape[2:])}"
            assert torch.equal(got, expected), f"call {k} (stage {trace.stage + 1}): not the condition at its coords"
    assert result.frames is not None and result.frames.shape == (1, 17, 64, 64, 3)
    assert result.frames.dtype == np.uint8


def test_dvg_i2v_stages_see_the_condition_at_their_coordinates(i2v, image_path):
    path, pipe = i2v
    cfg = _config("hunyuan15-i2v", path, "sampling.steps=12")
    result, seen = _run_and_capture(cfg, pipe, Request(PROMPT, seed=2, image=str(image_path)))
    # The full-size condition straight from the pipeline's own functions, independent of the adapter.
    image = pipe.video_processor.resize(Image.open(image_path).convert("RGB"), height=64, width=64, resize_mode="crop")
    with torch.no_grad():
        latents = torch.zeros(1, C, FULL.t, FULL.h, FULL.w)
        cond, mask = pipe.prepare_cond_latents_and_mask(latents, image, 1, 64, 64, torch.float32, torch.device("cpu"))
        image_latent = pipe._get_image_latents(pipe.vae, pipe.video_processor, image, 64, 64, torch.device("cpu"))
    full_condition = torch.cat([cond, mask], dim=1)
    _check_stages(result, seen, full_condition, passes=2)
    for got in seen:  # frame 0 is a temporal anchor at every stage: the image latent, mask 1; the rest empty
        h, w = got.shape[3:]
        assert torch.equal(got[:, C:, 0], torch.ones(1, 1, h, w))
        assert torch.equal(got[:, :, 1:], torch.zeros_like(got[:, :, 1:]))
        assert got[:, :C, 0].abs().sum() > 0
        coords = stage_coords([Grid(got.shape[2], h, w), FULL])[0]
        assert torch.equal(got[:, :C, 0], image_latent[:, :, 0][:, :, coords[1]][:, :, :, coords[2]])


def test_dvg_t2v_runs_with_zero_condition_channels(t2v):
    path, pipe = t2v
    cfg = _config("hunyuan15", path, "sampling.steps=12", "sampling.guidance_scale=1.0")
    result, seen = _run_and_capture(cfg, pipe, Request(PROMPT, seed=2))
    _check_stages(result, seen, torch.zeros(1, C + 1, FULL.t, FULL.h, FULL.w), passes=1)


# -- (c) MeanFlow (step-distilled) checkpoints: timestep_r ----------------------------------------------------


@pytest.fixture(scope="module")
def meanflow(tiny_checkpoint) -> dict[str, tuple[Path, Any]]:
    out = {}
    for family in ("hunyuan15-meanflow", "hunyuan15-meanflow-i2v"):
        path = tiny_checkpoint(family)
        out[family] = (path, DiffusionPipeline.from_pretrained(path, use_safetensors=True))
    return out


def _capture_r(pipe: Any) -> tuple[list[tuple[float, float]], Any]:
    """Every transformer call's (timestep, timestep_r), checked to be the transformer's dtype and one per sample."""
    seen: list[tuple[float, float]] = []

    def hook(module, args, kwargs):
        t, r = kwargs["timestep"], kwargs["timestep_r"]
        assert r is not None and r.dtype == t.dtype == module.dtype and r.shape == t.shape, (r, t)
        seen.append((float(t[0]), float(r[0])))

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["hunyuan15-meanflow", "hunyuan15-meanflow-i2v"])
def test_meanflow_full_mode_equals_the_pipeline(meanflow, image_path, family):
    """``--mode full`` on a MeanFlow checkpoint is the I2V pipeline's own loop: ``timestep_r = timesteps[i + 1]``,
    0 at the last step. diffusers' T2V pipeline (0.42) passes no ``timestep_r`` at all, so its reference here is the
    same pipeline with the I2V pipeline's rule put in by a pre-hook; without it the result differs."""
    path, pipe = meanflow[family]
    i2v = family.endswith("i2v")
    request = Request(PROMPT, seed=5, image=str(image_path) if i2v else None)
    cfg = _config(family.replace("-meanflow", ""), path, "sampling.mode=full", "sampling.steps=4",
                  "sampling.guidance_scale=1.0")  # fmt: skip
    seen, handle = _capture_r(pipe)
    try:
        ours = Engine(cfg, pipe).generate([request], decode=False, progress=False)
    finally:
        handle.remove()
    timesteps = [t.timestep for t in ours.trace]
    assert seen == list(zip(timesteps, [*timesteps[1:], 0.0])), seen
    assert [t.next_timestep for t in ours.trace] == [*timesteps[1:], 0.0]
    kwargs: dict[str, Any] = {"image": Image.open(image_path).convert("RGB")} if i2v else {"height": 64, "width": 64}
    if i2v:
        ref = _pipeline_latent(pipe, 5, 4, 1.0, **kwargs)
    else:
        plain = _pipeline_latent(pipe, 5, 4, 1.0, **kwargs)
        calls = iter([*timesteps[1:], 0.0])

        def add_r(module, args, kw):
            kw["timestep_r"] = torch.full_like(kw["timestep"], next(calls))
            return args, kw

        handle = pipe.transformer.register_forward_pre_hook(add_r, with_kwargs=True)
        try:
            ref = _pipeline_latent(pipe, 5, 4, 1.0, **kwargs)
        finally:
            handle.remove()
        assert _rel(plain, ref) > 1e-3, "timestep_r has no effect on the tiny MeanFlow transformer"
    assert [float(t) for t in pipe.scheduler.timesteps] == timesteps, "not the pipeline's schedule"
    diff = _rel(ours.latent, ref)
    print(f"{family}: relative difference to the pipeline {diff:.2e}")
    assert diff < 1e-6, f"engine full mode differs from the {family} pipeline by {diff:.2e}"


def test_meanflow_dvg_timestep_r_follows_each_stage_schedule(meanflow, image_path):
    """Under DVG each call's ``timestep_r`` is the next timestep of its own stage's schedule (released stage shifts
    5/9/11/11 here, so the stages' schedules differ), 0 at the very end; ``dvg.meanflow_switch_end=zero`` gives 0 at
    each stage's last call instead, which changes the result."""
    path, pipe = meanflow["hunyuan15-meanflow-i2v"]
    request = Request(PROMPT, seed=2, image=str(image_path))
    results = {}
    for end in ("stage", "zero"):
        cfg = _config("hunyuan15-i2v", path, "sampling.steps=12", "sampling.guidance_scale=1.0",
                      "dvg.stage_shifts=[null, 9.0, 11.0, 11.0]", f"dvg.meanflow_switch_end={end}")  # fmt: skip
        seen, handle = _capture_r(pipe)
        try:
            result = Engine(cfg, pipe).generate([request], decode=False, progress=False)
        finally:
            handle.remove()
        bounds = result.record.boundaries
        assert len(seen) == 12 and {t.stage for t in result.trace} == {0, 1, 2, 3}
        for (t, r), trace in zip(seen, result.trace):
            i, stage = trace.step, trace.stage
            sigmas = flow_sigmas(12, [5.0, 9.0, 11.0, 11.0][stage])
            assert t == pytest.approx(1000 * float(sigmas[i]), rel=1e-5)
            want = 0.0 if i == 11 or (end == "zero" and i in bounds) else 1000 * float(sigmas[i + 1])
            assert r == pytest.approx(want, rel=1e-5, abs=1e-4), f"{end}: call {i} (stage {stage + 1}) r={r}"
            assert r < t and trace.next_timestep == pytest.approx(r, rel=1e-5, abs=1e-4)
        results[end] = result.latent
    assert _rel(results["stage"], results["zero"]) > 1e-4, "meanflow_switch_end has no effect"


def test_meanflow_refuses_a_multistep_scheduler_before_loading(meanflow, image_path, tmp_path, capsys):
    """A MeanFlow checkpoint whose scheduler is UniPC is refused in one line before any weight loads (the copy's
    transformer weights are garbage, so loading them would fail differently)."""
    path, _ = meanflow["hunyuan15-meanflow-i2v"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    unipc = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True}
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(unipc))
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny-hunyuan15-i2v.yaml"), "--model", str(bad), "--prompt", "x",
            "--image", str(image_path), "--guidance_scale", "1", "--out", str(out)]  # fmt: skip
    assert generate_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "need FlowMatchEulerDiscreteScheduler" in errors[0], errors
    assert not out.exists()


# -- adapter declarations ------------------------------------------------------------------------------


def test_spec_cost_model_and_guidance_mapping(t2v):
    path, pipe = t2v
    spec = HunyuanVideo15Adapter.read_spec(path)
    assert (spec.latent_channels, spec.patch, spec.vae_scale) == (16, (1, 1, 1), (4, 16, 16))
    assert spec.latent_grid(64, 64, 17) == FULL
    assert pipe.transformer.config.in_channels == 2 * spec.latent_channels + 1
    adapter = HunyuanVideo15Adapter(pipe)
    assert adapter.spec == spec and adapter.fps == 24 and not adapter.is_i2v
    s = _config("hunyuan15", path).sampling
    assert adapter.do_cfg(s) and adapter.guidance_for(999.0, s) == 6.0
    assert not adapter.do_cfg(_config("hunyuan15", path, "sampling.guidance_scale=1.0").sampling)
    saved = pipe.guider
    try:
        pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, use_original_formulation=True)
        original = HunyuanVideo15Adapter(pipe)
        assert original.guidance_for(999.0, s) == 7.0  # cond + g·(cond - uncond) = uncond + (g+1)·(cond - uncond)
        pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7)
        with pytest.raises(InputError, match="guidance_rescale"):
            HunyuanVideo15Adapter(pipe)
    finally:
        pipe.guider = saved


# -- (d) launch/generate.py ---------------------------------------------------------------------------------


def test_generate_i2v_writes_video_and_sidecar(i2v, image_path, tmp_path):
    path, _ = i2v
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny-hunyuan15-i2v.yaml"), "--model", str(path), "--prompt",
            "a red ball", "--image", str(image_path), "--seed", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert generate_main(argv) == 0
    stem = "a-red-ball_s4_dvg"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.mp4"]
    assert (out / f"{stem}.mp4").read_bytes()[4:8] == b"ftyp", "not an mp4"
    side = json.loads((out / f"{stem}.json").read_text())
    assert side["image"] == str(image_path) and side["seed"] == 4
    assert [s["grid"] for s in side["plan"]["stages"]] == side["plan"]["chosen"]["grids"]


@pytest.mark.parametrize(
    ("family", "with_image", "needle"),
    [("hunyuan15", True, "text-to-video checkpoint"), ("hunyuan15-i2v", False, "image-to-video checkpoint")],
)
def test_generate_refuses_image_mismatch_in_one_line(
    tiny_checkpoint, image_path, tmp_path, capsys, family, with_image, needle
):
    path = tiny_checkpoint(family)
    out = tmp_path / "out"
    name = "tiny-hunyuan15-i2v.yaml" if family == "hunyuan15-i2v" else "tiny-hunyuan15.yaml"
    argv = ["--config", str(ROOT / "configs" / name), "--model", str(path), "--prompt", "x", "--out", str(out)]
    if with_image:
        argv += ["--image", str(image_path)]
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
