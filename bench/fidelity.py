"""Fidelity of DVG against the full run: does DVG keep quality, and does content-aware allocation beat fixed?

    python bench/fidelity.py [--config configs/demo-wan.yaml] [--captions 32] [--seeds 0] [--budgets 0.5,0.6]
    python bench/fidelity.py --smoke          # 2 captions, few steps: the test's size
    python bench/fidelity.py --steps 8 --reference-steps 50 --out bench/results/fidelity_8steps.json

For each held-out caption and seed: the ``full`` run, and at every budget the ``dvg``, ``spatial-only``,
``temporal-only``, ``fixed`` and ``random-renoise`` runs, all decoded and compared with that caption's full
video. For scale, ``full-reseed`` compares the full run at seed + 1000 with the one at the seed: two unrelated
samples of the caption. One model load; modes whose plan does not depend on the video (full, the single-axis
ablations, fixed) run in batches, dvg and random-renoise one video at a time (DVG plans per video; a batch pools
the demands).

Metrics (each video vs its full run, uint8 frames):
- PSNR over all frames, pixels and RGB channels, peak 255. Identical videos give infinity, written to the
  JSON as the string ``"inf"`` (JSON has no infinity; ``float(value)`` reads both forms back).
- SSIM: Wang et al. 2004 — 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, on the BT.601 luma
  ``Y = 0.299 R + 0.587 G + 0.114 B``, over the valid region (no padding), averaged over pixels then frames.
- Motion: the moving object's centroid per frame (pixels of its caption colour within ``--colour-tol`` of RGB
  distance, at least ``MIN_PIXELS`` of them), compared with the full run's centroid and, where the dataset
  knows it, with the generator's ground-truth trajectory: mean Euclidean distance in pixels over the frames
  where both are found.

The ``fixed`` ablation is one content-independent (s, T₂₃) per budget: the action the planner matches to
equal demand weights (w_s = w_t = 0.5) over the same feasible set DVG chooses from — so its density is within
the planner's δ of the budget, as every dvg plan's is. Each row records its own density. A single-axis
ablation with no action within δ of the budget (coarse grids have gaps) runs at the nearest reachable
density (spatial-only first tries ``s_grid = 0.05``); its row says ``relaxed``.

``--reference-steps M`` also runs the full mode at M steps per (caption, seed) and gives every row
``psnr_vs_reference`` / ``ssim_vs_reference`` against it: at few steps (``--steps 8``), how far each mode is from
the many-step video, next to how far it is from the full run at its own step count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_model  # noqa: E402
from _video import (  # noqa: E402
    MIN_PIXELS,
    as_json_number,
    centroids,
    contact_sheet,
    psnr,
    ssim,
    trajectory_error,
)

from dvg_dist.config import Config, ConfigError, load_config  # noqa: E402
from dvg_dist.data import procedural  # noqa: E402
from dvg_dist.dvg.options import Mode  # noqa: E402
from dvg_dist.dvg.planner import InfeasibleBudget, Planner  # noqa: E402
from dvg_dist.models import InputError  # noqa: E402
from dvg_dist.runtime.engine import Engine, Request  # noqa: E402

ABLATIONS = (Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY, Mode.FIXED, Mode.RANDOM_RENOISE)
PER_VIDEO = (Mode.DVG, Mode.RANDOM_RENOISE)
"""Modes whose plan reads the video's own sketch: one video per call."""
KINDS = procedural.KINDS
TIE_DB = 1e-3
"""Mean-PSNR differences below this are batching round-off (the same plan batched or alone), counted as equal."""
FULL_RESEED = "full-reseed"
RESEED = 1000
"""``full-reseed`` rows: the full run at seed + RESEED against the full run at the seed — how far apart two
samples of one caption are, the scale on which the other modes' distances read."""

