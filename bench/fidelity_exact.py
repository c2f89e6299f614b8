"""Fidelity of DVG on an exact denoiser: what the algorithm alone costs, with no model weakness mixed in.

    python bench/fidelity_exact.py                       # the full run (docs/fidelity-exact.md)
    python bench/fidelity_exact.py --smoke               # seconds: 3 captions, 8 steps, closed-form encoder

The model is :class:`dvg_dist.data.exact.ExactDenoiser`: the posterior-mean velocity of a finite dataset of
procedural clips (``--captions`` held-out captions × ``--variants`` renderings each, encoded by the demo VAE), at
every stage grid the ideal model of the dataset resized to that grid. It is the ``transformer`` of a real
``WanPipeline`` (the demo model's tokenizer, text encoder, VAE and UniPC scheduler) that the engine drives through
the unchanged Wan adapter. Guidance 1: the conditional model alone, which is exact.

For each step count, caption and seed: the ``full`` run; ``full-reseed`` (full at seed + 1000, the chance level);
and at every budget ``dvg``, ``spatial-only``, ``temporal-only``, ``fixed``, ``trilinear`` and ``random-renoise``
(bench/fidelity.py's rules: the fixed split is the planner's match at equal demand weights; a single-axis mode with
nothing within δ runs at its nearest density, marked ``*``). Then ``--probe`` runs: dvg at one budget and step
count with one transition setting changed, to say where a loss comes from.

Metrics, each video against the full run of its caption, seed and step count:
- **same clip**: the nearest dataset latent (L2, full grid) is the one the full run ended on; **in caption**: it
  is one of the caption's clips; **landing**: distance to the nearest clip over that clip's distance to its own
  nearest other clip (0 = exactly on a clip).
- **PSNR / SSIM** on the decoded frames (bench/_video.py's definitions), PSNR capped at ``PSNR_CAP_DB`` (an RMS
  difference of one grey level; identical videos would be infinite); **latent PSNR** in the denoiser's own
  space, peak = the dataset latents' range, capped at ``LATENT_CAP_DB``.
- **HF kept**: spatial high-frequency energy of the frames (luma power at normalised radius ≥ 0.5, DC removed,
  summed over frames) over the full run's: the spatial side of the error.
- **motion**: the object-colour tracker of bench/_video.py. ``motion px``: against the full run's track;
  ``path px``: the known path of the clip this run ended on against the full run's clip's (the offset between
  them); ``shape px``: the track against the full run's with their mean offset removed, the temporal side of the
  error (jumps, stalls, wrong speed); ``found``: share of frames with the object.
- **Paired margins**: dvg minus each ablation on the same caption and seed, mean ± standard error over the pairs,
  for the capped PSNR and the same-clip rate; "within noise" when no larger than two standard errors.

Frames come from :func:`dvg_dist.data.exact.frames_of`, the closed form of the demo's hand-set VAE (the real one
decodes frame by frame, about a second per video here); the run checks it against the pipeline's own decode on
``--verify-decode`` videos and records the largest difference. The prompt encodings are memoised per prompt (the
text encoder is deterministic; the engine would encode every call's prompt again).
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_model  # noqa: E402
from _video import MIN_PIXELS, as_json_number, centroids, contact_sheet, luma, psnr, ssim  # noqa: E402
from fidelity import Setup, _shown, mode_config, planner_split  # noqa: E402

from dvg_dist.config import ConfigError  # noqa: E402
from dvg_dist.data import procedural  # noqa: E402
from dvg_dist.data.exact import DatasetSpec, ExactDataset, build_dataset, exact_pipeline, frames_of  # noqa: E402
from dvg_dist.dvg.options import Mode  # noqa: E402
from dvg_dist.dvg.planner import Grid, InfeasibleBudget  # noqa: E402
from dvg_dist.models import InputError  # noqa: E402
from dvg_dist.runtime.engine import Engine, Request  # noqa: E402

ABLATIONS = (Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY, Mode.FIXED, Mode.TRILINEAR, Mode.RANDOM_RENOISE)
PER_VIDEO = (Mode.DVG, Mode.TRILINEAR, Mode.RANDOM_RENOISE)
"""Modes whose plan reads the video's own sketch: one video per call (a batch pools the demands)."""
COMPARED = (Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY, Mode.FIXED, Mode.TRILINEAR, Mode.RANDOM_RENOISE)
"""The ablations dvg's paired margins are taken against."""
FULL_RESEED = "full-reseed"
RESEED = 1000
PSNR_CAP_DB = 10 * math.log10(255.0**2)
"""48.13 dB: the PSNR of an RMS difference of one grey level. Runs that end on the full run's clip decode to
(nearly) identical frames, whose PSNR is infinite; the cap keeps means and paired differences finite."""
LATENT_CAP_DB = 60.0
HF_RADIUS = 0.5


@dataclass(frozen=True)
class Probe:
    """One diagnostic run: dvg at the probe budget with some settings changed, or a hand-set plan (``fixed``
    mode at budget 1.0, so that only the named stages are reduced)."""

    overrides: tuple[str, ...] = ()
    fixed_plan: bool = False
    """``fixed`` mode at budget 1.0 with ``overrides`` setting the grids (default: every stage at full size)."""
    pooled_sketch_noise: bool = False
    """Start the sketch from the full run's first noise, area-pooled to the sketch grid (see
    :func:`pooled_sketch_noise`): a bench-only patch of the sampler, to test where the identity is lost."""


