"""Memory-bounded VAE decode: diffusers' own tile scheduling per VAE class, on one process or split over ranks.

What each diffusers 0.42.1 VAE offers, and what we do with it:

==============================  =====================================  ========================================
VAE class                       diffusers' decode                      here
==============================  =====================================  ========================================
``AutoencoderKLWan``            spatial ``tiled_decode`` (overlap,     the same tiles; each tile decoded frame by
(Wan 2.1 / 2.2)                 ``blend_v``/``blend_h``); time is      frame through the VAE's causal cache, as
                                causal: one latent frame at a time     diffusers does. Time is never split across
                                with a feature cache (memory bounded   ranks: a frame needs the cache of every
                                in time already)                       frame before it, so a split is not exact.
``AutoencoderKLHunyuanVideo``   spatial ``tiled_decode`` and           the same chunks × tiles, every one a unit
                                framewise (temporal) decoding, on by   of work: split over ranks by chunk *and*
                                default: chunks of 16 frames, stride   tile, blended with the VAE's ``blend_t``
                                12, blended with ``blend_t``
``AutoencoderKLHunyuanVideo15`` spatial ``tiled_decode`` (overlap      the same tiles. Time is not tiled: the
(HunyuanVideo-1.5)              factor); no temporal tiling            decoder's causal attention spans all
                                                                       frames of a tile.
``AutoencoderKLLTXVideo``       spatial ``tiled_decode`` (512 px,      the same tiles, each decoded with the
(LTX-Video)                     stride 448); framewise decoding off    pipeline's decode timestep. Time is not
                                by default                             tiled: the decoder is not causal in time.
``AutoencoderKLCogVideoX``       ``decode``: 2 latent frames at a time  the VAE's own ``decode`` as one unit
(CogVideoX)                     through a conv cache; ``tiled_decode`` (tiling on: its own ``tiled_decode``);
                                with its own non-square overlaps       not split over ranks.
==============================  =====================================  ========================================

diffusers' ``tiled_decode`` methods are monolithic (decode every tile, then blend), so this module reproduces only
their *tile scheduling* — which latent boxes, which overlaps, in which order — calls the VAE's own ``decoder``
(and ``post_quant_conv``) per box and blends with the VAE's own ``blend_v`` / ``blend_h`` / ``blend_t``. No
VAE ``forward`` is copied. Two differences from diffusers, neither changing a value: tiles are blended as they
arrive in row-major order, keeping only the previous row of raw tiles (diffusers keeps them all), and pieces are
written into one preallocated output (diffusers concatenates rows, then rows again). The result equals
``vae.decode`` with ``enable_tiling`` at the same settings (tests/test_vae_decode.py).

Distributed decode (xDiT's DistVAE idea): every rank holds the same latent and builds the same plan (a pure
function of the latent shape, the settings and the VAE's config). Unit ``k`` belongs to rank ``k % world``; each
rank decodes its units and sends them to rank 0 (point-to-point, a shape header first, so uneven tile sizes never
meet a gloo gather); rank 0 takes the units in plan order — its own or received — and blends exactly as the
single-process path does. The result equals single-process tiled decode within float round-off.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..models import InputError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ..config import ModelConfig, SamplingConfig
    from ..models import Adapter

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""dtypes a decoded piece may have; its index travels in the header of a sent piece."""


