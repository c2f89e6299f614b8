"""Several processes: the launcher, layout validation, rank 0's decision, CFG-parallel, failure handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from safetensors.torch import load_file

from dvg_dist.config import load_config
from dvg_dist.executors.local import main as generate_main

pytest_plugins = ["conftest_tiny"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-wan.yaml")


def _generate(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "generate.py"), *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


COMMON = ["--prompt", "a red ball", "--seed", "5", "--save-latent", "--no-progress"]
LATENT = "a-red-ball_s5_dvg.latent.safetensors"


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory) -> tuple[str, torch.Tensor]:
    path = str(tiny_checkpoint("wan"))
    out = tmp_path_factory.mktemp("single")
    proc = _generate("--config", CONFIG, "--model", path, *COMMON, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path, load_file(out / LATENT)["latent"]


def test_cfg_parallel_with_nproc_equals_one_process(single, tmp_path):
    path, reference = single
    # Also: rank 0 encodes the prompt and broadcasts it — the same result as every rank encoding.
    two = _generate("--config", CONFIG, "--model", path, *COMMON, "--out", str(tmp_path), "--nproc", "2",
                    "--use_cfg_parallel", "--set", "parallel.text_encoder=rank0")  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    latent = load_file(tmp_path / LATENT)["latent"]
    assert torch.equal(latent, reference), f"CFG-parallel latent differs: {float((latent - reference).abs().max()):.2e}"
    stem = LATENT.removesuffix(".latent.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATENT, f"{stem}.mp4", f"{stem}.json"])
    assert two.stdout.count("wrote ") == 1, "only rank 0 writes and reports"


def test_torchrun_ulysses_equals_one_process(single, tmp_path):
    path, reference = single
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(ROOT / "launch" / "generate.py"), "--config", CONFIG, "--model", path, *COMMON,
         "--out", str(tmp_path), "--ulysses_size", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    latent = load_file(tmp_path / LATENT)["latent"]
    rel = float((latent - reference).abs().max() / reference.abs().max())
    assert rel < 1e-4, f"Ulysses-2 latent under torchrun differs from one process by {rel:.2e}"
    import json

    side = json.loads((tmp_path / LATENT.replace(".latent.safetensors", ".json")).read_text())
    assert side["parallel"] == {"world_size": 2, "ulysses": 2, "ring": 1, "cfg": 1}


def test_a_rank_that_raises_fails_the_run_naming_the_rank(tiny_checkpoint, tmp_path):
    path = str(tiny_checkpoint("wan"))
    proc = _generate(
        "--config", CONFIG, "--model", path, "--prompt", "x", "--out", str(tmp_path / "o"), "--nproc", "2",
        "--use_cfg_parallel", "--no-progress", "--set", "parallel.timeout_s=60",
        env={"DVG_FAULT_INJECT": "1:5"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "rank 1 failed" in proc.stderr and "injected fault at step 5" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.mp4")), "no output from a failed run"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--nproc", "3", "--use_cfg_parallel"], "world size 3 is odd"),
        (["--nproc", "2", "--ulysses_degree", "3"], "world size 2 != cfg 1 × ulysses 3"),
        (["--nproc", "2", "--use_cfg_parallel", "--guidance_scale", "1"], "CFG-parallel needs guidance"),
        (["--nproc", "4", "--ulysses_degree", "4", "--ring_degree", "1"], "does not divide num_heads=2"),
        (["--nproc", "0"], "--nproc must be >= 1"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--set", "parallel.backend=mpi"], "parallel.backend must be one of auto, nccl, gloo"),
        (["--nproc", "2", "--backend", "nccl"], "backend nccl needs CUDA"),
        (["--set", "parallel.text_encoder=rank1"], "parallel.text_encoder must be one of each, rank0"),
    ],
)
def test_bad_layouts_are_refused_before_any_process_starts(tiny_checkpoint, tmp_path, capsys, extra, needle):
    argv = ["--config", CONFIG, "--model", str(tiny_checkpoint("wan")), "--prompt", "x", "--out", str(tmp_path / "o"),
            *extra]  # fmt: skip
    assert generate_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (tmp_path / "o").exists()


def _follow_rank0(rank: int, world: int) -> tuple[float, int]:
    from dvg_dist.dvg.sampler import Decision
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext

    par = ParallelContext(build_groups(ParallelLayout(world, world, 1, 1)))
    # Each rank's local analysis "sees" different floats and would choose differently.
    local = {0: Decision(0.7, 3), 1: Decision(1.0, 5)}[rank]
    decided = par.broadcast_decider(lambda x0: local)(torch.zeros(1))
    return decided.s, decided.t23


def test_every_rank_follows_rank_0s_decision():
    results = run_distributed(_follow_rank0, 2)
    assert results == [(0.7, 3), (0.7, 3)], results


def test_default_layout_prefers_ulysses_then_ring(tiny_checkpoint):
    from dvg_dist.runtime.distributed import resolve_layout

    cfg = load_config(CONFIG, [f"model.path={tiny_checkpoint('wan')}"])
    lay = resolve_layout(cfg, 4, num_heads=2, guidance_on=True)
    assert (lay.ulysses_degree, lay.ring_degree, lay.cfg_degree) == (2, 2, 1)
    cfg_p = load_config(CONFIG, ["parallel.cfg_parallel=true"])
    lay = resolve_layout(cfg_p, 4, num_heads=2, guidance_on=True)
    assert (lay.ulysses_degree, lay.ring_degree, lay.cfg_degree) == (2, 1, 2)
