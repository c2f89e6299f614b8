"""Per-stage parallel layouts (``parallel.stage_layouts``, ``dvg_dist/parallel/layouts.py``): the spec syntax and its
one-line refusals, the cost model, and — on 2, 3 and 4 gloo processes, every family's tiny checkpoint, CFG on and
off — the final latent of every layout mix against one process and against each other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import run_distributed
from PIL import Image

from dvg_dist.config import ConfigError, load_config
from dvg_dist.dvg.planner import CostModel
from dvg_dist.executors.local import main as generate_main
from dvg_dist.models import InputError
from dvg_dist.parallel.layouts import ArchModel, LayoutSpec, LinkModel, auto_candidates, choose, estimate
from dvg_dist.runtime.distributed import resolve_stage_layouts

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (("a red ball rolling over green grass", 11), ("a blue cube on a table", 12), ("a cat", 13))
# 5 steps at budget 0.625 is the smallest DVG plan of the tiny 5x8x8 latents: every stage runs at least one call.
COMMON = ["sampling.steps=5", "sampling.budget=0.625"]
FIXED_MODE = ["sampling.mode=fixed", "dvg.fixed=[0.75, 0.6]"]
"""A plan that does not depend on the content: a batch of prompts runs the grids each prompt runs alone."""
# family → (config, overrides with CFG on, overrides with CFG off, needs an image)
FAMILIES: dict[str, tuple[str, list[str], list[str], bool]] = {
    "wan": ("tiny-wan.yaml", [], ["sampling.guidance_scale=1"], False),
    "wan-moe": ("tiny-wan-moe.yaml", [], ["sampling.guidance_scale=1", "sampling.guidance_scale_2=1"], False),
    "wan-i2v": ("tiny-wan-i2v.yaml", [], ["sampling.guidance_scale=1"], True),
    "wan-ti2v": ("tiny-wan-ti2v.yaml", [], ["sampling.guidance_scale=1"], False),
    "hunyuan": ("tiny-hunyuan.yaml", ["sampling.true_cfg_scale=3.5", "sampling.negative_prompt=blurry"], [], False),
    "hunyuan15": ("tiny-hunyuan15.yaml", [], ["sampling.guidance_scale=1"], False),
    "hunyuan15-i2v": ("tiny-hunyuan15-i2v.yaml", [], ["sampling.guidance_scale=1"], True),
    "ltx": ("tiny-ltx.yaml", [], ["sampling.guidance_scale=1"], False),
    "cogvideox-i2v": ("tiny-cogvideox-i2v.yaml", [], ["sampling.guidance_scale=1"], True),
}
BATCHED_CFG = {"ltx", "cogvideox-i2v"}
"""Families whose pipeline runs both guidance branches as one batch (``Adapter.batched_cfg``): the engine does too
wherever both run on the same ranks, and a CFG-parallel stage runs each at batch 1 — the same video up to that
batch's round-off, so the bit-for-bit sets below hold for them only where the compared runs batch alike."""
# The fixed layout of each world (2 heads in every tiny model: Ulysses at most 2).
BASE = {2: (2, 1, 1), 3: (1, 3, 1), 4: (2, 2, 1)}
"""world → (ulysses, ring, cfg)."""
# A link where latency dominates (as for these tiny models on gloo), given in the config so that `auto` is
# deterministic: the model then prefers the layouts with the fewest collectives per call.
AUTO_LINK = ["parallel.link_latency_us=100", "parallel.link_bandwidth_gbs=1", "parallel.compute_tflops=0.01"]
# world → runs: (name, stage_layouts, CFG on, prompts (indices into PROMPTS: the batch), content-independent plan)
RUNS: dict[int, list[tuple[str, str, bool, tuple[int, ...], bool]]] = {
    2: [
        ("u2", "fixed", True, (0,), False),
        ("cfg2", "cfg2", True, (0,), False),
        ("switch-0", "cfg2,u2,cfg2,u2", True, (0,), True),
        ("switch-1", "cfg2,u2,cfg2,u2", True, (1,), True),
        ("off-mix", "dp2,r2,u2,u2", False, (0, 1), True),
    ],
    3: [
        ("r3", "fixed", True, (0,), False),
        ("off-dp3", "dp3,dp3,r3,r3", False, (0, 1, 2), True),
    ],
    4: [
        ("cfg2xu2", "cfg2xu2", True, (0,), False),
        ("auto", "auto", True, (0, 1), True),
        ("switch", "dp2xcfg2,dp2xu2,dp2xcfg2,dp2xu2", True, (0, 1), True),
        ("mix", "dp2xu2,cfg2xr2,u2xr2,cfg2xu2", True, (0, 1), True),
    ],
}
# Bit-identical by construction: every rank runs the very forwards a reference runs — the same sp group size and
# shards, one prompt per forward where the reference has one, one thread — and the guidance combination is the same
# elementwise expression; switching layouts between stages moves no data.
SAME_AS_ONE_PROCESS = {(2, "cfg2"), (4, "auto")}
"""(world, run) whose every stage has a one-rank sp group and one prompt per forward: each prompt's own
single-process latent, bit for bit (the hooks' split and gather are copies; attention runs diffusers' native)."""
SAME_AS_RUN = {(4, "cfg2xu2"): [(2, "u2", 0)], (4, "switch"): [(2, "switch-0", 0), (2, "switch-1", 0)]}
"""(world, run) → for each of its prompts, (world, run, prompt) with the same forwards: CFG-parallel over two
Ulysses-2 halves of 4 ranks is sequential CFG on 2 Ulysses ranks; DP × CFG-parallel / DP × Ulysses 2, switched at
every stage, is each prompt alone on CFG-parallel / Ulysses 2, switched likewise."""
TOL = 5e-6
"""Every other case vs one process (relative max difference). Not zero: a ring merges partial softmaxes by
log-sum-exp, joint attention (the Hunyuan families) attends the text separately and merges, and a GEMM over another
number of rows (a shard, or a batch of 2 instead of 1) may sum in another order. Measured: up to 9.6e-7."""