@dataclass(frozen=True)
class TileSettings:
    """How a decode is tiled. Defaults are diffusers' own for all three VAE classes (HunyuanVideo-1.5's
    ``tile_overlap_factor`` 0.25 of 256 px is the same stride 192)."""

    spatial: bool = True
    """Spatial tiling on; off decodes each chunk whole (the VAE's untiled decode)."""
    size: int = 256
    """Tile edge in pixels; a multiple of the VAE's spatial compression."""
    stride: int = 192
    """Pixels between tile starts; neighbours overlap by ``size - stride`` pixels, blended linearly."""
    frames: int = 16
    """Temporal chunk in pixel frames, where the VAE tiles time (HunyuanVideo's framewise decoding)."""
    frame_stride: int = 12
    """Pixel frames between chunk starts; chunks overlap by ``frames - frame_stride`` frames."""

    @classmethod
    def from_config(cls, model: ModelConfig) -> TileSettings:
        return cls(
            model.vae_tiling, model.vae_tile_size, model.vae_tile_stride, model.vae_tile_frames,
            model.vae_tile_frame_stride,
        )  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """One piece of decode work: a latent box ``[t0, t1) × [h0, h1) × [w0, w1)`` decoded on its own."""

    chunk: int
    row: int
    col: int
    t: tuple[int, int]
    h: tuple[int, int]
    w: tuple[int, int]


@dataclass(frozen=True)
class DecodePlan:
    """Which boxes are decoded, and how they are blended back: a pure function of the latent shape, the settings
    and the VAE's config, so every rank derives the same plan without talking."""

    vae_class: str
    latent_shape: tuple[int, ...]
    units: tuple[Unit, ...]
    chunks: int
    rows: int
    cols: int
    tiled: bool
    """Spatially tiled (blend); else each chunk is decoded whole."""
    settings: TileSettings

    def owner(self, k: int, world: int) -> int:
        """The rank that decodes unit ``k`` (round robin in plan order, so rank 0 can blend while others decode)."""
        return k % world

    def describe(self, world: int = 1) -> str:
        s = self.settings
        parts = [f"VAE decode ({self.vae_class}, latent {list(self.latent_shape[2:])}):"]
        if self.tiled:
            parts.append(
                f"spatial tiles {s.size} px, stride {s.stride} (blend {s.size - s.stride} px): "
                f"{self.rows}x{self.cols} tiles"
            )
        else:
            parts.append("spatially untiled")
        if self.chunks > 1:
            parts.append(f"× {self.chunks} temporal chunks of {s.frames} frames, stride {s.frame_stride}")
        n = len(self.units)
        if world > 1:
            counts = [len(range(r, n, world)) for r in range(world)]
            parts.append(f"= {n} units over {world} ranks ({', '.join(map(str, counts))}), gathered on rank 0")
        else:
            parts.append(f"= {n} units on one process")
        return " ".join(parts)


# -- per VAE class: tile geometry, one box's decode, the final transform --------------------------------------------


class _Scheme:
    """One diffusers VAE class's tiled decode, as data plus the calls diffusers makes per tile."""

    temporal = False
    ratio_key = "spatial_compression_ratio"
    """The VAE config key of its spatial compression."""

    timestep = 0.0
    """The decode timestep a timestep-conditioned VAE takes (LTX-Video's ``decode_timestep``)."""

    def __init__(self, vae: Any, settings: TileSettings) -> None:
        self.vae = vae
        self.settings = settings
        self.ratio = int(vae.spatial_compression_ratio)
        self.t_ratio = int(getattr(vae, "temporal_compression_ratio", 4))
        self.check(settings, self.ratio, self.t_ratio)

    @classmethod
    def config_ratios(cls, vae_config: dict[str, Any]) -> tuple[int, int]:
        """(spatial, temporal) compression from the VAE's ``config.json``."""
        return int(vae_config[cls.ratio_key]), int(vae_config.get("temporal_compression_ratio", 4))

    @classmethod
    def check(cls, s: TileSettings, ratio: int, t_ratio: int) -> None:
        """Refuse settings this VAE cannot tile exactly, in one line (the tile size only when tiling is on)."""
        if not s.spatial:
            return
        if s.size < ratio or s.size % ratio:
            raise InputError(
                f"VAE tile size {s.size} px must be a positive multiple of the VAE's spatial compression {ratio}"
            )
        if not 0 < s.stride <= s.size or s.stride % ratio:
            raise InputError(f"VAE tile stride {s.stride} px must be a multiple of {ratio} in (0, tile size {s.size}]")

    @property
    def lat_tile(self) -> int:
        return self.settings.size // self.ratio

    @property
    def lat_stride(self) -> int:
        return self.settings.stride // self.ratio

    @property
    def out_px(self) -> int:
        """Decoder-output pixels per latent pixel, in the space the blending happens in."""
        return self.ratio

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """A spatial tile, raw (before blending), exactly as the VAE's ``tiled_decode`` decodes it."""
        raise NotImplementedError

    def decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        """An untiled box (the whole latent, or one temporal chunk), as the VAE's untiled path decodes it."""
        raise NotImplementedError

    def finish(self, video: torch.Tensor, tiled: bool) -> torch.Tensor:
        """What the VAE applies after blending."""
        return video

    def chunks(self, frames: int) -> list[tuple[int, int]]:
        return [(0, frames)]


