"""Apply a model family's :class:`~dvg_dist.models.base.SequencePlan` to a diffusers transformer, as data.

:func:`parallelize_transformer` registers, on one transformer, in place:

- a pre-hook on the transformer that starts a new forward (forgets the previous token count);
- for every ``split_inputs`` entry: a forward pre-hook splitting the named inputs (positional or keyword) and/or a
  forward hook splitting the numbered outputs (``"0"`` for a single, non-tuple output) along the given dim;
- for every ``gather_outputs`` entry: a forward hook all-gathering the output (uneven shards: pad, equal-size
  all_gather, trim — :func:`dvg_dist.parallel.gather`), so every rank unpatchifies the whole output;
- on the sequence self-attention processors only, the ``dvg_usp`` attention backend
  (:mod:`dvg_dist.parallel.diffusers_backend`), the only collective-aware code inside the model;
- with ``plan.direct_sdpa_text`` (processors that call torch's ``scaled_dot_product_attention`` themselves, not
  diffusers' dispatch: CogVideoX), a pre-/post-hook pair on each such self-attention module that, for the duration of
  its forward only, routes that one torch function to the same backend (:class:`_SequenceParallelSdpa`).

A declared input may also be a tuple or list of tensors (CogVideoX's rotary ``(cos, sin)`` kwarg): each element is
split the same way.

The token count of a forward is the size, along its dim, of the first tensor split in that forward (the rotary
tables in every family we drive); later declared inputs of a different size on that dim do not carry the sequence
(Wan 2.1's ``temb`` is ``[B, 6, D]``; only Wan 2.2 TI2V's ``[B, S, 6, D]`` does) and are left whole, as are inputs
without that dim (LTX-Video's ``timestep``: ``[B]`` for text-to-video, per token ``[B, S]`` with an image). Hazard: a
non-sequence input whose size happens to equal the token count would be split; no family we drive declares one
except Wan's ``temb`` at exactly 6 tokens, which no real stage grid comes near (TI2V's per-token timestep is
split at the root, first, so there the token count is the sequence's own).

Hazards, all ranks: every rank of the sp group must call the transformer with the same shapes in the same order —
the hooks then enter the same collectives in the same order. Split sizes are re-derived from the current token
count on every call (:class:`~dvg_dist.parallel.shard.ShardPlan`); no shape is cached between forwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from dvg_dist.parallel.backends import NATIVE, make_attention
from dvg_dist.parallel.diffusers_backend import SequenceParallelState, _usp_backend, usp_backend
from dvg_dist.parallel.mesh import ParallelGroups
from dvg_dist.parallel.shard import gather, split

if TYPE_CHECKING:
    from dvg_dist.models.base import SequencePlan

_ATTR = "_dvg_sequence_parallel"
_MISSING = object()


@dataclass
class _Applied:
    """What :func:`parallelize_transformer` changed on one transformer, to undo it exactly."""

    plan: SequencePlan
    groups: ParallelGroups
    attention_backend: str
    state: SequenceParallelState
    handles: list[RemovableHandle] = field(default_factory=list)
    processors: list[tuple[Any, Any, Any]] = field(default_factory=list)
    """(processor, previous instance ``_attention_backend``, previous instance ``_parallel_config``)."""


def _split_if_sequence(state: SequenceParallelState, x: Any, dim: int) -> Any:
    """This rank's shard of ``x`` if it carries the current forward's sequence on ``dim``; else ``x`` unchanged. A
    tuple or list (rotary ``(cos, sin)`` passed as one argument) has each of its tensors split the same way."""
    if isinstance(x, (tuple, list)):
        return type(x)(_split_if_sequence(state, e, dim) for e in x)
    if not isinstance(x, torch.Tensor) or x.ndim <= dim:
        return x  # no such dim: no sequence (LTX-Video's timestep is [B] for text-to-video, [B, S] with an image)
    n = x.shape[dim]
    if state.num_tokens is None:
        state.num_tokens = n  # the first split of this forward fixes its token count
    elif n != state.num_tokens:
        return x
    return split(x, dim, state.shard(n))


def _param_names(module: torch.nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _input_splitter(state: SequenceParallelState, path: str, module: torch.nn.Module, dims: dict[str, int]) -> Any:
    names = _param_names(module)
    unknown = [n for n in dims if n not in inspect.signature(module.forward).parameters]
    if unknown:
        raise ValueError(f"sequence plan: {path or '<transformer>'}.forward has no argument(s) {unknown}")

    def pre_hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        args_l = list(args)
        for name, dim in dims.items():
            if name in kwargs:
                kwargs[name] = _split_if_sequence(state, kwargs[name], dim)
            elif name in names and names.index(name) < len(args_l):
                i = names.index(name)
                args_l[i] = _split_if_sequence(state, args_l[i], dim)
        return tuple(args_l), kwargs

    return pre_hook


def _output_splitter(state: SequenceParallelState, path: str, dims: dict[int, int]) -> Any:
    def hook(_: torch.nn.Module, __: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            if set(dims) != {0}:
                raise ValueError(f"sequence plan: {path} returns one tensor; only output '0' can be split")
            return _split_if_sequence(state, output, dims[0])
        out = list(output)
        for i, dim in dims.items():
            out[i] = _split_if_sequence(state, out[i], dim)
        return type(output)(out) if isinstance(output, tuple) else out

    return hook


def _gatherer(state: SequenceParallelState, path: str, dim: int) -> Any:
    def hook(_: torch.nn.Module, __: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"sequence plan: {path} must return a tensor to be gathered, got {type(output).__name__}")
        # num_tokens is this forward's, on every rank: shard sizes are derived locally, no size exchange.
        return gather(output, dim, group=state.groups.sp, num_tokens=state.current().num_tokens)

    return hook


def self_attention_modules(transformer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The attention modules whose queries are the (sharded) video tokens: those inside the transformer's block
    stacks (its top-level ``ModuleList`` children) with a dispatch-based processor, minus cross-attention.

    Excluded by construction: Wan's ``attn2`` (``is_cross_attention``: every rank holds all text tokens), and
    the Hunyuan families' text token refiners (inside ``context_embedder``, not a block stack; text only).
    """
    for name, child in transformer.named_children():
        if not isinstance(child, torch.nn.ModuleList):
            continue
        for sub, module in child.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(processor, "_attention_backend"):
                continue
            if getattr(module, "is_cross_attention", False):
                continue
            yield f"{name}.{sub}", module


