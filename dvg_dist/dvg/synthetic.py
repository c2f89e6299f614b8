"""Procedural, deterministic latent content for demos, tests and benchmarks (pure torch).

:func:`moving_texture` builds a latent ``[B, C, T, H, W]`` that looks like a video latent to the DVG
demands (docs/architecture.md, eq. 3–4): a smooth low-frequency field (a natural-image-like ``1/f`` spectrum, cut
off well below Nyquist) plus band-limited texture near the high band, both rigidly translated by a
constant sub-pixel velocity, mixed randomly into the channels.

How it is made, and why it is an honest test signal:

* Every component is real white noise filtered in the Fourier domain on a *canvas* larger than the frame
  (at least twice each side and at least the frame plus the whole travel), so the spectrum is band-limited
  and the canvas periodic and smooth.
* Frame ``t`` is the canvas translated by ``t·speed`` — a phase ramp ``exp(-2πi·f·t·v)`` on the spectrum,
  which is exact sub-pixel translation for a band-limited signal (the Nyquist bins are zero) — then
  cropped to ``H × W``. The canvas is large enough that content leaving the crop never re-enters it: no
  wrap-around seam, no fake motion; what the crop sees is a true translation, ``x[t+1](p) = x[t](p - v)``.
* The random draws do not depend on ``speed`` or ``texture`` (while the travel fits in the default
  canvas), so for one seed changing ``texture`` changes only the texture's gain and changing ``speed``
  only the motion: demands compared across those values differ by the knob alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Spectral shapes, in cycles per latent pixel (Nyquist = 0.5).
_LOW_CORNER = 0.02
"""Below this the low field's spectrum flattens (no infinite DC power)."""
_LOW_SLOPE = 1.6
"""Amplitude ∝ f^-slope above the corner: smooth, large structures."""
_LOW_CUTOFF = 0.15
"""Gaussian roll-off of the low field: almost nothing of it reaches the demand's high band."""
_TEX_CENTER = 0.33
_TEX_WIDTH = 0.07
"""The texture is a Gaussian annulus around the centre frequency: fine detail straddling the high band."""
_TEX_GAIN = 2.0
"""Texture amplitude at ``texture = 1`` relative to the (unit-variance) low field."""
_MARGIN = 8


def _canvas(size: int, travel: float) -> int:
    """Canvas length for a frame side of ``size`` whose content moves ``travel`` pixels in all."""
    return max(2 * size, size + math.ceil(travel) + _MARGIN)


