"""Spatial and temporal demands and their weights (docs/architecture.md, eq. 3–5)."""

from __future__ import annotations

import math

import pytest
import torch

from dvg_dist.dvg import (
    TemporalDemandMethod,
    analyse,
    demand_weights,
    lucas_kanade,
    pyramid_lucas_kanade,
    spatial_demand,
    temporal_demand,
)
from dvg_dist.dvg.options import DVGOptions


def moving_pattern(
    frames: int, h: int, w: int, u: tuple[float, float], sigma: float = 7.0, k: float = 0.3
) -> torch.Tensor:
    """``[1, 3, T, H, W]``: a Gaussian-windowed sine (odd, so zero-mean: its standardised background is ≈ 0
    and the zero-padded Sobel border adds nothing) translated by ``u = (x, y)`` latent px per frame. The
    three channels are scaled copies (the demand uses the channel mean)."""
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    out = []
    for t in range(frames):
        x = xs - (w - 1) / 2 - u[0] * t
        y = ys - (h - 1) / 2 - u[1] * t
        out.append(torch.exp(-(x**2 + y**2) / (2 * sigma**2)) * torch.sin(k * (x + 0.8 * y)))
    v = torch.stack(out)
    return torch.stack([v, 2 * v, 0.5 * v])[None].to(torch.float32)


def smooth_video(frames: int = 4, h: int = 32, w: int = 40) -> torch.Tensor:
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, h)[None, :, None]
    x = torch.linspace(0, 1, w)[None, None, :]
    v = torch.cos(2 * math.pi * (x + 0.5 * y) + t) + 0.5 * torch.sin(math.pi * y)
    return torch.stack([v, -v, v * 0.3 + 1])[None]


@pytest.mark.parametrize("shape", [(2, 4, 4, 64, 64), (1, 16, 3, 45, 80)])
def test_white_noise_spatial_demand(shape):
    gen = torch.Generator().manual_seed(0)
    d = spatial_demand(torch.randn(*shape, generator=gen))
    assert abs(d - 0.63) <= 0.03, f"white noise {shape}: D_s = {d:.4f}, expected 0.63 ± 0.03"


def test_spatial_demand_by_hand_fraction_of_band():
    # White noise has a flat expected spectrum, so D_s is ≈ the fraction of (H, W) bins at radius ≥ 0.5.
    h, w = 40, 56
    fy = torch.linspace(-1, 1, h, dtype=torch.float64)
    fx = torch.linspace(-1, 1, w, dtype=torch.float64)
    rho = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / math.sqrt(2)
    frac = (rho >= 0.5).double().mean().item()
    gen = torch.Generator().manual_seed(1)
    d = spatial_demand(torch.randn(4, 8, 8, h, w, generator=gen))
    assert abs(d - frac) < 0.01, f"D_s = {d:.4f} vs band fraction {frac:.4f} (diff {abs(d - frac):.4f})"


def test_smooth_content_has_low_spatial_demand():
    d_smooth = spatial_demand(smooth_video())
    assert d_smooth < 0.05, f"a smooth video has D_s = {d_smooth:.4f}, expected < 0.05"


def test_lucas_kanade_recovers_subpixel_translation():
    u = (0.3, -0.2)
    flow = lucas_kanade(moving_pattern(5, 48, 64, u))
    assert flow.shape == (1, 4, 2), f"flow shape {tuple(flow.shape)}, expected (1, 4, 2)"
    want = torch.tensor(u).expand_as(flow)
    err = (flow - want).abs().max().item()
    assert err < 0.03, f"LK flow {flow[0].tolist()} differs from {u} by up to {err:.4f} (> 0.03)"
    d_t = temporal_demand(moving_pattern(5, 48, 64, u))
    m = math.hypot(*u)
    assert abs(d_t - m / (1 + m)) < 0.02, f"D_t = {d_t:.4f}, expected m/(1+m) = {m / (1 + m):.4f}"


def test_static_video_has_zero_temporal_demand():
    static = smooth_video(5)[:, :, :1].expand(-1, -1, 6, -1, -1).contiguous()
    d = temporal_demand(static)
    assert d < 1e-3, f"static video: D_t = {d:.3e}, expected < 1e-3"
    d_p = temporal_demand(static, TemporalDemandMethod.PYRAMID)
    assert d_p < 1e-3, f"static video (pyramid): D_t = {d_p:.3e}, expected < 1e-3"


