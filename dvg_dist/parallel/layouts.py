"""Per-stage parallel layouts (``parallel.stage_layouts``, docs/parallel.md): the spec syntax, the candidates, the
cost model that chooses between them, the link calibration, and the process groups of every layout a run may use.

DVG's sketch stage has about 1/16 of the full tokens and the middle stages a third to a half; sharding a small
stage over every rank of the group pays the same collective latency for a fraction of the work. Each stage can
therefore run on its own layout of the same world:

- **sequence parallel** ``uU`` / ``rR`` / ``uUxrR``: every rank shares one sequence (the fixed layout's kind);
- **CFG-parallel** ``cfg2xuU``: half the ranks compute the conditional branch, half the unconditional one, each
  over ``world / 2`` sequence-parallel ranks; one all-gather over the pair combines them;
- **data parallel** ``dpDxuU``: ``D`` sub-groups each run a slice of the batch (``batch >= D``); the slices are
  all-gathered after the call.

Spec syntax: terms ``dpN``, ``cfgN`` (N = 1 or 2), ``uN`` (Ulysses), ``rN`` (ring) joined by ``x``, each at most once,
in any order; omitted degrees are 1; their product must be the world size (``u1`` is the one-rank layout). In the
config an entry may also be ``auto`` (the cost model chooses per stage) or ``fixed`` (the run's fixed layout, from
``parallel.ulysses_degree`` / ``ring_degree`` / ``cfg_parallel``).

**Re-partitioning reuses the existing stage-switch collectives: one gather/scatter of the latent per switch, no
more.** Every rank holds the same whole latent between model calls (the token split happens inside the forward,
from the replicated input, and the output is gathered), so switching the layout between two calls moves no data:
it only changes which groups the next forward's hooks and attention use (:meth:`SequenceParallelState.use`), which
branch this rank computes and which batch slice.

Process groups: every layout a run may use is known at start-up (the forced entries, the fixed layout, and for
``auto`` one layout per (dp, cfg) pair); :func:`build_layout_groups` creates all of their groups once, in one order
on every rank (``dist.new_group`` is collective over the whole world), sharing identical rank lists.

The cost model (:func:`estimate`) prices one model call of a stage on this rank: compute from the adapter's FLOP
model (:class:`~dvg_dist.dvg.planner.CostModel`, per layer ``a·L + b·L²``) at a FLOP rate, plus every collective as
``latency + bytes / bandwidth`` (:class:`LinkModel`, measured at start-up by :func:`measure_link` or taken from the
config). It is a model: it ignores per-kernel overheads, compute/communication overlap and topology.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dvg_dist.dvg.planner import CostModel
from dvg_dist.parallel.mesh import GroupCache, ParallelGroups, ParallelLayout, build_groups

AUTO = "auto"
FIXED = "fixed"
_TERM = re.compile(r"(dp|cfg|u|r)(\d+)")


@dataclass(frozen=True, order=True)
class LayoutSpec:
    """One way to use the world's ranks for a model call: ``dp × cfg × ulysses × ring`` ranks."""

    dp: int = 1
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.cfg * self.ulysses * self.ring

    @property
    def sp(self) -> int:
        """Ranks sharing one sequence."""
        return self.ulysses * self.ring

    @property
    def name(self) -> str:
        """The canonical spec, e.g. ``dp2xu2``, ``cfg2xu2xr2``, ``u1``."""
        degrees = (("dp", self.dp), ("cfg", self.cfg), ("u", self.ulysses), ("r", self.ring))
        return "x".join(f"{axis}{n}" for axis, n in degrees if n != 1) or "u1"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> LayoutSpec:
        """``"cfg2xu2"`` → ``LayoutSpec(cfg=2, ulysses=2)``; a one-line ``ValueError`` naming the bad part."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a layout spec is a string like u4, cfg2xu2 or dp2xu2; got {text!r}")
        degrees: dict[str, int] = {}
        for term in text.strip().lower().split("x"):
            m = _TERM.fullmatch(term)
            if m is None:
                raise ValueError(
                    f"layout spec {text!r}: bad term {term!r}; use dpN, cfgN, uN (Ulysses), rN (ring) joined by x, "
                    "e.g. cfg2xu2"
                )
            axis, n = m.group(1), int(m.group(2))
            if axis in degrees:
                raise ValueError(f"layout spec {text!r}: {axis} given twice")
            if n < 1:
                raise ValueError(f"layout spec {text!r}: {axis} degree must be >= 1")
            degrees[axis] = n
        if degrees.get("cfg", 1) not in (1, 2):
            raise ValueError(f"layout spec {text!r}: cfg degree must be 1 or 2 (two branches)")
        return cls(degrees.get("dp", 1), degrees.get("cfg", 1), degrees.get("u", 1), degrees.get("r", 1))

    @classmethod
    def of(cls, layout: ParallelLayout) -> LayoutSpec:
        return cls(layout.dp_degree, layout.cfg_degree, layout.ulysses_degree, layout.ring_degree)

    def layout(self, num_heads: int | None = None) -> ParallelLayout:
        return ParallelLayout(self.world, self.ulysses, self.ring, self.cfg, num_heads, self.dp)


Entry = str | LayoutSpec
"""A parsed ``parallel.stage_layouts`` entry: :data:`AUTO`, :data:`FIXED` or a :class:`LayoutSpec`."""


def parse_entry(text: str) -> Entry:
    """``auto`` | ``fixed`` | a layout spec (one-line ``ValueError``)."""
    t = text.strip().lower() if isinstance(text, str) else text
    return t if t in (AUTO, FIXED) else LayoutSpec.parse(text)


def check_spec(
    spec: LayoutSpec, world: int, num_heads: int, guidance: bool, batch: int | None = None, where: str = ""
) -> None:
    """One-line ``ValueError`` if ``spec`` cannot run a model call on this world: degrees not multiplying to the world
    size, a Ulysses degree not dividing the heads, CFG-parallel without guidance, DP over more slices than the batch
    (``batch`` None: not known yet)."""
    at = f"{where}: " if where else ""
    if spec.world != world:
        raise ValueError(
            f"{at}layout {spec.name} uses dp {spec.dp} × cfg {spec.cfg} × ulysses {spec.ulysses} × ring {spec.ring} = "
            f"{spec.world} ranks, but the world has {world}"
        )
    if num_heads % spec.ulysses:
        ok = [u for u in range(1, spec.sp + 1) if spec.sp % u == 0 and num_heads % u == 0]
        raise ValueError(
            f"{at}layout {spec.name}: ulysses {spec.ulysses} does not divide num_heads={num_heads}; with sp "
            f"{spec.sp} use ulysses in {ok} (ring = sp / ulysses)"
        )
    if spec.cfg == 2 and not guidance:
        raise ValueError(f"{at}layout {spec.name} is CFG-parallel, which needs guidance (an unconditional pass)")
    if batch is not None and spec.dp > batch:
        raise ValueError(
            f"{at}layout {spec.name} runs {spec.dp} batch slices side by side, but the batch has {batch} prompt(s)"
            + (" (one prompt per batch: give generate.py --batch_size N, or DVG.generate_batch)" if batch == 1 else "")
        )


def default_split(sp: int, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) for ``sp`` ranks: the largest Ulysses degree dividing both, the rest in the ring."""
    u = math.gcd(sp, num_heads)
    return u, sp // u


