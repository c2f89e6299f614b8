"""The stage switch (docs/architecture.md, eq. 14): x̂0 extrapolation, sketch smoothing, re-noise.

Two noise processes: flow matching (``x = (1-σ)·x0 + σ·ε``, the model returns ``v = ε - x0``) and variance
preserving (``z = α·x0 + s·ε`` with ``α = √ᾱ``, ``s = √(1-ᾱ)``, the model returns ``v = α·ε - s·x0`` or ``ε``).
"""

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


def vp_x0(z: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor, prediction: str = "v_prediction") -> torch.Tensor:
    """The clean latent a VP model output points at, with diffusers' own ``pred_original_sample`` arithmetic
    (``alpha_bar`` the scheduler's 0-d ``alphas_cumprod[t]``), so a transition's x̂0 is bit for bit what the
    scheduler's step computes: ``α·z - s·v`` (v-prediction) or ``(z - s·ε)/α`` (epsilon)."""
    if z.shape != v.shape:
        raise ValueError(f"latent {tuple(z.shape)} and model output {tuple(v.shape)} differ in shape")
    beta = 1 - alpha_bar
    if prediction == "v_prediction":
        return (alpha_bar**0.5) * z - (beta**0.5) * v
    if prediction == "epsilon":
        return (z - beta ** (0.5) * v) / alpha_bar ** (0.5)
    raise ValueError(f"prediction type {prediction!r} is not supported; use v_prediction or epsilon")


def vp_renoise(y: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``z = α·y + s·ε``: put the clean estimate back on the VP path at the new schedule's ``ᾱ``."""
    if y.shape != noise.shape:
        raise ValueError(f"estimate {tuple(y.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (alpha_bar**0.5) * y + ((1 - alpha_bar) ** 0.5) * noise


def vp_flow_sigma(alpha_bar: float) -> float:
    """The flow σ with the same signal-to-noise ratio as ``ᾱ``: ``s/(α+s)``, since ``z/(α+s)`` is the flow state
    ``(1-σ)·x0 + σ·ε``. ``ᾱ = 0`` (zero terminal SNR) is σ = 1, ``ᾱ = 1`` is 0."""
    if not 0.0 <= alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must be in [0, 1]; got {alpha_bar}")
    a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    return s / (a + s)