# -- held-out clips --------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """One held-out caption with what the generator knows about it."""

    caption: str
    kind: str
    """``texture`` (rich static texture, slow motion), ``motion`` (plain background, fast) or ``mix``."""
    colour: tuple[int, int, int]
    """RGB of the moving object."""
    trajectory: np.ndarray
    """Ground-truth (x, y) centre of the object per frame ``[F, 2]``, in pixels."""
    render: np.ndarray
    """The dataset's own rendering of the caption ``[F, H, W, 3]`` uint8: what the caption describes."""


def held_out_clips(n: int, seed: int | None, frames: int, width: int, height: int) -> list[HeldOut]:
    """The procedural dataset's held-out captions (cycling texture, motion, mix) with their object colour and
    ground-truth trajectory at this size. ``seed`` None: the dataset's own held-out seed, whose captions
    training never sees."""
    captions = procedural.held_out_captions(n) if seed is None else procedural.held_out_captions(n, seed)
    clips = []
    for caption in captions:
        params = procedural.parse_caption(caption)
        clip = procedural.make_clip(params, frames, height, width)
        truth = clip.trajectory.astype(np.float64)
        clips.append(HeldOut(caption, params.kind, procedural.COLOURS[params.colour], truth, clip.frames))
    return clips


# -- runs ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every run shares: the base config file, its overrides and the model path."""

    config: str
    model: str | None
    overrides: list[str]

    def load(self, *extra: str) -> Config:
        cfg = load_config(self.config, [*self.overrides, *extra])
        if self.model:
            cfg.model = replace(cfg.model, path=self.model)
        return cfg


def mode_config(setup: Setup, engine: Engine, mode: Mode, budget: float) -> tuple[Config, dict[str, Any]]:
    """The config of one ablation at one budget, and what had to be decided for it (recorded per row)."""
    base = [f"sampling.mode={mode.value}", f"sampling.budget={budget}"]
    if mode == Mode.FIXED:
        # The dvg feasible set at this budget (a fixed-mode config cannot build a planner without its s, r).
        planner = _planner(engine, setup.load(f"sampling.mode={Mode.DVG.value}", f"sampling.budget={budget}"))
        chosen, _ = planner.choose(0.5, Mode.DVG)
        fixed = f"dvg.fixed=[{chosen.s}, {chosen.t23 / planner.full.t!r}]"
        return setup.load(*base, fixed), {"fixed_action": [chosen.s, chosen.t23]}
    cfg = setup.load(*base)
    if mode not in (Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY):
        return cfg, {}
    if _feasible(engine, cfg, mode):
        return cfg, {}
    if mode == Mode.SPATIAL_ONLY and cfg.dvg.s_grid > 0.05:
        base.append("dvg.s_grid=0.05")  # the finest grid the paper uses
        cfg = setup.load(*base)
        if _feasible(engine, cfg, mode):
            return cfg, {"s_grid": cfg.dvg.s_grid}
    # Nothing within δ even so: run at the nearest reachable density and say so.
    gap = min(abs(c.density - budget) for c in _planner(engine, cfg).candidates(mode))
    delta = float(f"{gap + 1e-6:.6f}")
    return setup.load(*base, f"dvg.delta={delta}"), {"relaxed": True, "delta": delta, "s_grid": cfg.dvg.s_grid}


def _feasible(engine: Engine, cfg: Config, mode: Mode) -> bool:
    try:
        _planner(engine, cfg).feasible(mode)
    except InfeasibleBudget:
        return False
    return True


