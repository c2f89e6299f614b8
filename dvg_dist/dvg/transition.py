"""The stage switch (docs/architecture.md, eq. 14): x̂0 extrapolation, sketch smoothing, re-noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def extrapolate_x0(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x̂0 = x_σ - σ·v``: the clean latent the current velocity points at (λ(t) = σ_t)."""
    if x.shape != v.shape:
        raise ValueError(f"latent {tuple(x.shape)} and velocity {tuple(v.shape)} differ in shape")
    return x - sigma * v


def smooth_sketch(y: torch.Tensor, keep: float = 0.7) -> torch.Tensor:
    """``y ← keep·y + (1-keep)·avgpool3×3(y)`` per frame of ``[B, C, T, H, W]``.

    The average ignores the zero padding (``count_include_pad=False``): with it included, border pixels
    would be pulled toward zero by up to 5/9·(1-keep), a visible dark frame around the upsampled sketch.
    """
    b, c, t, h, w = y.shape
    frames = y.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    pooled = F.avg_pool2d(frames, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    pooled = pooled.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
    return keep * y + (1.0 - keep) * pooled


def renoise(y: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x = (1-σ)·y + σ·ε``: put the clean estimate back on the flow path at the new schedule's σ."""
    if y.shape != noise.shape:
        raise ValueError(f"estimate {tuple(y.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (1.0 - sigma) * y + sigma * noise