class _WanScheme(_Scheme):
    """``AutoencoderKLWan``: tiles decoded one latent frame at a time through the causal feature cache; blending in
    the patchified space when ``patch_size`` is set (Wan 2.2 TI2V), then unpatchify and clamp."""

    ratio_key = "scale_factor_spatial"

    def __init__(self, vae: Any, settings: TileSettings) -> None:
        super().__init__(vae, settings)
        self.patch = vae.config.patch_size

    @property
    def out_px(self) -> int:
        return self.ratio // (self.patch or 1)

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        vae.clear_cache()  # the causal cache is per tile: every tile starts at its first frame
        frames = []
        for k in range(z.shape[2]):
            vae._conv_idx = [0]
            x = vae.post_quant_conv(z[:, :, k : k + 1])
            frames.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(k == 0)))
        vae.clear_cache()
        return torch.cat(frames, dim=2)

    def decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        with _untiled(self.vae):
            return self.vae.decode(z, return_dict=False)[0]  # already unpatchified and clamped

    def finish(self, video: torch.Tensor, tiled: bool) -> torch.Tensor:
        if not tiled:
            return video
        if self.patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=self.patch)
        return video.clamp_(min=-1.0, max=1.0)


class _HunyuanVideoScheme(_Scheme):
    """``AutoencoderKLHunyuanVideo``: ``post_quant_conv`` + ``decoder`` per box; framewise (temporal) chunks when
    the VAE's ``use_framewise_decoding`` is on (diffusers' default) and the latent is longer than one chunk."""

    temporal = True

    @classmethod
    def check(cls, s: TileSettings, ratio: int, t_ratio: int) -> None:
        super().check(s, ratio, t_ratio)
        if s.frames < t_ratio or s.frames % t_ratio:
            raise InputError(
                f"VAE tile frames {s.frames} must be a positive multiple of the VAE's temporal compression {t_ratio}"
            )
        if not 0 < s.frame_stride <= s.frames or s.frame_stride % t_ratio:
            raise InputError(
                f"VAE tile frame stride {s.frame_stride} must be a multiple of {t_ratio} in (0, tile frames {s.frames}]"
            )

    def chunks(self, frames: int) -> list[tuple[int, int]]:
        lat_frames = self.settings.frames // self.t_ratio
        if not (getattr(self.vae, "use_framewise_decoding", False) and frames > lat_frames):
            return [(0, frames)]
        step = self.settings.frame_stride // self.t_ratio
        return [(i, min(i + lat_frames + 1, frames)) for i in range(0, frames, step)]

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(self.vae.post_quant_conv(z))

    decode_whole = decode_tile


class _HunyuanVideo15Scheme(_Scheme):
    """``AutoencoderKLHunyuanVideo15``: ``decoder`` per tile (no ``post_quant_conv``), no temporal tiling."""

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(z)

    decode_whole = decode_tile


