"""The committed demo model loads and reproduces its reference video; the trainer runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from dvg_dist.config import load_config
from dvg_dist.data import make_clip
from dvg_dist.data.procedural import OBJECT_RADIUS, training_params
from dvg_dist.data.train import (
    META_FILE,
    TEXT_LENGTH,
    Architecture,
    build_components,
    encode_text,
    fixed_vae,
    install_padding_bias,
    object_loss_weight,
    object_masks,
    smoke_config,
    stage_grids,
    train,
)
from dvg_dist.dvg.options import Mode
from dvg_dist.dvg.planner import Grid, InfeasibleBudget, Planner
from dvg_dist.runtime.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # the default (GPU-trained) and the one trained here on CPU, each with its stored reference frames
    "dvg-demo-wan": ROOT / "tests" / "data" / "demo_wan_full_seed0.png",
    "dvg-demo-wan-cpu": ROOT / "tests" / "data" / "demo_wan_cpu_full_seed0.png",
}
CAPTION = "a red disc moving quickly right over a plain black background"
REF_FRAMES = (0, 16, 32)
REF_SETTINGS = ("sampling.mode=full", "sampling.steps=12")  # fewer steps than the config's 24: a fast test


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reference_strip(frames: np.ndarray) -> np.ndarray:
    """Frames 0, 16 and 32 of a ``[F, H, W, 3]`` video side by side (the stored reference's layout)."""
    return np.concatenate([frames[f] for f in REF_FRAMES], axis=1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_model_reproduces_its_reference_frames(name):
    model, reference = ROOT / "models" / name, MODELS[name]
    config = load_config(ROOT / "configs" / "demo-wan.yaml", [f"model.path={model}", *REF_SETTINGS])
    result = Engine(config).generate([Request(CAPTION, seed=0)], progress=False)
    assert result.frames is not None and result.frames.shape == (1, 33, 64, 64, 3)
    ours = reference_strip(result.frames[0])
    ref = np.asarray(Image.open(reference).convert("RGB"))
    psnr = _psnr(ours, ref)
    assert psnr >= 30.0, f"full-mode frames differ from {reference.name}: PSNR {psnr:.1f} dB < 30 dB"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_committed_model_is_small_and_describes_its_training(name):
    model = ROOT / "models" / name
    size = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    assert size < 8 * 2**20, f"committed weights are {size / 2**20:.1f} MiB"
    meta = json.loads((model / META_FILE).read_text())
    assert {"seed", "dataset", "vae", "transformer", "wall_seconds"} <= set(meta)
    assert meta["dataset"]["object_radius_px"] == OBJECT_RADIUS  # trained on the dataset the harness renders


def test_padding_bias_equals_the_pipelines_512_token_padding():
    """Training pads captions to the batch's longest + 1 with a log-count bias; WanPipeline pads to 512 zeros."""
    parts = build_components(Architecture(heads=2, head_dim=12, layers=1, ffn_dim=32), seed=0)
    tok, enc, tr = parts["tokenizer"], parts["text_encoder"], parts["transformer"].eval()
    captions = [CAPTION, "", "a white square moving slowly up over a fine red and blue striped background"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():  # random weights of a useful scale, so the padding keys matter
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        full, _ = encode_text(tok, enc, captions, length=TEXT_LENGTH)
        short, bias = encode_text(tok, enc, captions)
        x, t = torch.randn(3, 12, 2, 4, 4, generator=gen), torch.tensor([900.0, 500.0, 100.0])
        ref = tr(x, t, full, return_dict=False)[0]
        wrapper = install_padding_bias(tr)
        wrapper.bias = bias
        ours = tr(x, t, short, return_dict=False)[0]
        wrapper.bias = None
        unbiased = tr(x, t, short, return_dict=False)[0]
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 1e-5, f"biased short padding differs from 512-token padding by {rel:.2e}"
    assert float((unbiased - ref).norm() / ref.norm()) > 1e-3, "the test cannot see the padding"


def _train_demo_main():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "launch" / "train_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_smoke_training_writes_a_loadable_pipeline(tmp_path):
    threads = torch.get_num_threads()
    out = train(smoke_config(tmp_path / "demo"))
    assert torch.get_num_threads() == threads, "train() must restore the torch thread count"
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.vae.config.scale_factor_spatial == 4 and len(pipe.vae.config.latents_mean) == 12
    meta = json.loads((out / META_FILE).read_text())
    assert meta["transformer"]["steps"] == 3 and meta["transformer"]["stage_grids"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "x", "--minutes", "-1"],
        ["--minutes", "5"],
        ["--out", "x", "--bogus"],
        ["--out", "x", "--object_weight_max_sigma", "1.5"],
        ["--out", "x", "--head_dim", "31"],
        ["--out", "x", "--layers", "0"],
    ],
)
def test_bad_flags_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _train_demo_main()(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_demo.py: error:"), err


def test_architecture_flags_build_that_transformer(tmp_path):
    argv = ["--out", str(tmp_path / "m"), "--clips", "4", "--frames", "5", "--steps", "2", "--batch", "2",
            "--layers", "2", "--heads", "2", "--head_dim", "12", "--ffn_dim", "24", "--threads", "1",
            "--weights_dtype", "float16", "--quiet"]  # fmt: skip
    assert _train_demo_main()(argv) == 0
    config = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (2, 2, 12)
    assert config["ffn_dim"] == 24
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["config"]["arch"]["layers"] == 2 and meta["transformer"]["steps"] == 2
    stored = safetensors.torch.load_file(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}  # loaded back as float32


def test_fixed_vae_is_the_4x4_block_mean_exact_in_time():
    clips = [make_clip(p) for p in training_params(3, seed=5)]
    video = torch.from_numpy(np.stack([c.video() for c in clips]))
    vae = fixed_vae()
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
        rec = vae.decode(z).sample
    pooled = F.avg_pool3d(video, (1, 4, 4))
    assert z.shape == (3, 12, 5, 16, 16)
    # latent frame k, group g = pixel frame 4k-3+g (frame 0 in every group of latent frame 0)
    assert torch.allclose(z[:, 9:12, 2], pooled[:, :, 8], atol=2e-3) and torch.allclose(
        z[:, 0:3, 2], pooled[:, :, 5], atol=2e-3
    )
    block_mean = pooled.repeat_interleave(4, 3).repeat_interleave(4, 4)
    err = float((rec - block_mean).abs().max())
    assert err < 5e-3, f"decode(encode(x)) differs from the 4x4 block mean by {err:.2e}"


def test_training_covers_every_grid_dvg_runs_the_demo_model_at():
    """The reduced grids trained on include every stage grid of every action DVG, spatial-only and
    temporal-only keep at the harness's budgets, and never the full grid (trained on separately)."""
    full = Grid(9, 16, 16)
    grids = set(stage_grids(full, 24))
    assert full not in grids
    for budget in (0.5, 0.6):
        planner = Planner(full, 24, budget, spatial_multiple=2)
        for mode in (Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY):
            try:
                feasible = planner.feasible(mode)
            except InfeasibleBudget:  # e.g. temporal-only at 0.5: nothing within δ (the harness relaxes it)
                assert mode != Mode.DVG
                continue
            for cand in feasible:
                assert set(cand.grids) - {full} <= grids, (budget, mode, cand.grids)
    assert Grid(4, 8, 8) in grids  # the sketch at budget 0.5


def test_object_masks_sit_on_the_object_in_the_latent_grid():
    """The loss weight's mask: the latent pixel under the object's centre is covered, the far corner is not,
    on the fixed VAE's grid (frame 0 alone, then 4 pixel frames per latent frame)."""
    params = training_params(2, seed=3)
    masks = object_masks(params, 33, 64, 64)
    assert masks.shape == (2, 1, 9, 16, 16) and 0 <= float(masks.min()) and float(masks.max()) <= 1
    for p, m in zip(params, masks):
        clip = make_clip(p, 33, 64, 64)
        x, y = clip.trajectory[16]  # pixel frame 16 is in latent frame 4 (frames 13-16)
        assert m[0, 4, int(y) // 4, int(x) // 4] > 0.9
        # mid-clip the object is within 3 frames x 3 px + radius 10 of the centre: the corners are uncovered
        assert m[0, 4, 0, 0] == 0 and m[0, 4, 15, 15] == 0 and m[0, 4, 0, 15] == 0 and m[0, 4, 15, 0] == 0


def test_object_weight_applies_only_up_to_its_noise_level():
    """Samples noised above ``max_sigma`` get the plain MSE's weight 1 everywhere; the rest 1 + w·mask."""
    masks = torch.rand(3, 1, 2, 4, 4)
    sigma = torch.tensor([0.2, 0.7, 0.9])
    w = object_loss_weight(masks, sigma, 8.0, 0.7)
    assert torch.equal(w[0], 1 + 8.0 * masks[0]) and torch.equal(w[1], 1 + 8.0 * masks[1])
    assert torch.equal(w[2], torch.ones_like(masks[2]))
    assert torch.equal(object_loss_weight(masks, sigma, 8.0, 1.0), 1 + 8.0 * masks)
