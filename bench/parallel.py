"""Benchmark: what sequence parallelism moves per rank, per stage of a DVG plan — measured and analytic.

    python bench/parallel.py [--steps 12] [--out bench/results/parallel.json]

**Measured** (CPU, gloo, the tiny random-weight Wan 2.1 T2V arch: 2 heads × 12 = hidden 24, 2 layers,
patch 1×2×2, 16 out channels, fp32; 17 frames × 64×64 → latent 5×8×8, DVG budget 0.5): 2 spawned ranks, layouts
Ulysses 2 and ring 2, guidance 1 (one forward per step) and 5 (two). In every rank, for the duration of the run,
``torch.distributed``'s ``all_to_all_single``, ``all_gather``, ``all_gather_into_tensor``, ``batch_isend_irecv``,
``broadcast``, ``broadcast_object_list`` and ``all_reduce`` are wrapped (the package calls ``dist.<name>``, so the
wrappers are what runs; the counts below prove it). Each wrapper counts the calls and the bytes this rank *sends
to other ranks* (the logical payload, what any algorithm must move off the rank):

    all_to_all_single          input bytes minus the chunk addressed to itself
    all_gather(_into_tensor)   (P-1) × input bytes
    batch_isend_irecv          bytes of the isend ops
    broadcast(_object_list)    (P-1) × payload on the source, 0 elsewhere (objects: int64 sizes + pickles)
    all_reduce                 2 (P-1)/P × bytes (ring all-reduce)

and attributes them to the model call in flight (a flag set while the engine's velocity function runs, by
wrapping the velocity handed to the sampler) or, between calls, to the gap they fall in; a gap between the last
call of a stage and the first of the next is that **stage switch**. Expected there: only the
``broadcast_object_list`` of rank 0's decision at the sketch switch, nothing at the other switches — the latent is
whole and identical on every rank, so re-partitioning the next stage's tokens is local.

**Formulas** (per forward, per rank r, P = sp size, shards ``S_0..S_{P-1}`` of N tokens from ``shard_sizes``
(balanced, the first ranks one token longer), d = hidden = heads × head dim, L = layers, b = bytes per element,
c = out channels × patch volume):

    Ulysses, per attention layer:  q,k,v all-to-all  3 × (P-1) × S_r × d/P × b    (= 3 (P-1)/P × S × d × b)
                                   output all-to-all (N - S_r) × d/P × b          (=   (P-1)/P × S × d × b)
    ring, per attention layer:     K and V blocks     Σ_{j=0}^{P-2} 2 × S_{(r-j) mod P} × d × b
                                                                                  (= (P-1) × 2 × S × d × b)
    output gather of proj_out:     (P-1) × S_r × c × b  minimum;  our gather pads every shard to max(S):
                                   (P-1) × max(S) × c × b  (one padded token at most)

(the parenthesised forms hold when P divides N). These are the minimum each algorithm moves: Ulysses must
deliver every other rank's head slice of q, k, v and return the outputs; ring must show every K/V block to every
other rank; every rank must receive the whole velocity. Cross-attention (text replicated) moves nothing. The
measured bytes of the tiny runs are checked against the same formulas on the tiny arch (printed side by side).

**Analytic**: Wan 2.1 14B at 720p (latent 21×90×160, patch 1×2×2 → 75,600 tokens; 40 heads × 128 = 5,120
hidden, 40 layers, 16 out channels, bf16 = 2 bytes), the DVG plan ``Planner(Grid(21, 90, 160), 50, 0.5,
spatial_multiple=2).choose(0.5)[0]`` at sp = 2, 4, 8, for Ulysses and ring; rank 0 (the largest shard), per
forward and per run (2 forwards per step with CFG, ``executed_counts`` steps per stage), against a full run; the
stage-switch cost is (sp - 1) × the pickled :class:`~dvg_dist.dvg.Decision` this plan's decider would broadcast.

Step time at 1 process (2 threads) vs 2 processes (1 thread each) on this 2-core machine is context only: the
tiny model is all overhead, and 2 ranks on 2 cores measure the collectives' latency, not a speed-up.

**Stage-aware layouts** (``--layouts``, written to ``bench/results/parallel_layouts.json``;
``dvg_dist/parallel/layouts.py``):

    python bench/parallel.py --layouts [--frames 33 --size 512x320 --steps 12]

(a) *A model* of 8-GPU scaling per stage, not a measurement: Wan 2.1 14B at 1280×720×81 (latent 21×90×160, CFG on:
two passes per step) and HunyuanVideo 13B at 1280×720×129 (33×90×160, embedded guidance: one pass), their released
transformer configs (``check_gpu.REAL_ARCHS``), the DVG plan at budget 0.5 and 50 steps (equal demand weights), each
stage priced by :func:`dvg_dist.parallel.layouts.estimate` for every layout of 8 ranks with an *assumed* H100/H200
NVLink node (:data:`GPU_LINK`: 25 µs per collective, 150 GB/s all-to-all per GPU, 400 TFLOP/s bf16 achieved — about
40 % of the 989 TFLOP/s dense peak), batch 1 and 2. The formulas are the ones ``auto`` uses at run time; they ignore
kernel efficiency at small shapes, overlap of compute and communication, and memory limits.

(b) *Measured* on this machine (CPU, gloo): the attention-dominated Wan of ``bench/speedup.py`` (2 heads × 64, one
block; 33 frames × 512×320 → latent 9×40×64 = 5,760 tokens at full size) with guidance 5 (two passes per step), DVG at
budget 0.5 and ``full``, at 1 process (2 threads), 2 and 4 processes (1 thread each): the fixed layout (``u2`` /
``u2xr2``, the default for 2 heads) against ``parallel.stage_layouts: auto`` (the cost model with the link measured at
start-up). One warm-up run, then the best of ``--repeats`` timed runs of the denoising loop. **4 processes on 2 cores
oversubscribe the CPU**: the 4-process rows measure the collectives' cost and the layout's effect on it, not a
4-way speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import io
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from _common import cpu_model

from dvg_dist.dvg import Decision, Demands, DVGOptions, Grid, Planner
from dvg_dist.parallel import shard_sizes
from dvg_dist.parallel.layouts import ArchModel, LayoutSpec, LinkModel, auto_candidates, choose, default_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "parallel.json"
CONFIG = ROOT / "configs" / "tiny-wan.yaml"
PROMPT = "a red ball rolling over green grass"
SEED = 0
WORLD = 2
LAYOUTS: dict[str, tuple[int, int]] = {"ulysses2": (2, 1), "ring2": (1, 2)}  # name -> (ulysses, ring)
GUIDANCES = (1.0, 5.0)
COLLECTIVES = (
    "all_to_all_single",
    "all_gather",
    "all_gather_into_tensor",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "all_reduce",
)


@dataclass(frozen=True)
class Arch:
    """What the communication formulas need from a DiT backbone."""

    hidden: int
    layers: int
    patch: tuple[int, int, int]
    out_channels: int
    elem_bytes: int

    @property
    def out_per_token(self) -> int:
        """Output elements per token of ``proj_out`` (out channels × patch volume)."""
        pt, ph, pw = self.patch
        return self.out_channels * pt * ph * pw


WAN14B = Arch(hidden=40 * 128, layers=40, patch=(1, 2, 2), out_channels=16, elem_bytes=2)
WAN14B_FULL = Grid(21, 90, 160)
ANALYTIC_STEPS, ANALYTIC_BUDGET, ANALYTIC_W_S, ANALYTIC_PASSES = 50, 0.5, 0.5, 2


# ------------------------------------------------------------------------------------------------ formulas


def ulysses_bytes(n: int, p: int, rank: int, arch: Arch) -> int:
    """Bytes rank ``rank`` sends in one forward's Ulysses all-to-alls (q,k,v in, output back), all layers."""
    sizes = shard_sizes(n, p)
    per_head_slice = arch.hidden // p
    qkv = 3 * (p - 1) * sizes[rank] * per_head_slice
    out = (n - sizes[rank]) * per_head_slice
    return arch.layers * (qkv + out) * arch.elem_bytes


