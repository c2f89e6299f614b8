"""The engine's distributed context: process group from the launcher's environment, the validated layout,
rank 0's decision broadcast, the CFG-parallel exchange, and per-stage layouts (``parallel.stage_layouts``:
:class:`StageLayouts`, :mod:`dvg_dist.parallel.layouts`). Tensors go through torch.distributed only.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config
from ..dvg.planner import COST_PRESETS, Grid
from ..dvg.sampler import DecideFn, Decision, StageContext
from ..models import Adapter, Conditioning, InputError, adapter_class, resolve_model_path
from ..parallel import Axis, ParallelGroups, ParallelLayout, build_groups, default_backend, gather
from ..parallel.backends import NATIVE, BackendUnavailableError, check_backend_available
from ..parallel.layouts import (
    AUTO,
    FIXED,
    ArchModel,
    Entry,
    Estimate,
    LayoutSpec,
    LinkModel,
    auto_candidates,
    build_layout_groups,
    check_spec,
    choose,
    estimate,
    measure_link,
    parse_entry,
)
from ..parallel.mesh import GroupCache
from .guidance import guided

logger = logging.getLogger(__name__)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / the elastic launcher set them; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_layout(config: Config, world_size: int, num_heads: int, guidance_on: bool) -> ParallelLayout:
    """The layout for ``world_size`` ranks from the config's degrees (defaults: all sp ranks in Ulysses when
    the heads allow, the rest in ring). One-line errors for every impossible combination — before weights."""
    p = config.parallel
    if world_size > 1 and p.backend == "nccl" and not torch.cuda.is_available():
        raise InputError("backend nccl needs CUDA, which is not available here; use --backend gloo (or auto)")
    cfg = 2 if p.cfg_parallel else 1
    if p.cfg_parallel and not guidance_on:
        raise InputError("CFG-parallel needs guidance (an unconditional pass): raise the guidance scale or drop it")
    if world_size % cfg:
        raise InputError(f"CFG-parallel splits the world in two halves; world size {world_size} is odd")
    sp = world_size // cfg
    ulysses, ring = p.ulysses_degree, p.ring_degree
    if ulysses is None and ring is None:
        import math

        ulysses = math.gcd(sp, num_heads)
        ring = sp // ulysses
    elif ulysses is None:
        assert ring is not None
        ulysses = sp // ring if sp % ring == 0 else 0
    elif ring is None:
        ring = sp // ulysses if sp % ulysses == 0 else 0
    if not ulysses or not ring or cfg * ulysses * ring != world_size:
        raise InputError(
            f"world size {world_size} != cfg {cfg} × ulysses {p.ulysses_degree or '?'} × ring "
            f"{p.ring_degree or '?'}: set --ulysses_degree and --ring_degree so their product is {sp}"
        )
    try:
        layout = ParallelLayout(world_size, ulysses, ring, cfg, num_heads)
    except ValueError as e:
        raise InputError(str(e)) from None
    if layout.sp_degree > 1:  # the attention backend's extra, checked here: at startup, not mid-run
        try:
            check_backend_available(p.attention_backend)
        except BackendUnavailableError as e:
            raise InputError(str(e)) from None
    return layout


def resolve_stage_layouts(
    config: Config, world_size: int, num_heads: int, guidance_on: bool, batch: int | None = None
) -> tuple[Entry, ...] | None:
    """``parallel.stage_layouts`` parsed and checked against this world (one-line errors, before weights): every
    forced spec's degrees multiply to ``world_size``, its Ulysses degree divides the heads, CFG-parallel has
    guidance, DP has ``batch`` prompts (None: not known yet); no weight sharding (FSDP2 shards over one fixed sp
    group); the attention backend's extra installed. None when the field is unset."""
    p = config.parallel
    if p.stage_layouts is None:
        return None
    entries = tuple(parse_entry(e) for e in p.stage_layouts)
    for k, entry in enumerate(entries):
        if isinstance(entry, LayoutSpec):
            try:
                check_spec(entry, world_size, num_heads, guidance_on, batch, where=f"parallel.stage_layouts[{k}]")
            except ValueError as e:
                raise InputError(str(e)) from None
    if p.shard_weights and any(e != FIXED for e in entries):
        raise InputError(
            "parallel.stage_layouts other than 'fixed' cannot be combined with --shard_weights: FSDP2 shards the "
            "weights over one fixed sp group"
        )
    if world_size > 1:
        try:
            check_backend_available(p.attention_backend)
        except BackendUnavailableError as e:
            raise InputError(str(e)) from None
    return entries


