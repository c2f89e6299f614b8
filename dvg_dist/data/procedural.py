"""Procedural video clips whose content pulls DVG's space/time decision in opposite directions.

Every clip is one object (a disc or a square) crossing a background in a straight line:

- **texture**: a fine or coarse two-colour checkered / striped background (static, high spatial frequency)
  with the object moving *slowly* — spatial demand;
- **motion**: a plain one-colour background with the object moving *quickly* — temporal demand;
- **mix**: a textured background with the object moving quickly — both.

A clip is a pure function of its :class:`ClipParams` and the size: the object's path is centred on the frame
(it passes the centre at the middle frame), so the caption alone fixes the whole video and its ground-truth
trajectory. Nothing here is random except :func:`sample_params`, which draws parameters from a numpy
``Generator`` (deterministic per seed).

Caption grammar (fixed; :func:`parse_caption` inverts :func:`caption_of` exactly)::

    caption    := "a " COLOUR " " SHAPE " moving " SPEED " " DIRECTION " over a " BACKGROUND " background"
    BACKGROUND := "plain " COLOUR
                | SCALE " " COLOUR " and " COLOUR " " PATTERN
    COLOUR     := red | green | blue | yellow | white | black
    SHAPE      := disc | square
    SPEED      := slowly | quickly
    DIRECTION  := left | right | up | down | up-left | up-right | down-left | down-right
    SCALE      := fine | coarse          (cells of 4 or 8 px at 64 px, scaled with the frame)
    PATTERN    := checkered | striped    (striped = vertical stripes)

e.g. ``a red disc moving quickly left over a plain black background`` (motion) or ``a white square moving
slowly up-right over a fine blue and yellow checkered background`` (texture). The object's colour differs from
every background colour and the two background colours differ.

Geometry, at the 64-px reference size (lengths scale with ``min(height, width) / 64``): object radius / half
side 14 px; speed 0.5 px/frame (slowly) or 3 px/frame (quickly) along the direction (diagonals have unit
length, not √2). Pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``; positions are in these continuous pixel
coordinates, so the frame centre is ``(width/2, height/2)``. Edges are anti-aliased by coverage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("disc", "square")
SPEEDS: dict[str, float] = {"slowly": 0.5, "quickly": 3.0}
"""Pixels per frame at the 64-px reference size."""
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
"""Unit vectors (x right, y down)."""
PATTERNS: tuple[str, ...] = ("plain", "checkered", "striped")
SCALES: dict[str, int] = {"fine": 4, "coarse": 8}
"""Pattern cell size in pixels at the 64-px reference size."""
KINDS: tuple[str, ...] = ("texture", "motion", "mix")

REFERENCE_SIZE = 64
OBJECT_RADIUS = 14.0
HELD_OUT_SEED = 20_240_601
"""Seed of the held-out caption set; training data never contains its first :data:`HELD_OUT_RESERVED`."""
HELD_OUT_RESERVED = 64


@dataclass(frozen=True)
class ClipParams:
    """Everything a clip depends on besides its size; exactly what its caption says."""

    colour: str
    """Object colour."""
    shape: str
    speed: str
    direction: str
    pattern: str
    """``plain``, ``checkered`` or ``striped``."""
    background: tuple[str, ...]
    """One colour for ``plain``, two for the patterns."""
    scale: str | None = None
    """``fine`` / ``coarse`` for the patterns, None for ``plain``."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("speed", self.speed, SPEEDS),
            ("direction", self.direction, DIRECTIONS),
            ("pattern", self.pattern, PATTERNS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        plain = self.pattern == "plain"
        if len(self.background) != (1 if plain else 2) or any(c not in COLOURS for c in self.background):
            raise ValueError(f"background must be {1 if plain else 2} colour(s) of {', '.join(COLOURS)}")
        if len(set(self.background)) != len(self.background) or self.colour in self.background:
            raise ValueError("object and background colours must all differ")
        if (self.scale is None) != plain or (self.scale is not None and self.scale not in SCALES):
            raise ValueError(f"scale must be None for plain, one of {', '.join(SCALES)} for patterns")

    @property
    def kind(self) -> str:
        """``texture`` (pattern, slow), ``motion`` (plain, fast), otherwise ``mix``."""
        if self.pattern != "plain" and self.speed == "slowly":
            return "texture"
        if self.pattern == "plain" and self.speed == "quickly":
            return "motion"
        return "mix"


@dataclass
class Clip:
    """One rendered clip."""

    frames: np.ndarray
    """uint8 ``[F, H, W, 3]``."""
    caption: str
    params: ClipParams
    trajectory: np.ndarray
    """float32 ``[F, 2]``: the object's centre ``(x, y)`` per frame in pixel coordinates (see module doc)."""

    def video(self) -> np.ndarray:
        """float32 ``[3, F, H, W]`` in [-1, 1], the layout and range diffusers' video VAEs take."""
        return (self.frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2).copy()


def caption_of(p: ClipParams) -> str:
    """The caption of ``p`` in the module's grammar."""
    if p.pattern == "plain":
        background = f"plain {p.background[0]}"
    else:
        background = f"{p.scale} {p.background[0]} and {p.background[1]} {p.pattern}"
    return f"a {p.colour} {p.shape} moving {p.speed} {p.direction} over a {background} background"


def _alt(words: object) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # type: ignore[call-overload]


_C = _alt(COLOURS)
_CAPTION = re.compile(
    rf"a (?P<colour>{_C}) (?P<shape>{_alt(SHAPES)}) moving (?P<speed>{_alt(SPEEDS)}) "
    rf"(?P<direction>{_alt(DIRECTIONS)}) over a "
    rf"(?:plain (?P<plain>{_C})|(?P<scale>{_alt(SCALES)}) (?P<c1>{_C}) and (?P<c2>{_C}) "
    rf"(?P<pattern>checkered|striped)) background"
)


def parse_caption(caption: str) -> ClipParams:
    """The parameters a caption states; ``ValueError`` (naming the caption) when it is not in the grammar."""
    m = _CAPTION.fullmatch(caption.strip())
    if m is None:
        raise ValueError(f"not a caption of the procedural grammar: {caption!r}")
    g = m.groupdict()
    if g["plain"] is not None:
        return ClipParams(g["colour"], g["shape"], g["speed"], g["direction"], "plain", (g["plain"],))
    return ClipParams(g["colour"], g["shape"], g["speed"], g["direction"], g["pattern"], (g["c1"], g["c2"]), g["scale"])


def sample_params(rng: np.random.Generator, kind: str) -> ClipParams:
    """Uniformly random parameters of one ``kind`` (``texture``, ``motion`` or ``mix``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    names = list(COLOURS)
    order = [names[i] for i in rng.permutation(len(names))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    if kind == "motion":
        return ClipParams(order[0], shape, "quickly", direction, "plain", (order[1],))
    pattern = ("checkered", "striped")[int(rng.integers(2))]
    scale = list(SCALES)[int(rng.integers(len(SCALES)))]
    speed = "slowly" if kind == "texture" else "quickly"
    return ClipParams(order[0], shape, speed, direction, pattern, (order[1], order[2]), scale)


def trajectory(p: ClipParams, frames: int, height: int, width: int) -> np.ndarray:
    """float32 ``[F, 2]`` object centre ``(x, y)`` per frame: a straight line through the frame centre at
    the middle frame."""
    unit = min(height, width) / REFERENCE_SIZE
    dx, dy = DIRECTIONS[p.direction]
    t = np.arange(frames, dtype=np.float64) - (frames - 1) / 2
    step = SPEEDS[p.speed] * unit
    return np.stack([width / 2 + dx * step * t, height / 2 + dy * step * t], axis=1).astype(np.float32)


def _background(p: ClipParams, height: int, width: int) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 255]."""
    colours = [np.array(COLOURS[c], dtype=np.float32) for c in p.background]
    if p.pattern == "plain":
        return np.broadcast_to(colours[0], (height, width, 3)).copy()
    assert p.scale is not None
    cell = max(1, round(SCALES[p.scale] * min(height, width) / REFERENCE_SIZE))
    i = np.arange(height)[:, None]
    j = np.arange(width)[None, :]
    if p.pattern == "checkered":
        second = (i // cell + j // cell) % 2 == 1
    else:  # vertical stripes, cell pixels wide
        second = np.broadcast_to((j // cell) % 2 == 1, (height, width))
    return np.where(second[..., None], colours[1], colours[0]).astype(np.float32)


def _coverage(p: ClipParams, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased ``[H, W]`` coverage in [0, 1] of the object centred at ``(cx, cy)``."""
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5 - cy
    x = np.arange(width, dtype=np.float64)[None, :] + 0.5 - cx
    if p.shape == "disc":
        return np.clip(radius + 0.5 - np.sqrt(x * x + y * y), 0.0, 1.0)
    return np.clip(radius + 0.5 - np.abs(x), 0.0, 1.0) * np.clip(radius + 0.5 - np.abs(y), 0.0, 1.0)


def object_coverage(p: ClipParams, frames: int = 17, height: int = 64, width: int = 64) -> np.ndarray:
    """float32 ``[F, H, W]``: the object's anti-aliased coverage per frame, the alpha :func:`make_clip` blends with
    (and the demo trainer's object loss weight)."""
    radius = OBJECT_RADIUS * min(height, width) / REFERENCE_SIZE
    path = trajectory(p, frames, height, width)
    return np.stack([_coverage(p, float(cx), float(cy), radius, height, width) for cx, cy in path]).astype(np.float32)


def make_clip(p: ClipParams, frames: int = 17, height: int = 64, width: int = 64) -> Clip:
    """Render ``p`` at the given size: uint8 frames, the caption and the ground-truth trajectory."""
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need frames >= 1 and height, width >= 8; got {frames}x{height}x{width}")
    background = _background(p, height, width)
    colour = np.array(COLOURS[p.colour], dtype=np.float32)
    alpha = object_coverage(p, frames, height, width)[..., None]
    out = np.rint(background * (1 - alpha) + colour * alpha).astype(np.uint8)
    return Clip(out, caption_of(p), p, trajectory(p, frames, height, width))


def held_out_captions(n: int, seed: int = HELD_OUT_SEED) -> list[str]:
    """``n`` distinct captions cycling through texture, motion, mix; a prefix-stable sequence per seed (the
    first ``n`` of a longer list are the same). With the default seed the first :data:`HELD_OUT_RESERVED`
    never appear in :func:`training_params`."""
    rng = np.random.default_rng([seed, 1])
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        caption = caption_of(sample_params(rng, KINDS[len(out) % len(KINDS)]))
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
    return out


def training_params(n: int, seed: int, weights: tuple[float, float, float] = (0.4, 0.4, 0.2)) -> list[ClipParams]:
    """``n`` training clips' parameters (kinds drawn with ``weights`` for texture, motion, mix), never one of the
    reserved held-out captions. Deterministic per seed; the stream differs from :func:`held_out_captions`'."""
    reserved = set(held_out_captions(HELD_OUT_RESERVED))
    rng = np.random.default_rng([seed, 0])
    out: list[ClipParams] = []
    while len(out) < n:
        p = sample_params(rng, KINDS[int(rng.choice(len(KINDS), p=np.asarray(weights) / sum(weights)))])
        if caption_of(p) not in reserved:
            out.append(p)
    return out