class _LTXVideoScheme(_Scheme):
    """``AutoencoderKLLTXVideo``: ``decoder(z, temb)`` per tile (no ``post_quant_conv``), ``temb`` what
    ``LTXPipeline`` passes at its default decode timestep; no temporal tiling (diffusers' framewise decoding is off
    unless asked for, and the decoder is not causal in time). The compression is derived from the config as the class
    derives it (its JSON may leave the ratios null)."""

    @classmethod
    def config_ratios(cls, vae_config: dict[str, Any]) -> tuple[int, int]:
        from ..models.ltx import ltx_vae_scale

        temporal, spatial = ltx_vae_scale(vae_config)
        return spatial, temporal

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        from ..models.ltx import decode_timestep

        return self.vae.decoder(z, decode_timestep(self.vae, z.shape[0], z.dtype, z.device, self.timestep))

    decode_whole = decode_tile


class _CogVideoXScheme(_Scheme):
    """``AutoencoderKLCogVideoX``: its decode is one call of the VAE's own ``decode`` — two latent frames at a time
    through a causal conv cache, and with tiling on diffusers' ``tiled_decode`` at the VAE's own geometry (tiles of
    half its sample size, overlaps of 1/6 of the height and 1/5 of the width: not the square size/stride the other
    VAEs take). So the plan is one unit (rank 0 decodes it under ``vae_parallel``), and ``model.vae_tile_size`` /
    ``vae_tile_stride`` other than the defaults are refused rather than ignored."""

    timestep = 0.0
    """The decode timestep a timestep-conditioned VAE takes (LTX-Video's ``decode_timestep``)."""

    def __init__(self, vae: Any, settings: TileSettings) -> None:
        self.vae = vae
        self.settings = settings
        self.ratio, self.t_ratio = self.config_ratios(dict(vae.config))
        self.check(settings, self.ratio, self.t_ratio)

    @classmethod
    def config_ratios(cls, vae_config: dict[str, Any]) -> tuple[int, int]:
        # As the VAE derives its own latent tile size: one 2x downsampling per block after the first.
        spatial = 2 ** (len(vae_config.get("block_out_channels", (128, 256, 256, 512))) - 1)
        return spatial, int(vae_config.get("temporal_compression_ratio", 4))

    @classmethod
    def check(cls, s: TileSettings, ratio: int, t_ratio: int) -> None:
        default = TileSettings()
        if s.spatial and (s.size, s.stride) != (default.size, default.stride):
            raise InputError(
                "CogVideoX's VAE tiles with its own geometry (diffusers' tiled_decode): model.vae_tile_size and "
                "model.vae_tile_stride do not apply to it; leave them at their defaults or turn tiling off"
            )

    @property
    def lat_tile(self) -> int:
        return 1 << 30  # never tiled here: the VAE tiles inside its own decode

    def decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        was = getattr(vae, "use_tiling", False)
        vae.use_tiling = self.settings.spatial
        try:
            video = vae.decode(z, return_dict=False)[0]
        finally:
            vae.use_tiling = was
        want = (z.shape[3] * self.ratio, z.shape[4] * self.ratio)
        if tuple(video.shape[3:]) != want:
            # diffusers' tiled_decode mis-sizes latents smaller than a few of its tiles; never hand that on.
            raise InputError(
                f"CogVideoX's tiled VAE decode gave {video.shape[4]}x{video.shape[3]} px for a {want[1]}x{want[0]} "
                "video; decode untiled (--no-vae_tiling)"
            )
        return video


SCHEMES: dict[str, type[_Scheme]] = {
    "AutoencoderKLWan": _WanScheme,
    "AutoencoderKLHunyuanVideo": _HunyuanVideoScheme,
    "AutoencoderKLHunyuanVideo15": _HunyuanVideo15Scheme,
    "AutoencoderKLLTXVideo": _LTXVideoScheme,
    "AutoencoderKLCogVideoX": _CogVideoXScheme,
}
"""VAE class name → its tiled-decode scheme."""