def guidance_on(config: Config) -> bool:
    """Whether the run has an unconditional pass (what CFG-parallel splits)."""
    s = config.sampling
    return s.guidance_scale > 1.0 or s.true_cfg_scale > 1.0


def num_heads(config: Config) -> int:
    """The checkpoint's attention heads, from its transformer config (no weights loaded)."""
    assert config.model.path
    path = resolve_model_path(config.model.path)
    cls = adapter_class(path)
    return cls.num_heads_from_config(cls.read_json_configs(path)[0])


def validate_layout(config: Config, world_size: int, batch: int | None = 1) -> None:
    """Refuse an impossible layout (or memory option) for ``world_size`` ranks before any process starts or weight
    loads. ``batch``: the fewest prompts any engine call of the run gets (a forced ``dpN`` stage layout needs N);
    None where it is not known yet (the Python API, whose ``generate_batch`` checks each call)."""
    from .memory import check_options

    layout = None
    if world_size > 1 or config.parallel.ulysses_degree or config.parallel.ring_degree or config.parallel.cfg_parallel:
        layout = resolve_layout(config, world_size, num_heads(config), guidance_on(config))
    if config.parallel.stage_layouts is not None:
        resolve_stage_layouts(config, world_size, num_heads(config), guidance_on(config), batch=batch)
    check_options(config, layout)


