"""The staged engine drives diffusers' own Wan classes exactly as WanPipeline does, and DVG on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from dvg_dist.config import load_config
from dvg_dist.dvg import Planner, hash_noise
from dvg_dist.executors.local import main as generate_main
from dvg_dist.runtime.engine import Engine, Request

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"


def _config(path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny-wan.yaml", [f"model.path={path}", *overrides])


@pytest.fixture(scope="module")
def wan(tiny_checkpoint) -> tuple[Path, DiffusionPipeline]:
    path = tiny_checkpoint("wan")
    return path, DiffusionPipeline.from_pretrained(path, use_safetensors=True)


@pytest.fixture(scope="module")
def wan_moe(tiny_checkpoint) -> tuple[Path, DiffusionPipeline]:
    path = tiny_checkpoint("wan-moe")
    return path, DiffusionPipeline.from_pretrained(path, use_safetensors=True)


def _pipeline_latent(pipe, seed: int, steps: int, guidance: float, **kwargs) -> torch.Tensor:
    latents = hash_noise(seed, 16, torch.arange(5), torch.arange(8), torch.arange(8))
    out = pipe(
        prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=steps, guidance_scale=guidance,
        height=64, width=64, num_frames=17, output_type="latent", **kwargs,
    )  # fmt: skip
    return out.frames


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_full_mode_equals_wan_pipeline(wan, guidance):
    path, pipe = wan
    engine = Engine(
        _config(path, "sampling.mode=full", "sampling.steps=8", f"sampling.guidance_scale={guidance}"), pipe
    )
    ours = engine.generate([Request(PROMPT, seed=3)], decode=False, progress=False)
    ref = _pipeline_latent(pipe, 3, 8, guidance)
    assert _rel(ours.latent, ref) < 1e-5, f"engine full mode differs from WanPipeline by {_rel(ours.latent, ref):.2e}"
    calls_per_step = 1
    assert len(ours.trace) == 8 * calls_per_step
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]


def test_moe_full_mode_equals_pipeline_and_switches_at_the_boundary(wan_moe):
    path, pipe = wan_moe
    engine = Engine(_config(path, "sampling.mode=full", "sampling.steps=10"), pipe)
    ours = engine.generate([Request(PROMPT, seed=5)], decode=False, progress=False)
    ref = _pipeline_latent(pipe, 5, 10, 5.0)
    assert _rel(ours.latent, ref) < 1e-5, f"MoE full mode differs from WanPipeline by {_rel(ours.latent, ref):.2e}"
    experts = [(t.timestep >= 875, t.expert) for t in ours.trace]
    assert all((e == "transformer") == high for high, e in experts), experts
    assert {e for _, e in experts} == {"transformer", "transformer_2"}, "both experts must run in 10 steps"


def test_moe_expert_follows_the_current_stage_schedule(wan_moe):
    path, pipe = wan_moe
    cfg = _config(path, "sampling.steps=12", "dvg.stage_shifts=[null, 9, 11, 11]")
    result = Engine(cfg, pipe).generate([Request(PROMPT, seed=1)], decode=False, progress=False)
    # The timestep each call got is its stage's schedule (shift 3 → 9 → 11 → 11), and the expert is chosen
    # from that timestep: high-noise expert iff t ≥ 875.
    from diffusers import UniPCMultistepScheduler

    for t in result.trace:
        shift = [3.0, 9.0, 11.0, 11.0][t.stage]
        sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
        sched.set_timesteps(12)
        assert t.timestep == float(sched.timesteps[t.step]), f"step {t.step}: not the stage-{t.stage + 1} schedule"
        assert (t.expert == "transformer") == (t.timestep >= 875), f"step {t.step}: {t.expert} at t={t.timestep}"
    # With shifts 9/11 the later stages stay above the boundary longer than one schedule would.
    assert sum(t.expert == "transformer" for t in result.trace) > 1


def test_dvg_token_counts_seen_by_the_transformer_match_the_plan(wan):
    path, pipe = wan
    cfg = _config(path, "sampling.steps=12", "sampling.budget=0.6")
    seen: list[int] = []
    hook = pipe.transformer.patch_embedding.register_forward_hook(lambda m, i, o: seen.append(o.shape[2:].numel()))
    try:
        result = Engine(cfg, pipe).generate([Request(PROMPT, seed=2)], decode=True, progress=False)
    finally:
        hook.remove()
    grids = result.record.chosen["grids"]
    planner = Planner(cfg.latent_grid(), 12, 0.6, cfg.dvg, 2)
    expected = []
    for stage, count in enumerate(planner.executed_counts):
        t, h, w = grids[stage]
        expected += [t * (h // 2) * (w // 2)] * count * 2  # cond + uncond per step
    assert seen == expected, f"tokens per call {seen} differ from the plan's {expected}"
    assert len({tuple(g) for g in grids}) > 1, "the plan should use more than one grid"
    assert result.frames is not None and result.frames.shape == (1, 17, 64, 64, 3)
    assert result.frames.dtype.name == "uint8"


def test_batch_of_prompts_in_full_mode_equals_single_runs(wan):
    path, pipe = wan
    engine = Engine(_config(path, "sampling.mode=full", "sampling.steps=6"), pipe)
    both = engine.generate([Request(PROMPT, seed=1), Request("a blue cube", seed=2)], decode=False, progress=False)
    one = engine.generate([Request("a blue cube", seed=2)], decode=False, progress=False)
    assert both.latent.shape[0] == 2
    assert _rel(both.latent[1:], one.latent) < 1e-5


# -- launch/generate.py ----------------------------------------------------------------------------------


def test_generate_writes_video_sidecar_and_latent(wan, tmp_path):
    path, _ = wan
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(path), "--prompt", PROMPT,
            "--seed", "4", "--out", str(out), "--save-latent", "--no-progress"]  # fmt: skip
    assert generate_main(argv) == 0
    files = sorted(p.name for p in out.iterdir())
    stem = "a-red-ball-rolling-over-green-grass_s4_dvg"
    assert files == [f"{stem}.json", f"{stem}.latent.safetensors", f"{stem}.mp4"], files
    assert (out / f"{stem}.mp4").read_bytes()[4:8] == b"ftyp", "not an mp4"
    side = json.loads((out / f"{stem}.json").read_text())
    for key in ("prompt", "seed", "model", "mode", "budget", "plan", "demands", "weights", "parallel", "timings"):
        assert key in side, f"sidecar lacks {key}"
    assert side["seed"] == 4 and side["parallel"] == {"world_size": 1}
    assert [s["grid"] for s in side["plan"]["stages"]] == side["plan"]["chosen"]["grids"]
    assert all(s["time_s"] is not None and {"grid", "steps", "shift"} <= set(s) for s in side["plan"]["stages"])
    assert {"encode", "stage1", "stage4", "decode", "total"} <= set(side["timings"])
    from safetensors.torch import load_file

    assert load_file(out / f"{stem}.latent.safetensors")["latent"].shape == (1, 16, 5, 8, 8)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--budget", "1.5"], "sampling.budget must be in (0, 1]"),
        (["--budget", "0.1"], "reachable densities"),
        (["--steps", "0"], "sampling.steps must be >= 1"),
        (["--steps", "3"], "sampling.steps must be >= 4 in mode dvg"),
        (["--frame_num", "16"], "nearest valid: 13 or 17"),
        (["--size", "60x64"], "width must be a multiple of 16"),
        (["--model", "/nonexistent/model"], "model not found"),
        (["--model", "{tmp}"], "not a diffusers pipeline directory"),
        (["--image", "{tmp}/x.png"], "text-to-video checkpoint"),
        (["--set", "dvg.alpha"], "override must be key=value"),
        (["--set", "dvg.alhpa=2"], "unknown config key dvg.alhpa"),
        (["--mode", "fixed"], "mode fixed needs --fixed"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(wan, tmp_path, capsys, extra, needle):
    path, _ = wan
    out = tmp_path / "out"
    (tmp_path / "x.png").write_bytes(b"")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(path), "--prompt", PROMPT,
            "--out", str(out), *extra]  # fmt: skip
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists(), "nothing may be written on bad input"


def test_unknown_mode_is_an_argparse_error(wan, tmp_path, capsys):
    path, _ = wan
    argv = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(path), "--prompt", "x",
            "--mode", "fast", "--out", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        generate_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'fast'" in err[0]


# -- image-to-video ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_i2v(tiny_checkpoint) -> tuple[Path, DiffusionPipeline]:
    path = tiny_checkpoint("wan-i2v")
    return path, DiffusionPipeline.from_pretrained(path, use_safetensors=True)


def _image():
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb)


def test_i2v_full_mode_equals_wan_image_to_video_pipeline(wan_i2v, tmp_path):
    path, pipe = wan_i2v
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    engine = Engine(_config(path, "sampling.mode=full", "sampling.steps=6"), pipe)
    ours = engine.generate([Request(PROMPT, seed=7, image=str(image_path))], decode=False, progress=False)
    ref = _pipeline_latent(pipe, 7, 6, 5.0, image=_image())
    assert _rel(ours.latent, ref) < 1e-5, f"I2V full mode differs from the pipeline by {_rel(ours.latent, ref):.2e}"


def test_i2v_condition_is_sampled_at_every_stage_with_the_image_in_frame_0(wan_i2v, tmp_path):
    from dvg_dist.dvg import sample_at, stage_coords
    from dvg_dist.dvg.planner import Grid

    path, pipe = wan_i2v
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    seen: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"][:, 16:].clone()), with_kwargs=True
    )
    try:
        engine = Engine(_config(path, "sampling.steps=12"), pipe)
        result = engine.generate([Request(PROMPT, seed=7, image=str(image_path))], decode=False, progress=False)
    finally:
        hook.remove()
    full = Grid(5, 8, 8)
    conditioning = engine.adapter.encode([PROMPT], [""], engine.config.sampling, _image(), full)
    grids = [Grid(*g) for g in result.record.chosen["grids"]]
    coords = stage_coords(grids)
    assert len(seen) == 2 * 12
    for k, (trace, cond) in enumerate(zip([t for t in result.trace for _ in (0, 1)], seen)):
        expected = sample_at(conditioning.latent_condition, coords[trace.stage], full)
        assert torch.equal(cond, expected.to(cond)), f"call {k} (stage {trace.stage + 1}): condition differs"
        assert torch.all(cond[:, :4, 0] == 1) and torch.all(cond[:, :4, 1:] == 0), "mask must mark frame 0 only"
    assert len({g.t for g in grids}) > 1 or len({g.h for g in grids}) > 1, "the plan should change the grid"


def test_decode_equals_the_pipelines_own_np_output(wan):
    path, pipe = wan
    engine = Engine(_config(path, "sampling.mode=full", "sampling.steps=4"), pipe)
    ours = engine.generate([Request(PROMPT, seed=3)], decode=True, progress=False).frames
    latents = hash_noise(3, 16, torch.arange(5), torch.arange(8), torch.arange(8))
    ref = pipe(
        prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=4, guidance_scale=5.0,
        height=64, width=64, num_frames=17, output_type="np",
    ).frames  # fmt: skip
    expected = (ref.clip(0, 1) * 255).round().astype("uint8")
    assert ours.shape == expected.shape == (1, 17, 64, 64, 3)
    assert int(abs(ours.astype(int) - expected.astype(int)).max()) == 0, "decoded frames differ from WanPipeline's"
