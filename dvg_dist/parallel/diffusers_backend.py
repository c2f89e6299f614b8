"""The one collective-aware point inside a diffusers transformer: an attention backend calling :func:`usp_attention`.

diffusers' attention processors (``WanAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``,
``HunyuanVideo15AttnProcessor2_0``) end in ``dispatch_attention_fn(q, k, v, attn_mask=…, backend=
self._attention_backend, parallel_config=self._parallel_config)`` with ``[B, S, H, D]`` tensors. We register one
extra backend in ``_AttentionBackendRegistry`` and point only the sequence self-attention processors at it; the
processors' own code (projections, norms, rotary, output projection) runs unchanged. The processor's
``_parallel_config`` slot carries this transformer's :class:`SequenceParallelState` to the backend — diffusers
passes it through untouched, and passes ``None`` for Wan's cross-attention, which then runs locally.

Why a private enum member: ``dispatch_attention_fn`` accepts a backend that ``isinstance(…, AttentionBackendName)``
and looks it up in the registry; ``AttentionBackendName`` is a closed ``Enum``. The member below is created
without adding it to the enum's member maps, so ``list(AttentionBackendName)``, ``set_attention_backend`` and
diffusers' requirement checks never see it; only processors we configure carry it.

Joint attention (HunyuanVideo, HunyuanVideo-1.5): the processor concatenates ``[local video, text]`` and passes a
mask built from the *local* length. The video shard length is known from the per-forward token count (every rank
derives it from :class:`ShardPlan`), so everything after it is the replicated text tail; the text key mask is read
from the mask's text columns, and video keys are never masked in these families.

With an external backend configured (``parallel.attention_backend``, :mod:`dvg_dist.parallel.backends`), each call
goes to it when it can do that call exactly and to :func:`usp_attention` otherwise; ``SequenceParallelState.served``
counts which one served each call.

Per-stage layouts (``parallel.stage_layouts``, :mod:`dvg_dist.parallel.layouts`): the hooks and the backend read the
groups from the state at every call, so :meth:`SequenceParallelState.use` switches a parallelized transformer to
another layout's groups between two forwards without re-registering anything. A layout whose sp group is one rank
(pure CFG-parallel or data-parallel) then runs each attention call locally through diffusers' native backend,
exactly as the unparallelized model would.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed import ProcessGroup

from dvg_dist.parallel.attention import usp_attention
from dvg_dist.parallel.backends import NATIVE, CallShape, ExternalAttention, log_fallback, make_attention
from dvg_dist.parallel.mesh import Axis, ParallelGroups
from dvg_dist.parallel.shard import ShardPlan

BACKEND_VALUE = "dvg_usp"
"""The name of our backend in diffusers' registry."""

_BACKEND: Any = None  # the private AttentionBackendName member, created on first use


@dataclass
class SequenceParallelState:
    """One parallelized transformer's groups and the token count of the forward in flight.

    ``num_tokens`` is reset by a pre-hook on the transformer at the start of every forward and set by the first
    split of that forward (never carried over: a new stage grid is a new count).
    """

    groups: ParallelGroups
    num_tokens: int | None = None
    """Video tokens of the current forward (before splitting); None until the first split of the forward."""
    attention: ExternalAttention | None = None
    """The configured external backend (``parallel.attention_backend``); None = native for every call."""
    served: Counter[str] = field(default_factory=Counter)
    """Calls served per backend name (``native`` includes the external backend's fallbacks)."""
    fallbacks: Counter[str] = field(default_factory=Counter)
    """Calls the external backend handed to native, per reason."""
    _bound: dict[int, tuple[ParallelGroups, ExternalAttention | None]] = field(default_factory=dict, repr=False)
    """Groups seen by :meth:`use` (by ``id``, the groups kept alive here) and the external backend bound to each."""

    def use(self, groups: ParallelGroups, attention_backend: str = NATIVE) -> None:
        """Run the next forwards on ``groups`` (another layout of the same world), with ``attention_backend`` bound
        to them (built once per groups). Between forwards only: a forward in flight keeps the groups it started
        with. Every rank of the world must switch to the same layout before the same forward."""
        if groups is self.groups:
            return
        self._bound.setdefault(id(self.groups), (self.groups, self.attention))
        if id(groups) not in self._bound:
            attention = None if groups.layout.sp_degree == 1 else make_attention(attention_backend, groups)
            self._bound[id(groups)] = (groups, attention)
        self.groups, self.attention = self._bound[id(groups)]

    @property
    def calls(self) -> int:
        """Parallel attention calls so far, whichever backend served them (tests check the backend is used)."""
        return sum(self.served.values())

    @property
    def sp_size(self) -> int:
        return self.groups.layout.sp_degree

    @property
    def sp_rank(self) -> int:
        return self.groups.coords[Axis.SP]

    def shard(self, num_tokens: int) -> ShardPlan:
        """This rank's shard of ``num_tokens`` tokens (re-derived on every call)."""
        return ShardPlan(num_tokens, self.sp_size, self.sp_rank)

    def current(self) -> ShardPlan:
        """This rank's shard of the current forward's tokens."""
        if self.num_tokens is None:
            raise RuntimeError("sequence-parallel attention ran before any input of this forward was split")
        return self.shard(self.num_tokens)

    @property
    def ulysses_group(self) -> ProcessGroup | None:
        return self.groups.ulysses if self.groups.layout.ulysses_degree > 1 else None

    @property
    def ring_group(self) -> ProcessGroup | None:
        return self.groups.ring if self.groups.layout.ring_degree > 1 else None


