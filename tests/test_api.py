"""The Python API (``dvg_dist/api.py``): ``DVG.from_pretrained`` / ``DVG(pipe)`` / ``generate`` / ``plan`` on the tiny
Wan — equal to diffusers' pipeline in full mode, to the CLI's own output, on one process and two; typed outputs;
callbacks; one-line errors before any model work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from distributed import run_distributed
from PIL import Image
from safetensors.torch import load_file

from dvg_dist import DVG, Plan, StepInfo, VideoOutput
from dvg_dist.config import ConfigError
from dvg_dist.dvg import InfeasibleBudget, hash_noise
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import InputError

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-wan.yaml"
PROMPT = "a red ball rolling over green grass"


@pytest.fixture(scope="module")
def dvg(tiny_checkpoint) -> DVG:
    return DVG.from_pretrained(tiny_checkpoint("wan"), config=CONFIG)


def test_generate_returns_typed_outputs_and_matches_the_cli(dvg, tiny_checkpoint, tmp_path):
    seen: list[StepInfo] = []
    out = dvg.generate(PROMPT, seed=4, budget=0.5, callback=seen.append)
    assert isinstance(out, VideoOutput) and isinstance(out.plan, Plan)
    assert out.frames.shape == (17, 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.latent.shape == (1, 16, 5, 8, 8) and out.seed == 4 and out.fps == 16
    chosen = out.plan.chosen
    assert abs(chosen.density - 0.5) <= 0.02 and chosen.speedup_bound == pytest.approx(1 / chosen.flop_density)
    assert out.plan.demands is not None and out.plan.demands.w_s + out.plan.demands.w_t == pytest.approx(1.0)
    assert [st.grid for st in out.plan.stages] == [tuple(g) for g in out.sidecar["plan"]["chosen"]["grids"]]
    assert {"encode", "denoise", "decode", "total"} <= set(out.timings)
    # The callback: one call per model call, the stages and grids of the plan, in order.
    assert [s.step for s in seen] == list(range(12)) and {s.num_steps for s in seen} == {12}
    for st_index, st in enumerate(out.plan.stages):
        calls = [s for s in seen if st.steps[0] <= s.step <= st.steps[1]]
        assert calls and all(s.stage == st_index and s.grid == st.grid for s in calls)

    # The CLI is a user of the API: its saved latent and plan are the API's, bit for bit.
    argv = ["--config", str(CONFIG), "--model", str(tiny_checkpoint("wan")), "--prompt", PROMPT, "--seed", "4",
            "--budget", "0.5", "--out", str(tmp_path), "--save-latent", "--no-progress"]  # fmt: skip
    assert generate_main(argv) == 0
    (latent_file,) = tmp_path.glob("*.latent.safetensors")
    assert torch.equal(load_file(str(latent_file))["latent"], out.latent)

    saved = out.save(tmp_path / "api" / "ball.mp4")
    assert saved.stat().st_size > 0 and saved.with_suffix(".json").is_file()

    # plan(): the same denoising, no decode.
    planned = dvg.plan(PROMPT, seed=4, budget=0.5)
    assert planned.frames is None and torch.equal(planned.latent, out.latent) and planned.plan == out.plan
    pil = dvg.generate(PROMPT, seed=4, budget=0.5, output_type="pil")
    assert len(pil.frames) == 17 and isinstance(pil.frames[0], Image.Image)
    assert np.array_equal(np.asarray(pil.frames[3]), out.frames[3])
    with pytest.raises(InputError, match="has no frames"):
        planned.save(tmp_path / "x.mp4")


def test_wrapping_a_loaded_pipeline_equals_diffusers_in_full_mode(tiny_checkpoint):
    pipe = DiffusionPipeline.from_pretrained(tiny_checkpoint("wan"), use_safetensors=True)
    latents = hash_noise(3, 16, torch.arange(5), torch.arange(8), torch.arange(8))
    ref = pipe(prompt=PROMPT, negative_prompt="", latents=latents, num_inference_steps=8, guidance_scale=5.0,
               height=64, width=64, num_frames=17, output_type="latent").frames  # fmt: skip
    dvg = DVG(pipe, config=CONFIG)  # the one line a diffusers script changes
    out = dvg.generate(PROMPT, seed=3, mode="full", steps=8, output_type="latent")
    assert out.frames is None
    assert torch.equal(out.latent, ref), (
        f"DVG(pipe) full mode differs from the pipeline by {(out.latent - ref).abs().max()}"
    )
    # The per-call settings were this call's only.
    assert dvg.config.sampling.mode.value == "dvg" and dvg.config.sampling.steps == 12


def test_bad_arguments_raise_one_line_before_any_model_work(dvg):
    calls: list[Any] = []
    cases = [
        (dict(budget=1.5), ConfigError, r"sampling.budget must be in \(0, 1\]"),
        (dict(budget=0.1), InfeasibleBudget, "reachable densities"),
        (dict(frame_num=16), InputError, "nearest valid: 13 or 17"),
        (dict(size="60x64"), InputError, "multiple of 16"),
        (dict(image="first.png"), InputError, "text-to-video checkpoint"),
        (dict(output_type="mp4"), InputError, "output_type must be np, pil or latent"),
        (dict(sharpness=2), InputError, "unknown argument sharpness"),
    ]
    for kwargs, error, needle in cases:
        with pytest.raises(error, match=needle) as info:
            dvg.generate(PROMPT, callback=calls.append, **kwargs)
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(InputError, match="prompt is empty"):
        dvg.generate("  ")
    assert calls == [], "no model call may run on bad input"
    with pytest.raises(InputError, match="model not found"):
        DVG.from_pretrained("/nonexistent/checkpoint", config=CONFIG)


def test_generate_batch_shares_one_plan_and_equals_each_prompt_alone_in_full_mode(dvg):
    prompts = [PROMPT, "a blue cube on a table"]
    alone = [dvg.generate(p, seed=k, mode="full", output_type="latent").latent for k, p in enumerate(prompts)]
    outs = dvg.generate_batch(prompts, seeds=[0, 1], mode="full", output_type="latent")
    assert [(o.prompt, o.seed, o.latent.shape) for o in outs] == [(p, k, alone[0].shape) for k, p in enumerate(prompts)]
    for got, want in zip(outs, alone, strict=True):
        assert float((got.latent - want).abs().max() / want.abs().max()) < 1e-5  # a batch of 2 sums in another order
    # DVG mode: one plan for the batch (demands pooled), in every video's record; the default seeds count up.
    first, second = dvg.generate_batch(prompts, budget=0.5)
    assert (first.seed, second.seed) == (0, 1) and first.frames.shape == second.frames.shape == (17, 64, 64, 3)
    assert first.plan == second.plan and first.sidecar["batch"] == 2
    assert not np.array_equal(first.frames, second.frames)
    calls: list[Any] = []
    for args, kwargs, needle in [
        ([[]], {}, "non-empty list"),
        ([prompts], {"seeds": [1]}, "2 prompts need as many seeds"),
        ([[PROMPT, " "]], {}, "prompt is empty"),
    ]:
        with pytest.raises(InputError, match=needle):
            dvg.generate_batch(*args, callback=calls.append, **kwargs)
    assert calls == []


def _two_rank_job(rank: int, world: int, path: str) -> list[torch.Tensor]:
    """Two generate calls on one DVG over a 2-rank process group (kept up between them)."""
    os.environ.update(HF_HUB_OFFLINE="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dvg = DVG.from_pretrained(path, config=CONFIG, parallel={"ulysses_degree": 2})
    first = dvg.generate(PROMPT, seed=1, budget=0.5, output_type="latent")
    second = dvg.generate(PROMPT, seed=2, budget=0.6)
    assert (second.frames is not None) == (rank == 0), "frames on rank 0 only"
    assert second.sidecar["parallel"]["world_size"] == 2
    return [first.latent, second.latent]


@pytest.mark.slow
def test_two_ranks_keep_the_group_between_calls_and_match_one_process(dvg, tiny_checkpoint):
    ref = [dvg.generate(PROMPT, seed=1, budget=0.5, output_type="latent").latent,
           dvg.generate(PROMPT, seed=2, budget=0.6, output_type="latent").latent]  # fmt: skip
    results = run_distributed(_two_rank_job, 2, str(tiny_checkpoint("wan")), timeout=300)
    for rank, latents in enumerate(results):
        for got, want in zip(latents, ref, strict=True):
            rel = float((got - want).abs().max() / want.abs().max())
            assert rel < 1e-5, f"rank {rank}: 2-rank API result differs from one process by {rel:.2e}"
