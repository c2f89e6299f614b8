"""``--compile`` on the tiny Wan, CPU inductor: one compile serves every stage shape of every plan (the sequence
dimension is dynamic; later videos with other plans compile nothing), the output equals eager within float
round-off, compile time is reported apart from the denoising time, and the same holds under sequence parallelism
(the SP attention runs eagerly between compiled regions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed

from dvg_dist.config import ConfigError, load_config
from dvg_dist.models import InputError
from dvg_dist.runtime.engine import Engine, Request

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-wan.yaml"
PROMPT = "a red ball rolling over green grass"
# Three videos, three plans (different seeds and budgets): together more stage shapes than one plan has.
RUNS = [(1, 0.5), (2, 0.6), (3, 0.7)]


def _config(path: Path | str, *overrides: str) -> Any:
    return load_config(CONFIG, [f"model.path={path}", "sampling.steps=12", *overrides])


def _videos(path: str, compile: str, parallel: Any = None) -> list[dict[str, Any]]:
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    engine = Engine(_config(path, f"model.compile={compile}"), pipe, parallel=parallel)
    out = []
    for seed, budget in RUNS:
        engine.config = _config(path, f"model.compile={compile}", f"sampling.budget={budget}")
        r = engine.generate([Request(PROMPT, seed=seed)], decode=False, progress=False)
        out.append({"latent": r.latent, "grids": [tuple(g) for g in r.record.chosen["grids"]], "timings": r.timings})
    return out


def _compile_after_first(videos: list[dict[str, Any]]) -> list[float]:
    return [v["timings"]["compile"] for v in videos[1:]]


def test_compile_reuses_one_graph_across_stage_shapes_and_plans(tiny_checkpoint):
    path = str(tiny_checkpoint("wan"))
    eager = _videos(path, "none")
    compiled = _videos(path, "blocks")
    shapes = {g for v in compiled for g in v["grids"]}
    assert len(shapes) >= 5, f"the three plans should cover several stage shapes: {sorted(shapes)}"
    for e, c in zip(eager, compiled):
        assert e["grids"] == c["grids"], "compiling must not change the plan"
        rel = float((c["latent"] - e["latent"]).abs().max() / e["latent"].abs().max())
        assert rel < 1e-5, f"compiled differs from eager by {rel:.2e}"
        assert "compile" not in e["timings"]
    first = compiled[0]["timings"]
    assert first["compile"] > 0.0 and first["denoise"] > 0.0
    # The later videos run new plans (new stage shapes) on the graphs compiled for the first: nothing compiles.
    assert _compile_after_first(compiled) == [0.0, 0.0]


def test_compile_refuses_what_it_cannot_run(tiny_checkpoint):
    path = tiny_checkpoint("wan")
    with pytest.raises(ConfigError, match="--compile with --offload") as err:
        _config(path, "model.compile=blocks", "model.offload=true")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="must be none, blocks or full"):
        _config(path, "model.compile=fast")
    from dvg_dist.parallel import ParallelLayout
    from dvg_dist.runtime import memory

    cfg = _config(path, "model.compile=blocks", "parallel.shard_weights=true")
    with pytest.raises(InputError, match="--compile with --shard_weights"):
        memory.check_options(cfg, ParallelLayout(2, 2, 1, num_heads=2))


def _sp_job(rank: int, world: int, path: str) -> list[dict[str, Any]]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext

    par = ParallelContext(build_groups(ParallelLayout(world, world, 1, num_heads=2)))
    return _videos(path, "blocks", parallel=par)[:2]


@pytest.mark.slow
def test_compile_under_sequence_parallelism_equals_eager(tiny_checkpoint):
    path = str(tiny_checkpoint("wan"))
    reference = _videos(path, "none")[:2]
    reports = run_distributed(_sp_job, 2, path, timeout=300.0)
    for rank, videos in enumerate(reports):
        for e, c in zip(reference, videos):
            assert e["grids"] == c["grids"]
            rel = float((c["latent"] - e["latent"]).abs().max() / e["latent"].abs().max())
            assert rel < 1e-4, f"rank {rank}: compiled SP differs from eager one process by {rel:.2e}"
        assert videos[0]["timings"]["compile"] > 0.0 and videos[1]["timings"]["compile"] == 0.0
    assert torch.equal(reports[0][0]["latent"], reports[1][0]["latent"]), "ranks disagree"