_ALL_FULL = ("dvg.fixed=[1.0, 1.0]",)
PROBES: dict[str, Probe] = {
    "dvg (released settings)": Probe(),
    "stage shifts null (the model's 3 in every stage)": Probe(("dvg.stage_shifts=[null,null,null,null]",)),
    "renoise hash-fixed-seed (the released 12345)": Probe(("dvg.renoise=hash-fixed-seed",)),
    "no sketch smoothing (smooth_keep 1)": Probe(("dvg.smooth_keep=1.0",)),
    "resize anchor-linear (transitions)": Probe(("dvg.resize=anchor-linear",)),
    "dvg, sketch from the pooled full noise": Probe(pooled_sketch_noise=True),
    "plan: every stage full (transitions only)": Probe(
        (*_ALL_FULL, "dvg.sketch_spatial_ratio=1.0", "dvg.sketch_temporal_factor=1.0"), fixed_plan=True
    ),
    "plan: every stage full, shifts null": Probe(
        (
            *_ALL_FULL,
            "dvg.sketch_spatial_ratio=1.0",
            "dvg.sketch_temporal_factor=1.0",
            "dvg.stage_shifts=[null,null,null,null]",
        ),
        fixed_plan=True,
    ),
    "plan: sketch 4x8x8, stages 2-4 full": Probe(
        (*_ALL_FULL, "dvg.sketch_spatial_ratio=0.5", "dvg.sketch_temporal_factor=0.4"), fixed_plan=True
    ),
    "plan: sketch 9x8x8 (space cut only), then full": Probe(
        (*_ALL_FULL, "dvg.sketch_spatial_ratio=0.5", "dvg.sketch_temporal_factor=1.0"), fixed_plan=True
    ),
    "plan: sketch 4x16x16 (time cut only), then full": Probe(
        (*_ALL_FULL, "dvg.sketch_spatial_ratio=1.0", "dvg.sketch_temporal_factor=0.4"), fixed_plan=True
    ),
    "plan: sketch 4x8x8 from the pooled full noise, then full": Probe(
        (*_ALL_FULL, "dvg.sketch_spatial_ratio=0.5", "dvg.sketch_temporal_factor=0.4"), True, True
    ),
}
"""--probe runs (at --probe-steps; dvg ones at --probe-budget). The ``plan:`` rows fix the stage grids by hand
(sketch frames = round(factor · 1.0 · T)): which reduced stage costs the identity, and whether the transitions or
shifts do."""
RELEASED = next(iter(PROBES))


@contextmanager
def pooled_sketch_noise(full: Grid) -> Iterator[None]:
    """Patch the sampler so a staged run's first noise is the full grid's coordinate-hash field (the full run's
    first noise) at the sketch's frames, area-pooled in space to the sketch's size and rescaled to unit variance;
    re-noise is left alone. An experiment, not a change to DVG: it asks whether the sketch loses the full run's
    sample because its noise is a point subsample of the full field."""
    from dvg_dist.dvg import sampler

    original = sampler._noise

    def noise(config: Any, seeds: Any, channels: int, coords: Any, step: int, like: torch.Tensor) -> torch.Tensor:
        h, w = len(coords[1]), len(coords[2])
        if step > 0 or (h, w) == (full.h, full.w):
            return original(config, seeds, channels, coords, step, like)
        if full.h % h or full.w % w:
            raise ValueError(f"pooled sketch noise needs whole pooling factors; got {full} -> {h}x{w}")
        whole = (torch.arange(full.t), torch.arange(full.h), torch.arange(full.w))
        eps = original(config, seeds, channels, whole, step, like)[:, :, coords[0]]
        kh, kw = full.h // h, full.w // w
        return F.avg_pool3d(eps, (1, kh, kw)) * math.sqrt(kh * kw)

    sampler._noise = noise
    try:
        yield
    finally:
        sampler._noise = original


# -- metrics ---------------------------------------------------------------------------------------------------


def hf_energy(frames: np.ndarray, radius: float = HF_RADIUS) -> float:
    """Luma power at normalised spatial frequency radius ≥ ``radius`` (DC removed), summed over the frames of a
    uint8 ``[F, H, W, 3]`` video; the radius as the spatial demand defines it (corner = 1)."""
    y = luma(frames)[:, 0]
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fftshift(torch.fft.fft2(y, norm="ortho"), dim=(-2, -1)).abs() ** 2
    h, w = y.shape[-2:]
    fy, fx = torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / math.sqrt(2)
    return float(power[:, r >= radius].sum())


