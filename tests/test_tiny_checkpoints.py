"""Tiny random-weight checkpoints (``dvg_dist.models.tiny``) are real diffusers pipelines.

Each family is built once per session (``conftest_tiny``), loaded back through ``DiffusionPipeline.from_pretrained``
offline, and run for a few steps with guidance on: the latent has the expected shape, is finite, and depends on
the prompt (so the text path is real, not padded away). Same seed → byte-identical safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dvg_dist.models.tiny import FAMILIES, TINY_META_FILE, build_tiny_checkpoint, read_tiny_meta

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "make_tiny_checkpoint.py"

EXPECTED = {
    "wan": ("WanPipeline", "UniPCMultistepScheduler"),
    "wan-moe": ("WanPipeline", "UniPCMultistepScheduler"),
    "wan-i2v": ("WanImageToVideoPipeline", "UniPCMultistepScheduler"),
    "wan-ti2v": ("WanPipeline", "UniPCMultistepScheduler"),
    "hunyuan": ("HunyuanVideoPipeline", "FlowMatchEulerDiscreteScheduler"),
    "hunyuan15": ("HunyuanVideo15Pipeline", "FlowMatchEulerDiscreteScheduler"),
    "hunyuan15-i2v": ("HunyuanVideo15ImageToVideoPipeline", "FlowMatchEulerDiscreteScheduler"),
    "hunyuan15-meanflow": ("HunyuanVideo15Pipeline", "FlowMatchEulerDiscreteScheduler"),
    "hunyuan15-meanflow-i2v": ("HunyuanVideo15ImageToVideoPipeline", "FlowMatchEulerDiscreteScheduler"),
    "ltx": ("LTXPipeline", "FlowMatchEulerDiscreteScheduler"),
    "cogvideox": ("CogVideoXPipeline", "CogVideoXDPMScheduler"),
    "cogvideox-i2v": ("CogVideoXImageToVideoPipeline", "CogVideoXDPMScheduler"),
}
# 17 frames × 64×64 pixels: VAE 4×8×8 (Wan, HunyuanVideo) or 4×16×16 (HV-1.5), 16 latent channels; Wan 2.2 TI2V:
# 4×16×16 and 48 channels.
LATENT = {f: (1, 16, 5, 4, 4) if f.startswith("hunyuan15") else (1, 16, 5, 8, 8) for f in FAMILIES}
LATENT["wan-ti2v"] = (1, 48, 5, 4, 4)
LATENT["ltx"] = (1, 3 * 2 * 2, 16)  # LTXPipeline's packed [B, S, C]: VAE 8x32x32 gives a 3x2x2 latent
LATENT["cogvideox"] = LATENT["cogvideox-i2v"] = (1, 6, 16, 8, 8)  # [B, F, C, H, W], 5 frames padded to 6


def load(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe: Any, family: str, meta: dict[str, Any], prompt: str) -> torch.Tensor:
    """Three steps, ``output_type="latent"``, fixed latents, guidance on (real CFG for every family)."""
    latents = torch.randn(LATENT[family], generator=torch.Generator().manual_seed(0))
    kw: dict[str, Any] = dict(num_frames=17, num_inference_steps=3, output_type="latent", latents=latents)
    if not (family.startswith("hunyuan15") and family.endswith("i2v")):  # HV-1.5 I2V takes its size from the image
        kw.update(height=64, width=64)
    if family.startswith("wan"):
        kw.update(guidance_scale=5.0, negative_prompt="blurry, static")
        if family == "wan-moe":
            kw.update(guidance_scale_2=3.0)
    elif family == "hunyuan":
        kw.update(true_cfg_scale=4.0, negative_prompt="blurry, static", prompt_template=meta["prompt_template"])
    elif family == "ltx":
        kw.update(guidance_scale=3.0, negative_prompt="blurry, static")
    elif family.startswith("cogvideox"):  # the DPM scheduler draws noise every step: a seeded generator
        kw.update(guidance_scale=6.0, negative_prompt="blurry, static", generator=torch.Generator().manual_seed(0))
    if family.endswith("i2v") and family != "wan-ti2v":  # TI2V's tiny checkpoint is its text-to-video pipeline
        kw.update(image=Image.new("RGB", (64, 64), (200, 40, 90)))
    return pipe(prompt=prompt, **kw).frames


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_as_the_real_pipeline_and_scheduler(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint(family)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe = load(path)
    assert (type(pipe).__name__, type(pipe.scheduler).__name__) == EXPECTED[family]
    meta = read_tiny_meta(path)
    assert meta["family"] == family and meta["seed"] == 0
    if family.startswith("wan"):
        cfg = pipe.scheduler.config
        shift = 5.0 if family == "wan-ti2v" else 3.0  # TI2V-5B's released flow_shift
        assert (cfg.prediction_type, cfg.use_flow_sigmas, cfg.flow_shift) == ("flow_prediction", True, shift)
        assert pipe.transformer.config.patch_size in ([1, 2, 2], (1, 2, 2))
        assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    if family == "wan-moe":
        assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None
        a, b = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), "the two Wan 2.2 experts have identical weights"
    if family == "wan-i2v":
        assert pipe.transformer.config.in_channels == 36
        assert pipe.transformer.config.image_dim == pipe.image_encoder.config.hidden_size
    if family == "wan-ti2v":  # Wan 2.2 TI2V-5B's layout: per-token timesteps, the Wan 2.2 VAE
        vae = pipe.vae.config
        assert pipe.config.expand_timesteps and pipe.config.boundary_ratio is None
        assert (vae.z_dim, vae.is_residual, vae.patch_size, vae.in_channels, vae.out_channels) == (48, True, 2, 12, 12)
        assert (vae.scale_factor_temporal, vae.scale_factor_spatial) == (4, 16) and len(vae.latents_std) == 48
        assert pipe.transformer.config.in_channels == pipe.transformer.config.out_channels == 48
    if family == "ltx":  # LTX-Video's layout: patch 1, the 8x32x32 timestep-conditioned VAE, dynamic shifting
        t, vae, sched = pipe.transformer.config, pipe.vae, pipe.scheduler.config
        assert (t.patch_size, t.patch_size_t, t.in_channels, t.caption_channels) == (1, 1, 16, 32)
        assert t.cross_attention_dim == t.num_attention_heads * t.attention_head_dim
        assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)
        assert vae.config.timestep_conditioning and float(vae.latents_std.max()) > 1.0
        assert sched.use_dynamic_shifting and sched.shift_terminal == 0.1
    if family.startswith("cogvideox"):  # CogVideoX 1.5's layout and its released v-prediction DPM settings
        t, sched = pipe.transformer.config, pipe.scheduler.config
        assert (t.patch_size, t.patch_size_t, t.use_rotary_positional_embeddings, t.patch_bias) == (2, 2, True, False)
        assert (t.in_channels, t.ofs_embed_dim) == ((32, 32) if family.endswith("i2v") else (16, None))
        assert (sched.prediction_type, sched.timestep_spacing, sched.rescale_betas_zero_snr) == (
            "v_prediction", "trailing", True,
        )  # fmt: skip
        assert sched.snr_shift_scale == 1.0 and pipe.vae.config.scaling_factor == 0.7
        assert pipe.vae_scale_factor_spatial == 8 and pipe.vae.config.invert_scale_latents
    if family == "hunyuan":
        assert set(meta["prompt_template"]) == {"template", "crop_start"}
    if family.startswith("hunyuan15"):
        meanflow = "meanflow" in family  # step- and guidance-distilled: timestep_r, one pass
        assert pipe.transformer.config.use_meanflow == meanflow
        assert pipe.guider.guidance_scale == 1.0 if meanflow else pipe.guider.guidance_scale > 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_with_guidance_and_the_prompt_matters(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint(family)
    pipe, meta = load(path), read_tiny_meta(path)
    a = run_pipe(pipe, family, meta, "a red fox jumps over a fence")
    b = run_pipe(pipe, family, meta, "a calm blue lake at night")
    assert tuple(a.shape) == LATENT[family], f"latent shape {tuple(a.shape)}, expected {LATENT[family]}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite latents"
    diff = float((a - b).abs().max())
    assert diff > 1e-5, f"two different prompts give latents within {diff:.2e}: the text path has no effect"
    again = run_pipe(pipe, family, meta, "a red fox jumps over a fence")
    assert torch.equal(a, again), "the same call twice differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_byte_identical_safetensors(
    family: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    first = tiny_checkpoint(family)
    second = build_tiny_checkpoint(family, tmp_path / "again", seed=0)
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert Path("transformer/diffusion_pytorch_model.safetensors") in files
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.safetensors"))
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), f"{rel} differs between two seed-0 builds"


def test_another_seed_gives_other_weights(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    rel = "transformer/diffusion_pytorch_model.safetensors"
    other = build_tiny_checkpoint("wan", tmp_path / "seed1", seed=1)
    assert (tiny_checkpoint("wan") / rel).read_bytes() != (other / rel).read_bytes()


def test_refuses_unknown_family_and_non_empty_out(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_checkpoint("sdxl", tmp_path / "x")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_checkpoint("wan", out)
    assert (out / "keep.txt").read_text() == "mine"
    assert build_tiny_checkpoint("wan", out, overwrite=True) == out
    assert not (out / "keep.txt").exists() and (out / TINY_META_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"], "temporary build directories left behind"


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    """One real subprocess: what a user runs (exit code, stdout is the directory, loads offline)."""
    out = tmp_path / "wan"
    cmd = [sys.executable, str(SCRIPT), "--family", "wan", "--out", str(out), "--seed", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out)
    meta = read_tiny_meta(out)
    assert (meta["family"], meta["seed"]) == ("wan", 3)
    assert type(load(out)).__name__ == "WanPipeline"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--family", "sdxl"], "argument --family: invalid choice"),
        (["--family", "wan", "--seed", "x"], "argument --seed: invalid int value"),
        (["--family", "wan", "--busy"], "not empty"),
        (["--lora-of", "/nonexistent/tiny-wan"], "has no transformer"),
        (["--family", "wan", "--lora-of", "x"], "not allowed with argument"),
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint_cli", SCRIPT)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    if "--busy" in args:
        args = [a for a in args if a != "--busy"]
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("make_tiny_checkpoint.py: error: ") and expected in err, err