def test_single_frame_has_zero_temporal_demand():
    x = torch.randn(2, 4, 1, 16, 16)
    assert temporal_demand(x) == 0.0
    assert temporal_demand(x, "pyramid") == 0.0
    assert lucas_kanade(x).shape == (2, 0, 2)


@pytest.mark.parametrize("fn", ["spatial", "temporal", "temporal-pyramid"])
def test_demands_invariant_to_scale_and_offset(fn):
    x = moving_pattern(4, 40, 48, (0.4, 0.25)) + 0.05 * torch.randn(
        1, 3, 4, 40, 48, generator=torch.Generator().manual_seed(0)
    )
    if fn == "spatial":
        f = spatial_demand
    elif fn == "temporal":
        f = temporal_demand
    else:

        def f(v):
            return temporal_demand(v, "pyramid")

    a, b = f(x), f(7 * x + 3)
    assert b == pytest.approx(a, rel=1e-4), f"{fn}: demand {a:.6f} for x, {b:.6f} for 7x+3 (rel {abs(b - a) / a:.2e})"


@pytest.mark.parametrize("u", [(3.5, -3.0), (6.0, 2.0)])
def test_pyramid_recovers_large_motion_that_single_level_underestimates(u):
    x = moving_pattern(4, 64, 64, u)
    true = math.hypot(*u)
    single = lucas_kanade(x).norm(dim=-1).mean().item()
    pyr = pyramid_lucas_kanade(x, levels=3)
    err = (pyr - torch.tensor(u)).abs().max().item()
    assert err < 0.06, f"pyramid LK {pyr[0].tolist()} differs from {u} by up to {err:.4f}"
    assert single < true - 0.3, f"single-level |u| = {single:.3f} does not underestimate the true {true:.3f}"
    d_lk = temporal_demand(x, "lk")
    d_pyr = temporal_demand(x, "pyramid", levels=3)
    assert d_pyr == pytest.approx(true / (1 + true), abs=0.01), f"pyramid D_t = {d_pyr:.4f}"
    assert d_pyr > d_lk, f"pyramid D_t {d_pyr:.4f} should exceed the single-level {d_lk:.4f}"


def test_pyramid_with_one_level_is_plain_lk():
    x = moving_pattern(3, 32, 32, (0.5, 0.1))
    a, b = lucas_kanade(x), pyramid_lucas_kanade(x, levels=1)
    assert torch.allclose(a, b, atol=1e-5), f"levels=1 differs from LK by {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize(("d_s", "d_t"), [(0.63, 0.0), (0.2, 0.5), (0.4, 0.4), (0.0, 1.0)])
@pytest.mark.parametrize("alpha", [2.6, 1.0, 10.0])
def test_demand_weights_formula(d_s, d_t, alpha):
    w_s, w_t = demand_weights(d_s, d_t, alpha)
    want = math.exp(alpha * d_s) / (math.exp(alpha * d_s) + math.exp(alpha * d_t))
    assert w_s == pytest.approx(want, abs=1e-12), f"w_s = {w_s}, formula gives {want}"
    assert w_s + w_t == pytest.approx(1.0, abs=1e-15), f"w_s + w_t = {w_s + w_t}"


def test_alpha_default_is_2_6():
    assert DVGOptions().alpha == 2.6
    assert demand_weights(0.6, 0.1) == demand_weights(0.6, 0.1, 2.6)
    w_s, _ = demand_weights(0.6, 0.1)
    assert w_s == pytest.approx(1 / (1 + math.exp(-2.6 * 0.5)), abs=1e-12)


def test_analyse_combines_the_pieces():
    x = moving_pattern(4, 32, 48, (0.5, 0.0))
    d = analyse(x, alpha=3.0)
    assert d.spatial == spatial_demand(x)
    assert d.temporal == temporal_demand(x)
    assert (d.w_s, d.w_t) == demand_weights(d.spatial, d.temporal, 3.0)
    assert set(d.to_dict()) == {"spatial", "temporal", "w_s", "w_t"}


def test_wrong_rank_raises():
    with pytest.raises(ValueError):
        spatial_demand(torch.zeros(3, 4, 5, 6))
    with pytest.raises(ValueError):
        lucas_kanade(torch.zeros(3, 4, 5, 6))
