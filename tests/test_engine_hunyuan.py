"""The staged engine drives diffusers' own HunyuanVideo classes exactly as HunyuanVideoPipeline does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from dvg_dist.config import load_config
from dvg_dist.dvg import Planner, hash_noise
from dvg_dist.dvg.planner import COST_PRESETS
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import ADAPTERS, FAMILIES, HunyuanVideoAdapter
from dvg_dist.models.hunyuan import prompt_template_of
from dvg_dist.models.tiny import read_tiny_meta
from dvg_dist.runtime.engine import Engine, Request

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"


def _config(path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny-hunyuan.yaml", [f"model.path={path}", *overrides])


@pytest.fixture(scope="module")
def hunyuan(tiny_checkpoint) -> tuple[Path, DiffusionPipeline]:
    path = tiny_checkpoint("hunyuan")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_registered_and_geometry_from_the_checkpoint(hunyuan):
    path, pipe = hunyuan
    assert ADAPTERS["HunyuanVideoPipeline"] is HunyuanVideoAdapter and FAMILIES["hunyuanvideo"] is HunyuanVideoAdapter
    adapter = HunyuanVideoAdapter(pipe)
    assert adapter.spec == HunyuanVideoAdapter.read_spec(path)
    assert (adapter.spec.latent_channels, adapter.spec.patch, adapter.spec.vae_scale) == (16, (1, 2, 2), (4, 8, 8))
    # The tiny tokenizer's template comes from the checkpoint directory the pipeline was loaded from.
    assert adapter.prompt_template == read_tiny_meta(path)["prompt_template"]
    assert prompt_template_of(path.parent) is None
    # The sequence plan names modules that exist in the diffusers transformer.
    names = {name for name, _ in pipe.transformer.named_modules()}
    plan = adapter.sequence_plan
    assert set(plan.split_inputs) | set(plan.replicated_inputs) | set(plan.gather_outputs) <= names


def test_auto_cost_model_of_the_released_architecture_is_the_preset():
    released = {"num_attention_heads": 24, "attention_head_dim": 128, "mlp_ratio": 4.0, "patch_size": 2,
                "patch_size_t": 1}  # fmt: skip
    assert HunyuanVideoAdapter.cost_model_from_config(released) == COST_PRESETS["hunyuanvideo"]


@pytest.mark.parametrize("true_cfg", [1.0, 3.5], ids=["embedded-only", "true-cfg"])
def test_full_mode_equals_hunyuan_video_pipeline(hunyuan, true_cfg):
    path, pipe = hunyuan
    cfg = _config(path, "sampling.mode=full", "sampling.steps=6", f"sampling.true_cfg_scale={true_cfg}")
    ours = Engine(cfg, pipe).generate([Request(PROMPT, seed=3, negative_prompt="blurry")], decode=False, progress=False)
    latents = hash_noise(3, 16, torch.arange(5), torch.arange(8), torch.arange(8))
    ref = pipe(
        prompt=PROMPT, negative_prompt="blurry", latents=latents, num_inference_steps=6, guidance_scale=6.0,
        true_cfg_scale=true_cfg, height=64, width=64, num_frames=17, output_type="latent",
        prompt_template=read_tiny_meta(path)["prompt_template"],
    ).frames  # fmt: skip
    diff = _rel(ours.latent, ref)
    assert diff < 1e-5, f"engine full mode differs from HunyuanVideoPipeline by {diff:.2e}"
    assert len(ours.trace) == 6
    assert [t.timestep for t in ours.trace] == [float(t) for t in pipe.scheduler.timesteps]
    assert all(t.guidance == true_cfg for t in ours.trace)


def test_dvg_token_counts_seen_by_the_transformer_match_the_plan(hunyuan):
    path, pipe = hunyuan
    cfg = _config(path, "sampling.steps=12", "sampling.budget=0.6")
    seen: list[int] = []
    # x_embedder is the patch embedding: [B, C, T, H, W] → [B, tokens, D].
    hook = pipe.transformer.x_embedder.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    try:
        result = Engine(cfg, pipe).generate([Request(PROMPT, seed=2)], decode=True, progress=False)
    finally:
        hook.remove()
    grids = result.record.chosen["grids"]
    planner = Planner(cfg.latent_grid(), 12, 0.6, cfg.dvg, 2)
    expected = []
    for stage, count in enumerate(planner.executed_counts):
        t, h, w = grids[stage]
        expected += [t * (h // 2) * (w // 2)] * count  # embedded guidance only: one pass per step
    assert seen == expected, f"tokens per call {seen} differ from the plan's {expected}"
    assert len({tuple(g) for g in grids}) > 1, "the plan should use more than one grid"
    assert result.frames is not None and result.frames.shape == (1, 17, 64, 64, 3)
    assert result.frames.dtype.name == "uint8"


# -- launch/generate.py ----------------------------------------------------------------------------------


def test_generate_writes_video_and_sidecar(hunyuan, tmp_path):
    import imageio_ffmpeg

    path, _ = hunyuan
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny-hunyuan.yaml"), "--model", str(path), "--prompt", PROMPT,
            "--seed", "4", "--true_cfg_scale", "2.0", "--negative_prompt", "blurry", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert generate_main(argv) == 0
    stem = "a-red-ball-rolling-over-green-grass_s4_dvg"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.json", f"{stem}.mp4"]
    video = out / f"{stem}.mp4"
    assert video.read_bytes()[4:8] == b"ftyp", "not an mp4"
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    reader.close()
    assert meta["fps"] == 24 and tuple(meta["size"]) == (64, 64)
    side = json.loads((out / f"{stem}.json").read_text())
    assert side["seed"] == 4 and side["true_cfg_scale"] == 2.0 and side["negative_prompt"] == "blurry"
    assert side["mode"] == "dvg" and side["experts"] == {"transformer": 12}
    assert [s["grid"] for s in side["plan"]["stages"]] == side["plan"]["chosen"]["grids"]
    assert {"encode", "stage1", "stage4", "decode", "total"} <= set(side["timings"])


def test_image_on_a_text_to_video_checkpoint_is_refused_in_one_line(hunyuan, tmp_path, capsys):
    path, _ = hunyuan
    out = tmp_path / "out"
    (tmp_path / "x.png").write_bytes(b"")
    argv = ["--config", str(ROOT / "configs" / "tiny-hunyuan.yaml"), "--model", str(path), "--prompt", PROMPT,
            "--image", str(tmp_path / "x.png"), "--out", str(out)]  # fmt: skip
    assert generate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "text-to-video checkpoint" in err[0], err
    assert not out.exists(), "nothing may be written on bad input"
