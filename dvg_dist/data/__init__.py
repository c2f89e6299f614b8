"""Procedural video clips with captions and known trajectories (the demo model's dataset), and its trainer.

The generator (:mod:`.procedural`) is pure numpy; the trainer (:mod:`.train`) imports diffusers and
transformers lazily, inside its functions.
"""

from .procedural import (
    COLOURS,
    DIRECTIONS,
    KINDS,
    PATTERNS,
    SCALES,
    SHAPES,
    SPEEDS,
    Clip,
    ClipParams,
    caption_of,
    held_out_captions,
    make_clip,
    parse_caption,
    sample_params,
    training_params,
)

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "KINDS",
    "PATTERNS",
    "SCALES",
    "SHAPES",
    "SPEEDS",
    "Clip",
    "ClipParams",
    "caption_of",
    "held_out_captions",
    "make_clip",
    "parse_caption",
    "sample_params",
    "training_params",
]
