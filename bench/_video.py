"""Video comparison helpers for the benchmarks: PSNR, SSIM, an object's trajectory by colour, a contact sheet.

Conventions (bench/fidelity.py documents them in its output):
- PSNR over all frames, pixels and RGB channels of two uint8 videos, peak 255; identical videos give infinity.
- SSIM: Wang et al. 2004 — 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, on the BT.601 luma
  ``Y = 0.299 R + 0.587 G + 0.114 B``, over the valid region (no padding), averaged over pixels then frames.
- Trajectories: continuous pixel coordinates, pixel (i, j) covering ``[j, j+1) × [i, i+1)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MIN_PIXELS = 4
"""Fewest matching pixels for an object to count as found in a frame."""
SHEET_FRAMES = 6
SHEET_TILE = 128
SHEET_LABEL_W = 190
SHEET_HEADER_H = 18
SHEET_PAD = 4


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two uint8 videos of equal shape; ``inf`` when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def luma(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` → float64 BT.601 luma ``[N, 1, H, W]``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float64)
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return y.reshape(-1, 1, *y.shape[-2:])


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5, peak: float = 255.0) -> float:
    """Mean SSIM of two uint8 videos ``[F, H, W, 3]`` (or images ``[H, W, 3]``) on luma; 1 when identical."""
    x, y = luma(a), luma(b)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size}; got {tuple(x.shape[-2:])}")
    g = _gaussian(size, sigma)
    gh, gw = g.view(1, 1, size, 1), g.view(1, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh), gw)  # separable, valid region

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())


def centroids(frames: np.ndarray, colour: tuple[int, int, int], tol: float) -> np.ndarray:
    """Per frame, the (x, y) centroid of the pixels within ``tol`` (RGB distance) of ``colour``; NaN where fewer
    than ``MIN_PIXELS`` match. Continuous pixel coordinates, as the dataset's trajectories: pixel (i, j) covers
    ``[j, j+1) × [i, i+1)``, so its centre is ``(j + 0.5, i + 0.5)``."""
    dist = np.linalg.norm(frames.astype(np.float64) - np.asarray(colour, np.float64), axis=-1)  # [F, H, W]
    mask = dist <= tol
    count = mask.sum(axis=(1, 2)).astype(np.float64)
    ys, xs = np.arange(frames.shape[1]) + 0.5, np.arange(frames.shape[2]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(axis=1) * xs).sum(axis=1) / count
        cy = (mask.sum(axis=2) * ys).sum(axis=1) / count
    out = np.stack([cx, cy], axis=1)
    out[count < MIN_PIXELS] = np.nan
    return out


def trajectory_error(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean Euclidean distance (pixels) of two ``[F, 2]`` trajectories over the frames where both exist."""
    both = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    return float(np.linalg.norm(a[both] - b[both], axis=1).mean()) if both.any() else None


def as_json_number(value: float | None) -> float | str | None:
    """Finite floats as they are; infinities as ``"inf"`` (JSON has none)."""
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def sheet_size(blocks: int, rows: int, cols: int, tile_w: int, tile_h: int) -> tuple[int, int]:
    """(width, height) of the contact sheet in pixels."""
    width = SHEET_LABEL_W + cols * (tile_w + SHEET_PAD) + SHEET_PAD
    height = blocks * (SHEET_HEADER_H + rows * (tile_h + SHEET_PAD)) + SHEET_PAD
    return width, height


def contact_sheet(
    blocks: list[tuple[str, list[tuple[str, np.ndarray]]]], path: Path, cols: int = SHEET_FRAMES
) -> tuple[int, int]:
    """A PNG: per block a header line, then one labelled row of ``cols`` evenly spaced frames per video."""
    from PIL import Image, ImageDraw

    first = blocks[0][1][0][1]
    n_frames, height, width = first.shape[:3]
    scale = max(1, SHEET_TILE // height)
    tile_w, tile_h = width * scale, height * scale
    n_rows = max(len(videos) for _, videos in blocks)
    size = sheet_size(len(blocks), n_rows, cols, tile_w, tile_h)
    sheet = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    picks = np.linspace(0, n_frames - 1, cols).round().astype(int)
    y = SHEET_PAD
    for header, videos in blocks:
        draw.text((SHEET_PAD, y + 3), header[: size[0] // 6], fill=(0, 0, 0))
        y += SHEET_HEADER_H
        for label, frames in videos:
            for i, line in enumerate(label.split("\n")):
                draw.text((SHEET_PAD, y + 4 + 12 * i), line, fill=(0, 0, 0))
            for j, f in enumerate(picks):
                tile = Image.fromarray(frames[f]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
                sheet.paste(tile, (SHEET_LABEL_W + j * (tile_w + SHEET_PAD), y))
            y += tile_h + SHEET_PAD
        y += (n_rows - len(videos)) * (tile_h + SHEET_PAD)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return size