def _planner(engine: Engine, cfg: Config) -> Planner:
    width, height = cfg.sampling.pixel_size()
    return engine.sampler_config(engine.spec.latent_grid(width, height, cfg.sampling.frame_num), cfg).planner()


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class Bench:
    """The whole comparison on one loaded model."""

    setup: Setup
    engine: Engine
    clips: list[HeldOut]
    seeds: list[int]
    budgets: list[float]
    batch: int
    colour_tol: float
    sheet_picks: set[tuple[int, int]]
    """(clip, seed) pairs whose frames the contact sheet shows."""
    reference_steps: int | None = None
    """Also compare every video with the full run at this many steps (``psnr_vs_reference``)."""

    def run(self, bar: Any) -> tuple[list[dict[str, Any]], dict[tuple[int, int, str, float | None], np.ndarray]]:
        items = [(ci, seed) for ci in range(len(self.clips)) for seed in self.seeds]
        self.full: dict[tuple[int, int], np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.kept: dict[tuple[int, int, str, float | None], np.ndarray] = {}
        self.reference: dict[tuple[int, int], np.ndarray] = {}
        if self.reference_steps is not None:
            ref = self.setup.load(f"sampling.mode={Mode.FULL.value}", f"sampling.steps={self.reference_steps}")
            for group in _chunks(items, self.batch):
                requests = [Request(self.clips[ci].caption, seed=seed) for ci, seed in group]
                frames = self.engine.generate(requests, config=ref, progress=False).frames
                assert frames is not None
                self.reference.update({it: frames[k] for k, it in enumerate(group)})
                bar.update(len(group))
        cfg = self.setup.load(f"sampling.mode={Mode.FULL.value}")
        for group in _chunks(items, self.batch):
            self._generate(cfg, Mode.FULL, None, group, {}, bar)
        for group in _chunks(items, self.batch):  # the scale of "unrelated": another sample of the same caption
            self._generate(cfg, Mode.FULL, None, group, {}, bar, reseed=True)
        for budget in self.budgets:
            self.dvg_grids: dict[tuple[int, int], list[list[int]]] = {}
            for mode in ABLATIONS:
                cfg, note = mode_config(self.setup, self.engine, mode, budget)
                groups = [[it] for it in items] if mode in PER_VIDEO else list(_chunks(items, self.batch))
                for group in groups:
                    self._generate(cfg, mode, budget, group, note, bar)
        return self.rows, self.kept

    def _generate(
        self,
        cfg: Config,
        mode: Mode,
        budget: float | None,
        group: list[tuple[int, int]],
        note: dict,
        bar: Any,
        reseed: bool = False,
    ) -> None:
        """Generate ``group`` (clip, seed) in one call and append a row per video. ``reseed``: the full run at
        seed + ``RESEED``, compared with the full run at the seed (row mode ``full-reseed``)."""
        offset = RESEED if reseed else 0
        requests = [Request(self.clips[ci].caption, seed=seed + offset) for ci, seed in group]
        t0 = time.perf_counter()
        result = self.engine.generate(requests, config=cfg, progress=False)
        seconds = (time.perf_counter() - t0) / len(group)
        assert result.frames is not None
        plan = result.record.to_dict()
        chosen = plan["chosen"]
        frames_total = plan["stages"][-1]["grid"][0]
        for k, (ci, seed) in enumerate(group):
            frames = result.frames[k]
            name = FULL_RESEED if reseed else mode.value
            if mode == Mode.FULL and not reseed:
                self.full[(ci, seed)] = frames
            if (ci, seed) in self.sheet_picks and not reseed:
                self.kept[(ci, seed, name, budget)] = frames
            if mode == Mode.DVG:
                self.dvg_grids[(ci, seed)] = chosen["grids"]
            row = {
                "clip": ci,
                "caption": self.clips[ci].caption,
                "kind": self.clips[ci].kind,
                "seed": seed,
                "mode": name,
                "budget": budget,
                "s": chosen["s"],
                "t23": chosen["t23"],
                "r": chosen["t23"] / frames_total,
                "density": chosen["density"],
                "executed_density": chosen["executed_density"],
                "flop_density": chosen["flop_density"],
                "grids": chosen["grids"],
                "demands": plan["demands"] if mode in PER_VIDEO else None,
                **({"sample_seed": seed + offset} if reseed else note),
                **self._metrics(ci, seed, frames),
                "seconds": seconds,
            }
            if budget is not None and mode != Mode.DVG:
                # The same stage grids as this video's dvg run: the same computation up to batching round-off.
                row["same_plan_as_dvg"] = self.dvg_grids.get((ci, seed)) == chosen["grids"]
            self.rows.append(row)
        bar.update(len(group))

    def _metrics(self, ci: int, seed: int, frames: np.ndarray) -> dict[str, Any]:
        ref = self.full[(ci, seed)]
        clip = self.clips[ci]
        mine = centroids(frames, clip.colour, self.colour_tol)
        vs_reference = {}
        if self.reference:
            far = self.reference[(ci, seed)]
            vs_reference = {
                "psnr_vs_reference": as_json_number(psnr(frames, far)),
                "ssim_vs_reference": ssim(frames, far),
            }
        return {
            **vs_reference,
            "psnr": as_json_number(psnr(frames, ref)),
            "identical": bool(np.array_equal(frames, ref)),
            "ssim": ssim(frames, ref),
            "object_found": float(np.isfinite(mine).all(axis=1).mean()),
            "motion_err_vs_full": trajectory_error(mine, centroids(ref, clip.colour, self.colour_tol)),
            "motion_err_vs_gt": trajectory_error(mine, clip.trajectory),
            "psnr_vs_render": as_json_number(psnr(frames, clip.render)),
        }


# -- summary ---------------------------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Mean metrics per (mode, budget, kind), ``kind = "all"`` first; PSNR means are over dB values."""
    out = []
    keys = [(Mode.FULL.value, None), (FULL_RESEED, None)] + [(m.value, b) for b in budgets for m in ABLATIONS]
    for mode, budget in keys:
        mine = [r for r in rows if r["mode"] == mode and r["budget"] == budget]
        for kind in ("all", *KINDS):
            sel = mine if kind == "all" else [r for r in mine if r["kind"] == kind]
            if not sel:
                continue
            out.append(
                {
                    "mode": mode,
                    "budget": budget,
                    "kind": kind,
                    "n": len(sel),
                    "density": _mean([r["density"] for r in sel]),
                    "psnr": as_json_number(_mean([r["psnr"] for r in sel])),
                    "ssim": _mean([r["ssim"] for r in sel]),
                    "motion_err_vs_full": _mean([r["motion_err_vs_full"] for r in sel]),
                    "motion_err_vs_gt": _mean([r["motion_err_vs_gt"] for r in sel]),
                    "object_found": _mean([r["object_found"] for r in sel]),
                    "psnr_vs_render": as_json_number(_mean([r["psnr_vs_render"] for r in sel])),
                    "psnr_vs_reference": as_json_number(_mean([r.get("psnr_vs_reference") for r in sel])),
                    "ssim_vs_reference": _mean([r.get("ssim_vs_reference") for r in sel]),
                    "seconds": _mean([r["seconds"] for r in sel]),
                    "same_plan_as_dvg": _mean([r["same_plan_as_dvg"] for r in sel if "same_plan_as_dvg" in r]),
                    "relaxed": any(r.get("relaxed", False) for r in sel),
                }
            )
    return out


def planner_split(rows: list[dict[str, Any]], budgets: list[float]) -> dict[str, Any]:
    """DVG's decisions by content kind: mean s and r = T₂₃/T, the demands, and how often each action won."""
    out: dict[str, Any] = {}
    for budget in budgets:
        per_kind: dict[str, Any] = {}
        for kind in KINDS:
            sel = [r for r in rows if r["mode"] == Mode.DVG.value and r["budget"] == budget and r["kind"] == kind]
            if not sel:
                continue
            actions: dict[str, int] = {}
            for r in sel:
                name = f"s={r['s']:g},T23={r['t23']}"
                actions[name] = actions.get(name, 0) + 1
            per_kind[kind] = {
                "n": len(sel),
                "s_mean": _mean([r["s"] for r in sel]),
                "r_mean": _mean([r["r"] for r in sel]),
                "D_s_mean": _mean([r["demands"]["spatial"] for r in sel if r["demands"]]),
                "D_t_mean": _mean([r["demands"]["temporal"] for r in sel if r["demands"]]),
                "w_s_mean": _mean([r["demands"]["w_s"] for r in sel if r["demands"]]),
                "actions": dict(sorted(actions.items())),
            }
        out[str(budget)] = per_kind
    return out


def paired(rows: list[dict[str, Any]], mode: str, budget: float) -> dict[str, Any]:
    """dvg's PSNR minus ``mode``'s on the same (clip, seed), over the pairs where both are finite: the mean
    difference, its standard error and the pair count. Two plans' PSNRs move together with the clip, so the paired
    error is what decides whether a difference of means is more than noise."""
    other = {(r["clip"], r["seed"]): r for r in rows if r["mode"] == mode and r["budget"] == budget}
    diffs = []
    for r in rows:
        o = other.get((r["clip"], r["seed"])) if r["mode"] == Mode.DVG.value and r["budget"] == budget else None
        if o is not None and math.isfinite(float(r["psnr"])) and math.isfinite(float(o["psnr"])):
            diffs.append(float(r["psnr"]) - float(o["psnr"]))
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"pairs": len(diffs), "mean_db": _mean(diffs), "se_db": se}


