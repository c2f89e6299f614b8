"""An exact denoiser: the ideal flow-matching model of a finite set of procedural clips, as a diffusers module.

This module owns the second fidelity reference (docs/fidelity-exact.md): a model with no weaknesses of its own,
so that what a DVG run loses against the full run is the algorithm's doing alone.

**The model.** For a finite dataset ``{x0_i}`` and WanPipeline's flow convention ``x_σ = (1-σ)·x0 + σ·ε``, the
velocity that minimises the flow-matching loss is known in closed form. With the posterior weights

    w_i(x_σ) ∝ exp(-|x_σ - (1-σ)·x0_i|² / (2σ²))         (softmax; float64, log-sum-exp)

``E[x0 | x_σ] = Σ w_i·x0_i`` and the velocity is ``v = (x_σ - E[x0 | x_σ]) / σ``, the model output ``v ≈ ε - x0``
the Wan adapter expects. As σ → 0 the weights collapse on the dataset latent nearest to ``x_σ``, so a converged
sampler ends exactly on a dataset clip.

**At every grid.** A DVG stage calls the model on a reduced grid (fewer frames, fewer latent pixels).
:class:`ExactDenoiser` then uses the dataset resized to that grid with DVG's own :func:`dvg_dist.dvg.resize.resize`
(the mode in its config: ``area-anchor``, the sampler's default, which is also what the demo trainer resizes its
training latents with). It is the ideal model *of that grid*: what a network trained on the resized data would
converge to. The resized copies are cached per grid.

**The dataset** (:func:`build_dataset`). Each caption of :mod:`dvg_dist.data.procedural` fixes its clip exactly,
so a one-clip-per-caption dataset would leave the model nothing to decide: its posterior would be one clip at any
noise, and every sampler would land on it. So each caption comes in ``variants`` renderings that differ in what
the caption does not say (:class:`Variant`): where the object's straight path runs (a continuous offset of up to
``max_offset`` px in x and y) and the phase of a textured background (a shift by whole 4-px VAE cells within the
pattern's period). Variant 0 is :func:`procedural.make_clip`'s own rendering. This is the decision a real model
also makes from the noise: Wan has no absolute position signal, so where the object goes and which phase a
checkerboard takes are symmetries that the noise breaks. Clips are encoded with the demo pipeline's VAE and
normalised with its ``latents_mean`` / ``latents_std`` (the latents the pipeline denoises), and cached under
``build/exact/`` keyed by every setting and the VAE's weights.

**Text conditioning.** The module holds the embedding of each dataset caption, computed with the pipeline's own
``encode_prompt`` (the Wan adapter's call). A prompt whose embedding matches one of them (relative L2 distance
below ``match_tol``) conditions the posterior on that caption's variants; any other prompt, including the empty
negative prompt of a CFG pass, gets the whole dataset: the ideal unconditional model. Guidance 1 (no CFG) is the
exact conditional model; a guidance above 1 combines the two passes as for any Wan model.

**Timesteps.** The Wan adapter passes UniPC's timesteps as int64, ``⌊1000·σ⌋`` (diffusers truncates), and
FlowMatchEuler's as float ``1000·σ``. The module reads ``σ = (t + integer_timestep_offset) / 1000`` for integer
timesteps (offset 0.5: the middle of the truncation interval, within 5e-4 of the scheduler's σ) and ``t / 1000``
for float ones.

:func:`exact_pipeline` assembles a real ``WanPipeline`` around it (the demo model's tokenizer, text encoder, VAE
and scheduler), which the engine and :class:`dvg_dist.DVG` drive through the unchanged Wan adapter. The closed
forms of the demo's hand-set VAE (:func:`block_encode`, :func:`block_decode`) stand in for the real one where
thousands of videos make its frame-by-frame causal convolutions too slow; they agree with it to 2e-4 (tested,
and checked again by the benchmark on its own videos).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..dvg.options import ResizeMode
from ..dvg.planner import Grid
from ..dvg.resize import resize
from . import procedural
from .procedural import COLOURS, Clip, ClipParams, parse_caption

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the rendering or the encoding changes: it is part of every cache key."""
GROUPS = 4
"""Pixel frames per latent frame of the demo's fixed VAE (one RGB group each)."""
CELL = 4
"""Pixels per latent pixel of the demo's fixed VAE; background phases move by whole cells."""


