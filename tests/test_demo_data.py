"""The procedural demo dataset: deterministic, captions invert exactly, both content kinds, true trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from dvg_dist.data import (
    COLOURS,
    KINDS,
    ClipParams,
    caption_of,
    held_out_captions,
    make_clip,
    parse_caption,
    sample_params,
)
from dvg_dist.data.procedural import HELD_OUT_RESERVED, OBJECT_RADIUS, _background, training_params


def test_generator_is_deterministic_per_seed():
    a, b = training_params(40, seed=3), training_params(40, seed=3)
    assert a == b
    assert training_params(40, seed=4) != a, "a different seed must give different clips"
    for p in a[:5]:
        assert np.array_equal(make_clip(p).frames, make_clip(p).frames)


@pytest.mark.parametrize("kind", KINDS)
def test_captions_parse_back_to_their_parameters(kind):
    rng = np.random.default_rng(0)
    for _ in range(100):
        p = sample_params(rng, kind)
        assert p.kind == kind
        assert parse_caption(caption_of(p)) == p, caption_of(p)


def test_parse_refuses_text_outside_the_grammar():
    with pytest.raises(ValueError, match="not a caption"):
        parse_caption("a corgi surfing a wave at sunset")
    with pytest.raises(ValueError, match="differ"):
        parse_caption("a red disc moving quickly left over a plain red background")


def test_both_kinds_present_and_held_out_set_is_disjoint_from_training():
    held = held_out_captions(HELD_OUT_RESERVED)
    assert len(set(held)) == HELD_OUT_RESERVED
    assert held_out_captions(8) == held[:8], "the held-out list must be prefix-stable"
    assert {parse_caption(c).kind for c in held[:32]} == set(KINDS)
    train = training_params(600, seed=0)
    kinds = [p.kind for p in train]
    assert kinds.count("texture") > 150 and kinds.count("motion") > 150 and kinds.count("mix") > 50
    assert not {caption_of(p) for p in train} & set(held)


@pytest.mark.parametrize(
    "caption",
    [
        "a red disc moving quickly right over a plain black background",
        "a white square moving slowly down-left over a coarse blue and green checkered background",
    ],
)
def test_trajectory_matches_the_rendered_object(caption):
    p = parse_caption(caption)
    clip = make_clip(p, frames=17, height=64, width=64)
    assert clip.frames.shape == (17, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.caption == caption and clip.trajectory.shape == (17, 2)
    # Coverage from the pixels: alpha = (frame - background) / (object - background), on the channel where the
    # two differ most; its centroid is the rendered object's centre.
    background = _background(p, 64, 64)
    diff = np.array(COLOURS[p.colour], dtype=np.float32) - background
    channel = np.abs(diff).argmax(axis=-1)[..., None]
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    inside = [f for f in range(17) if np.all(np.abs(clip.trajectory[f] - 32) <= 32 - OBJECT_RADIUS)]
    assert len(inside) >= 13  # the fast object (radius 14) is cut by the frame edge only in the first and last two
    for f in inside:  # an object cut by the frame edge has its centroid off its centre
        alpha = np.take_along_axis((clip.frames[f] - background) / diff, channel, axis=-1)[..., 0]
        assert alpha.sum() > 100, f"frame {f}: object not found"
        centre = np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum()
        assert np.abs(centre - clip.trajectory[f]).max() < 0.05, f"frame {f}: {centre} vs {clip.trajectory[f]}"
    speed = np.linalg.norm(np.diff(clip.trajectory, axis=0), axis=1)
    assert np.allclose(speed, 3.0 if p.speed == "quickly" else 0.5, atol=1e-4)


def test_clip_params_validate():
    with pytest.raises(ValueError, match="shape"):
        ClipParams("red", "triangle", "slowly", "left", "plain", ("blue",))
    with pytest.raises(ValueError, match="scale"):
        ClipParams("red", "disc", "slowly", "left", "checkered", ("blue", "white"))
