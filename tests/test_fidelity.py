"""The fidelity harness (bench/fidelity.py): its metrics where the math fixes their values, and one end-to-end
smoke run (2 captions, 8 steps) on the tiny Wan checkpoint: the JSON schema, PSNR(full, full) = inf,
SSIM 1, and the contact sheet's size."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvg_dist.data import procedural

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


video = _load("bench_video", "_video.py")
fid = _load("bench_fidelity", "fidelity.py")


def _video(value: float | np.ndarray, frames: int = 3, size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.uint8), (frames, size, size, 3)).copy()


def test_psnr_identical_is_inf_and_constant_offset_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, size=(3, 16, 16, 3), dtype=np.uint8)
    assert video.psnr(a, a) == math.inf
    assert video.as_json_number(video.psnr(a, a)) == "inf"
    for offset in (1, 5, 50):
        assert video.psnr(a + np.uint8(offset), a) == pytest.approx(20 * math.log10(255 / offset), abs=1e-12)


def test_ssim_identical_is_one_and_constant_frames_follow_the_formula():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    assert video.ssim(a, a) == 1.0
    # Constant frames have no variance: SSIM = (2xy + C1) / (x² + y² + C1) on the luma values x, y.
    x, y = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    assert video.ssim(_video(x), _video(y)) == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), abs=1e-12)
    # Luma is BT.601: pure red at 200 has Y = 0.299·200.
    red = _video(np.array([200, 0, 0]))
    assert video.ssim(red, _video(0.299 * 200)) == pytest.approx(1.0, abs=1e-4)  # uint8 rounding of 59.8
    noisy = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert 0.0 < video.ssim(noisy, a) < 1.0
    with pytest.raises(ValueError, match="at least 11x11"):
        video.ssim(_video(0, size=8), _video(0, size=8))


def test_centroids_recover_the_datasets_ground_truth_trajectory():
    for caption in procedural.held_out_captions(3):  # one texture, one motion, one mix clip
        params = procedural.parse_caption(caption)
        clip = procedural.make_clip(params, 17, 64, 64)
        found = video.centroids(clip.frames, procedural.COLOURS[params.colour], tol=80.0)
        assert np.isfinite(found).all(), caption
        err = video.trajectory_error(found, clip.trajectory.astype(np.float64))
        assert err is not None and err < 0.5, f"{caption}: centroid off the ground truth by {err:.3f} px"
    missing = np.full((4, 2), np.nan)
    assert video.trajectory_error(missing, np.zeros((4, 2))) is None
    assert video.trajectory_error(np.array([[0.0, 0.0], [3.0, 4.0]]), np.zeros((2, 2))) == pytest.approx(2.5)


def test_smoke_run_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    argv = ["--smoke", "--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(tiny_checkpoint("wan"))]
    # A reference at the run's own 8 steps is the full run itself: every row's vs-reference metrics must equal its
    # vs-full ones exactly (what --steps 8 --reference-steps 50 reports is that comparison against another run).
    argv += ["--reference-steps", "8"]
    assert fid.main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "planner split" in printed and "paired standard error" in printed
    data = json.loads(out.read_text())

    assert set(data) >= {"config", "machine", "clips", "runs", "summary", "planner_split", "goals", "timings"}
    assert data["config"]["budgets"] == [0.5, 0.6] and data["config"]["steps"] == 8
    assert [c["kind"] for c in data["clips"]] == ["texture", "motion"]
    modes = ["full", "full-reseed", "dvg", "spatial-only", "temporal-only", "fixed", "random-renoise"]
    assert data["config"]["modes"] == modes
    runs = data["runs"]
    assert len(runs) == 2 * (2 + 2 * 5)
    row_keys = {"clip", "caption", "kind", "seed", "mode", "budget", "s", "t23", "r", "density", "psnr", "ssim"}
    row_keys |= {"identical", "motion_err_vs_full", "motion_err_vs_gt", "object_found", "psnr_vs_render"}
    assert data["config"]["reference_steps"] == 8
    for r in runs:
        assert set(r) >= row_keys
        assert (r["psnr_vs_reference"], r["ssim_vs_reference"]) == (r["psnr"], r["ssim"]), r
        assert isinstance(r["psnr_vs_render"], float) and 0 < r["psnr_vs_render"] < 100, r
        if r["mode"] == "full":
            assert r["psnr"] == "inf" and r["ssim"] == 1.0 and r["identical"], r
            assert r["budget"] is None and r["density"] == 1.0
        elif r["mode"] == "full-reseed":  # another sample: finite, not identical
            assert r["sample_seed"] == r["seed"] + 1000 and isinstance(r["psnr"], float) and not r["identical"]
        else:
            assert isinstance(r["psnr"], float) and 0 < r["psnr"] < 100 and -1 <= r["ssim"] < 1, r
            assert abs(r["density"] - r["budget"]) <= 0.02 + 1e-9 or r.get("relaxed"), r
    dvg = {(r["clip"], r["budget"]): r for r in runs if r["mode"] == "dvg"}
    for r in runs:
        if r["mode"] == "fixed":  # one content-independent action per budget
            assert [r["s"], r["t23"]] == r["fixed_action"]
        if r["budget"] is not None and r["mode"] != "dvg":
            mine = dvg[(r["clip"], r["budget"])]
            assert r["same_plan_as_dvg"] == (r["grids"] == mine["grids"])
            if r["same_plan_as_dvg"] and r["mode"] != "random-renoise":  # same computation, batched or alone
                assert r["psnr"] == pytest.approx(mine["psnr"], abs=0.01), (r, mine)
    for mode in ("dvg", "random-renoise"):
        assert all(r["demands"] is not None for r in runs if r["mode"] == mode)

    summary = {(s["mode"], s["budget"], s["kind"]): s for s in data["summary"]}
    assert summary[("full", None, "all")]["psnr"] == "inf"
    assert set(summary) >= {(m, b, k) for m in modes[2:] for b in (0.5, 0.6) for k in ("all", "texture", "motion")}
    for budget in ("0.5", "0.6"):
        assert set(data["planner_split"][budget]) == {"texture", "motion"}
        assert {"s_mean", "r_mean", "D_s_mean", "D_t_mean", "actions"} <= set(data["planner_split"][budget]["motion"])
    assert {"dvg_psnr_at_0.5_ge_25dB", "dvg_ge_each_ablation", "planner_split"} <= set(data["goals"])
    for name, g in data["goals"]["dvg_ge_each_ablation"].items():  # two clips, one seed: two pairs each
        pair = fid.paired(runs, name.split("@")[0], float(name.split("@")[1]))
        assert g["pairs"] == pair["pairs"] == 2 and g["paired_se_db"] == pytest.approx(pair["se_db"])
        assert g["margin_db"] == pytest.approx(pair["mean_db"])  # every pair finite: mean of differences

    sheet = Path(data["contact_sheet"]["path"])
    assert sheet == tmp_path / "fidelity_contact.png"
    # 2 clips × (dataset render + full + 5 ablations) rows of 6 frames, 64 px shown at 128 px.
    expected = video.sheet_size(2, 7, video.SHEET_FRAMES, 128, 128)
    assert Image.open(sheet).size == expected == tuple(data["contact_sheet"]["size"])


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        fid.parse_args(["--budgets", "0.5,1.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fidelity.py: error: budgets must be in (0, 1]") and "\n" not in err


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    argv = ["--smoke", "--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", str(tmp_path / "nowhere")]
    assert fid.main([*argv, "--out", str(tmp_path / "f.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fidelity.py: error: model not found: {tmp_path / 'nowhere'} (give a local diffusers pipeline directory)"
    ]
    assert not (tmp_path / "f.json").exists()


def test_paired_margin_and_standard_error_are_exact():
    # dvg − fixed on three (clip, seed) pairs: 1, 0, 2 → mean 1, sample sd 1, standard error 1/√3. A pair where
    # either PSNR is infinite (identical videos) is left out, and rows of other modes or budgets are ignored.
    def row(clip, seed, mode, psnr, budget=0.5):
        return {"clip": clip, "seed": seed, "mode": mode, "budget": budget, "psnr": psnr}

    rows = [row(0, 0, "dvg", 10.0), row(0, 0, "fixed", 9.0), row(1, 0, "dvg", 12.0), row(1, 0, "fixed", 12.0)]
    rows += [row(1, 1, "dvg", 14.0), row(1, 1, "fixed", 12.0), row(2, 0, "dvg", "inf"), row(2, 0, "fixed", 30.0)]
    rows += [row(0, 0, "fixed", 0.0, budget=0.6), row(0, 0, "spatial-only", 0.0)]
    got = fid.paired(rows, "fixed", 0.5)
    assert got["pairs"] == 3 and got["mean_db"] == pytest.approx(1.0)
    assert got["se_db"] == pytest.approx(1 / math.sqrt(3))
    assert fid.paired(rows, "temporal-only", 0.5) == {"pairs": 0, "mean_db": None, "se_db": None}
