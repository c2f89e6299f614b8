"""How much a video needs space vs. time, read from a latent (docs/architecture.md, eq. 3–5).

Both demands take ``x̂0`` of shape ``[B, C, T, H, W]`` and are invariant to the latent's scale (each is
computed on standardised values). They return Python floats pooled over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .options import TemporalDemandMethod

_EPS = 1e-6
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _check(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"expected a latent [B, C, T, H, W]; got shape {tuple(x.shape)}")


def _high_band(h: int, w: int, cutoff: float, device: torch.device) -> torch.Tensor:
    """Mask of the frequencies at normalised radius ≥ ``cutoff``, in ``fft2``'s (unshifted) order.

    The radius is ``sqrt(f_y² + f_x²)/√2`` with ``f = linspace(-1, 1, n)`` laid over the *shifted*
    spectrum (corner = 1); ``ifftshift`` of that mask puts it in unshifted order, which saves shifting the
    power spectrum itself.
    """
    fy = torch.linspace(-1.0, 1.0, h, device=device, dtype=torch.float64)
    fx = torch.linspace(-1.0, 1.0, w, device=device, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / math.sqrt(2.0)
    return torch.fft.ifftshift(radius >= cutoff, dim=(-2, -1))


def spatial_demand(x0: torch.Tensor, cutoff: float = 0.5) -> float:
    """Eq. 3: share of spectral energy at normalised radius ≥ ``cutoff``; white noise ≈ 0.61–0.65 (grid-size
    dependent; 1 − π/8 in the limit).

    Standardise per (batch, channel) over (T, H, W), take ``|fftshift(fft2(·, ortho))|²`` per frame and
    pool the high-band fraction over batch, channels and frames.
    """
    _check(x0)
    x = x0.detach().to(torch.float32)
    var, mean = torch.var_mean(x, dim=(2, 3, 4), keepdim=True, correction=0)
    x = (x - mean) / (var.sqrt() + _EPS)
    spec = torch.fft.fft2(x, norm="ortho")
    per_freq = (spec.real.square() + spec.imag.square()).sum(dim=(0, 1, 2))  # [H, W], unshifted
    band = _high_band(x.shape[-2], x.shape[-1], cutoff, x.device)
    return float(per_freq[band].sum() / per_freq.sum().clamp_min(1e-12))


def _frames(x0: torch.Tensor) -> torch.Tensor:
    """Channel-mean frames ``[B, T, H, W]``, each standardised over (H, W)."""
    f = x0.detach().to(torch.float32).mean(dim=1)
    mean = f.mean(dim=(-2, -1), keepdim=True)
    std = f.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (f - mean) / (std + _EPS)


def _gradients(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel/8 gradients (zero padding 1) of ``[N, H, W]`` frames."""
    kx = _SOBEL_X.to(frames)
    kernels = torch.stack([kx, kx.t()])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    g = F.conv2d(frames[:, None], kernels, padding=1)
    return g[:, 0], g[:, 1]