def ring_bytes(n: int, p: int, rank: int, arch: Arch) -> int:
    """Bytes rank ``rank`` sends in one forward's ring K/V passes (P-1 blocks of K and V per layer)."""
    sizes = shard_sizes(n, p)
    blocks = sum(sizes[(rank - j) % p] for j in range(p - 1))
    return arch.layers * 2 * blocks * arch.hidden * arch.elem_bytes


def gather_bytes(n: int, p: int, rank: int, arch: Arch, padded: bool = True) -> int:
    """Bytes rank ``rank`` sends in the output all-gather of ``proj_out`` (padded to the longest shard, as our
    :func:`dvg_dist.parallel.gather` does, or the unpadded minimum)."""
    sizes = shard_sizes(n, p)
    tokens = max(sizes) if padded else sizes[rank]
    return (p - 1) * tokens * arch.out_per_token * arch.elem_bytes


def expected_forward(layout: tuple[int, int], n: int, rank: int, arch: Arch) -> dict[str, tuple[int, int]]:
    """Collective -> (calls, bytes) one forward must show on ``rank`` for a 1-D layout (Ulysses or ring)."""
    u, r = layout
    p = u * r
    out: dict[str, tuple[int, int]] = {"all_gather": (1, gather_bytes(n, p, rank, arch))}
    if u > 1:
        out["all_to_all_single"] = (2 * arch.layers, ulysses_bytes(n, p, rank, arch))
    else:
        out["batch_isend_irecv"] = ((p - 1) * arch.layers, ring_bytes(n, p, rank, arch))
    return out


# ------------------------------------------------------------------------------------------------ counting


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pickled_size(obj: Any) -> int:
    """The size ``broadcast_object_list`` sends for ``obj`` (it pickles with ``pickle.Pickler``'s default)."""
    f = io.BytesIO()
    pickle.Pickler(f).dump(obj)
    return f.getbuffer().nbytes


@dataclass
class Counter:
    """Collective calls and bytes sent by this rank, attributed to the model call in flight or to the gap
    after the ``after``-th call (``after = -1``: before the first)."""

    in_call: int | None = None
    calls_done: int = 0
    per_call: list[dict[str, list[int]]] = field(default_factory=list)
    gaps: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    call_info: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, nbytes: int) -> None:
        if self.in_call is not None:
            bucket = self.per_call[self.in_call]
        else:
            bucket = self.gaps.setdefault(self.calls_done - 1, {})
        entry = bucket.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)


def _sent(name: str, bound: dict[str, Any]) -> int:
    """Bytes this rank sends to other ranks in collective ``name`` called with ``bound`` arguments."""
    group = bound.get("group")
    p = dist.get_world_size(group)
    if name == "all_to_all_single":
        inp: torch.Tensor = bound["input"]
        row = _nbytes(inp) // max(inp.shape[0], 1) if inp.dim() else _nbytes(inp)
        splits = bound.get("input_split_sizes")
        me = dist.get_rank(group)
        own = splits[me] * row if splits else _nbytes(inp) // p
        return _nbytes(inp) - own
    if name == "all_gather":
        return (p - 1) * _nbytes(bound["tensor"])
    if name == "all_gather_into_tensor":
        return (p - 1) * _nbytes(bound["input_tensor"])
    if name == "batch_isend_irecv":
        return sum(_nbytes(op.tensor) for op in bound["p2p_op_list"] if getattr(op.op, "__name__", "") == "isend")
    if name == "broadcast":
        return (p - 1) * _nbytes(bound["tensor"]) if _is_source(bound, group) else 0
    if name == "broadcast_object_list":
        if not _is_source(bound, group):
            return 0
        objs = bound["object_list"]
        return (p - 1) * (8 * len(objs) + sum(_pickled_size(o) for o in objs))
    if name == "all_reduce":
        return 2 * (p - 1) * _nbytes(bound["tensor"]) // p
    raise ValueError(name)