@contextlib.contextmanager
def _untiled(vae: Any) -> Iterator[None]:
    """The VAE's untiled decode path for one call, whatever ``enable_tiling`` set before."""
    was = getattr(vae, "use_tiling", False)
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = was


def check_tiling(settings: TileSettings, vae_config: dict[str, Any]) -> None:
    """Refuse tile settings the checkpoint's VAE cannot take, from its ``vae/config.json`` alone — so a bad
    ``--set model.vae_tile_size`` fails before any weight loads, not after the denoising. Unknown VAE classes pass
    (the decode then says it has no scheme)."""
    cls = SCHEMES.get(str(vae_config.get("_class_name")))
    if cls is not None:
        cls.check(settings, *cls.config_ratios(vae_config))


def scheme_for(vae: Any, settings: TileSettings) -> _Scheme:
    """The scheme of ``vae``'s class; validates ``settings`` against it (one-line :class:`InputError`)."""
    cls = SCHEMES.get(type(vae).__name__)
    if cls is None:
        raise InputError(f"no tiled-decode scheme for {type(vae).__name__}; known: {', '.join(SCHEMES)}")
    return cls(vae, settings)


def make_plan(scheme: _Scheme, latent_shape: tuple[int, ...]) -> DecodePlan:
    """diffusers' tile scheduling: which boxes, in which order (chunk-major, then row-major tiles)."""
    if len(latent_shape) != 5:
        raise InputError(f"VAE decode takes a [B, C, T, H, W] latent; got shape {list(latent_shape)}")
    _, _, frames, height, width = latent_shape
    tile, step = scheme.lat_tile, scheme.lat_stride
    tiled = scheme.settings.spatial and (width > tile or height > tile)
    rows = range(0, height, step) if tiled else range(1)
    cols = range(0, width, step) if tiled else range(1)
    chunks = scheme.chunks(frames)
    units = tuple(
        Unit(c, r, q, t, (i, min(i + tile, height) if tiled else height), (j, min(j + tile, width) if tiled else width))
        for c, t in enumerate(chunks)
        for r, i in enumerate(rows)
        for q, j in enumerate(cols)
    )
    return DecodePlan(
        type(scheme.vae).__name__, tuple(latent_shape), units, len(chunks), len(rows), len(cols), tiled,
        scheme.settings,
    )  # fmt: skip


# -- blending, streamed ---------------------------------------------------------------------------------------------