def auto_candidates(world: int, num_heads: int, guidance: bool, batch: int | None = None) -> list[LayoutSpec]:
    """What ``auto`` chooses from: for every (dp, cfg) the world allows, the default Ulysses/ring split of the rest.
    ``batch`` None: every dp degree (the start-up set, before the batch is known)."""
    out = []
    for dp in (d for d in range(1, world + 1) if world % d == 0):
        if batch is not None and dp > batch:
            continue
        for cfg in (1, 2) if guidance else (1,):
            if (world // dp) % cfg:
                continue
            u, r = default_split(world // (dp * cfg), num_heads)
            out.append(LayoutSpec(dp, cfg, u, r))
    return out


def build_layout_groups(
    specs: Iterable[LayoutSpec], num_heads: int, backend: str | None = None, cache: GroupCache | None = None
) -> dict[LayoutSpec, ParallelGroups]:
    """The process groups of every layout in ``specs``, created once (collective: every rank must pass the same set,
    and a ``cache`` filled by the same earlier calls).

    Sorted before creation, so the ``dist.new_group`` sequence is the same on every rank whatever order the caller
    collected them in; rank lists shared by several layouts (or already in ``cache``) are created once."""
    cache = {} if cache is None else cache
    return {spec: build_groups(spec.layout(num_heads), backend, cache) for spec in sorted(set(specs))}


# ------------------------------------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class LinkModel:
    """What a collective and a FLOP cost on this group: ``latency_s + bytes / bandwidth`` per collective call."""

    latency_s: float
    """Seconds per collective call, independent of size."""
    bandwidth: float
    """Bytes per second one rank sends to the others."""
    flops: float
    """FLOP/s one rank achieves on the transformer's dtype."""
    source: str = "config"
    """``measured`` (start-up calibration) or ``config``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_us": self.latency_s * 1e6,
            "bandwidth_gbs": self.bandwidth / 1e9,
            "tflops": self.flops / 1e12,
            "source": self.source,
        }


@dataclass(frozen=True)
class ArchModel:
    """What the cost model needs of a transformer: the FLOP model and the sizes that set the message bytes."""

    cost: CostModel
    """Per-layer FLOPs ``linear·L + quadratic·L²`` (and the patch that turns a grid into tokens)."""
    layers: int
    """Blocks with a sequence self-attention (each does Ulysses' four all-to-alls or the ring's K/V passes)."""
    hidden: int
    """Heads × head dim: the width of q, k, v and the attention output."""
    out_per_token: int
    """Elements per token of the gathered output (out channels × patch volume)."""
    elem_bytes: int
    """Bytes per element of the transformer's dtype."""

    @classmethod
    def from_config(cls, transformer: dict[str, Any], cost: CostModel, elem_bytes: int) -> ArchModel:
        """From a diffusers transformer ``config.json`` (``num_layers`` + ``num_single_layers`` blocks, heads ×
        ``attention_head_dim``, ``out_channels`` or ``in_channels``)."""
        layers = int(transformer.get("num_layers", 1)) + int(transformer.get("num_single_layers", 0) or 0)
        hidden = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
        out = int(transformer.get("out_channels") or transformer["in_channels"])
        return cls(cost, layers, hidden, out * math.prod(cost.patch), elem_bytes)


@dataclass(frozen=True)
class Estimate:
    """The model's price of one model call (all its branches) of a stage on one rank."""

    spec: LayoutSpec
    compute_s: float
    comm_s: float
    collectives: int
    """Collective calls per model call (latency-bound stages are decided by this)."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute_ms": self.compute_s * 1e3,
            "comm_ms": self.comm_s * 1e3,
            "total_ms": self.total_s * 1e3,
            "collectives": self.collectives,
        }


def estimate(spec: LayoutSpec, tokens: int, batch: int, branches: int, arch: ArchModel, link: LinkModel) -> Estimate:
    """One model call of ``tokens`` tokens, ``batch`` samples and ``branches`` (2 with CFG) forwards, on layout
    ``spec``, priced on the busiest rank. ``n = ⌈tokens / sp⌉`` tokens and ``s = ⌈batch / dp⌉`` samples per rank,
    ``f = branches / cfg`` forwards, ``d`` = hidden, ``e`` = bytes per element, ``c`` = output elements per token:

        compute    f · s · layers · (a·n + b·n·tokens) / FLOPs          (each local query sees every key)
        Ulysses    f · layers · 4 · (α + s·n·d·e · (u−1)/u / β)          (q, k, v in, output back)
        ring       f · layers · (r−1) · (α + 2·s·n·d·e / β)             (K and V blocks; no overlap assumed)
        gather     f · (α + (sp−1)·s·n·c·e / β)                        (proj_out, when sp > 1)
        CFG pair   α + s·tokens·c·e / β                                 (one all-gather of the velocity, cfg 2)
        DP         α + (dp−1)·s·tokens·c·e / β                          (all-gather of the batch slices, dp > 1)
    """
    f = branches // spec.cfg if branches == 2 else 1
    s = -(-batch // spec.dp)
    n = -(-tokens // spec.sp)
    a, b = arch.cost.linear, arch.cost.quadratic
    compute = f * s * arch.layers * (a * n + b * n * tokens) / link.flops
    alpha, beta, e, d, c = link.latency_s, link.bandwidth, arch.elem_bytes, arch.hidden, arch.out_per_token
    comm, calls = 0.0, 0
    if spec.ulysses > 1:
        comm += f * arch.layers * 4 * (alpha + s * n * d * e * (spec.ulysses - 1) / spec.ulysses / beta)
        calls += f * arch.layers * 4
    if spec.ring > 1:
        comm += f * arch.layers * (spec.ring - 1) * (alpha + 2 * s * n * d * e / beta)
        calls += f * arch.layers * (spec.ring - 1)
    if spec.sp > 1:
        comm += f * (alpha + (spec.sp - 1) * s * n * c * e / beta)
        calls += f
    if spec.cfg == 2 and branches == 2:
        comm += alpha + s * tokens * c * e / beta
        calls += 1
    if spec.dp > 1:
        comm += alpha + (spec.dp - 1) * s * tokens * c * e / beta
        calls += 1
    return Estimate(spec, compute, comm, calls)


def choose(
    specs: Sequence[LayoutSpec], tokens: int, batch: int, branches: int, arch: ArchModel, link: LinkModel
) -> tuple[LayoutSpec, dict[LayoutSpec, Estimate]]:
    """The cheapest of ``specs`` by :func:`estimate` (ties: the first listed) and every candidate's estimate. A pure
    function of its arguments: every rank, given rank 0's :class:`LinkModel`, chooses the same layout."""
    estimates = {spec: estimate(spec, tokens, batch, branches, arch, link) for spec in specs}
    best = min(specs, key=lambda spec: estimates[spec].total_s)
    return best, estimates


def measure_link(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> LinkModel:
    """Calibrate :class:`LinkModel` on the world group with a couple of tiny collectives and one matmul.

    Latency: the median ``all_to_all_single`` of 64 elements per peer; bandwidth: from the extra time of 1 Mi
    elements per peer; FLOP/s: a square matmul (256 on CPU, 2048 on CUDA) in ``dtype``. Collective over the world:
    every rank measures, then rank 0's numbers are broadcast, so every rank's cost model (and choice) is identical.
    A few tens of milliseconds on gloo."""
    world = dist.get_world_size()

    def timed(fn: Any) -> float:
        fn()  # warm-up (first use of a communicator, kernel selection)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def a2a(per_peer: int) -> float:
        src = torch.zeros(per_peer * world, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        return timed(lambda: dist.all_to_all_single(dst, src))

    small, large = 64, 1024 * 1024
    t_small, t_large = a2a(small), a2a(large)
    sent = (large - small) * (world - 1) * 4
    # A noisy (oversubscribed) host can time the large exchange barely above the small one: the bandwidth is then
    # bounded by the large exchange's whole time instead.
    bandwidth = sent / (t_large - t_small if t_large > 2 * t_small else t_large)
    n = 2048 if device.type == "cuda" else 256
    m = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3 / max(timed(lambda: m @ m), 1e-9)
    box: list[Any] = [(t_small, bandwidth, flops)]
    dist.broadcast_object_list(box, src=0)
    latency, bandwidth, flops = box[0]
    return LinkModel(float(latency), float(bandwidth), float(flops), "measured")