def _to(c: Conditioning | None, device: torch.device) -> Conditioning | None:
    """A copy of ``c`` with every tensor on ``device`` (kwargs values that are not tensors kept as they are)."""
    if c is None:
        return None

    def move(d: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if d is None else {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}

    lc = c.latent_condition
    return Conditioning(move(c.cond) or {}, move(c.uncond), None if lc is None else lc.to(device), c.generator_states)


@dataclass
class ParallelContext:
    """What the engine needs to run on several processes."""

    groups: ParallelGroups
    """The fixed layout's groups (``parallel.ulysses_degree`` / ``ring_degree`` / ``cfg_parallel``)."""
    stage_entries: tuple[Entry, ...] | None = None
    """``parallel.stage_layouts`` parsed (:meth:`setup_stage_layouts`); None: every stage on the fixed layout."""
    layout_groups: dict[LayoutSpec, ParallelGroups] = field(default_factory=dict)
    """The groups of every layout a stage may use, built once at start-up."""
    num_heads: int = 0
    link: LinkModel | None = None
    """The cost model's link and FLOP rate (measured once, rank 0's numbers on every rank)."""
    arch: ArchModel | None = None
    transformers: list[Any] = field(default_factory=list)
    """Every transformer whose sequence-parallel state follows the stage's layout (:meth:`attach`)."""
    attention_backend: str = NATIVE
    group_cache: GroupCache = field(default_factory=dict)
    """Stage layouts' process groups by rank list (a later :meth:`setup_stage_layouts` reuses them)."""

    @property
    def layout(self) -> ParallelLayout:
        return self.groups.layout

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def is_main(self) -> bool:
        return self.groups.rank == 0

    @property
    def cfg_rank(self) -> int:
        return self.groups.coords[Axis.CFG]

    def broadcast_decider(self, local: DecideFn) -> DecideFn:
        """Rank 0 analyses the sketch and chooses; every rank follows rank 0's choice, even where its own
        floats would have chosen differently (a rank-local decision is how "static noise" bugs start).
        Every rank enters the broadcast; only rank 0 runs ``local``."""

        def decide(x0_hat: torch.Tensor) -> Decision:
            box: list[Decision | None] = [local(x0_hat) if self.is_main else None]
            dist.broadcast_object_list(box, src=0)
            assert box[0] is not None
            return box[0]

        return decide

    def broadcast_conditioning(self, mine: Conditioning | None, device: torch.device) -> Conditioning:
        """Rank 0's prompt (and image) conditioning to every rank: moved to CPU for the object broadcast, back
        to ``device`` after. Every rank enters the broadcast; only rank 0 passes a value."""
        box: list[Conditioning | None] = [_to(mine, torch.device("cpu")) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        received = _to(box[0], device)
        assert received is not None
        return received

    def exchange_cfg(
        self, v_mine: torch.Tensor, groups: ParallelGroups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG-parallel: this half computed one branch; one all-gather over the cfg pair (of ``groups``, default the
        fixed layout's) gives both, ``(v_cond, v_uncond)``, identical on both halves. Equal shapes, so a plain
        all_gather is safe."""
        parts = [torch.empty_like(v_mine) for _ in range(2)]
        dist.all_gather(parts, v_mine.contiguous(), group=(groups or self.groups).cfg)
        return parts[0], parts[1]

    # -- per-stage layouts ---------------------------------------------------------------------------

    def setup_stage_layouts(
        self, config: Config, num_heads: int, guidance_on: bool, backend: str | None = None
    ) -> None:
        """Parse ``parallel.stage_layouts`` and build the groups of every layout a stage may use: the forced specs
        and, for ``auto``, one layout per (dp, cfg) pair the world allows (:func:`auto_candidates`). Collective over
        the world (every rank creates every group in one order); a no-op without the field. Called again (another
        config on the same context), it builds only the layouts not built yet."""
        world = self.layout.world_size
        self.stage_entries = resolve_stage_layouts(config, world, num_heads, guidance_on)
        if self.stage_entries is None:
            return
        self.num_heads = num_heads
        base = LayoutSpec.of(self.layout)
        specs = {e for e in self.stage_entries if isinstance(e, LayoutSpec)}
        if AUTO in self.stage_entries:
            specs |= set(auto_candidates(world, num_heads, guidance_on))
        specs -= {base, *self.layout_groups}
        built = build_layout_groups(specs, num_heads, backend, self.group_cache)
        self.layout_groups = {base: self.groups, **self.layout_groups, **built}
        if self.is_main:
            names = ", ".join(spec.name for spec in sorted(self.layout_groups))
            logger.info("stage layouts %s; groups built for %s", ", ".join(map(str, self.stage_entries)), names)

    def attach(self, adapter: Any, config: Config) -> None:
        """Bind per-stage layouts to an engine's adapter (after the fixed layout's sequence-parallel hooks): the
        transformers whose state switches per stage, the cost model's arch from the checkpoint's config, hooks on a
        transformer the fixed layout left local (one sp rank) when a stage shards, and, with an ``auto`` entry, the
        link calibration (collective, once per context). A no-op without ``parallel.stage_layouts``."""
        self.transformers = adapter.transformers()
        self.attention_backend = config.parallel.attention_backend
        if self.stage_entries is None:
            self.use_groups(self.groups)  # a pipeline an earlier stage-layout engine left on another layout
            return
        from ..parallel import parallelize_transformer

        tc = dict(adapter.pipe.transformer.config)
        name = config.model.cost_model
        cost = type(adapter).cost_model_from_config(tc) if name == "auto" else COST_PRESETS[name]
        dtype = adapter.transformer_dtype
        self.arch = ArchModel.from_config(tc, cost, torch.empty((), dtype=dtype).element_size())
        if self.layout.sp_degree == 1:
            sharded = [g for spec, g in sorted(self.layout_groups.items()) if spec.sp > 1]
            for module in self.transformers if sharded else []:
                parallelize_transformer(module, adapter.sequence_plan, sharded[0], self.attention_backend)
        if AUTO in self.stage_entries and self.link is None:
            p = config.parallel
            given = (p.link_latency_us, p.link_bandwidth_gbs, p.compute_tflops)
            if None in given:
                measured = measure_link(adapter.device, dtype)
                self.link = LinkModel(
                    measured.latency_s if p.link_latency_us is None else p.link_latency_us * 1e-6,
                    measured.bandwidth if p.link_bandwidth_gbs is None else p.link_bandwidth_gbs * 1e9,
                    measured.flops if p.compute_tflops is None else p.compute_tflops * 1e12,
                    "measured",
                )
            else:
                assert p.link_latency_us and p.link_bandwidth_gbs and p.compute_tflops
                self.link = LinkModel(p.link_latency_us * 1e-6, p.link_bandwidth_gbs * 1e9, p.compute_tflops * 1e12)
            if self.is_main:
                link = self.link
                logger.info(
                    "stage layout cost model (%s): %.1f us per collective, %.2f GB/s, %.3g TFLOP/s per rank",
                    link.source, link.latency_s * 1e6, link.bandwidth / 1e9, link.flops / 1e12,
                )  # fmt: skip

    def use_groups(self, groups: ParallelGroups) -> None:
        """Point every attached transformer's sequence-parallel state at ``groups`` for the next forwards (between
        forwards only, the same layout on every rank; :meth:`SequenceParallelState.use`)."""
        from ..parallel import sequence_parallel_state

        for module in self.transformers:
            state = sequence_parallel_state(module)
            if state is not None:
                state.use(groups, self.attention_backend)

    def stage_plan(self, full_mode: bool, batch: int, conditioning: Conditioning) -> StageLayouts | None:
        """The per-stage layouts of one ``Engine.generate`` call (None without ``parallel.stage_layouts``). Refuses,
        before the first model call, a forced DP layout this batch cannot take."""
        if self.stage_entries is None:
            self.use_groups(self.groups)
            return None
        dp_ok = batch > 1 and all(
            _batch_sliceable(kw, batch) for kw in (conditioning.cond, conditioning.uncond) if kw is not None
        )
        for k, entry in enumerate(self.stage_entries):
            if isinstance(entry, LayoutSpec) and entry.dp > 1:
                try:
                    check_spec(
                        entry, self.layout.world_size, self.num_heads, True, batch, f"parallel.stage_layouts[{k}]"
                    )
                except ValueError as e:
                    raise InputError(str(e)) from None
                if not dp_ok:
                    raise InputError(
                        f"parallel.stage_layouts[{k}] = {entry.name}: this family's conditioning is not batched "
                        "along dim 0 (e.g. both CFG branches stacked in one batch), so it cannot be sliced"
                    )
        return StageLayouts(self, self.stage_entries, 1 if full_mode else 4, batch, conditioning, dp_ok)


def init_distributed(config: Config, num_heads: int, guidance_on: bool) -> ParallelContext | None:
    """Join the process group the launcher prepared (``env://``) and build the layout's sub-groups; None when
    running alone."""
    rank, world, local_rank = env_world()
    if world == 1:
        return None
    layout = resolve_layout(config, world, num_heads, guidance_on)
    backend = default_backend(None if config.parallel.backend == "auto" else config.parallel.backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=config.parallel.timeout_s), rank=rank, world_size=world
        )
    groups = build_groups(layout, backend)
    if rank == 0:
        logger.info(
            "%d ranks: cfg %d × ring %d × ulysses %d on %s", world, layout.cfg_degree, layout.ring_degree,
            layout.ulysses_degree, backend,
        )  # fmt: skip
    context = ParallelContext(groups)
    context.setup_stage_layouts(config, num_heads, guidance_on, backend)
    return context


def _batch_sliceable(kwargs: dict[str, Any], batch: int) -> bool:
    """Whether every tensor of ``kwargs`` is either per sample (``shape[0] == batch``) or shared (``shape[0] == 1``,
    or a scalar): what a DP layout's batch slice needs."""
    return all(v.dim() == 0 or v.shape[0] in (1, batch) for v in kwargs.values() if torch.is_tensor(v))


def _batch_slice(value: Any, batch: int, part: slice) -> Any:
    """``value[part]`` for a per-sample tensor (``shape[0] == batch``); anything else unchanged."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value[part]
    return value


class StageLayouts:
    """The layout of each stage of one ``Engine.generate`` call, and the guided velocity under it.

    A stage's layout is decided at its first model call, from its grid (known only after the sketch decision),
    identically on every rank: a forced entry as given; ``auto`` the cheapest candidate by the cost model
    (:func:`~dvg_dist.parallel.layouts.choose`, rank 0's link numbers). Rank 0 logs one line per stage; the choice and
    every candidate's estimate go to the sidecar (:meth:`records`).
    """

    def __init__(
        self,
        par: ParallelContext,
        entries: tuple[Entry, ...],
        num_stages: int,
        batch: int,
        conditioning: Conditioning,
        dp_ok: bool,
    ) -> None:
        self.par = par
        self.entries = entries
        self.num_stages = num_stages
        self.batch = batch
        self.branches = 1 if conditioning.uncond is None else 2
        self.dp_ok = dp_ok
        self._chosen: dict[tuple[int, Grid], LayoutSpec] = {}
        self._records: dict[int, dict[str, Any]] = {}

    def entry(self, stage: int) -> Entry:
        """This stage's config entry: the only one, or one of four (``full`` mode's one stage takes the last)."""
        if len(self.entries) == 1:
            return self.entries[0]
        return self.entries[3 if self.num_stages == 1 else stage]

    def candidates(self) -> list[LayoutSpec]:
        """What ``auto`` may pick for this call: the fixed layout first (it wins ties), then one per (dp, cfg)."""
        par = self.par
        base = LayoutSpec.of(par.layout)
        found = auto_candidates(par.layout.world_size, par.num_heads, self.branches == 2, self.batch)
        found = [s for s in found if (s.dp == 1 or self.dp_ok) and s in par.layout_groups]
        return [base] + [s for s in found if s != base]

    def select(self, ctx: StageContext) -> LayoutSpec:
        """The layout of the stage ``ctx`` belongs to (decided and recorded at its first call)."""
        key = (ctx.stage, ctx.grid)
        if key in self._chosen:
            return self._chosen[key]
        par, entry = self.par, self.entry(ctx.stage)
        assert par.arch is not None
        tokens = ctx.grid.tokens(par.arch.cost.patch)
        cands = self.candidates()
        estimates: dict[LayoutSpec, Estimate] = {}
        if entry == AUTO:
            assert par.link is not None
            spec, estimates = choose(cands, tokens, self.batch, self.branches, par.arch, par.link)
            why = "auto: the lowest estimate"
        else:
            forced = LayoutSpec.of(par.layout) if entry == FIXED else entry
            assert isinstance(forced, LayoutSpec)
            spec = forced
            why = f"forced ({entry})"
            if par.link is not None:
                estimates = {s: estimate(s, tokens, self.batch, self.branches, par.arch, par.link) for s in cands}
                estimates.setdefault(spec, estimate(spec, tokens, self.batch, self.branches, par.arch, par.link))
        self._chosen[key] = spec
        record = {
            "layout": spec.name,
            "entry": str(entry),
            "reason": why,
            "grid": ctx.grid.as_list(),
            "tokens": tokens,
            "batch": self.batch,
            "branches": self.branches,
            "estimates": {s.name: e.to_dict() for s, e in estimates.items()},
            "link": None if par.link is None else par.link.to_dict(),
        }
        self._records.setdefault(ctx.stage, record)
        if par.is_main:
            ranked = sorted(estimates.values(), key=lambda e: e.total_s)
            model = ", ".join(f"{e.spec.name} {e.total_s * 1e3:.3g}" for e in ranked)
            logger.info(
                "stage %d grid %s (%d tokens, batch %d, %s): layout %s, %s%s",
                ctx.stage + 1, ctx.grid, tokens, self.batch, "CFG on" if self.branches == 2 else "CFG off", spec.name,
                why, f"; model ms per call: {model}" if model else "",
            )  # fmt: skip
        return spec

    def velocity(
        self,
        ctx: StageContext,
        forward: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor],
        x_in: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        step: dict[str, Any],
        g: float,
        adapter: Adapter,
    ) -> torch.Tensor:
        """The guided velocity of one model call on this stage's layout, whole on every rank.

        ``forward(x_in, t, kwargs)`` is one transformer pass. The transformers' sequence-parallel states switch to
        the layout's groups (no data moves: every rank holds the whole ``x_in``); with ``dp > 1`` this rank's
        sub-group takes its batch slice (``shard_sizes`` order) and the slices are all-gathered after; with
        ``cfg 2`` this rank's half computes one branch and one all-gather over the pair combines them; otherwise
        both branches run here, as one batch where ``adapter.batched_cfg`` (``runtime/guidance.py``). The guidance
        formula is the engine's own, ``v_u + g·(v_c − v_u)``."""
        spec = self.select(ctx)
        par = self.par
        groups = par.layout_groups[spec]
        par.use_groups(groups)
        cond, uncond = conditioning.cond, conditioning.uncond
        if spec.dp > 1:
            from ..parallel import ShardPlan

            plan = ShardPlan(self.batch, spec.dp, groups.coords[Axis.DP])
            part = slice(plan.start, plan.start + plan.length)
            x_in, t = x_in[part], _batch_slice(t, self.batch, part)
            cond = {k: _batch_slice(v, self.batch, part) for k, v in cond.items()}
            uncond = None if uncond is None else {k: _batch_slice(v, self.batch, part) for k, v in uncond.items()}
            step = {k: _batch_slice(v, self.batch, part) for k, v in step.items()}
        if spec.cfg == 2 and uncond is not None:
            mine = cond if groups.coords[Axis.CFG] == 0 else uncond
            v, v_uncond = par.exchange_cfg(forward(x_in, t, {**mine, **step}), groups)
            v = v_uncond + g * (v - v_uncond)
        else:
            v = guided(forward, x_in, t, cond, uncond, step, g, adapter.batched_cfg, adapter.shared_cfg_kwargs)
        if spec.dp > 1:
            v = gather(v, 0, group=groups.dp, num_tokens=self.batch)
        return v

    def records(self) -> list[dict[str, Any]]:
        """Per stage, in order: the layout, why, and the cost model's estimate of every candidate (the sidecar)."""
        return [self._records[k] for k in sorted(self._records)]
