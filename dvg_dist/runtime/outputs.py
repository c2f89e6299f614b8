"""Writing results atomically: every file appears whole (temp file + rename) or not at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str) -> None:
    """Write through a temp file in the same directory, then ``os.replace`` onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private to the writer
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """uint8 frames ``[F, H, W, 3]`` as H.264 mp4 (the ffmpeg that imageio-ffmpeg ships)."""
    import imageio_ffmpeg

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3]; got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    # yuv420p needs even sides; pad by edge replication rather than rescale.
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", macro_block_size=1,
            pix_fmt_out="yuv420p", quality=8, ffmpeg_log_level="error",
        )  # fmt: skip
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    atomic_write(path, write, ".mp4")


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2) + "\n")

    atomic_write(path, write, ".json")


def write_latent(path: Path, latent: torch.Tensor) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({"latent": latent.detach().cpu().contiguous()}, str(tmp)), ".safetensors")


def output_name(prompt: str, seed: int, mode: str, index: int | None = None) -> str:
    """A readable, filesystem-safe name: ``<slug of prompt>_s<seed>_<mode>`` (+ ``_<index>`` in a batch file)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    name = f"{slug}_s{seed}_{mode}"
    return f"{index:04d}_{name}" if index is not None else name