def _tail(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """A copy of the last ``n`` entries of ``x`` along ``dim`` (all of them when shorter; none when ``n`` is 0).

    diffusers' ``blend_v`` / ``blend_h`` / ``blend_t`` read only the last ``min(len(a), len(b), extent)`` entries of
    the tile before, and take that min over ``a``'s length too — so passing this tail instead of the whole tile gives
    the same values while the rest of the tile is freed."""
    size = x.shape[dim]
    return x.narrow(dim, size - min(n, size), min(n, size)).clone()


class _SpatialBlender:
    """diffusers' ``tiled_decode`` blend loop fed one raw tile at a time in row-major order. Blends are in place on
    the incoming tile with the (already blended) tile above and to the left, as in diffusers. Kept between tiles:
    only what later blends read (the bottom ``blend`` rows of the previous row's tiles, the right ``blend`` columns
    of the tile to the left); each tile's ``stride × stride`` corner goes straight into the output."""

    def __init__(self, scheme: _Scheme, plan: DecodePlan) -> None:
        self.vae, self.cols = scheme.vae, plan.cols
        px = scheme.out_px
        self.blend = (scheme.settings.size - scheme.settings.stride) // (scheme.ratio // px)
        self.keep = scheme.lat_stride * px
        _, _, _, height, width = plan.latent_shape
        self.out_hw = (height * px, width * px)
        self.above: list[torch.Tensor] = []  # bottom strips of the previous row's tiles, blended
        self.below: list[torch.Tensor] = []  # the same for this row, for the next one
        self.left: torch.Tensor | None = None  # right strip of the tile to the left, blended
        self.out: torch.Tensor | None = None
        self.y = self.x = 0

    def add(self, unit: Unit, tile: torch.Tensor) -> torch.Tensor | None:
        """Blend ``tile``; returns the chunk's video once its last tile arrived."""
        i, j = unit.row, unit.col
        if i > 0:
            tile = self.vae.blend_v(self.above[j], tile, self.blend)
        if j > 0:
            assert self.left is not None
            tile = self.vae.blend_h(self.left, tile, self.blend)
        # Strips are taken after this tile's own blends (they modify its top rows and left columns, strips included)
        # and nothing modifies the tile after: it is only ever the "a" of later blends.
        self.below.append(_tail(tile, -2, self.blend))
        self.left = _tail(tile, -1, self.blend)
        piece = tile[:, :, :, : self.keep, : self.keep]
        if self.out is None:
            self.out = tile.new_empty((*tile.shape[:3], *self.out_hw))
        ph, pw = piece.shape[-2:]
        self.out[:, :, :, self.y : self.y + ph, self.x : self.x + pw] = piece
        self.x += pw
        if j == self.cols - 1:
            if self.x != self.out_hw[1]:
                raise RuntimeError(f"tile row {i} filled {self.x} of {self.out_hw[1]} columns")  # a scheduling bug
            self.y, self.x = self.y + ph, 0
            self.above, self.below = self.below, []
            if self.y == self.out_hw[0]:
                return self.out
        return None


class _Assembler:
    """Rank 0's side: takes decoded units in plan order and returns the finished video."""

    def __init__(self, scheme: _Scheme, plan: DecodePlan) -> None:
        self.scheme, self.plan = scheme, plan
        self.blender: _SpatialBlender | None = None
        self.prev: torch.Tensor | None = None  # the previous chunk's last frames, blended (what blend_t reads)
        self.out: torch.Tensor | None = None
        self.frame = 0
        self.video: torch.Tensor | None = None

    def add(self, unit: Unit, piece: torch.Tensor) -> None:
        if self.plan.tiled:
            if self.blender is None:
                self.blender = _SpatialBlender(self.scheme, self.plan)
            chunk = self.blender.add(unit, piece)
            if chunk is None:
                return
            self.blender = None
        else:
            chunk = piece
        if self.plan.chunks == 1:
            self.video = chunk
        else:
            self._add_chunk(unit.chunk, chunk)

    def _add_chunk(self, c: int, video: torch.Tensor) -> None:
        """``_temporal_tiled_decode``'s loop, one chunk at a time: drop the chunk's first frame (the previous chunk
        decoded it), blend with the previous chunk, keep ``frame_stride`` frames (+1 for the first chunk)."""
        s = self.scheme.settings
        scheme = self.scheme
        assert isinstance(scheme, _HunyuanVideoScheme)
        if c > 0:
            assert self.prev is not None
            video = scheme.vae.blend_t(self.prev, video[:, :, 1:], s.frames - s.frame_stride)
        keep = video[:, :, : s.frame_stride + (1 if c == 0 else 0)]
        if self.out is None:
            total = (self.plan.latent_shape[2] - 1) * scheme.t_ratio + 1
            self.out = video.new_empty((video.shape[0], video.shape[1], total, *video.shape[3:]))
        n = min(keep.shape[2], self.out.shape[2] - self.frame)
        self.out[:, :, self.frame : self.frame + n] = keep[:, :, :n]
        self.frame += n
        self.prev = _tail(video, 2, s.frames - s.frame_stride)
        if c == self.plan.chunks - 1:
            self.video, self.prev = self.out, None

    def result(self) -> torch.Tensor:
        if self.video is None:
            raise RuntimeError("VAE decode ended before every unit arrived")  # a scheduling bug, never user input
        return self.scheme.finish(self.video, self.plan.tiled)


# -- running a plan -------------------------------------------------------------------------------------------------


def _decode_unit(scheme: _Scheme, plan: DecodePlan, z: torch.Tensor, unit: Unit) -> torch.Tensor:
    box = z[:, :, unit.t[0] : unit.t[1], unit.h[0] : unit.h[1], unit.w[0] : unit.w[1]]
    return scheme.decode_tile(box) if plan.tiled else scheme.decode_whole(box)


def _send(piece: torch.Tensor, group: ProcessGroup | None) -> None:
    header = torch.tensor([*piece.shape, _DTYPES.index(piece.dtype)], dtype=torch.int64, device=piece.device)
    dist.send(header, group_dst=0, group=group)
    dist.send(piece.contiguous(), group_dst=0, group=group)


def _recv(src: int, group: ProcessGroup | None, device: torch.device) -> torch.Tensor:
    header = torch.empty(6, dtype=torch.int64, device=device)
    dist.recv(header, group_src=src, group=group)
    *shape, dtype = header.tolist()
    piece = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
    dist.recv(piece, group_src=src, group=group)
    return piece


def decode_video(
    vae: Any,
    z: torch.Tensor,
    tiling: TileSettings | None = None,
    *,
    parallel: bool = False,
    group: ProcessGroup | None = None,
    timestep: float = 0.0,
) -> torch.Tensor | None:
    """VAE-input latent ``[B, C, T, H, W]`` → the VAE's video ``[B, 3, F, H', W']`` (what ``vae.decode`` returns).

    ``tiling`` None decodes spatially untiled (HunyuanVideo still in framewise chunks, as diffusers does by default).
    ``parallel``: split the units over the ranks of ``group`` (default: the world); every rank must call this with
    the same latent; rank 0 returns the video, the others None. Without ``parallel`` the caller decodes alone.
    """
    settings = tiling or TileSettings(spatial=False)
    scheme = scheme_for(vae, settings)
    scheme.timestep = timestep
    plan = make_plan(scheme, tuple(z.shape))
    world = dist.get_world_size(group) if parallel else 1
    rank = dist.get_rank(group) if parallel else 0
    if rank == 0:
        logger.info("%s", plan.describe(world))
    asm = _Assembler(scheme, plan) if rank == 0 else None
    # Every rank walks the same plan in the same order, so every send has its receive: the plan is a function of
    # the latent's shape and the settings alone, never of anything rank-local (that would be a hang).
    with torch.no_grad():
        for k, unit in enumerate(plan.units):
            owner = plan.owner(k, world)
            if rank != owner and rank != 0:
                continue
            piece = _decode_unit(scheme, plan, z, unit) if rank == owner else _recv(owner, group, z.device)
            if asm is not None:
                asm.add(unit, piece)
            else:
                _send(piece, group)
            del piece
        return asm.result() if asm is not None else None


def decode_latent(
    adapter: Adapter,
    latent: torch.Tensor,
    *,
    tiling: TileSettings | None = None,
    parallel: bool = False,
    group: ProcessGroup | None = None,
    sampling: SamplingConfig | None = None,
    generators: list[torch.Generator] | None = None,
) -> np.ndarray | None:
    """The pipeline's latent → uint8 frames ``[B, F, H, W, 3]`` (the adapter's scaling, its decode-time noise and
    timestep under ``sampling``, and postprocessing around :func:`decode_video`). With ``parallel``, every rank of
    ``group`` must call it (with the same ``generators``); rank 0 gets the frames, the others None. ``tiling`` None
    is the VAE's untiled decode."""
    vae = adapter.pipe.vae
    z = adapter.vae_input(latent.to(vae.device, vae.dtype))
    timestep = 0.0
    if sampling is not None:
        z, timestep = adapter.decode_input(z, sampling, generators)
    video = decode_video(vae, z, tiling, parallel=parallel, group=group, timestep=timestep)
    return None if video is None else adapter.postprocess(video)
