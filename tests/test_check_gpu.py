"""``launch/check_gpu.py`` on CPU at reduced depth: the real widths and heads, the planner's stage grids, tokens per
rank, the projection's arithmetic, one-line errors, and the sequence-parallel path on 2 gloo ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dvg_dist.config import load_config
from dvg_dist.dvg.planner import Grid, Planner
from dvg_dist.models import FAMILIES
from dvg_dist.runtime.check_gpu import REAL_ARCHS, build_transformer, main, materialize_random_

ROOT = Path(__file__).resolve().parents[1]
# hidden = heads × head dim (128; LTX-Video 64), parameters at the released depth (Wan2.1 14B, Wan2.2 TI2V 5B,
# HunyuanVideo 13B, HunyuanVideo-1.5 8.3B, LTX-Video 2B).
REAL = {
    "wan": (40, 5120, 14.0e9, 14.5e9),
    "wan-ti2v": (24, 3072, 4.9e9, 5.1e9),
    "hunyuan": (24, 3072, 12.5e9, 13.2e9),
    "hunyuan15": (16, 2048, 8.2e9, 8.4e9),
    "hunyuan15-distill": (16, 2048, 8.2e9, 8.4e9),  # + the timestep_r embedder
    "ltx": (32, 2048, 1.8e9, 2.0e9),
    "cogvideox": (48, 3072, 5.4e9, 5.7e9),  # CogVideoX1.5 5B: head dim 64
}
TINY = ["--layers", "1", "--size", "64x64", "--text_len", "8", "--steps-per-stage", "1"]


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "report.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _planner_grids(family: str, grid: Grid) -> list[list[int]]:
    """The stage grids the planner itself gives for this latent, independently of check_gpu."""
    arch = REAL_ARCHS[family]
    adapter = FAMILIES[arch.family]
    spec = adapter.spec_from_configs(arch.config, arch.vae)
    config = load_config(ROOT / "configs" / arch.run_config)
    cost = adapter.cost_model_from_config(arch.config)
    s = config.sampling
    planner = Planner(grid, s.steps, s.budget, config.dvg, spec.spatial_multiple, cost, spec.temporal_multiple)
    return [g.as_list() for g in planner.choose(0.5)[0].grids]


def _check_report(r: dict[str, Any], family: str, world: int) -> None:
    heads, hidden, lo, hi = REAL[family]
    assert (r["heads"], r["hidden"]) == (heads, hidden), f"{family}: built {r['heads']} heads, hidden {r['hidden']}"
    assert lo < r["params_full_depth"] < hi, f"{family}: {r['params_full_depth'] / 1e9:.2f}B at the released depth"
    assert r["params_built"] < r["params_full_depth"]
    assert r["world_size"] == world
    grids = [s["grid"] for s in r["stages"]]
    assert grids == r["plan"]["grids"] == _planner_grids(family, Grid(*r["latent"]))
    assert grids[-1] == r["latent"], "the last stage is the full latent"
    patch = r["patch"]
    for s in r["stages"]:
        tokens = math.prod(math.ceil(n / p) for n, p in zip(s["grid"], patch))
        assert s["tokens"] == tokens
        assert len(s["tokens_per_rank"]) == world and sum(s["tokens_per_rank"]) == tokens
        assert max(s["tokens_per_rank"]) - min(s["tokens_per_rank"]) <= 1
        assert s["ms_per_step"] > 0 and s["peak_bytes"] > 0
    assert [s["calls"] for s in r["stages"]] == r["plan"]["executed_counts"]
    j = r["projection"]
    assert j["full_s"] == pytest.approx(r["steps"] * r["stages"][-1]["ms_per_step"] / 1000)
    assert j["dvg_s"] == pytest.approx(sum(s["calls"] * s["ms_per_step"] / 1000 for s in r["stages"]))
    assert j["speedup_measured"] == pytest.approx(j["full_s"] / j["dvg_s"])
    assert j["speedup_flop_model"] == pytest.approx(1 / r["plan"]["flop_density"])


@pytest.mark.parametrize("family", ["wan", "wan-ti2v", "hunyuan", "hunyuan15", "hunyuan15-distill", "ltx", "cogvideox"])
def test_real_width_one_process(family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # LTX-Video's 8x32x32 VAE: 17 frames at 128x128 are a 3x4x4 latent (64x64 would leave DVG no room)
    size = ["--size", "128x128", "--frame_num", "17"] if family == "ltx" else ["--frame_num", "9"]
    r, out = _run(tmp_path, capsys, "--family", family, *TINY, *size)
    _check_report(r, family, world=1)
    if family == "hunyuan15-distill":  # the step-distilled recipe: 12 steps, a MeanFlow transformer
        assert r["steps"] == 12 and r["config"]["use_meanflow"] and r["config"]["task_type"] == "i2v"
    if family == "wan-ti2v":  # the Wan 2.2 VAE's 4x16x16 and 48 channels: 9 frames at 64x64 are a 3x4x4 latent
        assert r["latent"] == [3, 4, 4] and r["config"]["in_channels"] == r["config"]["out_channels"] == 48
    if family == "ltx":  # patch 1: one token per latent voxel; 128 channels; T5 prompt, FFN 4 × hidden
        assert r["latent"] == [3, 4, 4] and r["patch"] == [1, 1, 1] and r["config"]["in_channels"] == 128
        assert r["ffn"] == 8192 and r["stages"][-1]["tokens"] == 48
    if family == "cogvideox":  # 9 frames: 3 latent frames padded in front to 4 (patch_size_t 2), as the pipeline pads
        assert r["latent"] == [4, 8, 8] and r["patch"] == [2, 2, 2] and r["stages"][-1]["tokens"] == 32
    assert r["layers"] == 1 and r["dtype"] == "bfloat16" and r["memory_kind"] == "rss_high_water"
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    for s, line in zip(r["stages"], lines[header + 1 : header + 5]):
        assert line.split()[:3] == [str(s["stage"]), "x".join(map(str, s["grid"])), str(s["calls"])]
    assert "speed-up" in lines[header + 5]


def test_built_model_is_the_released_width() -> None:
    """Wan2.1 14B at one layer: the real projections, finite bf16 weights, biases 0 and norm scales 1."""
    model = build_transformer(REAL_ARCHS["wan"], 1, torch.bfloat16, torch.device("cpu"))
    attn = model.blocks[0].attn1
    assert attn.heads == 40 and tuple(attn.to_q.weight.shape) == (5120, 5120)
    assert tuple(model.blocks[0].ffn.net[0].proj.weight.shape) == (13824, 5120)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert float(attn.to_q.bias.abs().max()) == 0.0 and float(attn.to_q.weight.abs().max()) > 0.0
    assert not any(b.is_meta for b in model.buffers())


def test_random_weights_are_deterministic() -> None:
    from diffusers import WanTransformer3DModel

    def make(seed: int) -> torch.nn.Module:
        model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=1, text_dim=8)
        materialize_random_(model, torch.float32, torch.device("cpu"), seed)
        return model

    a, b, c = make(0).state_dict(), make(0).state_dict(), make(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    w = a["blocks.0.attn1.to_q.weight"]
    assert 0.5 < float(w.float().var() * 16) < 1.5, "matrices have variance ≈ 1/fan_in"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "sora"], "invalid choice"),
        (["--family", "wan", "--size", "100x64"], "width must be a multiple of 16"),
        (["--family", "wan-ti2v", "--size", "1280x720"], "height of 32 (nearest valid: 1280x704)"),
        (["--family", "wan-ti2v", "--size", "64x64", "--frame_num", "9", "--nproc", "3"], "one token per rank"),
        (["--family", "hunyuan15", "--frame_num", "10"], "not 4k+1"),
        (["--family", "ltx", "--size", "700x480"], "multiple of 32 and height of 32 (nearest valid: 704x480)"),
        (["--family", "ltx", "--frame_num", "160"], "frame count 160 is not 8k+1 for this model; nearest valid: 153"),
        (["--family", "wan", "--layers", "41"], "--layers must be in 1..40"),
        (["--family", "wan", "--nproc", "3", "--ulysses_degree", "3"], "does not divide num_heads=40"),
        (["--family", "wan", "--budget", "0.2"], "infeasible"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("check_gpu.py: error:") and "\n" not in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_refused_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--family", "wan", "--device", "cuda", "--nproc", "2"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_wan_two_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ulysses 2 over gloo: uneven shards (9 tokens → 5 + 4), every stage's output a finite full latent."""
    out = tmp_path / "report.json"
    code = main(["--family", "wan", *TINY, "--frame_num", "5", "--nproc", "2", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    _check_report(r, "wan", world=2)
    assert r["layout"] == {"ulysses": 2, "ring": 1}
    assert [s["tokens_per_rank"] for s in r["stages"]] == [[2, 2], [5, 4], [8, 8], [16, 16]]
    assert all(len(s["peak_bytes_per_rank"]) == 2 for s in r["stages"])