# --- the dataset ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """What one rendering of a caption adds to it: the object's path offset and the background's phase."""

    offset_x: float = 0.0
    """Pixels added to the object's x along its whole path."""
    offset_y: float = 0.0
    phase_x: int = 0
    """Pixels the background pattern is shifted by in x (a multiple of :data:`CELL`; 0 for plain)."""
    phase_y: int = 0


def render_variant(p: ClipParams, variant: Variant, frames: int, height: int, width: int) -> Clip:
    """``p`` rendered as :func:`procedural.make_clip` does, with the object's path shifted by the variant's offset
    and the (periodic) background rolled by its phase; the clip's trajectory is the shifted path."""
    background = procedural._background(p, height, width)
    if variant.phase_x or variant.phase_y:
        background = np.roll(background, (variant.phase_y, variant.phase_x), axis=(0, 1))
    radius = procedural.OBJECT_RADIUS * min(height, width) / procedural.REFERENCE_SIZE
    path = procedural.trajectory(p, frames, height, width).astype(np.float64)
    path += np.array([variant.offset_x, variant.offset_y])
    cover = [procedural._coverage(p, float(cx), float(cy), radius, height, width) for cx, cy in path]
    alpha = np.stack(cover).astype(np.float32)[..., None]
    colour = np.array(COLOURS[p.colour], dtype=np.float32)
    out = np.rint(background * (1 - alpha) + colour * alpha).astype(np.uint8)
    return Clip(out, procedural.caption_of(p), p, path.astype(np.float32))


def sample_variants(
    p: ClipParams, n: int, max_offset: float, rng: np.random.Generator, height: int = 64, width: int = 64
) -> list[Variant]:
    """``n`` distinct variants of ``p``: variant 0 the canonical rendering, the others a uniform offset in
    ``[-max_offset, max_offset]²`` and, on a pattern, a phase of whole :data:`CELL`-px steps within its period (two
    pattern cells). Two variants with the same phase keep their offsets at least 2 px apart (no near-duplicates)."""
    cell = 0 if p.scale is None else max(1, round(procedural.SCALES[p.scale] * min(height, width) / 64))
    phases = [0] if cell == 0 else list(range(0, 2 * cell, CELL)) or [0]
    out = [Variant()]
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 10_000:
            raise ValueError(f"cannot place {n} variants 2 px apart within ±{max_offset} px; raise max_offset")
        ox, oy = (float(v) for v in np.round(rng.uniform(-max_offset, max_offset, size=2), 2))
        px = int(rng.choice(phases))
        py = 0 if p.pattern == "striped" else int(rng.choice(phases))  # vertical stripes: y-phase is nothing
        if any((v.phase_x, v.phase_y) == (px, py) and math.hypot(v.offset_x - ox, v.offset_y - oy) < 2 for v in out):
            continue
        out.append(Variant(ox, oy, px, py))
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a dataset depends on besides the VAE (all of it goes into the cache key)."""

    captions: tuple[str, ...]
    variants: int = 12
    """Renderings per caption (variant 0 is the canonical one)."""
    max_offset: float = 10.0
    """Largest path offset in pixels, per axis."""
    seed: int = 0
    frames: int = 33
    height: int = 64
    width: int = 64
    encoder: str = "vae"
    """``vae``: the pipeline's VAE; ``block``: :func:`block_encode`, its closed form (for tests)."""

    def __post_init__(self) -> None:
        if not self.captions or self.variants < 1 or self.max_offset < 0:
            raise ValueError("need at least one caption, variants >= 1 and max_offset >= 0")
        if self.encoder not in ("vae", "block"):
            raise ValueError(f"encoder must be vae or block; got {self.encoder!r}")
        for c in self.captions:
            parse_caption(c)