def goals(
    summary: list[dict[str, Any]], split: dict[str, Any], budgets: list[float], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The three fidelity goals, measured (nothing here changes a metric to meet them): dvg ≥ 25 dB PSNR at budget
    0.5, dvg ≥ each ablation at every budget, and the planner's split (motion clips cut more space, texture clips
    more time). Each dvg-vs-ablation margin comes with its paired standard error; ``within_noise`` marks a margin
    no larger than two of them."""

    def cell(mode: str, budget: float) -> dict[str, Any] | None:
        return next((s for s in summary if s["mode"] == mode and s["budget"] == budget and s["kind"] == "all"), None)

    out: dict[str, Any] = {}
    dvg05 = cell(Mode.DVG.value, 0.5)
    if dvg05 is not None:
        out["dvg_psnr_at_0.5_ge_25dB"] = {"psnr": dvg05["psnr"], "met": float(dvg05["psnr"]) >= 25.0}
    beats: dict[str, Any] = {}
    for budget in budgets:
        dvg = cell(Mode.DVG.value, budget)
        for mode in (Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY, Mode.FIXED):
            other = cell(mode.value, budget)
            if dvg is None or other is None:
                continue
            margin = float(dvg["psnr"]) - float(other["psnr"])
            pair = paired(rows, mode.value, budget)
            beats[f"{mode.value}@{budget}"] = {
                "dvg_psnr": dvg["psnr"],
                "ablation_psnr": other["psnr"],
                "margin_db": margin,
                "dvg_ssim": dvg["ssim"],
                "ablation_ssim": other["ssim"],
                "ablation_density": other["density"],
                "same_plan_as_dvg": other["same_plan_as_dvg"],
                "paired_se_db": pair["se_db"],
                "pairs": pair["pairs"],
                "within_noise": pair["se_db"] is None or abs(margin) <= 2 * pair["se_db"],
                "met": margin >= -TIE_DB,
            }
    out["dvg_ge_each_ablation"] = beats
    split_goal: dict[str, Any] = {}
    for key, kinds in split.items():
        tex, mot = kinds.get("texture"), kinds.get("motion")
        if tex and mot:
            split_goal[key] = {
                "motion_cuts_more_space": mot["s_mean"] < tex["s_mean"],
                "texture_cuts_more_time": tex["r_mean"] < mot["r_mean"],
            }
    out["planner_split"] = split_goal
    return out


# -- output ----------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if value == "inf":
        return f"{'inf':>{width}}"
    return f"{float(value):>{width}{spec}}"


def table(summary: list[dict[str, Any]], split: dict[str, Any], goal: dict[str, Any] | None = None) -> str:
    """The stdout report: every mode × budget on all clips, then per kind, then the planner's split, then the
    dvg-vs-ablation margins with their paired standard errors."""
    reference = any(s.get("psnr_vs_reference") is not None for s in summary)
    lines = [
        f"{'mode':<15}{'budget':>7}{'n':>5}{'density':>9}{'PSNR dB':>9}{'SSIM':>8}{'motion px':>11}{'vs GT px':>10}"
        f"{'found':>7}{'vs render dB':>14}" + (f"{'vs ref dB':>11}{'ref SSIM':>10}" if reference else "")
    ]
    for s in summary:
        if s["kind"] != "all":
            continue
        budget = "-" if s["budget"] is None else f"{s['budget']:.2f}"
        mark = "*" if s["relaxed"] else " "
        lines.append(
            f"{s['mode'] + mark:<15}{budget:>7}{s['n']:>5}{_fmt(s['density'], '.3f', 9)}{_fmt(s['psnr'], '.2f', 9)}"
            f"{_fmt(s['ssim'], '.4f', 8)}{_fmt(s['motion_err_vs_full'], '.2f', 11)}"
            f"{_fmt(s['motion_err_vs_gt'], '.2f', 10)}{_fmt(s['object_found'], '.2f', 7)}"
            f"{_fmt(s['psnr_vs_render'], '.2f', 14)}"
            + (
                f"{_fmt(s['psnr_vs_reference'], '.2f', 11)}{_fmt(s['ssim_vs_reference'], '.4f', 10)}"
                if reference
                else ""
            )
        )
    if any(s["relaxed"] for s in summary):
        lines.append("* no action within δ of the budget: ran at the nearest reachable density (see the density)")
    kinds = [k for k in KINDS if any(s["kind"] == k for s in summary)]
    lines += ["", "per kind: PSNR dB / SSIM / motion px vs full"]
    lines.append(f"{'mode':<15}{'budget':>7}" + "".join(f"{k:>26}" for k in kinds))
    for s in summary:
        if s["kind"] != "all":
            continue
        budget = "-" if s["budget"] is None else f"{s['budget']:.2f}"
        cells = []
        for k in kinds:
            c = next((x for x in summary if (x["mode"], x["budget"], x["kind"]) == (s["mode"], s["budget"], k)), None)
            if c is None:
                cells.append("")
                continue
            motion = _fmt(c["motion_err_vs_full"], ".2f", 6)
            cells.append(f"{_fmt(c['psnr'], '.2f', 8)} /{_fmt(c['ssim'], '.3f', 6)} /{motion}")
        lines.append(f"{s['mode']:<15}{budget:>7}" + "".join(f"{c:>26}" for c in cells))
    lines += ["", "planner split (dvg): mean s, mean r = T23/T, demands, actions"]
    for budget, per_kind in split.items():
        for kind, p in per_kind.items():
            lines.append(
                f"  budget {float(budget):.2f} {kind:<8} n={p['n']:<3} s={_fmt(p['s_mean'], '.3f', 5).strip()} "
                f"r={_fmt(p['r_mean'], '.3f', 5).strip()} D_s={_fmt(p['D_s_mean'], '.3f', 5).strip()} "
                f"D_t={_fmt(p['D_t_mean'], '.3f', 5).strip()} w_s={_fmt(p['w_s_mean'], '.3f', 5).strip()} "
                f"{' '.join(f'{a}:{n}' for a, n in p['actions'].items())}"
            )
    if goal and goal.get("dvg_ge_each_ablation"):
        lines += ["", "dvg minus each ablation, PSNR dB: mean over clips ± paired standard error"]
        for name, g in goal["dvg_ge_each_ablation"].items():
            se = "" if g["paired_se_db"] is None else f" ± {g['paired_se_db']:.2f}"
            verdict = "within noise (≤ 2 SE)" if g["within_noise"] else ("dvg ahead" if g["met"] else "dvg behind")
            lines.append(
                f"  {name:<20}{float(g['margin_db']):+7.2f}{se:<8} {g['pairs']} pairs, same plan on "
                f"{_fmt(g['same_plan_as_dvg'], '.0%', 4).strip()}: {verdict}"
            )
    return "\n".join(lines)


def sheet_blocks(
    clips: list[HeldOut],
    picks: list[tuple[int, int]],
    kept: dict[tuple[int, int, str, float | None], np.ndarray],
    rows: list[dict[str, Any]],
    budget: float,
) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    blocks = []
    for ci, seed in picks:
        clip = clips[ci]
        videos = [("dataset render\n(what the caption\ndescribes)", clip.render)]
        for mode, b in [(Mode.FULL.value, None)] + [(m.value, budget) for m in ABLATIONS]:
            row = next(r for r in rows if (r["clip"], r["seed"], r["mode"], r["budget"]) == (ci, seed, mode, b))
            name = mode if b is None else f"{mode} @{b:g}"
            value = "inf" if row["psnr"] == "inf" else f"{row['psnr']:.1f}"
            label = (
                f"{name}\ns={row['s']:g} T23={row['t23']} rho={row['density']:.3f}\n{value} dB SSIM {row['ssim']:.3f}"
            )
            videos.append((label, kept[(ci, seed, mode, b)]))
        blocks.append((f"{clip.kind} (seed {seed}): {clip.caption}", videos))
    return blocks


# -- entry point -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dvg_dist.runtime.cli import OneLineParser

    p = OneLineParser(prog="fidelity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo-wan.yaml, else tiny-wan)")
    p.add_argument("--model", help="diffusers pipeline directory (overrides model.path)")
    p.add_argument("--captions", type=int, default=32, help="held-out captions (both kinds)")
    p.add_argument("--caption-seed", type=int, help="seed of the held-out set (default: the dataset's own)")
    p.add_argument("--seeds", default="0", help="sampling seeds, comma-separated")
    p.add_argument("--budgets", default="0.5,0.6")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--reference-steps", type=int, help="also compare every video with the full run at M steps")
    p.add_argument("--batch", type=int, default=8, help="videos per call for modes whose plan is per batch")
    p.add_argument("--colour-tol", type=float, default=80.0, help="RGB distance of the object-colour mask")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity.json"))
    p.add_argument("--smoke", action="store_true", help="2 captions, 8 steps: a quick end-to-end check")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.budget_list = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--seeds and --budgets must be comma-separated numbers; got {args.seeds!r}, {args.budgets!r}")
    if args.smoke:
        args.captions, args.steps = 2, args.steps or 8
    if args.reference_steps is not None and args.reference_steps < 1:
        p.error(f"--reference-steps must be >= 1; got {args.reference_steps}")
    if args.captions < 2 or args.batch < 1 or args.threads < 1:
        p.error("need --captions >= 2 (one of each kind), --batch >= 1 and --threads >= 1")
    if not all(0 < b <= 1 for b in args.budget_list):
        p.error(f"budgets must be in (0, 1]; got {args.budgets}")
    if args.config is None:
        demo = ROOT / "configs" / "demo-wan.yaml"
        args.config = str(demo if demo.is_file() else ROOT / "configs" / "tiny-wan.yaml")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but the printing: runs, metrics, the JSON and the contact sheet."""
    t_start = time.perf_counter()
    setup = Setup(args.config, args.model, [*args.set, *([f"sampling.steps={args.steps}"] if args.steps else [])])
    base = setup.load()
    width, height = base.sampling.pixel_size()
    clips = held_out_clips(args.captions, args.caption_seed, base.sampling.frame_num, width, height)
    picks = [
        (next(i for i, c in enumerate(clips) if c.kind == kind), args.seed_list[0])
        for kind in ("texture", "motion")
        if any(c.kind == kind for c in clips)
    ]
    t0 = time.perf_counter()
    engine = Engine(base)
    load_s = time.perf_counter() - t0
    bench = Bench(
        setup, engine, clips, args.seed_list, args.budget_list, args.batch, args.colour_tol, set(picks),
        args.reference_steps,
    )  # fmt: skip
    from tqdm import tqdm

    total = (
        len(clips)
        * len(args.seed_list)
        * (2 + (args.reference_steps is not None) + len(args.budget_list) * len(ABLATIONS))
    )
    with tqdm(total=total, unit="video", desc="fidelity", disable=args.no_progress) as bar:
        rows, kept = bench.run(bar)
    summary = summarise(rows, args.budget_list)
    split = planner_split(rows, args.budget_list)
    out_path = Path(args.out)
    sheet_path = out_path.with_name(out_path.stem + "_contact.png")
    sheet = contact_sheet(sheet_blocks(clips, picks, kept, rows, args.budget_list[0]), sheet_path)
    result = {
        "command": "python bench/fidelity.py " + " ".join(sys.argv[1:]),
        "config": {
            "config": str(args.config),
            "model": base.model.path,
            "steps": base.sampling.steps,
            "reference_steps": args.reference_steps,
            "size": base.sampling.size,
            "frame_num": base.sampling.frame_num,
            "guidance_scale": base.sampling.guidance_scale,
            "budgets": args.budget_list,
            "seeds": args.seed_list,
            "captions": len(clips),
            "caption_source": "dvg_dist.data.procedural.held_out_captions",
            "caption_seed": args.caption_seed,
            "modes": [Mode.FULL.value, FULL_RESEED, *(m.value for m in ABLATIONS)],
            "reseed_offset": RESEED,
            "batch": args.batch,
            "colour_tol": args.colour_tol,
            "fixed_rule": "per budget, the planner's match at w_s = w_t = 0.5 over the dvg feasible set",
            "psnr": 'dB over all frames, pixels and RGB channels, peak 255; identical videos: "inf"',
            "ssim": "Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, L 255, BT.601 luma, valid region, mean per frame",
            "motion": f"object-colour centroid per frame (RGB distance <= colour_tol, >= {MIN_PIXELS} px), "
            "mean distance in pixels vs the full run / the generator's trajectory",
        },
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "clips": [{"caption": c.caption, "kind": c.kind, "colour": c.colour} for c in clips],
        "runs": rows,
        "summary": summary,
        "planner_split": split,
        "goals": goals(summary, split, args.budget_list, rows),
        "contact_sheet": {"path": _shown(sheet_path), "size": list(sheet), "clips": [list(p) for p in picks]},
        "timings": {"load_s": load_s, "total_s": time.perf_counter() - t_start},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_path)
    return result


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (the JSON is committed)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dvg_dist.runtime.cli import setup_logging

    setup_logging()
    # Process-wide settings, put back afterwards (the test calls main in-process).
    threads, dvg_log = torch.get_num_threads(), logging.getLogger("dvg_dist")
    level = dvg_log.level
    torch.set_num_threads(args.threads)
    dvg_log.setLevel(logging.WARNING)  # per-video decision lines would drown the table
    try:
        result = run(args)
    except (ConfigError, InputError, InfeasibleBudget, FileNotFoundError, ValueError) as e:
        print(f"fidelity.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        dvg_log.setLevel(level)
    print(table(result["summary"], result["planner_split"], result["goals"]))
    print(f"\n{len(result['runs'])} videos in {result['timings']['total_s']:.0f} s; wrote {_shown(Path(args.out))} and "
          f"{result['contact_sheet']['path']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
