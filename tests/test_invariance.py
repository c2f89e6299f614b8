"""The invariant: for the same config and seed, the final latent does not depend on the world size or the
parallel layout (docs/parallel.md) — every family, DVG and full, Ulysses, ring, USP and CFG-parallel."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_distributed
from PIL import Image

pytest_plugins = ["conftest_tiny"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball rolling over green grass"
# family → (config, extra overrides, needs an image)
FAMILIES = {
    "wan": ("tiny-wan.yaml", [], False),
    "wan-moe": ("tiny-wan-moe.yaml", [], False),
    "wan-i2v": ("tiny-wan-i2v.yaml", [], True),
    "hunyuan": ("tiny-hunyuan.yaml", ["sampling.true_cfg_scale=3.5", "sampling.negative_prompt=blurry"], False),
    "hunyuan15": ("tiny-hunyuan15.yaml", [], False),
    "hunyuan15-i2v": ("tiny-hunyuan15-i2v.yaml", [], True),
    # MeanFlow: timestep_r rides along every sharded forward; CFG kept on so CFG-parallel carries it in both halves.
    "hunyuan15-meanflow-i2v": ("tiny-hunyuan15-i2v.yaml", [], True),
}
# (ulysses, ring, cfg) per world size; the first layout of each world size also runs `full`.
LAYOUTS = {2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)], 3: [(1, 3, 1)], 4: [(2, 2, 1)]}


def _latents(rank: int, world: int, paths: dict[str, str], image: str) -> dict | None:
    """Every family × layout × mode on this rank; rank 0 returns the final latents."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import DiffusionPipeline

    from dvg_dist.config import load_config
    from dvg_dist.parallel import ParallelLayout, build_groups, sequence_parallel_state
    from dvg_dist.runtime.distributed import ParallelContext
    from dvg_dist.runtime.engine import Engine, Request

    out = {}
    for family, path in paths.items():
        config_name, extra, needs_image = FAMILIES[family]
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
        for k, (u, r, c) in enumerate(LAYOUTS[world]):
            par = ParallelContext(build_groups(ParallelLayout(world, u, r, c, num_heads=2)))
            for mode in ("dvg", "full") if k == 0 else ("dvg",):
                cfg = load_config(
                    ROOT / "configs" / config_name, [f"model.path={path}", f"sampling.mode={mode}", *extra]
                )
                engine = Engine(cfg, pipe, parallel=par)
                req = Request(PROMPT, seed=11, image=image if needs_image else None)
                result = engine.generate([req], decode=False, progress=False)
                out[(family, (u, r, c), mode)] = result.latent
            state = sequence_parallel_state(pipe.transformer)
            # Proof the sharded path ran: with an sp group, the parallel attention was called.
            out[(family, (u, r, c), "parallel_attention_calls")] = 0 if state is None else state.calls
    return out if rank == 0 else None


def _reference(paths: dict[str, str], image: str) -> dict:
    from diffusers import DiffusionPipeline

    from dvg_dist.config import load_config
    from dvg_dist.runtime.engine import Engine, Request

    ref = {}
    for family, path in paths.items():
        config_name, extra, needs_image = FAMILIES[family]
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
        for mode in ("dvg", "full"):
            cfg = load_config(ROOT / "configs" / config_name, [f"model.path={path}", f"sampling.mode={mode}", *extra])
            req = Request(PROMPT, seed=11, image=image if needs_image else None)
            ref[(family, mode)] = Engine(cfg, pipe).generate([req], decode=False, progress=False).latent
    return ref


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    paths = {family: str(tiny_checkpoint(family)) for family in FAMILIES}
    image = tmp_path_factory.mktemp("img") / "first.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype("uint8")).save(image)
    return paths, str(image), _reference(paths, str(image))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_final_latent_does_not_depend_on_the_layout(setup, world):
    paths, image, ref = setup
    got = run_distributed(_latents, world, paths, image, timeout=600)[0]
    calls = {key[:2]: n for key, n in got.items() if key[2] == "parallel_attention_calls"}
    for (family, (u, r, c)), n in calls.items():
        assert (n > 0) == (u * r > 1), f"{family} layout {(u, r, c)}: {n} parallel attention calls"
    latents = {key: value for key, value in got.items() if key[2] != "parallel_attention_calls"}
    assert len(latents) == len(FAMILIES) * (len(LAYOUTS[world]) + 1)
    worst = []
    for (family, layout, mode), latent in latents.items():
        expected = ref[(family, mode)]
        rel = float((latent - expected).abs().max() / expected.abs().max())
        worst.append((rel, family, layout, mode))
        assert torch.isfinite(latent).all()
    bad = [w for w in worst if w[0] >= 1e-4]
    assert not bad, f"layouts whose latent differs from one process (rel max diff ≥ 1e-4): {bad}"