def _envelopes(hc: int, wc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude envelopes of the low field and the texture on the ``rfft2`` grid of an ``hc × wc`` canvas."""
    fy = torch.fft.fftfreq(hc, dtype=torch.float64)
    fx = torch.fft.rfftfreq(wc, dtype=torch.float64)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    low = (f.square() + _LOW_CORNER**2) ** (-_LOW_SLOPE / 2) * torch.exp(-((f / _LOW_CUTOFF) ** 2))
    tex = torch.exp(-0.5 * ((f - _TEX_CENTER) / _TEX_WIDTH) ** 2)
    keep = torch.ones_like(f)
    keep[0, 0] = 0.0  # no DC: channel offsets are added explicitly
    if hc % 2 == 0:
        keep[hc // 2, :] = 0.0  # the Nyquist bins cannot be translated by a fraction of a pixel
    if wc % 2 == 0:
        keep[:, -1] = 0.0
    return low * keep, tex * keep


def moving_texture(
    shape: Sequence[int] = (1, 16, 21, 45, 80),
    seed: int = 0,
    speed: tuple[float, float] = (0.0, 0.0),
    texture: float = 0.5,
    dtype: torch.dtype = torch.float32,
    *,
    components: int = 4,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A latent ``[B, C, T, H, W]`` of smooth content plus texture, translating by ``speed`` per frame.

    Args:
        shape: ``(B, C, T, H, W)``, all positive.
        seed: the only source of randomness; the same arguments give a bit-identical tensor (computed in
            float64 on the CPU, cast to ``dtype`` last). Batch elements are independent contents.
        speed: ``(vx, vy)`` in latent pixels per frame (x along W, y along H); content at ``p`` in frame
            ``t`` is at ``p + speed`` in frame ``t+1``. Any real values (sub-pixel included).
        texture: in ``[0, 1]``: the gain of the band-limited fine detail. 0 gives a smooth latent (low
            spatial demand); more texture gives a strictly larger share of high-band energy.
        dtype: the output dtype.
        components: how many low-frequency and how many texture fields are mixed into the channels.
        device: where the result goes.

    Each channel is a random mix of the shared fields with its own scale and offset, so channels differ
    but move together, as a video latent's channels do.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) != 5 or any(d < 1 for d in dims):
        raise ValueError(f"shape must be (B, C, T, H, W) with positive sizes; got {tuple(shape)}")
    if not 0.0 <= texture <= 1.0:
        raise ValueError(f"texture must be in [0, 1]; got {texture}")
    vx, vy = (float(v) for v in speed)
    if not (math.isfinite(vx) and math.isfinite(vy)):
        raise ValueError(f"speed must be finite; got {speed}")
    if components < 1:
        raise ValueError(f"components must be >= 1; got {components}")
    b, c, t, h, w = dims
    hc, wc = _canvas(h, abs(vy) * (t - 1)), _canvas(w, abs(vx) * (t - 1))

    gen = torch.Generator().manual_seed(int(seed))
    white = torch.randn(b, 2 * components, hc, wc, generator=gen, dtype=torch.float64)
    mix_low = torch.randn(b, c, components, generator=gen, dtype=torch.float64) / math.sqrt(components)
    mix_tex = torch.randn(b, c, components, generator=gen, dtype=torch.float64) / math.sqrt(components)
    scale = 0.6 + 0.8 * torch.rand(b, c, generator=gen, dtype=torch.float64)
    offset = 0.3 * torch.randn(b, c, generator=gen, dtype=torch.float64)

    low_env, tex_env = _envelopes(hc, wc)
    env = torch.cat([low_env.expand(components, -1, -1), tex_env.expand(components, -1, -1)])
    spec = torch.fft.rfft2(white) * env  # [B, 2K, hc, wc//2+1]
    # Unit variance per field over the canvas (Parseval on the un-shifted fields).
    std = torch.fft.irfft2(spec, s=(hc, wc)).std(dim=(-2, -1), keepdim=True)
    spec = spec / std.clamp_min(1e-12)

    fy = torch.fft.fftfreq(hc, dtype=torch.float64)
    fx = torch.fft.rfftfreq(wc, dtype=torch.float64)
    steps = torch.arange(t, dtype=torch.float64)
    phase = -2.0 * math.pi * steps[:, None, None] * (fy[None, :, None] * vy + fx[None, None, :] * vx)
    ramp = torch.polar(torch.ones_like(phase), phase)  # [T, hc, wc//2+1]
    fields = torch.fft.irfft2(spec[:, :, None] * ramp, s=(hc, wc))[..., :h, :w]  # [B, 2K, T, H, W]

    low, tex = fields[:, :components], fields[:, components:]
    gain = _TEX_GAIN * float(texture)
    out = torch.einsum("bck,bkthw->bcthw", mix_low, low) + gain * torch.einsum("bck,bkthw->bcthw", mix_tex, tex)
    out = out * scale[:, :, None, None, None] + offset[:, :, None, None, None]
    return out.to(dtype=dtype, device=device)


DEMO_TEXTURE = 0.5
"""The "moderately textured" preset of :func:`demo_sketch` (spatial demand ≈ 0.2–0.25)."""
DEMO_SPEED = (0.4, 0.2)
"""The "moderately moving" preset of :func:`demo_sketch`, latent px/frame (temporal demand ≈ 0.45–0.5)."""


def demo_sketch(
    shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """A stand-in sketch ``x̂0``: :func:`moving_texture` with moderate texture and moderate motion.

    Used by ``launch/plan.py --synthetic-sketch`` and ``bench/planner.py``; deterministic in ``seed``.
    """
    return moving_texture(shape, seed, DEMO_SPEED, DEMO_TEXTURE, dtype, device=device)