def shape_error(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean distance of two ``[F, 2]`` tracks after removing their mean offset (frames where both exist)."""
    both = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if both.sum() < 2:
        return None
    d = a[both] - b[both]
    return float(np.linalg.norm(d - d.mean(axis=0), axis=1).mean())


def track_error(a: np.ndarray, b: np.ndarray) -> float | None:
    both = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    return float(np.linalg.norm(a[both] - b[both], axis=1).mean()) if both.any() else None


def capped_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return min(psnr(a, b), PSNR_CAP_DB)


@dataclass
class Reference:
    """What a full run left for the others to be compared with."""

    latent: torch.Tensor
    frames: np.ndarray
    nearest: int
    track: np.ndarray
    hf: float


@dataclass
class Bench:
    """All runs on one exact pipeline."""

    setup: Setup
    engine: Engine
    dataset: ExactDataset
    separation: torch.Tensor
    latent_peak: float
    seeds: list[int]
    budgets: list[float]
    steps: list[int]
    batch: int
    colour_tol: float
    sheet: tuple[int, set[tuple[int, int]]] | None = None
    """(steps, {(caption, seed)}) whose frames the contact sheet shows."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[tuple[int, int, str, float | None], np.ndarray] = field(default_factory=dict)

    @property
    def captions(self) -> tuple[str, ...]:
        return self.dataset.captions

    def items(self) -> list[tuple[int, int]]:
        return [(ci, seed) for ci in range(len(self.captions)) for seed in self.seeds]

    def run(self, bar: Any, probes: dict[str, Probe], probe_at: tuple[int, float] | None) -> None:
        for n in self.steps:
            self.full: dict[tuple[int, int], Reference] = {}
            base = [f"sampling.steps={n}"]
            cfg = self.setup.load(*base, f"sampling.mode={Mode.FULL.value}")
            for group in _chunks(self.items(), self.batch):
                self._generate(cfg, n, Mode.FULL.value, None, group, {}, bar)
            for group in _chunks(self.items(), self.batch):
                self._generate(cfg, n, FULL_RESEED, None, group, {}, bar, reseed=True)
            for budget in self.budgets:
                steps_setup = Setup(self.setup.config, self.setup.model, [*self.setup.overrides, *base])
                for mode in ABLATIONS:
                    try:
                        mcfg, note = mode_config(steps_setup, self.engine, mode, budget)
                        self._planner_check(mcfg)
                    except InfeasibleBudget as e:
                        self.skipped.append({"steps": n, "mode": mode.value, "budget": budget, "reason": str(e)})
                        bar.update(len(self.items()))
                        continue
                    groups = (
                        [[it] for it in self.items()] if mode in PER_VIDEO else list(_chunks(self.items(), self.batch))
                    )
                    for group in groups:
                        self._generate(mcfg, n, mode.value, budget, group, note, bar)
            if probe_at is not None and probe_at[0] == n:
                self._probes(n, probe_at[1], probes, bar)

    def _probes(self, n: int, budget: float, probes: dict[str, Probe], bar: Any) -> None:
        for name, probe in probes.items():
            mode, b = (Mode.FIXED, 1.0) if probe.fixed_plan else (Mode.DVG, budget)
            cfg = self.setup.load(f"sampling.steps={n}", f"sampling.budget={b}", f"sampling.mode={mode.value}",
                                  *probe.overrides)  # fmt: skip
            groups = list(_chunks(self.items(), self.batch)) if probe.fixed_plan else [[it] for it in self.items()]
            note = {"probe": name, "overrides": list(probe.overrides), "pooled_sketch_noise": probe.pooled_sketch_noise}
            width, height = cfg.sampling.pixel_size()
            full = self.engine.spec.latent_grid(width, height, cfg.sampling.frame_num)
            with pooled_sketch_noise(full) if probe.pooled_sketch_noise else nullcontext():
                for group in groups:
                    self._generate(cfg, n, mode.value, b, group, note, bar)

    def _planner_check(self, cfg: Any) -> None:
        if cfg.sampling.mode in (Mode.FULL, Mode.FIXED):
            return
        mode = Mode.DVG if cfg.sampling.mode in (Mode.TRILINEAR, Mode.RANDOM_RENOISE) else cfg.sampling.mode
        width, height = cfg.sampling.pixel_size()
        grid = self.engine.spec.latent_grid(width, height, cfg.sampling.frame_num)
        self.engine.sampler_config(grid, cfg).planner().feasible(mode)

    def _generate(
        self,
        cfg: Any,
        steps: int,
        mode: str,
        budget: float | None,
        group: list[tuple[int, int]],
        note: dict[str, Any],
        bar: Any,
        reseed: bool = False,
    ) -> None:
        offset = RESEED if reseed else 0
        requests = [Request(self.captions[ci], seed=seed + offset) for ci, seed in group]
        model = self.engine.adapter.pipe.transformer
        model.trace = []
        t0 = time.perf_counter()
        try:
            result = self.engine.generate(requests, config=cfg, decode=False, progress=False)
        finally:
            trace, model.trace = model.trace, None
        seconds = (time.perf_counter() - t0) / len(group)
        vae = self.engine.adapter.pipe.vae
        frames = frames_of(result.latent, vae)
        idx, dist = self.dataset.nearest(result.latent)
        plan = result.record.to_dict()
        frames_total = plan["stages"][-1]["grid"][0]
        for k, (ci, seed) in enumerate(group):
            near = int(idx[k])
            track = centroids(frames[k], self._colour(ci), self.colour_tol)
            if mode == Mode.FULL.value:
                self.full[(ci, seed)] = Reference(result.latent[k], frames[k], near, track, hf_energy(frames[k]))
            if (
                self.sheet is not None
                and self.sheet[0] == steps
                and (ci, seed) in self.sheet[1]
                and not note.get("probe")
            ):
                self.kept[(ci, seed, mode, budget)] = frames[k]
            ref = self.full[(ci, seed)]
            lat_mse = float(((result.latent[k].double() - ref.latent.double()) ** 2).mean())
            lat_psnr = (
                LATENT_CAP_DB if lat_mse == 0 else min(10 * math.log10(self.latent_peak**2 / lat_mse), LATENT_CAP_DB)
            )
            frame_psnr = psnr(frames[k], ref.frames)
            full_clip = self.dataset.trajectories[ref.nearest]
            row = {
                "steps": steps,
                "clip": ci,
                "caption": self.captions[ci],
                "kind": procedural.parse_caption(self.captions[ci]).kind,
                "seed": seed,
                "mode": mode,
                "budget": budget,
                "s": plan["chosen"]["s"],
                "t23": plan["chosen"]["t23"],
                "r": plan["chosen"]["t23"] / frames_total,
                "density": plan["chosen"]["density"],
                "executed_density": plan["chosen"]["executed_density"],
                "flop_density": plan["chosen"]["flop_density"],
                "grids": plan["chosen"]["grids"],
                "demands": plan["demands"],
                **({"sample_seed": seed + offset} if reseed else note),
                "nearest": near,
                "nearest_variant": int(near - self.dataset.clips_of(int(self.dataset.clip_caption[near]))[0]),
                "same_clip": near == ref.nearest,
                "in_caption": int(self.dataset.clip_caption[near]) == ci,
                "landing": float(dist[k] / self.separation[near]),
                "psnr": as_json_number(frame_psnr),
                "psnr_capped": min(frame_psnr, PSNR_CAP_DB),
                "ssim": ssim(frames[k], ref.frames),
                "latent_psnr": lat_psnr,
                "hf_kept": hf_energy(frames[k]) / ref.hf if ref.hf > 0 else None,
                "object_found": float(np.isfinite(track).all(axis=1).mean()),
                "motion_err_vs_full": track_error(track, ref.track),
                "path_err": float(np.linalg.norm(self.dataset.trajectories[near] - full_clip, axis=1).mean()),
                "shape_err": shape_error(track, ref.track),
                "track_vs_own_path": track_error(track, self.dataset.trajectories[near].astype(np.float64)),
                **decision(trace, k, plan["boundaries"]),
                "seconds": seconds,
            }
            self.rows.append(row)
        bar.update(len(group))

    def _colour(self, ci: int) -> tuple[int, int, int]:
        return procedural.COLOURS[procedural.parse_caption(self.captions[ci]).colour]


COMMIT = 0.99
"""Posterior weight at which a call counts as committed to one clip."""


def decision(trace: list[dict[str, Any]], k: int, boundaries: list[int]) -> dict[str, Any]:
    """When batch element ``k`` chose its clip, from the denoiser's per-call trace: ``commit_*``, the first call whose
    top clip has weight ≥ :data:`COMMIT` (its σ, stage, and whether that clip is the final one); ``decided_*``,
    the call from which the top clip is the final clip with weight ≥ 0.5 to the end."""
    tops = [call["top_clip"][k] for call in trace]
    weights = [call["top_weight"][k] for call in trace]

    def stage(i: int) -> int:
        return sum(1 for b in boundaries if b < i)

    commit = next((i for i, w in enumerate(weights) if w >= COMMIT), None)
    decided = len(trace) - 1
    while decided > 0 and tops[decided - 1] == tops[-1] and weights[decided - 1] >= 0.5:
        decided -= 1
    return {
        "commit_sigma": None if commit is None else trace[commit]["sigma"][k],
        "commit_stage": None if commit is None else stage(commit),
        "commit_kept": None if commit is None else tops[commit] == tops[-1],
        "decided_step": decided,
        "decided_sigma": trace[decided]["sigma"][k],
        "decided_stage": stage(decided),
    }


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- summary ---------------------------------------------------------------------------------------------------


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _se(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


METRICS = (
    "density", "psnr_capped", "ssim", "latent_psnr", "same_clip", "in_caption", "landing", "hf_kept",
    "object_found", "motion_err_vs_full", "path_err", "shape_err", "track_vs_own_path", "commit_sigma",
    "commit_kept", "decided_sigma", "decided_stage", "seconds",
)  # fmt: skip


def _main_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("probe") is None]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means per (steps, mode, budget, kind), ``kind = "all"`` first; plus PSNR over the runs that ended on a
    different clip than full (``psnr_if_other_clip``) and the largest landing distance."""
    out = []
    main = _main_rows(rows)
    keys = sorted({(r["steps"], r["mode"], r["budget"]) for r in main}, key=_order)
    for steps, mode, budget in keys:
        mine = [r for r in main if (r["steps"], r["mode"], r["budget"]) == (steps, mode, budget)]
        for kind in ("all", *procedural.KINDS):
            sel = mine if kind == "all" else [r for r in mine if r["kind"] == kind]
            if not sel:
                continue
            other = [r["psnr_capped"] for r in sel if not r["same_clip"]]
            out.append(
                {
                    "steps": steps,
                    "mode": mode,
                    "budget": budget,
                    "kind": kind,
                    "n": len(sel),
                    **{m: _mean([r[m] for r in sel]) for m in METRICS},
                    "psnr_if_other_clip": _mean(other),
                    "landing_max": max(r["landing"] for r in sel),
                    "relaxed": any(r.get("relaxed", False) for r in sel),
                    "same_plan_as_dvg": _same_plan(rows, sel),
                }
            )
    return out


def _order(key: tuple[int, str, float | None]) -> tuple[int, float, int]:
    steps, mode, budget = key
    names = [Mode.FULL.value, FULL_RESEED, *(m.value for m in ABLATIONS)]
    return steps, -1.0 if budget is None else budget, names.index(mode)


def _same_plan(rows: list[dict[str, Any]], sel: list[dict[str, Any]]) -> float | None:
    """Share of ``sel``'s videos whose stage grids equal the dvg run's of the same video."""
    if not sel or sel[0]["mode"] in (Mode.DVG.value, Mode.FULL.value, FULL_RESEED) or sel[0]["budget"] is None:
        return None
    dvg = {
        (r["steps"], r["clip"], r["seed"]): r["grids"]
        for r in _main_rows(rows)
        if r["mode"] == Mode.DVG.value and r["budget"] == sel[0]["budget"]
    }
    same = [dvg.get((r["steps"], r["clip"], r["seed"])) == r["grids"] for r in sel]
    return sum(same) / len(same)


def paired(rows: list[dict[str, Any]], steps: int, budget: float, mode: str, metric: str) -> dict[str, Any]:
    """dvg minus ``mode`` on ``metric`` over the same (caption, seed): mean, standard error, pairs."""
    main = _main_rows(rows)
    other = {(r["clip"], r["seed"]): r for r in main if (r["steps"], r["mode"], r["budget"]) == (steps, mode, budget)}
    diffs = []
    for r in main:
        if (r["steps"], r["mode"], r["budget"]) != (steps, Mode.DVG.value, budget):
            continue
        o = other.get((r["clip"], r["seed"]))
        if o is not None and r[metric] is not None and o[metric] is not None:
            diffs.append(float(r[metric]) - float(o[metric]))
    mean, se = _mean(diffs), _se(diffs)
    noise = mean is None or se is None or abs(mean) <= 2 * se
    return {"pairs": len(diffs), "mean": mean, "se": se, "within_noise": noise}


def margins(rows: list[dict[str, Any]], steps: list[int], budgets: list[float]) -> dict[str, Any]:
    """Per step count, budget and ablation: dvg's paired margins on the capped PSNR and on the same-clip rate."""
    out: dict[str, Any] = {}
    present = {(r["steps"], r["mode"], r["budget"]) for r in _main_rows(rows)}
    for n in steps:
        for b in budgets:
            if (n, Mode.DVG.value, b) not in present:
                continue
            for mode in COMPARED:
                if (n, mode.value, b) not in present:
                    continue
                out[f"{mode.value}@{b}/{n}"] = {
                    "steps": n,
                    "budget": b,
                    "mode": mode.value,
                    "psnr_db": paired(rows, n, b, mode.value, "psnr_capped"),
                    "same_clip": paired(rows, n, b, mode.value, "same_clip"),
                }
    return out


def probe_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per probe: the same-clip rate and capped PSNR against full, and the paired margin against the released dvg
    of the same (caption, seed)."""
    probes = [r for r in rows if r.get("probe") is not None]
    out = []
    for name in dict.fromkeys(r["probe"] for r in probes):
        sel = [r for r in probes if r["probe"] == name]
        released = {(r["clip"], r["seed"]): r for r in probes if r["probe"] == RELEASED}
        diff_clip = [float(r["same_clip"]) - float(released[(r["clip"], r["seed"])]["same_clip"]) for r in sel
                     if (r["clip"], r["seed"]) in released]  # fmt: skip
        diff_psnr = [r["psnr_capped"] - released[(r["clip"], r["seed"])]["psnr_capped"] for r in sel
                     if (r["clip"], r["seed"]) in released]  # fmt: skip
        out.append(
            {
                "probe": name,
                "overrides": sel[0]["overrides"],
                "steps": sel[0]["steps"],
                "budget": sel[0]["budget"],
                "n": len(sel),
                "density": _mean([r["density"] for r in sel]),
                "same_clip": _mean([r["same_clip"] for r in sel]),
                "psnr_capped": _mean([r["psnr_capped"] for r in sel]),
                "hf_kept": _mean([r["hf_kept"] for r in sel]),
                "same_clip_vs_released": {"mean": _mean(diff_clip), "se": _se(diff_clip)},
                "psnr_vs_released": {"mean": _mean(diff_psnr), "se": _se(diff_psnr)},
            }
        )
    return out


# -- output ----------------------------------------------------------------------------------------------------


def _f(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    sign, spec = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
    return f"{float(value):>{sign}{width}{spec}}"


def table(result: dict[str, Any]) -> str:
    summary, margin = result["summary"], result["margins"]
    lines = []
    for n in result["config"]["steps"]:
        lines += [
            "",
            f"{n} steps: each mode vs the full run (PSNR capped at {PSNR_CAP_DB:.2f} dB)",
            f"{'mode':<16}{'budget':>7}{'n':>4}{'density':>9}{'same clip':>10}{'PSNR dB':>9}{'if other':>9}"
            f"{'SSIM':>8}{'lat dB':>8}{'HF kept':>8}{'motion px':>10}{'path px':>8}{'shape px':>9}{'landing':>9}",
        ]
        for s in summary:
            if s["steps"] != n or s["kind"] != "all":
                continue
            budget = "-" if s["budget"] is None else f"{s['budget']:.2f}"
            mark = "*" if s["relaxed"] else " "
            lines.append(
                f"{s['mode'] + mark:<16}{budget:>7}{s['n']:>4}{_f(s['density'], '.3f', 9)}"
                f"{_f(s['same_clip'], '.2f', 10)}{_f(s['psnr_capped'], '.2f', 9)}"
                f"{_f(s['psnr_if_other_clip'], '.2f', 9)}"
                f"{_f(s['ssim'], '.3f', 8)}{_f(s['latent_psnr'], '.1f', 8)}{_f(s['hf_kept'], '.3f', 8)}"
                f"{_f(s['motion_err_vs_full'], '.2f', 10)}{_f(s['path_err'], '.2f', 8)}{_f(s['shape_err'], '.2f', 9)}"
                f"{_f(s['landing_max'], '.4f', 9)}"
            )
        lines += ["", f"{n} steps, per kind: same clip / PSNR dB"]
        kinds = procedural.KINDS
        lines.append(f"{'mode':<16}{'budget':>7}" + "".join(f"{k:>18}" for k in kinds))
        for s in summary:
            if s["steps"] != n or s["kind"] != "all":
                continue
            cells = []
            for k in kinds:
                c = next((x for x in summary if (x["steps"], x["mode"], x["budget"], x["kind"]) ==
                          (n, s["mode"], s["budget"], k)), None)  # fmt: skip
                cells.append("" if c is None else f"{c['same_clip']:.2f} / {c['psnr_capped']:5.2f}")
            budget = "-" if s["budget"] is None else f"{s['budget']:.2f}"
            lines.append(f"{s['mode']:<16}{budget:>7}" + "".join(f"{c:>18}" for c in cells))
        lines += ["", f"{n} steps: dvg minus each ablation, mean ± paired SE (PSNR dB; same-clip rate)"]
        for g in margin.values():
            if g["steps"] != n:
                continue
            p, c = g["psnr_db"], g["same_clip"]
            verdict = "within noise" if p["within_noise"] else ("dvg ahead" if p["mean"] > 0 else "dvg behind")
            verdict_c = "within noise" if c["within_noise"] else ("dvg ahead" if c["mean"] > 0 else "dvg behind")
            lines.append(
                f"  {g['mode'] + '@' + str(g['budget']):<22}{p['mean']:+7.2f} ± {_f(p['se'], '.2f', 4).strip():<5} "
                f"{verdict:<13} same clip {c['mean']:+.3f} ± {_f(c['se'], '.3f', 5).strip():<6} {verdict_c}"
                f"  ({p['pairs']} pairs)"
            )
    if result["skipped"]:
        lines += ["", "not run (infeasible):"] + [
            f"  {s['mode']} @ {s['budget']} / {s['steps']} steps" for s in result["skipped"]
        ]
    if result["probes"]:
        lines += ["", "probes: dvg with one setting changed, vs full; and paired vs the released dvg"]
        lines.append(f"  {'probe':<50}{'density':>8}{'same clip':>10}{'PSNR dB':>9}{'HF kept':>8}  vs released")
        for p in result["probes"]:
            c, q = p["same_clip_vs_released"], p["psnr_vs_released"]
            lines.append(
                f"  {p['probe']:<50}{_f(p['density'], '.3f', 8)}{_f(p['same_clip'], '.2f', 10)}"
                f"{_f(p['psnr_capped'], '.2f', 9)}{_f(p['hf_kept'], '.3f', 8)}  same clip {_f(c['mean'], '+.3f', 6)}"
                f" ± {_f(c['se'], '.3f', 5).strip()}, PSNR {_f(q['mean'], '+.2f', 6)} ± {_f(q['se'], '.2f', 4).strip()}"
            )
    split = result["planner_split"]
    if split:
        lines += ["", "planner split (dvg): mean s, mean r = T23/T, demands, actions"]
        for n, per_budget in split.items():
            for budget, per_kind in per_budget.items():
                for kind, p in per_kind.items():
                    lines.append(
                        f"  {n} steps, budget {float(budget):.2f} {kind:<8} n={p['n']:<3}"
                        f" s={_f(p['s_mean'], '.3f', 5).strip()}"
                        f" r={_f(p['r_mean'], '.3f', 5).strip()} D_s={_f(p['D_s_mean'], '.3f', 5).strip()}"
                        f" D_t={_f(p['D_t_mean'], '.3f', 5).strip()} "
                        + " ".join(f"{a}:{k}" for a, k in p["actions"].items())
                    )
    return "\n".join(lines)


def sheet_blocks(
    bench: Bench, picks: list[tuple[int, int]], budget: float
) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    blocks = []
    steps = bench.sheet[0] if bench.sheet else 0
    for ci, seed in picks:
        videos = []
        for mode, b in [(Mode.FULL.value, None)] + [(m.value, budget) for m in ABLATIONS]:
            frames = bench.kept.get((ci, seed, mode, b))
            row = next((r for r in _main_rows(bench.rows) if (r["steps"], r["clip"], r["seed"], r["mode"], r["budget"])
                        == (steps, ci, seed, mode, b)), None)  # fmt: skip
            if frames is None or row is None:
                continue
            name = mode if b is None else f"{mode} @{b:g}"
            same = "same clip" if row["same_clip"] else f"variant {row['nearest_variant']}"
            label = (
                f"{name}\ns={row['s']:g} T23={row['t23']} rho={row['density']:.3f}\n{row['psnr_capped']:.1f} dB, {same}"
            )
            videos.append((label, frames))
        blocks.append((f"{procedural.parse_caption(bench.captions[ci]).kind} (seed {seed}, {steps} steps): "
                       f"{bench.captions[ci]}", videos))  # fmt: skip
    return blocks


# -- entry point -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dvg_dist.runtime.cli import OneLineParser

    p = OneLineParser(prog="fidelity_exact.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-wan.yaml"))
    p.add_argument("--model", help="the pipeline whose tokenizer, text encoder, VAE, scheduler are used")
    p.add_argument("--captions", type=int, default=32, help="held-out captions in the dataset (and run)")
    p.add_argument("--variants", type=int, default=12, help="renderings per caption")
    p.add_argument("--max-offset", type=float, default=10.0, help="largest object-path offset, px per axis")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--encoder", choices=("vae", "block"), default="vae", help="vae: the pipeline's VAE")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0.4,0.5,0.6,0.7")
    p.add_argument("--steps", default="8,25,50")
    p.add_argument("--probe-steps", type=int, default=25, help="step count of the --probe runs (0: none)")
    p.add_argument("--probe-budget", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--colour-tol", type=float, default=80.0)
    p.add_argument("--verify-decode", type=int, default=8, help="full-run videos decoded by the real VAE too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
    p.add_argument("--cache", default=str(ROOT / "build" / "exact"), help="dataset cache directory")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity_exact.json"))
    p.add_argument("--smoke", action="store_true", help="3 captions x 4 variants, 8 steps, budget 0.5, block encoder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.command = "python bench/fidelity_exact.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.captions, args.variants, args.encoder = 3, 4, "block"
        args.seeds, args.budgets, args.steps, args.probe_steps, args.verify_decode = "0", "0.5", "8", 8, 1
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.budget_list = [float(b) for b in args.budgets.split(",")]
        args.steps_list = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error("--seeds, --budgets and --steps must be comma-separated numbers")
    if args.captions < 1 or args.variants < 1 or args.batch < 1 or args.threads < 1:
        p.error("need --captions, --variants, --batch and --threads >= 1")
    if not all(0 < b <= 1 for b in args.budget_list) or not all(s >= 4 for s in args.steps_list):
        p.error("budgets must be in (0, 1] and step counts >= 4 (DVG's four stages)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    overrides = ["sampling.guidance_scale=1.0", *args.set]
    setup = Setup(args.config, args.model, overrides)
    cfg = setup.load(f"sampling.steps={args.steps_list[0]}")
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    base: Any = DiffusionPipeline.from_pretrained(cfg.model.path, use_safetensors=True)
    base.set_progress_bar_config(disable=True)
    width, height = cfg.sampling.pixel_size()
    spec = DatasetSpec(
        tuple(procedural.held_out_captions(args.captions)), args.variants, args.max_offset, args.dataset_seed,
        cfg.sampling.frame_num, height, width, args.encoder,
    )  # fmt: skip
    dataset = build_dataset(spec, base.vae, args.cache)
    pipe = exact_pipeline(base, dataset, cfg.dvg.resize)
    engine = Engine(cfg, pipe=pipe)
    _memoise_encode(engine)
    load_s = time.perf_counter() - t0
    separation = dataset.separation()
    peak = float(dataset.latents.max() - dataset.latents.min())
    picks = [
        (next(i for i, c in enumerate(dataset.captions) if procedural.parse_caption(c).kind == kind), args.seed_list[0])
        for kind in ("texture", "motion")
        if any(procedural.parse_caption(c).kind == kind for c in dataset.captions)
    ]
    sheet_steps = 25 if 25 in args.steps_list else args.steps_list[0]
    bench = Bench(
        setup, engine, dataset, separation, peak, args.seed_list, args.budget_list, args.steps_list, args.batch,
        args.colour_tol, (sheet_steps, set(picks)),
    )  # fmt: skip
    probe_at = (args.probe_steps, args.probe_budget) if args.probe_steps in args.steps_list else None
    per = len(dataset.captions) * len(args.seed_list)
    total = per * len(args.steps_list) * (2 + len(args.budget_list) * len(ABLATIONS))
    total += per * len(PROBES) if probe_at else 0
    from tqdm import tqdm

    with tqdm(total=total, unit="video", desc="fidelity-exact", disable=args.no_progress) as bar:
        bench.run(bar, PROBES, probe_at)
    decode_check = verify_decode(engine, bench, args.verify_decode)
    summary = summarise(bench.rows)
    split = {
        str(n): planner_split([r for r in _main_rows(bench.rows) if r["steps"] == n], args.budget_list)
        for n in args.steps_list
    }
    out_path = Path(args.out)
    sheet_path = out_path.with_name(out_path.stem + "_contact.png")
    budget = 0.5 if 0.5 in args.budget_list else args.budget_list[0]
    blocks = [b for b in sheet_blocks(bench, picks, budget) if b[1]]
    sheet = contact_sheet(blocks, sheet_path) if blocks else None
    result = {
        "command": args.command,
        "config": {
            "config": str(args.config),
            "components_from": cfg.model.path,
            "transformer": "dvg_dist.data.exact.ExactDenoiser",
            "scheduler": type(pipe.scheduler).__name__,
            "steps": args.steps_list,
            "budgets": args.budget_list,
            "seeds": args.seed_list,
            "guidance_scale": 1.0,
            "stage_shifts": list(cfg.dvg.stage_shifts),
            "model_resize": str(cfg.dvg.resize.value),
            "size": cfg.sampling.size,
            "frame_num": cfg.sampling.frame_num,
            "dataset": {
                "captions": len(spec.captions),
                "caption_source": "dvg_dist.data.procedural.held_out_captions",
                "variants": spec.variants,
                "clips": len(dataset),
                "max_offset_px": spec.max_offset,
                "seed": spec.seed,
                "encoder": spec.encoder,
                "key": dataset.key,
                "latent_shape": list(dataset.latents.shape[1:]),
                "latent_peak": peak,
                "separation_min": float(separation.min()),
                "separation_median": float(separation.median()),
                "info": {k: v for k, v in dataset.info.items() if k != "cache_path"},
            },
            "modes": [Mode.FULL.value, FULL_RESEED, *(m.value for m in ABLATIONS)],
            "fixed_rule": "per budget, the planner's match at w_s = w_t = 0.5 over the dvg feasible set",
            "psnr": f"frames, dB, peak 255, capped at {PSNR_CAP_DB:.2f} (one grey level RMS)",
            "latent_psnr": f"normalised latents, peak = dataset range, capped at {LATENT_CAP_DB}",
            "hf": f"luma power at normalised radius >= {HF_RADIUS}, DC removed, summed over frames; ratio to full",
            "motion": f"object-colour centroid (RGB distance <= {args.colour_tol}, >= {MIN_PIXELS} px) per frame",
            "probe": None if probe_at is None else {"steps": probe_at[0], "budget": probe_at[1]},
        },
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "decode_check": decode_check,
        "captions": [{"caption": c, "kind": procedural.parse_caption(c).kind} for c in dataset.captions],
        "runs": columnar(bench.rows),
        "skipped": bench.skipped,
        "summary": summary,
        "margins": margins(bench.rows, args.steps_list, args.budget_list),
        "probes": probe_summary(bench.rows),
        "planner_split": split,
        "contact_sheet": None if sheet is None else {"path": _shown(sheet_path), "size": list(sheet)},
        "timings": {"load_s": load_s, "total_s": time.perf_counter() - t_start},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(dumps(result))
    tmp.replace(out_path)
    return result


def _memoise_encode(engine: Engine) -> None:
    """Keep each (prompts, settings) encoding: the text encoder is deterministic, and every per-video call of the
    engine would run it again."""
    adapter = engine.adapter
    inner = adapter.encode
    memo: dict[Any, Any] = {}

    def encode(prompts: list[str], negatives: Any, sampling: Any, image: Any, grid: Any, generators: Any = None) -> Any:
        if image is not None:  # an image encoding may draw from the request generators: never shared
            return inner(prompts, negatives, sampling, image, grid, generators)
        key = (tuple(prompts), tuple(negatives or ()), sampling.guidance_scale > 1.0)
        if key not in memo:
            memo[key] = inner(prompts, negatives, sampling, image, grid, generators)
        return memo[key]

    adapter.encode = encode  # type: ignore[method-assign, assignment]


def verify_decode(engine: Engine, bench: Bench, count: int) -> dict[str, Any]:
    """The closed-form decode against the pipeline's own VAE decode (adapter.decode) on ``count`` full runs."""
    refs = list(bench.full.values())[:count] if count > 0 else []
    if not refs:
        return {"videos": 0}
    latents = torch.stack([r.latent for r in refs])
    t0 = time.perf_counter()
    real = engine.adapter.decode(latents)
    seconds = time.perf_counter() - t0
    fast = np.stack([r.frames for r in refs])
    diff = np.abs(real.astype(np.int16) - fast.astype(np.int16))
    return {
        "videos": len(refs),
        "max_abs_levels": int(diff.max()),
        "share_differing": float((diff > 0).mean()),
        "vae_decode_s_per_video": seconds / len(refs),
    }


def columnar(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-video rows as ``{"columns": [...], "rows": [[...], ...]}``, floats to 6 significant digits (thousands
    of videos: a third of the size of a list of objects); :func:`rows_of` reads it back."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def short(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.6g}") if math.isfinite(v) else as_json_number(v)
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        if isinstance(v, list):
            return [short(x) for x in v]
        return v

    return {"columns": columns, "rows": [[short(r.get(c)) for c in columns] for r in rows]}


def dumps(result: dict[str, Any]) -> str:
    """The result as indented JSON, except the per-video rows, one compact line each."""
    rows = result["runs"]["rows"]
    text = json.dumps({**result, "runs": {**result["runs"], "rows": "@ROWS@"}}, indent=1)
    body = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in rows)
    return text.replace('"@ROWS@"', "[\n" + body + "\n ]") + "\n"


def rows_of(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of :func:`columnar` as dicts again."""
    return [dict(zip(runs["columns"], values)) for values in runs["rows"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dvg_dist.runtime.cli import setup_logging

    setup_logging()
    threads, dvg_log = torch.get_num_threads(), logging.getLogger("dvg_dist")
    level = dvg_log.level
    torch.set_num_threads(args.threads)
    dvg_log.setLevel(logging.WARNING)
    try:
        result = run(args)
    except (ConfigError, InputError, FileNotFoundError, ValueError) as e:
        print(f"fidelity_exact.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        dvg_log.setLevel(level)
    print(table(result))
    dc = result["decode_check"]
    if dc.get("videos"):
        print(f"\nclosed-form decode vs the VAE on {dc['videos']} videos: max {dc['max_abs_levels']} levels, "
              f"{dc['share_differing']:.2%} of values differ")  # fmt: skip
    videos = len(result["runs"]["rows"])
    print(f"\n{videos} videos in {result['timings']['total_s']:.0f} s; wrote {_shown(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
