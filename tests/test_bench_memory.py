"""``bench/memory.py``: the analytic table's arithmetic on known values, and the JSON a smoke run writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def _bench() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    return _bench()


@pytest.fixture(scope="module")
def rows(bench: Any) -> dict[str, dict[str, Any]]:
    k = {"AutoencoderKLWan": 4.0, "AutoencoderKLHunyuanVideo": 4.0, "AutoencoderKLHunyuanVideo15": 4.0}
    return {r["name"]: r for r in bench.analytic(8, 0.5, k)}


def test_weights_per_rank(rows: dict[str, dict[str, Any]]) -> None:
    wan = rows["Wan2.1-T2V-14B"]
    assert 14.0 * GB < wan["params"] < 14.5 * GB
    assert wan["weights_replicated_bytes"] == wan["params"] * 2  # bf16
    # FSDP over 8 ranks: an eighth of the weights, plus the root and one block all-gathered while they run.
    assert wan["weights_fsdp_bytes"] == pytest.approx(
        wan["params"] * 2 / 8 + (wan["root_params"] + wan["block_params"]) * 2
    )
    assert 3.3 * GB < wan["params"] * 2 / 8 < 3.7 * GB  # ≈ 14B × 2 bytes / 8
    assert 340e6 < wan["block_params"] < 360e6  # one Wan 14B block: 8d² attention + 2·d·f FFN ≈ 351M
    moe = rows["Wan2.2-T2V-A14B"]
    assert moe["experts"] == 2 and moe["weights_replicated_bytes"] == 2 * wan["weights_replicated_bytes"]
    assert 8.2 * GB < rows["HunyuanVideo-1.5 (720p)"]["params"] < 8.4 * GB
    assert 12.5 * GB < rows["HunyuanVideo (13B)"]["params"] < 13.2 * GB


def test_text_encoders(rows: dict[str, dict[str, Any]]) -> None:
    t = rows["Wan2.1-T2V-14B"]["text_bytes"]
    assert t["each"] == t["rank0_on_rank0"] == pytest.approx(5.681e9 * 2)  # umT5-XXL encoder in bf16
    assert t["rank0_on_others"] == 0 and t["offload_after_encode"] == 0
    assert rows["HunyuanVideo (13B)"]["text_params"] == pytest.approx(7.505e9 + 0.123e9)
    assert rows["HunyuanVideo-1.5 (720p)"]["text_params"] == pytest.approx(7.071e9 + 0.218e9)


def test_activations(bench: Any, rows: dict[str, dict[str, Any]]) -> None:
    # Wan 14B full 720p grid at sp 8: 75,600 / 8 = 9,450 tokens; per token 2d + max(7d, 2f) = 10,240 + 35,840.
    assert bench.activation_bytes(9450, 5120, 13824, 0) == 2 * 9450 * 46080
    stages = rows["Wan2.1-T2V-14B"]["stages"]
    assert stages[-1]["grid"] == [21, 90, 160] and stages[-1]["tokens"] == 75600
    assert stages[-1]["tokens_per_rank"] == 9450
    assert stages[-1]["bytes_per_block"] == 2 * 9450 * 46080
    assert [s["bytes_per_block"] for s in stages] == sorted(s["bytes_per_block"] for s in stages)
    hv = rows["HunyuanVideo (13B)"]["stages"][-1]  # joint text: 256 replicated tokens × 7d on every rank
    assert hv["tokens"] == 118800 and hv["bytes_per_block"] == 2 * (14850 * (2 * 3072 + 8 * 3072) + 256 * 7 * 3072)


def test_vae_estimates(rows: dict[str, dict[str, Any]]) -> None:
    v = rows["Wan2.1-T2V-14B"]["vae"]  # k = 4 bytes per pixel-frame in fp32 → 2 in bf16
    out = 81 * 3 * 720 * 1280 * 2
    assert v["output_bytes"] == out and v["k_bytes_per_pixel_frame"] == 2.0
    assert v["untiled_bytes"] == v["weights_bytes"] + 2.0 * 4 * 1280 * 720 + out
    assert v["tiled_bytes"] == v["weights_bytes"] + 2.0 * 4 * 256 * 256 + out
    assert v["distributed_other_bytes"] == v["tiled_bytes"] - out
    hv15 = rows["HunyuanVideo-1.5 (720p)"]["vae"]
    assert hv15["unit_frames"] == 121  # no temporal tiling: every frame of a tile at once


@pytest.mark.slow
def test_smoke_run_writes_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke", "--out", str(out),
           "--checkpoint", str(tmp_path / "ckpt")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r) >= {"command", "measured", "vae_coefficients", "analytic", "machine"}
    phases = r["measured"]["phases"]
    assert phases == ["load", "encode", "stage1", "stage2", "stage3", "stage4", "decode"]
    for c in r["measured"]["configs"]:
        assert set(c) >= {"name", "world_size", "options", "peak_bytes", "ranks"}
        assert set(c["peak_bytes"]) == set(phases) and all(v > 0 for v in c["peak_bytes"].values())
        rank = c["ranks"][0]
        assert rank["calls"] == 2 * 8, "8 steps, two passes each (guidance 5)"
        assert rank["components"]["transformer"] > 0 and len(rank["grids"]) == 4
    assert [c["name"] for c in r["measured"]["configs"]] == ["baseline", "vae_tiling"]
    models = r["analytic"]["models"]
    assert [m["name"] for m in models][:2] == ["Wan2.1-T2V-14B", "Wan2.2-T2V-A14B"]
    for m in models:
        assert set(m) >= {"params", "weights_replicated_bytes", "weights_fsdp_bytes", "text_bytes", "stages", "vae"}
        assert len(m["stages"]) == 4 and m["vae"]["weights_bytes"] > 0
    assert "untiled_bytes" in models[0]["vae"], "the smoke run probes the Wan VAE only"
    assert "peak memory" in proc.stdout or "configuration" in proc.stdout