@dataclass
class ExactDataset:
    """The clips, their latents and what is known about each: caption, variant, path."""

    spec: DatasetSpec
    latents: torch.Tensor
    """float32 ``[N, C, T, H, W]``, normalised as the pipeline denoises them: ``(z - latents_mean) / latents_std``."""
    clip_caption: torch.Tensor
    """int64 ``[N]``: the caption index of each clip (into ``spec.captions``)."""
    variants: list[Variant]
    trajectories: np.ndarray
    """float32 ``[N, F, 2]``: each clip's object centre (x, y) per frame, in pixels."""
    key: str = ""
    """The cache key (settings, VAE weights, :data:`CACHE_VERSION`)."""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def captions(self) -> tuple[str, ...]:
        return self.spec.captions

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def clips_of(self, caption: int) -> list[int]:
        return [int(i) for i in torch.nonzero(self.clip_caption == caption).flatten()]

    def clip(self, index: int) -> Clip:
        """Clip ``index`` rendered again (the frames are not stored)."""
        s = self.spec
        p = parse_caption(s.captions[int(self.clip_caption[index])])
        return render_variant(p, self.variants[index], s.frames, s.height, s.width)

    def nearest(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each ``[B, C, T, H, W]`` full-size latent: the index of the nearest dataset latent and the L2
        distance to it."""
        d = torch.cdist(latents.flatten(1).double(), self.latents.flatten(1).double())
        dist, idx = d.min(dim=1)
        return idx, dist

    def separation(self) -> torch.Tensor:
        """``[N]``: each clip's L2 distance to the nearest other clip (the scale "landed on a clip" reads on)."""
        d = torch.cdist(self.latents.flatten(1).double(), self.latents.flatten(1).double())
        d.fill_diagonal_(math.inf)
        return d.min(dim=1).values


def block_encode(video: torch.Tensor) -> torch.Tensor:
    """The demo's fixed VAE (``train.fixed_vae``) in closed form: ``[B, 3, F, H, W]`` in [-1, 1] → the raw latent
    ``[B, 12, T, H/4, W/4]``. Latent frame 0 holds the 4×4 mean of pixel frame 0 in all four RGB groups; frame
    ``k ≥ 1`` holds pixel frames ``4k-3 … 4k`` as groups 0–3."""
    b, c, f, h, w = video.shape
    if c != 3 or (f - 1) % GROUPS or h % CELL or w % CELL:
        raise ValueError(f"expected [B, 3, 4k+1, 4m, 4n] video; got {tuple(video.shape)}")
    pooled = F.avg_pool3d(video, (1, CELL, CELL))
    first = pooled[:, :, :1].repeat(1, GROUPS, 1, 1, 1)
    rest = pooled[:, :, 1:].reshape(b, 3, (f - 1) // GROUPS, GROUPS, h // CELL, w // CELL)
    rest = rest.permute(0, 3, 1, 2, 4, 5).reshape(b, 3 * GROUPS, (f - 1) // GROUPS, h // CELL, w // CELL)
    return torch.cat([first, rest], dim=2)


def block_decode(z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`block_encode` up to the pooling, as the fixed VAE decodes: raw latent → video
    ``[B, 3, 4(T-1)+1, 4H, 4W]``, each latent pixel repeated over its 4×4 block (frame 0 from group 0)."""
    b, c, t, h, w = z.shape
    if c != 3 * GROUPS:
        raise ValueError(f"expected {3 * GROUPS} latent channels; got {c}")
    first = z[:, :3, :1]
    rest = z[:, :, 1:].reshape(b, GROUPS, 3, t - 1, h, w).permute(0, 2, 3, 1, 4, 5)
    rest = rest.reshape(b, 3, (t - 1) * GROUPS, h, w)
    video = torch.cat([first, rest], dim=2)
    return video.repeat_interleave(CELL, dim=3).repeat_interleave(CELL, dim=4)


def vae_statistics(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel ``latents_mean`` and ``latents_std`` as ``[1, C, 1, 1, 1]`` float64 tensors."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    return mean, std


def frames_of(latents: torch.Tensor, vae: Any) -> np.ndarray:
    """Normalised latents ``[B, C, T, H, W]`` → uint8 frames ``[B, F, H, W, 3]`` through :func:`block_decode`:
    the Wan adapter's un-normalisation, then the arithmetic of diffusers' ``postprocess_video`` (``x/2 + 0.5``
    clamped to [0, 1]) and the adapter's rounding to uint8."""
    mean, std = vae_statistics(vae)
    z = latents.double() * std + mean
    video = (block_decode(z) / 2 + 0.5).clamp(0, 1)
    frames = video.permute(0, 2, 3, 4, 1).float().numpy()
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _vae_fingerprint(vae: Any) -> str:
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_key(spec: DatasetSpec, vae: Any) -> str:
    """The cache key of ``spec`` encoded by ``vae``."""
    payload = json.dumps({"spec": asdict(spec), "vae": _vae_fingerprint(vae), "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def build_dataset(spec: DatasetSpec, vae: Any, cache_dir: str | Path | None = None, batch: int = 32) -> ExactDataset:
    """Render every (caption, variant), encode it with ``vae`` (or its closed form, ``spec.encoder = block``) and
    normalise it with the VAE's statistics. With ``cache_dir`` the latents are stored there under the dataset's key
    and read back on the next call with the same settings and VAE."""
    import time

    key = dataset_key(spec, vae)
    path = None if cache_dir is None else Path(cache_dir) / f"exact-dataset-{key}.pt"
    variants: list[Variant] = []
    clip_caption: list[int] = []
    trajectories: list[np.ndarray] = []
    videos: list[np.ndarray] = []
    for ci, caption in enumerate(spec.captions):
        p = parse_caption(caption)
        rng = np.random.default_rng([spec.seed, ci, CACHE_VERSION])
        for v in sample_variants(p, spec.variants, spec.max_offset, rng, spec.height, spec.width):
            clip = render_variant(p, v, spec.frames, spec.height, spec.width)
            variants.append(v)
            clip_caption.append(ci)
            trajectories.append(clip.trajectory)
            if path is None or not path.is_file():
                videos.append(clip.video())
    info: dict[str, Any] = {}
    if path is not None and path.is_file():
        stored = torch.load(path, weights_only=True)
        latents = stored["latents"]
        info = {**stored.get("info", {}), "cache": "read", "cache_path": str(path)}
    else:
        start = time.perf_counter()
        mean, std = vae_statistics(vae)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(videos), batch):
                video = torch.from_numpy(np.stack(videos[i : i + batch]))
                if spec.encoder == "block":
                    z = block_encode(video.double())
                else:
                    z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().cpu().double()
                chunks.append(((z - mean) / std).float())
        latents = torch.cat(chunks)
        info = {"encode_s": time.perf_counter() - start, "cache": "written" if path is not None else "none"}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"latents": latents, "info": {"encode_s": info["encode_s"]}, "spec": asdict(spec)}, tmp)
            tmp.replace(path)
            info["cache_path"] = str(path)
    expected = (len(variants), 3 * GROUPS)
    if tuple(latents.shape[:2]) != expected:
        raise ValueError(f"cached latents {tuple(latents.shape)} do not match {expected} clips x channels")
    return ExactDataset(spec, latents, torch.tensor(clip_caption), variants, np.stack(trajectories), key, info)


# --- the model ------------------------------------------------------------------------------------------------


class ExactDenoiser(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """The posterior-mean flow velocity of a finite latent dataset, in ``WanTransformer3DModel``'s place.

    Called as the Wan adapter calls a transformer: ``module(hidden_states=[B, C, T, H, W], timestep=[B],
    encoder_hidden_states=[B, L, D], return_dict=False)[0]`` is the velocity ``[B, C, T, H, W]`` on the grid of
    ``hidden_states``. The config carries what the engine reads of a Wan transformer (``patch_size``,
    ``in_channels``, ``num_attention_heads``, ``attention_head_dim``, ``ffn_dim``, ``image_dim``): the demo
    transformer's values, so the planner's FLOP model is the demo's. The dataset is in buffers (saved with the
    module); the arithmetic is float64 whatever the module's dtype.
    """

    @register_to_config
    def __init__(
        self,
        num_clips: int = 1,
        num_captions: int = 1,
        in_channels: int = 12,
        out_channels: int = 12,
        num_frames: int = 9,
        height: int = 16,
        width: int = 16,
        text_len: int = 512,
        text_dim: int = 32,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        ffn_dim: int = 512,
        num_layers: int = 8,
        image_dim: int | None = None,
        resize_mode: str = ResizeMode.AREA_ANCHOR.value,
        timestep_scale: float = 1000.0,
        integer_timestep_offset: float = 0.5,
        match_tol: float = 1e-4,
        min_sigma: float = 1e-6,
    ) -> None:
        super().__init__()
        ResizeMode(resize_mode)  # refuse an unknown mode now
        if in_channels != out_channels:
            raise ValueError("the exact denoiser takes the latent alone (in_channels = out_channels; no I2V)")
        shape = (num_clips, in_channels, num_frames, height, width)
        self.register_buffer("latents", torch.zeros(shape))
        self.register_buffer("caption_embeddings", torch.zeros(num_captions, text_len, text_dim))
        self.register_buffer("clip_caption", torch.zeros(num_clips, dtype=torch.long))
        self._grids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._reference: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self._match_memo: tuple[Any, list[int]] | None = None
        self.last_match: list[int] = []
        """Per batch element of the last call: the matched caption index, or -1 (the whole dataset)."""
        self.seen_grids: set[tuple[int, int, int]] = set()
        """Every (T, H, W) the module has been called on."""
        self.trace: list[dict[str, Any]] | None = None
        """Set to a list to record every call: its grid, σ, and per batch element the clip of largest posterior
        weight and that weight (when the sampler commits to a clip, and at which stage)."""

    @classmethod
    def from_dataset(
        cls, latents: torch.Tensor, clip_caption: torch.Tensor, caption_embeddings: torch.Tensor, **config: Any
    ) -> ExactDenoiser:
        """A denoiser over ``latents [N, C, T, H, W]`` whose clip ``i`` belongs to caption ``clip_caption[i]``,
        caption ``k`` having the prompt embedding ``caption_embeddings[k]`` (``[K, L, D]``)."""
        n, c, t, h, w = latents.shape
        k, length, dim = caption_embeddings.shape
        if clip_caption.shape != (n,) or int(clip_caption.min()) < 0 or int(clip_caption.max()) >= k:
            raise ValueError(f"clip_caption must be [{n}] indices into {k} captions")
        model = cls(
            num_clips=n, num_captions=k, in_channels=c, out_channels=c, num_frames=t, height=h, width=w,
            text_len=length, text_dim=dim, **config,
        )  # fmt: skip
        with torch.no_grad():
            model.latents.copy_(latents)
            model.caption_embeddings.copy_(caption_embeddings)
            model.clip_caption.copy_(clip_caption)
        return model

    @property
    def _config(self) -> Any:
        """The registered config (attribute access; typed loosely, as diffusers' ``FrozenDict``)."""
        return self.config

    # -- the dataset at a grid ---------------------------------------------------------------------------------

    def data_at(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset resized to ``grid`` with DVG's resize, flattened: float64 ``[N, D]`` and its squared
        norms ``[N]`` (cached per grid and device)."""
        key = (*grid, self.latents.device, self.latents.data_ptr())
        hit = self._grids.get(key)
        if hit is None:
            full = self.latents.double()
            y = resize(full, Grid(*grid), self._config.resize_mode).flatten(1).contiguous()
            hit = (y, (y * y).sum(dim=1))
            self._grids[key] = hit
        return hit

    def sigmas_of(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """float64 ``[B]`` σ of each batch element from the timestep as the adapter passes it."""
        t = torch.as_tensor(timestep).to(self.latents.device)
        sigma = t.double()
        if not t.is_floating_point():
            sigma = sigma + self._config.integer_timestep_offset
        sigma = (sigma / self._config.timestep_scale).clamp(self._config.min_sigma, 1.0)
        return sigma.expand(batch) if sigma.dim() == 0 else sigma.reshape(batch)

    def match(self, encoder_hidden_states: torch.Tensor | None, batch: int) -> list[int]:
        """Per batch element, the caption whose stored embedding the prompt's equals (relative L2 distance below
        ``match_tol``), or -1: no caption, the whole dataset. The engine passes the same tensor at every call of a
        run, so the last answer is kept for it."""
        if encoder_hidden_states is None:
            return [-1] * batch
        e = encoder_hidden_states
        memo = (e.data_ptr(), tuple(e.shape), e.dtype, e.device, e._version)
        if self._match_memo is not None and self._match_memo[0] == memo:
            return list(self._match_memo[1])
        ref, scale = self._caption_reference()
        flat = e.to(ref.device).double().flatten(1)
        if flat.shape[1] != ref.shape[1]:
            found = [-1] * batch
        else:
            dist, idx = torch.cdist(flat, ref).min(dim=1)
            tol = self._config.match_tol
            found = [int(i) if float(d) <= tol * float(scale[i]) else -1 for d, i in zip(dist, idx)]
        self._match_memo = (memo, found)
        return list(found)

    def _caption_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.caption_embeddings.device, self.caption_embeddings.data_ptr())
        if self._reference is None or self._reference[0] != key:
            ref = self.caption_embeddings.double().flatten(1)
            self._reference = (key, ref, ref.norm(dim=1).clamp(min=1e-12))
        return self._reference[1], self._reference[2]

    def posterior(
        self, x: torch.Tensor, sigma: torch.Tensor | float, captions: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior over the dataset at ``x [B, C, T, H, W]`` (on any grid) and noise ``σ`` (scalar or
        ``[B]``): the weights ``[B, N]`` (zero outside each element's caption; ``captions`` None or -1: all
        clips) and ``E[x0 | x]`` ``[B, C, T, H, W]``, both float64."""
        b = x.shape[0]
        y, sq = self.data_at((int(x.shape[2]), int(x.shape[3]), int(x.shape[4])))
        if y.shape[1] != x[0].numel():
            raise ValueError(f"latent {tuple(x.shape)} does not match the dataset's channels {self.latents.shape[1]}")
        s = torch.as_tensor(sigma, dtype=torch.float64).to(y.device)
        s = s.expand(b) if s.dim() == 0 else s.reshape(b)
        a = 1.0 - s
        flat = x.to(y.device).double().flatten(1)
        # -|x - a·y|²/(2σ²) up to the |x|² term, which is the same for every clip and drops out of the softmax.
        logits = (a[:, None] * (flat @ y.T) - 0.5 * (a * a)[:, None] * sq[None, :]) / (s * s)[:, None]
        if captions is not None:
            allowed = torch.stack(
                [self.clip_caption == k if k >= 0 else torch.ones_like(self.clip_caption, dtype=torch.bool)
                 for k in captions]
            ).to(y.device)  # fmt: skip
            logits = logits.masked_fill(~allowed, -math.inf)
        weights = torch.softmax(logits, dim=1)
        mean = (weights @ y).reshape(x.shape)
        return weights, mean

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``v = (x - E[x0 | x]) / σ`` on the grid of ``hidden_states``, in its dtype."""
        if encoder_hidden_states_image is not None:
            raise ValueError("the exact denoiser is text-to-video only")
        b, c, t, h, w = hidden_states.shape
        if c != self._config.in_channels:
            raise ValueError(f"expected {self._config.in_channels} latent channels; got {c} (I2V is not supported)")
        sigma = self.sigmas_of(timestep, b)
        captions = self.match(encoder_hidden_states, b)
        self.last_match = captions
        self.seen_grids.add((t, h, w))
        weights, mean = self.posterior(hidden_states, sigma, captions)
        if self.trace is not None:
            top, clip = weights.max(dim=1)
            self.trace.append(
                {"grid": (t, h, w), "sigma": sigma.tolist(), "top_clip": clip.tolist(), "top_weight": top.tolist()}
            )
        x = hidden_states.to(mean.device).double()
        v = ((x - mean) / sigma.view(-1, 1, 1, 1, 1)).to(hidden_states.dtype)
        if not return_dict:
            return (v,)
        return Transformer2DModelOutput(sample=v)


# --- the pipeline ---------------------------------------------------------------------------------------------


def caption_embeddings(pipe: Any, captions: Sequence[str], batch: int = 32) -> torch.Tensor:
    """``[K, 512, D]`` prompt embeddings exactly as the Wan adapter encodes prompts (the pipeline's
    ``encode_prompt``, no CFG, 512 tokens)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            cond, _ = pipe.encode_prompt(
                prompt=list(captions[i : i + batch]), do_classifier_free_guidance=False, max_sequence_length=512,
                device=pipe.text_encoder.device,
            )  # fmt: skip
            out.append(cond.float().cpu())
    return torch.cat(out)


def exact_pipeline(base: Any, dataset: ExactDataset, resize_mode: str | ResizeMode = ResizeMode.AREA_ANCHOR) -> Any:
    """A ``WanPipeline`` with ``base``'s tokenizer, text encoder, VAE and scheduler (a loaded demo pipeline) and an
    :class:`ExactDenoiser` over ``dataset`` as its transformer, configured like ``base``'s transformer where the
    engine reads it (patch, heads, FFN: the planner's FLOP model)."""
    from diffusers import WanPipeline

    cfg = dict(base.transformer.config) if getattr(base, "transformer", None) is not None else {}
    arch = {k: cfg[k] for k in ("patch_size", "num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")
            if k in cfg}  # fmt: skip
    if "patch_size" in arch:
        arch["patch_size"] = tuple(int(p) for p in arch["patch_size"])
    embeds = caption_embeddings(base, dataset.captions)
    model = ExactDenoiser.from_dataset(
        dataset.latents, dataset.clip_caption, embeds, resize_mode=ResizeMode(resize_mode).value, **arch
    )
    pipe: Any = WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=model,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "DatasetSpec",
    "ExactDataset",
    "ExactDenoiser",
    "Variant",
    "block_decode",
    "block_encode",
    "build_dataset",
    "caption_embeddings",
    "exact_pipeline",
    "frames_of",
    "render_variant",
    "sample_variants",
]