def _requests(prompts: tuple[int, ...], image: str | None) -> list[Any]:
    from dvg_dist.runtime.engine import Request

    return [Request(PROMPTS[k][0], seed=PROMPTS[k][1], image=image) for k in prompts]


def _config(family: str, path: str, cfg_on: bool, fixed_plan: bool, layouts: str | None = None) -> Any:
    name, on, off, _ = FAMILIES[family]
    extra = [*COMMON, *(on if cfg_on else off), *(FIXED_MODE if fixed_plan else [])]
    if layouts is not None:
        extra += [f"parallel.stage_layouts={layouts}", *(AUTO_LINK if layouts == "auto" else [])]
    return load_config(ROOT / "configs" / name, [f"model.path={path}", *extra])


def _stage_runs(rank: int, world: int, paths: dict[str, str], image: str) -> dict | None:
    """Every family × this world's runs on this rank; rank 0 returns (latent, layouts per stage) per run."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import DiffusionPipeline

    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext, guidance_on
    from dvg_dist.runtime.engine import Engine, sidecar

    u, r, c = BASE[world]
    par = ParallelContext(build_groups(ParallelLayout(world, u, r, c, num_heads=2)))
    out: dict[tuple[str, str], Any] = {}
    for family, path in paths.items():
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
        needs_image = FAMILIES[family][3]
        for name, layouts, cfg_on, prompts, fixed_plan in RUNS[world]:
            config = _config(family, path, cfg_on, fixed_plan, layouts)
            par.setup_stage_layouts(config, 2, guidance_on(config))
            engine = Engine(config, pipe, parallel=par)
            result = engine.generate(_requests(prompts, image if needs_image else None), decode=False, progress=False)
            # The sidecar's plan carries each stage's layout record (what ran, why, every candidate's estimate).
            stages = sidecar(result, 0, config, {})["plan"]["stages"]
            out[(family, name)] = (result.latent, [st["layout"]["layout"] for st in stages], stages)
    return out if rank == 0 else None


def _references(paths: dict[str, str], image: str) -> dict:
    """One process, one thread (as every spawned rank), each prompt alone: (family, CFG on, fixed plan, prompt)."""
    from diffusers import DiffusionPipeline

    from dvg_dist.runtime.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {}
        for family, path in paths.items():
            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
            for cfg_on, fixed_plan, n in ((True, False, 1), (True, True, 2), (False, True, 3)):
                engine = Engine(_config(family, path, cfg_on, fixed_plan), pipe)
                for k, request in enumerate(_requests(tuple(range(n)), image if FAMILIES[family][3] else None)):
                    result = engine.generate([request], decode=False, progress=False)
                    ref[(family, cfg_on, fixed_plan, k)] = result.latent
        return ref
    finally:
        torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_stage_layouts_give_the_single_process_latent(tiny_checkpoint, tmp_path):
    paths = {family: str(tiny_checkpoint(family)) for family in FAMILIES}
    image = tmp_path / "first.png"
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype("uint8")).save(image)
    ref = _references(paths, str(image))
    got = {world: run_distributed(_stage_runs, world, paths, str(image), timeout=600)[0] for world in RUNS}
    worst = []
    for world, runs in RUNS.items():
        for name, layouts, cfg_on, prompts, fixed_plan in runs:
            for family in FAMILIES:
                latent, used, stages = got[world][(family, name)]
                if layouts == "auto":  # latency-bound: no collective inside a forward, one prompt per forward
                    assert used == ["dp2xcfg2"] * 4, (family, used)
                    for st in stages:
                        estimates = st["layout"]["estimates"]
                        assert sorted(estimates) == sorted(s.name for s in auto_candidates(4, 2, True, batch=2))
                        assert min(estimates, key=lambda n: estimates[n]["total_ms"]) == "dp2xcfg2", estimates
                else:
                    base = LayoutSpec(1, BASE[world][2], *BASE[world][:2]).name
                    assert used == [base if e == "fixed" else e for e in (layouts.split(",") * 4)[:4]], (name, used)
                for i, k in enumerate(prompts):
                    mine, expected = latent[i : i + 1], ref[(family, cfg_on, fixed_plan, k)]
                    batched = family in BATCHED_CFG and cfg_on
                    if (world, name) in SAME_AS_ONE_PROCESS and not batched:
                        assert torch.equal(mine, expected), (world, name, family, k, _rel(mine, expected))
                    if (world, name) in SAME_AS_RUN and not (batched and name == "cfg2xu2"):
                        w, other, j = SAME_AS_RUN[(world, name)][i]
                        theirs = got[w][(family, other)][0][j : j + 1]
                        assert torch.equal(mine, theirs), (world, name, family, k, _rel(mine, theirs))
                    worst.append((_rel(mine, expected), world, name, family, k))
    bad = [w for w in worst if not w[0] < TOL]
    assert not bad, f"layouts whose latent differs from one process by >= {TOL}: {bad}"
    print("largest relative differences:", sorted(worst, reverse=True)[:3])


def test_layout_specs_are_parsed_and_bad_ones_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    assert [LayoutSpec.parse(t).name for t in ("cfg2xu2", "U2xR2", "r2xu2xdp1", "dp2xu1", "u1")] == [
        "cfg2xu2", "u2xr2", "u2xr2", "dp2", "u1"
    ]  # fmt: skip
    assert LayoutSpec.parse("dp2xcfg2xu2").layout(2).world_size == 8
    for value, needle in [
        ("cfg3", "cfg degree must be 1 or 2"),
        ("u2xu2", "u given twice"),
        ("q2", "bad term 'q2'"),
        ("[u2, u2]", "must be one entry or 4"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [f"parallel.stage_layouts={value}"])
    path = str(tiny_checkpoint("wan"))
    config = load_config(ROOT / "configs" / "tiny-wan.yaml", [f"model.path={path}"])
    assert config.parallel.stage_layouts is None and resolve_stage_layouts(config, 4, 2, True) is None
    ok = load_config(None, ["parallel.stage_layouts=auto, fixed, cfg2xu2, dp2xu2"])
    assert resolve_stage_layouts(ok, 4, 2, True, batch=2) == ("auto", "fixed", LayoutSpec(1, 2, 2), LayoutSpec(2, 1, 2))
    for layouts, world, guidance, batch, needle in [
        ("u2", 4, True, None, "layout u2 uses dp 1 × cfg 1 × ulysses 2 × ring 1 = 2 ranks, but the world has 4"),
        ("u4", 4, True, None, "ulysses 4 does not divide num_heads=2; with sp 4 use ulysses in [1, 2]"),
        ("cfg2xu2", 4, False, None, "CFG-parallel, which needs guidance"),
        ("dp2xu2", 4, True, 1, "runs 2 batch slices side by side, but the batch has 1 prompt(s)"),
    ]:
        with pytest.raises(InputError, match=re.escape(needle)):
            resolve_stage_layouts(load_config(None, [f"parallel.stage_layouts={layouts}"]), world, 2, guidance, batch)
    with pytest.raises(InputError, match="cannot be combined with --shard_weights"):
        resolve_stage_layouts(
            load_config(None, ["parallel.stage_layouts=auto", "parallel.shard_weights=true"]), 2, 2, True
        )
    # From the command line: refused before any process starts, one prompt per batch by default; with
    # --batch_size 2, three prompts leave a last batch of one.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\ny\nz\n")
    base = ["--config", str(ROOT / "configs" / "tiny-wan.yaml"), "--model", path, "--out", str(tmp_path / "o"),
            "--nproc", "2", "--set", "parallel.stage_layouts=auto,dp2,u2,u2"]  # fmt: skip
    for more in (["--prompt", "x"], ["--prompts", str(prompts), "--batch_size", "2"]):
        assert generate_main([*base, *more]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "parallel.stage_layouts[1]: layout dp2 runs 2 batch slices" in errors[0], errors
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_batch_size_runs_data_parallel_stages_from_the_command_line(tiny_checkpoint, tmp_path):
    """generate.py --batch_size 2 on 2 ranks with the sketch and stage 3 data parallel: each video equals its prompt
    generated alone in one process (fixed plan; a batch of 2 may sum in another order), and the sidecars say so."""
    from safetensors.torch import load_file

    from dvg_dist import DVG

    path = str(tiny_checkpoint("wan"))
    config = ROOT / "configs" / "tiny-wan.yaml"
    lines = [("a red ball", 3), ("a blue cube", 4)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "seed": s, "name": f"v{k}"}) + "\n" for k, (p, s) in enumerate(lines))
    )
    argv = ["--config", str(config), "--model", path, "--prompts", str(prompts), "--out", str(tmp_path / "o"),
            "--nproc", "2", "--batch_size", "2", "--mode", "fixed", "--fixed", "0.5,0.6", "--save-latent",
            "--no-progress", "--set", "parallel.stage_layouts=dp2,u2,dp2,cfg2"]  # fmt: skip
    assert generate_main(argv) == 0
    alone = DVG.from_pretrained(path, config=config, sampling__mode="fixed", dvg__fixed=[0.5, 0.6])
    for k, (prompt, seed) in enumerate(lines):
        want = alone.generate(prompt, seed=seed, output_type="latent").latent
        got = load_file(tmp_path / "o" / f"v{k}.latent.safetensors")["latent"]
        assert _rel(got, want) < TOL, (k, _rel(got, want))
        side = json.loads((tmp_path / "o" / f"v{k}.json").read_text())
        assert side["batch"] == 2 and side["seed"] == seed
        assert [st["layout"]["layout"] for st in side["plan"]["stages"]] == ["dp2", "u2", "dp2", "cfg2"]


def test_cost_model_prices_every_collective():
    # Per layer 10·L + 1·L² FLOPs, 2 layers, hidden 4, 3 output elements per token, 2-byte elements; a link of 1 ms
    # per collective, 1000 B/s and 1000 FLOP/s. One model call: 8 tokens, 2 prompts, CFG on (2 branches).
    arch = ArchModel(CostModel(10.0, 1.0, (1, 1, 1)), layers=2, hidden=4, out_per_token=3, elem_bytes=2)
    link = LinkModel(1e-3, 1e3, 1e3)
    u2, r2, cfg2, dp2 = (LayoutSpec.parse(t) for t in ("u2", "r2", "cfg2", "dp2"))
    # Every layout does the same FLOPs per rank here: 2 forwards x 2 prompts x 4 tokens = 1 forward x 2 x 8 = ...
    for spec in (u2, r2, cfg2, dp2):
        assert estimate(spec, 8, 2, 2, arch, link).compute_s == pytest.approx(0.576)
    # Ulysses: 2 forwards x 2 layers x 4 all-to-alls x (1 ms + 2·4·4·2 B / 2 / 1000) + 2 x gather (1 ms + 1·2·4·3·2 B).
    e = estimate(u2, 8, 2, 2, arch, link)
    assert (e.comm_s, e.collectives) == (pytest.approx(16 * 0.033 + 2 * 0.049), 18)
    # Ring: 2 forwards x 2 layers x 1 pass x (1 ms + K and V, 2·2·4·4·2 B) + the same gathers.
    e = estimate(r2, 8, 2, 2, arch, link)
    assert (e.comm_s, e.collectives) == (pytest.approx(4 * 0.129 + 2 * 0.049), 6)
    # CFG-parallel: one all-gather of the velocity (2·8·3·2 B); DP: one all-gather of the slices (1·1·8·3·2 B).
    assert estimate(cfg2, 8, 2, 2, arch, link).comm_s == pytest.approx(0.097)
    assert estimate(dp2, 8, 2, 2, arch, link).comm_s == pytest.approx(0.049)
    best, estimates = choose([u2, r2, cfg2, dp2], 8, 2, 2, arch, link)
    assert best == dp2 and set(estimates) == {u2, r2, cfg2, dp2}
    # Without guidance CFG-parallel has nothing to split; with one prompt, no DP.
    assert [s.name for s in auto_candidates(4, 2, True)] == ["u2xr2", "cfg2xu2", "dp2xu2", "dp2xcfg2", "dp4"]
    assert [s.name for s in auto_candidates(4, 2, False, batch=1)] == ["u2xr2"]