def _is_source(bound: dict[str, Any], group: Any) -> bool:
    if bound.get("group_src") is not None:
        return dist.get_rank(group) == bound["group_src"]
    return dist.get_rank() == (bound.get("src") or 0)


@contextmanager
def counting(counter: Counter) -> Iterator[None]:
    """Wrap ``torch.distributed``'s collectives (attribute patch, undone on exit) to count into ``counter``."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            counter.add(name, _sent(name, bound.arguments))  # before the call: objects are pickled on the source
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextmanager
def attributing(counter: Counter) -> Iterator[None]:
    """Wrap the velocity the engine hands to the sampler: the counter knows which model call is in flight,
    and each call's step, stage, grid and wall time are recorded."""
    import dvg_dist.runtime.engine as engine_mod

    original = engine_mod.sample

    def sample(velocity: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        def timed(x: torch.Tensor, timestep: float, ctx: Any) -> torch.Tensor:
            counter.in_call = counter.calls_done
            counter.per_call.append({})
            t0 = time.perf_counter()
            try:
                return velocity(x, timestep, ctx)
            finally:
                counter.call_info.append(
                    {
                        "step": ctx.step,
                        "stage": ctx.stage,
                        "grid": [ctx.grid.t, ctx.grid.h, ctx.grid.w],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                counter.in_call = None
                counter.calls_done += 1

        return original(timed, *args, **kwargs)

    engine_mod.sample = sample  # type: ignore[assignment]
    try:
        yield
    finally:
        engine_mod.sample = original  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------ runs


def _engine_config(steps: int, guidance: float) -> Any:
    from dvg_dist.config import load_config

    return load_config(CONFIG, [f"sampling.steps={steps}", f"sampling.guidance_scale={guidance}"])


def tiny_arch(pipe: Any) -> Arch:
    c = pipe.transformer.config
    return Arch(
        hidden=c.num_attention_heads * c.attention_head_dim,
        layers=c.num_layers,
        patch=tuple(c.patch_size),
        out_channels=c.out_channels,
        elem_bytes=next(pipe.transformer.parameters()).element_size(),
    )


def run_once(pipe: Any, steps: int, guidance: float, parallel: Any) -> dict[str, Any]:
    """One counted generation; returns the per-call records, per-call collectives and the gaps."""
    from dvg_dist.runtime.engine import Engine, Request

    engine = Engine(_engine_config(steps, guidance), pipe, parallel=parallel)
    counter = Counter()
    t0 = time.perf_counter()
    with attributing(counter), counting(counter):
        result = engine.generate([Request(PROMPT, seed=SEED)], decode=False, progress=False)
    wall = time.perf_counter() - t0
    traced = [(t.step, t.stage, list(t.grid)) for t in result.trace]
    seen = [(c["step"], c["stage"], c["grid"]) for c in counter.call_info]
    if traced != seen:
        raise AssertionError(f"velocity wrapper saw {seen}, the engine traced {traced}")
    return {
        "calls": counter.call_info,
        "per_call": counter.per_call,
        "gaps": {str(k): v for k, v in counter.gaps.items()},
        "plan": {
            "grids": [s["grid"] for s in result.record.to_dict()["stages"]],
            "executed_counts": result.record.executed_counts,
            "boundaries": result.record.boundaries,
        },
        "denoise_s": result.timings["denoise"],
        "wall_s": wall,
    }


def _rank_main(rank: int, world: int, port: int, steps: int, outdir: str) -> None:
    """One spawned rank: join the gloo group, run every layout × guidance counted, write ``rank{r}.json``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    from dvg_dist.models.tiny import build_tiny_pipeline
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        pipe, _ = build_tiny_pipeline("wan", SEED)
        out: dict[str, Any] = {"arch": tiny_arch(pipe).__dict__, "runs": {}}
        for name, (u, r) in LAYOUTS.items():
            par = ParallelContext(build_groups(ParallelLayout(world, u, r, 1, num_heads=2)))
            run_once(pipe, steps, 1.0, par)  # warm-up, uncounted
            for g in GUIDANCES:
                out["runs"][f"{name}/g{g:g}"] = run_once(pipe, steps, g, par)
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_parallel(steps: int) -> list[dict[str, Any]]:
    """Spawn the ranks and return their reports in rank order."""
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as outdir:
        tmp.spawn(_rank_main, args=(WORLD, _free_port(), steps, outdir), nprocs=WORLD, join=True)
        return [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(WORLD)]


def measure_single(steps: int) -> dict[str, Any]:
    """One process, 2 threads, no process group: step times for context (its counters must stay empty)."""
    from dvg_dist.models.tiny import build_tiny_pipeline

    torch.set_num_threads(2)
    pipe, _ = build_tiny_pipeline("wan", SEED)
    run_once(pipe, steps, 1.0, None)  # warm-up
    return {f"single/g{g:g}": run_once(pipe, steps, g, None) for g in GUIDANCES}


# ------------------------------------------------------------------------------------------------ analysis


def _stage_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: the calls it ran, their per-call collectives (checked equal across calls) and step times."""
    stages: dict[int, list[int]] = {}
    for i, c in enumerate(run["calls"]):
        stages.setdefault(c["stage"], []).append(i)
    rows = []
    for stage, idx in sorted(stages.items()):
        per_call = [run["per_call"][i] for i in idx]
        uniform = all(pc == per_call[0] for pc in per_call)
        rows.append(
            {
                "stage": stage + 1,
                "grid": run["calls"][idx[0]]["grid"],
                "model_calls": len(idx),
                "per_call": per_call[0],
                "uniform_across_calls": uniform,
                "step_s_median": statistics.median(run["calls"][i]["seconds"] for i in idx),
            }
        )
    return rows


def _gap_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every gap between model calls that moved anything, labelled (stage switch or not)."""
    calls = run["calls"]
    out = []
    for key, colls in run["gaps"].items():
        after = int(key)
        before_stage = calls[after]["stage"] if after >= 0 else None
        next_stage = calls[after + 1]["stage"] if after + 1 < len(calls) else None
        if before_stage is not None and next_stage is not None and before_stage != next_stage:
            label = f"switch {before_stage + 1}->{next_stage + 1}"
        else:
            label = "before first call" if after < 0 else ("after last call" if next_stage is None else "within stage")
        out.append({"after_call": after, "label": label, "collectives": colls})
    return out


def _switches(run: dict[str, Any]) -> list[str]:
    calls = run["calls"]
    return [f"switch {a['stage'] + 1}->{b['stage'] + 1}" for a, b in zip(calls, calls[1:]) if a["stage"] != b["stage"]]


def analyse_measured(
    reports: list[dict[str, Any]], single: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Measured rows (per run, stage, rank, collective) next to the formulas; stage-switch rows; timing rows."""
    arch = Arch(**{**reports[0]["arch"], "patch": tuple(reports[0]["arch"]["patch"])})
    rows: list[dict[str, Any]] = []
    switch_rows: list[dict[str, Any]] = []
    worst_abs, worst_rel, all_nonzero = 0, 0.0, True
    for key in reports[0]["runs"]:
        layout_name, g = key.split("/")
        layout = LAYOUTS[layout_name]
        passes = 2 if g != "g1" else 1
        for rank, rep in enumerate(reports):
            run = rep["runs"][key]
            for st in _stage_rows(run):
                n = Grid(*st["grid"]).tokens(arch.patch)
                expected = {
                    k: (c * passes, b * passes) for k, (c, b) in expected_forward(layout, n, rank, arch).items()
                }
                names = sorted(set(expected) | set(st["per_call"]))
                for name in names:
                    calls, got = st["per_call"].get(name, [0, 0])
                    exp_calls, exp = expected.get(name, (0, 0))
                    worst_abs = max(worst_abs, abs(got - exp))
                    worst_rel = max(worst_rel, abs(got - exp) / exp if exp else (0.0 if got == 0 else 1.0))
                    all_nonzero &= got > 0 or exp == 0
                    rows.append(
                        {
                            "run": key,
                            "layout": layout_name,
                            "guidance": float(g[1:]),
                            "forwards_per_step": passes,
                            "rank": rank,
                            "stage": st["stage"],
                            "grid": st["grid"],
                            "tokens": n,
                            "shard_tokens": shard_sizes(n, WORLD)[rank],
                            "model_calls": st["model_calls"],
                            "collective": name,
                            "calls_per_step": calls,
                            "bytes_per_step": got,
                            "formula_calls": exp_calls,
                            "formula_bytes": exp,
                            "minimum_bytes": _minimum(name, layout, n, rank, arch) * passes,
                            "uniform_across_steps": st["uniform_across_calls"],
                            "match": got == exp and calls == exp_calls and st["uniform_across_calls"],
                        }
                    )
            gaps = _gap_rows(run)
            labels = {g_["label"] for g_ in gaps}
            for label in _switches(run):
                if label not in labels:
                    gaps.append({"after_call": None, "label": label, "collectives": {}})
            for gap in gaps:
                switch_rows.append(
                    {
                        "run": key,
                        "rank": rank,
                        "gap": gap["label"],
                        "after_call": gap["after_call"],
                        "collectives": gap["collectives"],
                        "bytes": sum(b for _, b in gap["collectives"].values()),
                    }
                )
    switch_rows.sort(key=lambda r: (r["run"], r["rank"], r["gap"]))
    timing: list[dict[str, Any]] = []
    for key, run in [*single.items(), *reports[0]["runs"].items()]:
        for st in _stage_rows(run):
            timing.append(
                {
                    "run": key,
                    "processes": 1 if key.startswith("single") else WORLD,
                    "stage": st["stage"],
                    "grid": st["grid"],
                    "step_ms_median": 1e3 * st["step_s_median"],
                }
            )
        timing.append(
            {
                "run": key,
                "processes": 1 if key.startswith("single") else WORLD,
                "stage": "all",
                "denoise_s": run["denoise_s"],
            }
        )
    single_moves = [run["gaps"] or any(run["per_call"]) for run in single.values()]
    check = {
        "all_rows_match": all(r["match"] for r in rows),
        "all_rows_at_minimum": all(r["bytes_per_step"] == r["minimum_bytes"] for r in rows),
        "max_abs_diff_bytes": worst_abs,
        "max_rel_diff": worst_rel,
        "wrapped_collectives_saw_traffic": all_nonzero and bool(rows),
        "single_process_moved_nothing": not any(single_moves),
        "arch": arch.__dict__,
    }
    return rows, switch_rows, timing, check


def _minimum(name: str, layout: tuple[int, int], n: int, rank: int, arch: Arch) -> int:
    p = layout[0] * layout[1]
    if name == "all_gather":
        return gather_bytes(n, p, rank, arch, padded=False)
    if name == "all_to_all_single":
        return ulysses_bytes(n, p, rank, arch)
    if name == "batch_isend_irecv":
        return ring_bytes(n, p, rank, arch)
    return 0


def analytic() -> dict[str, Any]:
    """Wan 2.1 14B at 720p: per stage, per sp and layout, rank 0's bytes per forward and per run.

    The stage-switch cost is rank 0's broadcast of the :class:`Decision` the default decider would send for this
    plan (the action, the demands and the feasible set, pickled), to each of the other ``sp - 1`` ranks."""
    planner = Planner(WAN14B_FULL, ANALYTIC_STEPS, ANALYTIC_BUDGET, spatial_multiple=2)
    chosen, feasible = planner.choose(ANALYTIC_W_S)
    decision = Decision(chosen.s, chosen.t23, Demands(1.0, 1.0, ANALYTIC_W_S, 1.0 - ANALYTIC_W_S))
    decision = Decision(decision.s, decision.t23, decision.demands, [c.to_dict() for c in feasible])
    decision_bytes = 8 + _pickled_size(decision)  # int64 size + the pickle, as broadcast_object_list sends it
    counts = planner.executed_counts
    plans = {"dvg": list(zip(chosen.grids, counts)), "full": [(WAN14B_FULL, ANALYTIC_STEPS)]}
    rows: list[dict[str, Any]] = []
    for sp in (2, 4, 8):
        for layout_name in ("ulysses", "ring"):
            for plan_name, stages in plans.items():
                for k, (grid, calls) in enumerate(stages):
                    n = grid.tokens(WAN14B.patch)
                    attn = (ulysses_bytes if layout_name == "ulysses" else ring_bytes)(n, sp, 0, WAN14B)
                    gath = gather_bytes(n, sp, 0, WAN14B)
                    per_forward = attn + gath
                    rows.append(
                        {
                            "sp": sp,
                            "layout": layout_name,
                            "plan": plan_name,
                            "stage": k + 1,
                            "grid": grid.as_list(),
                            "tokens": n,
                            "shard_tokens_max": max(shard_sizes(n, sp)),
                            "model_steps": calls,
                            "attention_bytes_per_forward": attn,
                            "gather_bytes_per_forward": gath,
                            "bytes_per_forward": per_forward,
                            "bytes_per_step_cfg": ANALYTIC_PASSES * per_forward,
                            "bytes_in_stage": ANALYTIC_PASSES * per_forward * calls,
                        }
                    )
    totals = {}
    for sp in (2, 4, 8):
        for layout_name in ("ulysses", "ring"):
            got = {
                p: sum(r["bytes_in_stage"] for r in rows if (r["sp"], r["layout"], r["plan"]) == (sp, layout_name, p))
                for p in plans
            }
            totals[f"{layout_name}{sp}"] = {
                "dvg_bytes": got["dvg"],
                "full_bytes": got["full"],
                "ratio": got["dvg"] / got["full"],
                "stage_switch_bytes": (sp - 1) * decision_bytes,
            }
    return {
        "model": "Wan 2.1 T2V 14B, 720p (1280x720, 81 frames)",
        "arch": {**WAN14B.__dict__, "heads": 40, "head_dim": 128},
        "plan": {
            "full": WAN14B_FULL.as_list(),
            "steps": ANALYTIC_STEPS,
            "budget": ANALYTIC_BUDGET,
            "w_s": ANALYTIC_W_S,
            "chosen": chosen.to_dict(),
            "executed_counts": counts,
            "forwards_per_step": ANALYTIC_PASSES,
            "feasible_actions": len(feasible),
        },
        "decision_broadcast_bytes": decision_bytes,
        "rank": 0,
        "rows": rows,
        "totals": totals,
    }


# ------------------------------------------------------------------------------------------------ output


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _short(name: str) -> str:
    return {"all_to_all_single": "all_to_all", "batch_isend_irecv": "isend (ring)", "all_gather": "all_gather"}.get(
        name, name
    )


def print_report(
    rows: list[dict[str, Any]],
    switches: list[dict[str, Any]],
    timing: list[dict[str, Any]],
    check: dict[str, Any],
    ana: dict[str, Any],
) -> None:
    a = check["arch"]
    print(
        f"Measured: tiny Wan (hidden {a['hidden']}, {a['layers']} layers, {a['elem_bytes']}-byte elements), "
        f"{WORLD} gloo ranks on CPU; bytes SENT per rank per denoising step, vs the formula"
    )
    grouped: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["run"], r["stage"], r["collective"]), []).append(r)
    table = []
    for group in grouped.values():
        r = group[0]

        def per_rank(k: str, group: list[dict[str, Any]] = group) -> str:
            return " / ".join(str(g[k]) for g in sorted(group, key=lambda g: g["rank"]))

        table.append(
            [
                r["layout"],
                f"{r['guidance']:g}",
                str(r["stage"]),
                "x".join(map(str, r["grid"])),
                str(r["tokens"]),
                per_rank("shard_tokens"),
                _short(r["collective"]),
                per_rank("calls_per_step"),
                per_rank("bytes_per_step"),
                per_rank("formula_bytes"),
                "yes" if all(g["match"] for g in group) else "NO",
            ]
        )
    header = ["layout", "cfg", "stage", "grid", "tokens", "tokens/rank", "collective", "calls/step"]
    print("(values per rank: r0 / r1; cfg = guidance scale, 5 = two forwards per step)")
    print(_table([*header, "measured B/step", "formula B/step", "match"], table))
    print(
        f"measured == formula on every row: {check['all_rows_match']} (max |diff| {check['max_abs_diff_bytes']} B, "
        f"max rel {check['max_rel_diff']:.2%}); every expected collective seen non-zero through the wrappers: "
        f"{check['wrapped_collectives_saw_traffic']}; measured == algorithmic minimum (unpadded gather) on every "
        f"row: {check['all_rows_at_minimum']}"
    )
    print()
    print("Between model calls (stage switches and every other gap that moved anything), bytes sent per rank")
    srows = []
    for s in switches:
        what = ", ".join(f"{_short(k)} {c}x {b} B" for k, (c, b) in s["collectives"].items()) or "nothing"
        srows.append([s["run"], f"r{s['rank']}", s["gap"], str(s["bytes"]), what])
    print(_table(["run", "rank", "gap", "bytes", "collectives (calls, bytes)"], srows))
    others = [s for s in switches if not s["gap"].startswith("switch")]
    print(f"gaps other than stage switches that moved anything: {len(others)}")
    print()
    print("Step time (context only: tiny model, 2 cores; 1 process x 2 threads vs 2 processes x 1 thread)")
    trows = []
    for t in timing:
        if t["stage"] == "all":
            trows.append([t["run"], str(t["processes"]), "all", "", f"denoise {t['denoise_s'] * 1e3:.0f} ms"])
        else:
            grid = "x".join(map(str, t["grid"]))
            trows.append([t["run"], str(t["processes"]), str(t["stage"]), grid, f"{t['step_ms_median']:.1f} ms/step"])
    print(_table(["run", "procs", "stage", "grid", "median"], trows))
    print()
    plan = ana["plan"]
    grids = " -> ".join("x".join(map(str, g)) for g in plan["chosen"]["grids"])
    print(
        f"Analytic: {ana['model']}, hidden {ana['arch']['hidden']}, {ana['arch']['layers']} layers, bf16; DVG plan "
        f"{grids} (s={plan['chosen']['s']:g}, T23={plan['chosen']['t23']}, steps {plan['executed_counts']}); "
        f"rank 0 (largest shard); {plan['forwards_per_step']} forwards per step (CFG)"
    )
    arows = []
    for r in ana["rows"]:
        arows.append(
            [
                f"{r['layout']} {r['sp']}",
                r["plan"],
                str(r["stage"]),
                "x".join(map(str, r["grid"])),
                str(r["tokens"]),
                str(r["shard_tokens_max"]),
                _fmt_bytes(r["attention_bytes_per_forward"]),
                _fmt_bytes(r["gather_bytes_per_forward"]),
                _fmt_bytes(r["bytes_per_step_cfg"]),
                str(r["model_steps"]),
                _fmt_bytes(r["bytes_in_stage"]),
            ]
        )
    header = ["layout", "plan", "stage", "grid", "tokens", "tokens/rank", "attn/fwd", "gather/fwd", "per step"]
    print(_table([*header, "steps", "stage total"], arows))
    print()
    trows = []
    for name, t in ana["totals"].items():
        sw = f"{t['stage_switch_bytes']} B (decision broadcast)"
        trows.append([name, _fmt_bytes(t["dvg_bytes"]), _fmt_bytes(t["full_bytes"]), f"{t['ratio']:.3f}", sw])
    print(_table(["layout", "DVG run", "full run", "DVG/full", "stage switches"], trows))


# ------------------------------------------------------------------------------------------------ stage layouts

LAYOUTS_OUT = Path(__file__).resolve().parent / "results" / "parallel_layouts.json"
GPU_LINK = LinkModel(latency_s=25e-6, bandwidth=150e9, flops=400e12, source="assumed: one H100/H200 NVLink node")
"""The 8-GPU model's link (an assumption, stated in the docs; not measured here)."""
MODEL_ARCHS = {"wan": (1280, 720, 81, 2), "hunyuan": (1280, 720, 129, 1)}
"""REAL_ARCHS key → (width, height, frames, passes per step)."""
LAYOUT_WORLDS = (1, 2, 4)
FIXED_LAYOUT = {1: "u1", 2: "u2", 4: "u2xr2"}


def layout_model(world: int = 8, batch: int = 1) -> list[dict[str, Any]]:
    """Per architecture and stage: the fixed layout's (all-Ulysses, the default) and the cheapest layout's modelled
    time per model call on ``world`` GPUs, and the run totals (DVG and full, fixed and stage-aware)."""
    from dvg_dist.models import FAMILIES as ADAPTER_FAMILIES
    from dvg_dist.runtime.check_gpu import REAL_ARCHS

    out = []
    for key, (width, height, frames, branches) in MODEL_ARCHS.items():
        real = REAL_ARCHS[key]
        adapter = ADAPTER_FAMILIES[real.family]
        spec = adapter.spec_from_configs(real.config, real.vae)
        cost = adapter.cost_model_from_config(real.config)
        arch = ArchModel.from_config(real.config, cost, 2)
        heads = int(real.config["num_attention_heads"])
        full = spec.latent_grid(width, height, frames)
        planner = Planner(
            full, ANALYTIC_STEPS, ANALYTIC_BUDGET, DVGOptions(), spec.spatial_multiple, cost, spec.temporal_multiple
        )
        chosen, _ = planner.choose(ANALYTIC_W_S)
        fixed = LayoutSpec(1, 1, *default_split(world, heads))
        cands = [fixed] + [c for c in auto_candidates(world, heads, branches == 2, batch) if c != fixed]
        stages: list[dict[str, Any]] = []
        for plan, grids, counts in (("dvg", chosen.grids, planner.executed_counts), ("full", [full], [ANALYTIC_STEPS])):
            for k, (grid, calls) in enumerate(zip(grids, counts)):
                tokens = grid.tokens(cost.patch)
                best, estimates = choose(cands, tokens, batch, branches, arch, GPU_LINK)
                stages.append({
                    "plan": plan, "stage": k + 1, "grid": grid.as_list(), "tokens": tokens, "calls": calls,
                    "fixed": fixed.name, "fixed_ms": estimates[fixed].total_s * 1e3,
                    "fixed_comm_share": estimates[fixed].comm_s / estimates[fixed].total_s,
                    "best": best.name, "best_ms": estimates[best].total_s * 1e3,
                    "estimates_ms": {c.name: e.total_s * 1e3 for c, e in estimates.items()},
                })  # fmt: skip
        totals = {
            f"{plan}_{kind}_s": sum(r["calls"] * r[f"{kind}_ms"] for r in stages if r["plan"] == plan) / 1e3
            for plan in ("dvg", "full")
            for kind in ("fixed", "best")
        }
        out.append({
            "arch": key, "source": real.source, "world": world, "batch": batch, "passes_per_step": branches,
            "full_grid": full.as_list(), "steps": ANALYTIC_STEPS, "budget": ANALYTIC_BUDGET, "stages": stages,
            **totals,
            "stage_aware_gain_dvg": totals["dvg_fixed_s"] / totals["dvg_best_s"],
            "dvg_speedup_fixed": totals["full_fixed_s"] / totals["dvg_fixed_s"],
            "dvg_speedup_stage_aware_vs_full_fixed": totals["full_fixed_s"] / totals["dvg_best_s"],
        })  # fmt: skip
    return out


def _layout_rank(rank: int, world: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    """One rank of the measured comparison: every (mode, policy) run, warm-up first; rank 0 writes its report."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(2 if world == 1 else 1)
    from diffusers import DiffusionPipeline
    from speedup import FAMILIES as BENCH_FAMILIES

    from dvg_dist.config import load_config
    from dvg_dist.parallel import ParallelLayout, build_groups
    from dvg_dist.runtime.distributed import ParallelContext
    from dvg_dist.runtime.engine import Engine, Request

    par = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )  # fmt: skip
        fixed = LayoutSpec.parse(FIXED_LAYOUT[world])
        par = ParallelContext(build_groups(ParallelLayout(world, fixed.ulysses, fixed.ring, 1, num_heads=2)))
    try:
        # bench/speedup.py's attention-dominated transformer in the tiny pipeline the parent wrote (seeded init: the
        # same weights on every rank).
        path = Path(outdir, "wan")
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
        torch.manual_seed(SEED)
        tconfig = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        pipe.transformer = type(pipe.transformer).from_config({**tconfig, **BENCH_FAMILIES["wan"].overrides}).eval()
        base = [f"model.path={path}", f"sampling.steps={args.steps}", f"sampling.frame_num={args.frames}",
                f"sampling.size={args.size}", "sampling.guidance_scale=5.0", "sampling.budget=0.5"]  # fmt: skip
        runs: dict[str, Any] = {}
        policies = ("stage-aware", "fixed") if world > 1 else ("single",)
        for mode in ("dvg", "full"):
            for policy in policies:
                layouts = {"stage-aware": ["parallel.stage_layouts=auto"], "fixed": ["parallel.stage_layouts=fixed"]}
                config = load_config(CONFIG, [*base, f"sampling.mode={mode}", *layouts.get(policy, [])])
                if par is not None:
                    par.setup_stage_layouts(config, 2, True)
                engine = Engine(config, pipe, parallel=par)
                engine.generate([Request(PROMPT, seed=SEED)], decode=False, progress=False)  # warm-up
                best = None
                for _ in range(args.repeats):
                    result = engine.generate([Request(PROMPT, seed=SEED)], decode=False, progress=False)
                    if best is None or result.timings["denoise"] < best.timings["denoise"]:
                        best = result
                assert best is not None
                counts: dict[int, int] = {}
                for t in best.trace:
                    counts[t.stage] = counts.get(t.stage, 0) + 1
                runs[f"{mode}/{policy}"] = {
                    "denoise_s": best.timings["denoise"],
                    "stages": [
                        {
                            "stage": k + 1, "grid": list(best.trace[[t.stage for t in best.trace].index(k)].grid),
                            "calls": n, "time_s": best.timings.get(f"stage{k + 1}", best.timings["denoise"]),
                            "ms_per_call": 1e3 * best.timings.get(f"stage{k + 1}", best.timings["denoise"]) / n,
                            "layout": None if best.layouts is None else best.layouts[k],
                        }
                        for k, n in sorted(counts.items())
                    ],
                }  # fmt: skip
        if rank == 0:
            link = None if par is None or par.link is None else par.link.to_dict()
            Path(outdir, "report.json").write_text(json.dumps({"runs": runs, "link": link}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_layouts(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Rank 0's report per world size (1 process runs in this process's own spawned child too: same code path)."""
    import torch.multiprocessing as tmp

    from dvg_dist.models.tiny import build_tiny_checkpoint

    out = {}
    for world in LAYOUT_WORLDS:
        with tempfile.TemporaryDirectory() as outdir:
            build_tiny_checkpoint("wan", Path(outdir, "wan"), SEED)
            tmp.spawn(_layout_rank, args=(world, _free_port(), args, outdir), nprocs=world, join=True)
            out[world] = json.loads(Path(outdir, "report.json").read_text())
    return out


def print_layouts(measured: dict[int, dict[str, Any]], model: list[dict[str, Any]]) -> None:
    print("(a) MODEL, not measured: 8 GPUs, assumed link "
          f"{GPU_LINK.latency_s * 1e6:.0f} us / {GPU_LINK.bandwidth / 1e9:.0f} GB/s / {GPU_LINK.flops / 1e12:.0f} "
          "TFLOP/s per GPU; ms per model call on the busiest rank")  # fmt: skip
    for m in model:
        print(f"\n{m['arch']} {m['full_grid']} ({m['passes_per_step']} pass(es) per step), batch {m['batch']}:")
        rows = [[r["plan"], str(r["stage"]), "x".join(map(str, r["grid"])), str(r["tokens"]), str(r["calls"]),
                 f"{r['fixed']} {r['fixed_ms']:.1f} ({100 * r['fixed_comm_share']:.0f}% comm)",
                 f"{r['best']} {r['best_ms']:.1f}", f"{r['fixed_ms'] / r['best_ms']:.2f}x"]
                for r in m["stages"]]  # fmt: skip
        print(_table(["plan", "stage", "grid", "tokens", "calls", "fixed", "stage-aware", "gain"], rows))
        print(f"run: dvg fixed {m['dvg_fixed_s']:.1f} s, dvg stage-aware {m['dvg_best_s']:.1f} s "
              f"({m['stage_aware_gain_dvg']:.2f}x); full fixed {m['full_fixed_s']:.1f} s; DVG speed-up vs full "
              f"(fixed) {m['dvg_speedup_fixed']:.2f}x -> {m['dvg_speedup_stage_aware_vs_full_fixed']:.2f}x "
              "stage-aware")  # fmt: skip
    print("\n(b) MEASURED, CPU/gloo (4 processes on 2 cores: oversubscribed), attention-dominated tiny Wan, CFG on")
    four = measured[4]["runs"]
    rows = []
    for a, f in zip(four["dvg/stage-aware"]["stages"], four["dvg/fixed"]["stages"]):
        est = a["layout"]["estimates"] if a["layout"] else {}
        model_f = est.get(f["layout"]["layout"], {}).get("total_ms") if f["layout"] else None
        model_a = est.get(a["layout"]["layout"], {}).get("total_ms") if a["layout"] else None
        rows.append([str(a["stage"]), "x".join(map(str, a["grid"])), str(a["calls"]),
                     f"{f['layout']['layout']} {f['ms_per_call']:.0f}",
                     f"{a['layout']['layout']} {a['ms_per_call']:.0f}",
                     f"{f['ms_per_call'] / a['ms_per_call']:.2f}x",
                     f"{model_f:.0f} / {model_a:.0f}" if model_f and model_a else "-"])  # fmt: skip
    print(
        "4 processes, DVG, ms per model call (model's estimate fixed / stage-aware, measured link "
        f"{measured[4]['link']})"
    )
    print(_table(["stage", "grid", "calls", "fixed", "stage-aware", "gain", "model ms"], rows))
    rows = []
    for world, rep in measured.items():
        r = rep["runs"]
        if world == 1:
            rows.append(["1", f"{r['full/single']['denoise_s']:.2f}", "-", f"{r['dvg/single']['denoise_s']:.2f}", "-",
                         f"{r['full/single']['denoise_s'] / r['dvg/single']['denoise_s']:.2f}x", "-"])  # fmt: skip
            continue
        ff, fa = r["full/fixed"]["denoise_s"], r["full/stage-aware"]["denoise_s"]
        df, da = r["dvg/fixed"]["denoise_s"], r["dvg/stage-aware"]["denoise_s"]
        rows.append(
            [str(world), f"{ff:.2f}", f"{fa:.2f}", f"{df:.2f}", f"{da:.2f}", f"{ff / df:.2f}x", f"{ff / da:.2f}x"]
        )
    print("\ndenoising loop, s (speed-up = full with the fixed layout / dvg)")
    print(_table(["procs", "full fixed", "full stage-aware", "dvg fixed", "dvg stage-aware", "dvg speed-up fixed",
                  "dvg speed-up stage-aware"], rows))  # fmt: skip


def layouts_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    t0 = time.perf_counter()
    model = [m for batch in (1, 2) for m in layout_model(8, batch)]
    measured = measure_layouts(args)
    print_layouts(measured, model)
    elapsed = time.perf_counter() - t0
    print(f"\n({elapsed:.0f} s)")
    report = {
        "command": "python bench/parallel.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "model_8gpu": {"note": "a model, not a measurement", "link": GPU_LINK.__dict__, "archs": model},
        "measured": {
            "note": "CPU/gloo; 4 processes on 2 cores oversubscribe the CPU",
            "arch": "bench/speedup.py's attention-dominated Wan (2 heads x 64, FFN 256, 1 layer)",
            "frames": args.frames,
            "size": args.size,
            "steps": args.steps,
            "guidance": 5.0,
            "budget": 0.5,
            "repeats": args.repeats,
            "fixed_layouts": FIXED_LAYOUT,
            "worlds": {str(w): rep for w, rep in measured.items()},
        },
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__},
        "elapsed_s": elapsed,
    }
    out = args.out if args.out != DEFAULT_OUT else LAYOUTS_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parallel.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="denoising steps of the measured runs (default 12)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON")
    parser.add_argument("--layouts", action="store_true", help="the stage-aware layout benchmark (model + measured)")
    parser.add_argument("--frames", type=int, default=33, help="--layouts: pixel frames (default 33)")
    parser.add_argument("--size", default="512x320", help="--layouts: WxH (default 512x320)")
    parser.add_argument("--repeats", type=int, default=1, help="--layouts: timed runs per case, best kept (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be >= 4 (a DVG plan has 4 stages)")
    if args.layouts:
        return layouts_main(args, argv)

    t0 = time.perf_counter()
    reports = measure_parallel(args.steps)
    single = measure_single(args.steps)
    rows, switches, timing, check = analyse_measured(reports, single)
    decision = [s for s in switches if s["rank"] == 0 and s["gap"] == "switch 1->2" and s["bytes"]]
    decision_bytes = decision[0]["bytes"] // (WORLD - 1) if decision else None
    ana = analytic()
    print_report(rows, switches, timing, check, ana)
    elapsed = time.perf_counter() - t0
    print(f"\n({elapsed:.0f} s)")

    first = reports[0]["runs"][next(iter(reports[0]["runs"]))]
    report = {
        "command": "python bench/parallel.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "measured": {
            "model": "tiny Wan 2.1 T2V (dvg_dist.models.tiny, seed 0), configs/tiny-wan.yaml",
            "steps": args.steps,
            "world_size": WORLD,
            "backend": "gloo",
            "layouts": {k: {"ulysses": u, "ring": r} for k, (u, r) in LAYOUTS.items()},
            "guidance": list(GUIDANCES),
            "plan": first["plan"],
            "check": check,
            "rows": rows,
            "stage_switch": switches,
            "decision_broadcast_bytes": decision_bytes,
        },
        "timing_context": timing,
        "analytic": ana,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    return 0 if check["all_rows_match"] and check["wrapped_collectives_saw_traffic"] else 1


if __name__ == "__main__":
    sys.exit(main())