def _text_key_mask(attn_mask: torch.Tensor, s_local: int, num_text: int) -> torch.Tensor:
    """``[B, T]`` bool (True = attend) from a processor's mask over ``[local video, text]`` keys.

    Accepts ``[B, K]``, ``[B, 1, 1, K]`` (HunyuanVideo) and ``[B, 1, Q, K]`` (HunyuanVideo-1.5's outer product of the
    token mask with itself): a text key is attended if any query row attends it. Rows of padded text queries
    are all False in HunyuanVideo-1.5; here those queries attend the valid keys instead — their outputs are
    padding that no valid token ever reads (padded keys stay masked), so the video output is unchanged.
    """
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"sequence-parallel attention takes boolean masks, got {attn_mask.dtype}")
    B, K = attn_mask.shape[0], attn_mask.shape[-1]
    if K != s_local + num_text:
        raise ValueError(f"attention mask covers {K} keys, expected {s_local} video + {num_text} text")
    return attn_mask.reshape(B, -1, K)[:, :, s_local:].any(dim=1)


def _usp_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """diffusers backend signature (``[B, S, H, D]`` in and out); the argument names are diffusers' contract."""
    state = _parallel_config
    if not isinstance(state, SequenceParallelState):
        # A call without our state (Wan cross-attention passes parallel_config=None): plain local attention.
        return _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if state.sp_size == 1:
        # A one-rank sp group (a CFG- or data-parallel stage layout, SequenceParallelState.use): this rank holds the
        # whole sequence, so the call is the unparallelized model's own, bit for bit.
        return _native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if dropout_p or is_causal or enable_gqa:
        raise ValueError("sequence-parallel attention supports neither dropout, causal masks nor GQA")
    plan = state.current()
    s_local = plan.length
    num_text = query.shape[1] - s_local
    if num_text < 0 or key.shape[1] != query.shape[1]:
        # Same shapes on every rank of a well-formed model, so all ranks raise here, before any collective.
        raise ValueError(
            f"sequence-parallel attention: this rank holds {s_local} of {plan.num_tokens} video tokens, "
            f"got q {tuple(query.shape)}, k {tuple(key.shape)}"
        )
    if state.attention is not None:
        # Decided from what every rank knows identically (the global token count, heads, text length, mask
        # presence, dtype): a rank-local input here would split the ranks between two backends' collectives.
        masked = attn_mask is not None
        call = CallShape(plan.num_tokens, query.shape[2], num_text, masked, query.dtype, query.device.type)
        reason = state.attention.fallback_reason(call)
        if reason is None:
            state.served[state.attention.name] += 1
            return state.attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale)
        state.fallbacks[reason] += 1
        log_fallback(state.attention.name, reason, call, state.groups.rank)
    state.served[NATIVE] += 1
    if num_text == 0:
        if attn_mask is not None:
            raise ValueError("sequence-parallel attention: a mask over video tokens only is not supported")
        return usp_attention(
            query, key, value, state.ulysses_group, state.ring_group, scale=scale, num_tokens=plan.num_tokens
        ).out_BSHD
    mask_BT = None if attn_mask is None else _text_key_mask(attn_mask, s_local, num_text)
    out = usp_attention(
        query[:, :s_local],
        key[:, :s_local],
        value[:, :s_local],
        state.ulysses_group,
        state.ring_group,
        scale=scale,
        num_tokens=plan.num_tokens,
        text_q_BTHD=query[:, s_local:],
        text_k_BTHD=key[:, s_local:],
        text_v_BTHD=value[:, s_local:],
        text_key_mask_BT=mask_BT,
    )
    assert out.text_out_BTHD is not None
    return torch.cat([out.out_BSHD, out.text_out_BTHD], dim=1)


def _native(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    return native(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def usp_backend() -> Any:
    """The backend to put in a processor's ``_attention_backend`` (registered with diffusers on first call)."""
    global _BACKEND
    if _BACKEND is None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        member = str.__new__(AttentionBackendName, BACKEND_VALUE)
        member._name_ = BACKEND_VALUE.upper()
        member._value_ = BACKEND_VALUE
        # Excluded from torch.compile's tracing (--compile): its collectives run eagerly between compiled regions,
        # and its per-call bookkeeping (state.served, the token count) never becomes a guard that recompiles.
        eager = torch.compiler.disable(_usp_backend, recursive=True)
        _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=False)(eager)
        _BACKEND = member
    return _BACKEND