def _lk_solve(gx: torch.Tensor, gy: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One global Lucas–Kanade vector ``(u_x, u_y)`` per frame pair: ``A·u = -b``, det clamped ≥ 1e-6."""
    sxx = (gx * gx).sum(dim=(-2, -1))
    sxy = (gx * gy).sum(dim=(-2, -1))
    syy = (gy * gy).sum(dim=(-2, -1))
    bx = (gx * d).sum(dim=(-2, -1))
    by = (gy * d).sum(dim=(-2, -1))
    det = (sxx * syy - sxy * sxy).clamp_min(1e-6)
    ux = -(syy * bx - sxy * by) / det
    uy = -(-sxy * bx + sxx * by) / det
    return torch.stack([ux, uy], dim=-1)


def _frame_pairs(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Standardised frames ``f_t`` and ``f_{t+1}`` of every adjacent pair, each ``[B·(T-1), H, W]``, with B, T."""
    _check(x0)
    f = _frames(x0)
    b, t, h, w = f.shape
    return f[:, :-1].reshape(-1, h, w), f[:, 1:].reshape(-1, h, w), b, t


def lucas_kanade(x0: torch.Tensor) -> torch.Tensor:
    """Global motion per adjacent frame pair, ``[B, T-1, 2]`` as (x, y) in latent pixels per frame."""
    prev, nxt, b, t = _frame_pairs(x0)
    if t < 2:
        return prev.new_zeros(b, 0, 2)
    gx, gy = _gradients(prev)
    return _lk_solve(gx, gy, nxt - prev).reshape(b, t - 1, 2)


def _shift(frames: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``frames[n](p - u[n])``: translate each frame by its own vector (bilinear, border values kept)."""
    n, h, w = frames.shape
    ys = torch.arange(h, dtype=frames.dtype, device=frames.device)
    xs = torch.arange(w, dtype=frames.dtype, device=frames.device)
    src_x = xs[None, None, :] - u[:, 0, None, None]
    src_y = ys[None, :, None] - u[:, 1, None, None]
    gx = 2 * src_x / max(w - 1, 1) - 1
    gy = 2 * src_y / max(h - 1, 1) - 1
    grid = torch.stack([gx.expand(n, h, w), gy.expand(n, h, w)], dim=-1)
    return F.grid_sample(frames[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def _downsample(frames: torch.Tensor) -> torch.Tensor:
    """Half-size ``[N, H, W]`` after a binomial [1, 4, 6, 4, 1]/16 blur: without the blur, fine texture
    aliases into false coarse-level motion (a 0.25 px/frame texture read as 1.3 px/frame)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=frames.dtype, device=frames.device) / 16
    x = F.pad(frames[:, None], (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, k1.view(1, 1, 1, 5))
    x = F.conv2d(x, k1.view(1, 1, 5, 1))
    return x[:, 0, ::2, ::2]


def pyramid_lucas_kanade(x0: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Coarse-to-fine global LK with warping, ``[B, T-1, 2]``: sees motion of several latent px/frame,
    where the single-level estimate saturates."""
    prev, nxt, b, t = _frame_pairs(x0)
    if t < 2:
        return prev.new_zeros(b, 0, 2)
    pyramid = [(prev, nxt)]
    for _ in range(levels - 1):
        p, q = pyramid[-1]
        if min(p.shape[-2:]) < 8:
            break
        pyramid.append((_downsample(p), _downsample(q)))
    u = prev.new_zeros(prev.shape[0], 2)
    for level, (p, q) in enumerate(reversed(pyramid)):
        if level:
            u = u * 2
        warped = _shift(p, u)
        gx, gy = _gradients(warped)
        u = u + _lk_solve(gx, gy, q - warped)
    return u.reshape(b, t - 1, 2)


def temporal_demand(
    x0: torch.Tensor, method: TemporalDemandMethod | str = TemporalDemandMethod.LK, levels: int = 3
) -> float:
    """Eq. 4: ``D_t = m / (1 + m)`` with ``m`` the mean length of the global motion vectors."""
    method = TemporalDemandMethod(method)
    flow = lucas_kanade(x0) if method == TemporalDemandMethod.LK else pyramid_lucas_kanade(x0, levels)
    if flow.shape[1] == 0:
        return 0.0
    m = float(flow.norm(dim=-1).mean())
    return m / (1.0 + m)


def demand_weights(d_s: float, d_t: float, alpha: float = 2.6) -> tuple[float, float]:
    """Eq. 5: ``w_s = e^{α·D_s} / (e^{α·D_s} + e^{α·D_t})``, ``w_t = 1 - w_s``."""
    w_s = 1.0 / (1.0 + math.exp(alpha * (d_t - d_s)))
    return w_s, 1.0 - w_s


@dataclass(frozen=True)
class Demands:
    """What the sketch analysis found: both demands and the weights they give."""

    spatial: float
    temporal: float
    w_s: float
    w_t: float

    def to_dict(self) -> dict[str, float]:
        return {"spatial": self.spatial, "temporal": self.temporal, "w_s": self.w_s, "w_t": self.w_t}


def analyse(
    x0: torch.Tensor,
    alpha: float = 2.6,
    method: TemporalDemandMethod | str = TemporalDemandMethod.LK,
    levels: int = 3,
) -> Demands:
    """Both demands and the weights for one sketch ``x̂0``."""
    d_s = spatial_demand(x0)
    d_t = temporal_demand(x0, method, levels)
    w_s, w_t = demand_weights(d_s, d_t, alpha)
    return Demands(d_s, d_t, w_s, w_t)
