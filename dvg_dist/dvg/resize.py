"""Anchor coordinates and the latent resizes between stage grids (docs/architecture.md, eq. 11–12).

A stage of length ``L`` along an axis sits inside the next stage's length ``L'`` at the anchor positions
``a_i = round(i·(L'-1)/(L-1))`` (endpoints kept, strictly increasing; one sample sits at 0). Composing
anchors from the full grid down gives every stage's *full-resolution* coordinates, nested stage to stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .options import ResizeMode
from .planner import Grid


def anchors(length: int, target: int) -> torch.Tensor:
    """Positions of ``length`` source samples inside an axis of ``target`` samples (``length ≤ target``)."""
    if not 1 <= length <= target:
        raise ValueError(f"anchors need 1 <= length <= target; got length={length}, target={target}")
    if length == 1:
        return torch.zeros(1, dtype=torch.long)
    pos = [round(i * (target - 1) / (length - 1)) for i in range(length)]
    # Force strictly increasing from the left, then keep the right end fixed going back: with
    # length ≤ target both passes leave every position inside [0, target-1].
    for i in range(1, length):
        pos[i] = max(pos[i], pos[i - 1] + 1)
    pos[-1] = target - 1
    for i in range(length - 2, -1, -1):
        pos[i] = min(pos[i], pos[i + 1] - 1)
    return torch.tensor(pos, dtype=torch.long)


def nested_coords(lengths: Sequence[int]) -> list[torch.Tensor]:
    """Full-resolution coordinates of every length in a non-decreasing chain ending at the full length.

    ``coords[-1] = arange(lengths[-1])`` and ``coords[k] = coords[k+1][anchors(L_k, L_{k+1})]``, so every
    stage's coordinates are a subset of the next stage's.
    """
    coords = [torch.arange(lengths[-1])]
    for length, nxt in zip(reversed(lengths[:-1]), reversed(lengths[1:])):
        coords.insert(0, coords[0][anchors(length, nxt)])
    return coords


def stage_coords(grids: Sequence[Grid]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(t, h, w) full-resolution coordinates of each stage grid; the last grid is the full one.

    The sketch (first grid) is fixed before the action is chosen, so its coordinates are anchored on the
    full grid directly; the later stages form a nested chain (stage k ⊂ stage k+1 ⊂ … ⊂ full).
    """
    full = grids[-1]
    first = grids[0]
    sketch = (anchors(first.t, full.t), anchors(first.h, full.h), anchors(first.w, full.w))
    if len(grids) == 1:
        return [sketch]
    chains = [nested_coords([getattr(g, ax) for g in grids[1:]]) for ax in "thw"]
    return [sketch, *zip(*chains)]


def anchor_linear_1d(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Anchor-linear resize of one axis.

    Up (``size ≥ L``): anchors take the source values exactly, the samples between anchors ``a_m ≤ j ≤
    a_{m+1}`` get ``(1-w)·x_m + w·x_{m+1}`` with ``w = (j - a_m)/(a_{m+1} - a_m)``. Down: the target takes
    the source samples at the target's anchor positions in the source — the inverse, so down-then-up of a
    linear ramp is exact.
    """
    length = x.shape[dim]
    if size == length:
        return x
    if size < length:
        return x.index_select(dim, anchors(size, length).to(x.device))
    a = anchors(length, size)
    j = torch.arange(size)
    seg = (torch.searchsorted(a, j, right=True) - 1).clamp(0, max(length - 2, 0))
    if length == 1:
        return x.index_select(dim, torch.zeros(size, dtype=torch.long, device=x.device))
    lo, hi = a[seg], a[seg + 1]
    w = ((j - lo).to(torch.float64) / (hi - lo).to(torch.float64)).to(x.dtype).to(x.device)
    xm = x.index_select(dim, seg.to(x.device))
    xn = x.index_select(dim, (seg + 1).to(x.device))
    shape = [1] * x.dim()
    shape[dim] = size
    w = w.reshape(shape)
    return (1 - w) * xm + w * xn


def _restore_spatial_anchors(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Overwrite the anchor pixels of the upsampled ``y [.., H', W']`` with the source ``x [.., H, W]``."""
    ah = anchors(x.shape[-2], y.shape[-2]).to(y.device)
    aw = anchors(x.shape[-1], y.shape[-1]).to(y.device)
    y = y.clone()
    y[..., ah[:, None], aw[None, :]] = x
    return y


def area_anchor_spatial(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Space of ``[B, C, T, H, W]`` to ``h × w``: area interpolation per frame; when an axis grows, the
    anchor pixels are restored to their exact source values (shrinking axes keep the area average)."""
    b, c, t, hh, ww = x.shape
    if (h, w) == (hh, ww):
        return x
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh, ww)
    y = F.interpolate(frames, size=(h, w), mode="area")
    if h >= hh and w >= ww:
        y = _restore_spatial_anchors(y, frames)
    return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def resize(x: torch.Tensor, grid: Grid, mode: ResizeMode | str = ResizeMode.AREA_ANCHOR) -> torch.Tensor:
    """Resize a latent ``[B, C, T, H, W]`` to ``grid`` (up or down, any sizes)."""
    if x.dim() != 5:
        raise ValueError(f"expected a latent [B, C, T, H, W]; got shape {tuple(x.shape)}")
    mode = ResizeMode(mode)
    if tuple(x.shape[2:]) == (grid.t, grid.h, grid.w):
        return x
    if mode == ResizeMode.TRILINEAR:
        return F.interpolate(x, size=(grid.t, grid.h, grid.w), mode="trilinear", align_corners=False)
    y = anchor_linear_1d(x, grid.t, dim=2)
    if mode == ResizeMode.ANCHOR_LINEAR:
        return anchor_linear_1d(anchor_linear_1d(y, grid.h, dim=3), grid.w, dim=4)
    return area_anchor_spatial(y, grid.h, grid.w)


def sample_at(x: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], full: Grid) -> torch.Tensor:
    """A full-size ``[B, C, T, H, W]`` field sampled at a stage's (t, h, w) coordinates (I2V conditioning,
    oracle targets)."""
    if tuple(x.shape[2:]) != (full.t, full.h, full.w):
        raise ValueError(f"expected a full-size field {full}; got shape {tuple(x.shape)}")
    t, h, w = (c.to(x.device) for c in coords)
    return x[:, :, t][:, :, :, h][:, :, :, :, w]
