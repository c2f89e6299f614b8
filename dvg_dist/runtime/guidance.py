"""Classifier-free guidance on one set of ranks: the two branches as two passes, or as one batch.

A pipeline that runs ``[uncond, cond]`` as one batch of ``2B`` (CogVideoX, LTX-Video: ``Adapter.batched_cfg``) rounds
differently from two passes of ``B`` on the CPU (a batch-1 matrix–vector product in the timestep embedder sums in
another order than a batch-2 matrix product), so the engine runs the batch the pipeline runs and full mode equals it
bit for bit. CFG-parallel (each half of the ranks one branch) is two passes of ``B`` whatever the family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def join_branches(
    uncond: dict[str, Any], cond: dict[str, Any], batch: int, shared: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The kwargs of one pass over ``[uncond, cond]``: every tensor concatenated on its leading (batch) dimension,
    unconditional first; the keys in ``shared`` (batch-free tensors such as CogVideoX's ``ofs``) and equal plain
    values passed once."""
    if uncond.keys() != cond.keys():
        raise ValueError(f"the guidance branches have different kwargs: {sorted(uncond)} vs {sorted(cond)}")
    joined: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if key in shared or not torch.is_tensor(c):
            if not (u is c or (torch.is_tensor(c) and torch.equal(u, c)) or (not torch.is_tensor(c) and u == c)):
                raise ValueError(f"the guidance branches' {key!r} differ and cannot be passed once")
            joined[key] = c
        elif c.shape[:1] != (batch,) or u.shape[1:] != c.shape[1:]:
            raise ValueError(f"{key!r} of shape {tuple(c.shape)} has no batch of {batch} to join on")
        else:
            joined[key] = torch.cat([u, c])
    return joined


def guided(
    forward: Forward,
    x_in: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    step: dict[str, Any],
    g: float,
    batched: bool = False,
    shared: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """The guided velocity ``v_u + g·(v_c − v_u)`` (or ``v_c`` without an unconditional pass) on these ranks.

    ``batched``: one pass over ``[x, x]`` with :func:`join_branches` of the kwargs (``step``'s per-video entries,
    such as MeanFlow's ``timestep_r``, doubled too), split into halves after, as the pipelines that batch do."""
    if uncond is None:
        return forward(x_in, t, {**cond, **step})
    if not batched:
        v = forward(x_in, t, {**cond, **step})
        v_uncond = forward(x_in, t, {**uncond, **step})
        return v_uncond + g * (v - v_uncond)
    batch = x_in.shape[0]
    kwargs = join_branches({**uncond, **step}, {**cond, **step}, batch, shared)
    out = forward(torch.cat([x_in, x_in]), torch.cat([t, t]), kwargs)
    v_uncond, v = out.chunk(2)
    return v_uncond + g * (v - v_uncond)