def direct_sdpa_modules(transformer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The block stacks' self-attention modules whose processor calls torch's ``scaled_dot_product_attention``
    itself: a processor without diffusers' ``_attention_backend`` slot (CogVideoX's ``CogVideoXAttnProcessor2_0``),
    minus cross-attention. Only a plan with ``direct_sdpa_text`` says such processors are joint self-attention."""
    for name, child in transformer.named_children():
        if not isinstance(child, torch.nn.ModuleList):
            continue
        for sub, module in child.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or hasattr(processor, "_attention_backend"):
                continue
            if getattr(module, "is_cross_attention", False):
                continue
            yield f"{name}.{sub}", module


class _SequenceParallelSdpa(TorchFunctionMode):
    """Active only inside one direct-SDPA attention module's forward: its ``scaled_dot_product_attention`` call (torch
    layout ``[B, H, S, D]``, the replicated text first or last, then this rank's video shard) goes to the same
    sequence-parallel backend the dispatching processors use (:func:`_usp_backend`, ``[B, S, H, D]``, text last);
    every other torch call passes through untouched, so the processor's own projections, norms and rotary run as
    written."""

    def __init__(self, state: SequenceParallelState, text_first: bool) -> None:
        super().__init__()
        self.state = state
        self.text_first = text_first

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        s_local = self.state.current().length
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        num_text = q.shape[1] - s_local
        reorder = self.text_first and num_text > 0  # otherwise the backend refuses the shapes itself
        if reorder:
            if attn_mask is not None:
                raise ValueError("sequence-parallel attention: a mask with the text tokens first is not supported")
            q, k, v = (torch.cat([t[:, num_text:], t[:, :num_text]], dim=1) for t in (q, k, v))
        out = _usp_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config=self.state)
        if reorder:
            out = torch.cat([out[:, s_local:], out[:, :s_local]], dim=1)
        return out.transpose(1, 2).to(query.dtype)


def _sdpa_redirect(state: SequenceParallelState, text_first: bool) -> tuple[Any, Any]:
    """The (pre-hook, always-called post-hook) pair that keeps :class:`_SequenceParallelSdpa` on for exactly one
    forward of a module; the post-hook also runs when the forward raises, so the mode never outlives it."""
    active: list[_SequenceParallelSdpa] = []

    def enter(_: torch.nn.Module, __: Any) -> None:
        mode = _SequenceParallelSdpa(state, text_first)
        mode.__enter__()
        active.append(mode)

    def leave(_: torch.nn.Module, __: Any, ___: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    return enter, leave


def parallelize_transformer(
    transformer: torch.nn.Module, plan: SequencePlan, groups: ParallelGroups, attention_backend: str = NATIVE
) -> None:
    """Shard ``transformer``'s token sequence over ``groups.sp`` inside every forward, following ``plan``.

    Afterwards ``transformer(hidden_states=x, timestep=t, ..., return_dict=False)[0]``, called with the same
    arguments on every rank of the sp group, returns on every rank the full output of the unmodified model (up to
    float round-off). Idempotent: the same plan, groups and backend again is a no-op; anything else replaces the
    previous setup. An sp group of one rank leaves the model untouched (and removes an earlier setup).

    ``attention_backend``: ``native`` | ``xfuser`` | ``deepspeed`` (:mod:`dvg_dist.parallel.backends`); an
    external one serves the calls it can do exactly and hands the others to native.
    """
    applied: _Applied | None = getattr(transformer, _ATTR, None)
    if applied is not None:
        if applied.plan == plan and applied.groups is groups and applied.attention_backend == attention_backend:
            return
        unparallelize_transformer(transformer)
    if groups.layout.sp_degree == 1:
        return
    modules = list(self_attention_modules(transformer))
    if plan.direct_sdpa_text is not None:
        modules += list(direct_sdpa_modules(transformer))
    heads = {getattr(m, "heads", None) for _, m in modules} - {None}
    for h in heads:
        if isinstance(h, int) and h % groups.layout.ulysses_degree:
            raise ValueError(f"ulysses_degree={groups.layout.ulysses_degree} does not divide num_heads={h}")

    state = SequenceParallelState(groups, attention=make_attention(attention_backend, groups))
    applied = _Applied(plan, groups, attention_backend, state)
    try:
        _apply(transformer, plan, applied)
    except BaseException:
        _undo(applied)
        raise
    setattr(transformer, _ATTR, applied)


def _module(transformer: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return transformer.get_submodule(path)
    except AttributeError:
        raise ValueError(f"sequence plan names {path!r}, which {type(transformer).__name__} does not have") from None


def _apply(transformer: torch.nn.Module, plan: SequencePlan, applied: _Applied) -> None:
    state, handles = applied.state, applied.handles

    def new_forward(_: torch.nn.Module, __: Any) -> None:
        state.num_tokens = None  # a new forward: its token count comes from its own first split

    handles.append(transformer.register_forward_pre_hook(new_forward, prepend=True))
    for path, entries in plan.split_inputs.items():
        module = _module(transformer, path)
        outputs = {int(k): d for k, d in entries.items() if k.isdigit()}
        inputs = {k: d for k, d in entries.items() if not k.isdigit()}
        if inputs:
            pre = _input_splitter(state, path, module, inputs)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if outputs:
            handles.append(module.register_forward_hook(_output_splitter(state, path, outputs)))
    for path, dim in plan.gather_outputs.items():
        handles.append(_module(transformer, path).register_forward_hook(_gatherer(state, path, dim)))
    if plan.direct_sdpa_text is not None:
        if plan.direct_sdpa_text not in ("first", "last"):
            raise ValueError(
                f"sequence plan: direct_sdpa_text must be 'first' or 'last', got {plan.direct_sdpa_text!r}"
            )
        direct = list(direct_sdpa_modules(transformer))
        if not direct:
            raise ValueError(
                f"sequence plan: direct_sdpa_text is set but {type(transformer).__name__} has no attention processor "
                "calling torch's scaled_dot_product_attention itself"
            )
        for _, module in direct:
            enter, leave = _sdpa_redirect(state, plan.direct_sdpa_text == "first")
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
    backend = usp_backend()
    for _, module in self_attention_modules(transformer):
        proc: Any = module.processor
        applied.processors.append(
            (
                proc,
                proc.__dict__.get("_attention_backend", _MISSING),
                proc.__dict__.get("_parallel_config", _MISSING),
            )
        )
        proc._attention_backend = backend
        proc._parallel_config = state  # diffusers hands it to the backend as ``_parallel_config``


def _undo(applied: _Applied) -> None:
    for handle in applied.handles:
        handle.remove()
    # Reverse order: a processor shared by several modules is restored to its original values last.
    for proc, backend, config in reversed(applied.processors):
        for attr, old in (("_attention_backend", backend), ("_parallel_config", config)):
            if old is _MISSING:
                proc.__dict__.pop(attr, None)
            else:
                setattr(proc, attr, old)


def unparallelize_transformer(transformer: torch.nn.Module) -> None:
    """Remove what :func:`parallelize_transformer` added (hooks, attention backend); a no-op if nothing is."""
    applied: _Applied | None = getattr(transformer, _ATTR, None)
    if applied is None:
        return
    _undo(applied)
    delattr(transformer, _ATTR)


def sequence_parallel_state(transformer: torch.nn.Module) -> SequenceParallelState | None:
    """The state of a parallelized transformer (its groups, the last forward's token count); None if not."""
    applied: _Applied | None = getattr(transformer, _ATTR, None)
    return None if applied is None else applied.state


@contextmanager
def sequence_parallel(
    transformer: torch.nn.Module, plan: SequencePlan, groups: ParallelGroups, attention_backend: str = NATIVE
) -> Iterator[None]:
    """:func:`parallelize_transformer` for the duration of a ``with`` block, then undone."""
    parallelize_transformer(transformer, plan, groups, attention_backend)
    try:
        yield
    finally:
        unparallelize_transformer(transformer)
