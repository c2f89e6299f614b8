"""The synthetic latent generator: deterministic, a true translation, and it moves the demands the right way."""

from __future__ import annotations

import pytest
import torch

from dvg_dist.dvg import spatial_demand, temporal_demand
from dvg_dist.dvg.synthetic import demo_sketch, moving_texture

SHAPE = (1, 16, 9, 40, 64)


def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    a = moving_texture(SHAPE, seed=3, speed=(0.37, -0.2), texture=0.6)
    b = moving_texture(SHAPE, seed=3, speed=(0.37, -0.2), texture=0.6)
    c = moving_texture(SHAPE, seed=4, speed=(0.37, -0.2), texture=0.6)
    assert a.shape == SHAPE and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()
    assert torch.equal(demo_sketch(SHAPE, 5), demo_sketch(SHAPE, 5))


def test_channels_and_batch_elements_differ() -> None:
    x = moving_texture((2, 4, 3, 24, 32), seed=0, texture=0.5)
    assert not torch.allclose(x[0], x[1])
    for i in range(1, 4):
        assert not torch.allclose(x[0, 0], x[0, i])
    assert moving_texture((1, 4, 3, 24, 32), seed=0, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("speed", [(1.0, 0.0), (0.0, -1.0), (2.0, 1.0)])
def test_integer_speed_is_an_exact_translation_without_wraparound(speed: tuple[float, float]) -> None:
    """``x[t+1](p) = x[t](p - v)``: everything the next frame shares with this one is the same content."""
    vx, vy = int(speed[0]), int(speed[1])
    x = moving_texture((1, 4, 6, 24, 32), seed=1, speed=speed, texture=0.8, dtype=torch.float64)
    h, w = x.shape[-2:]
    nxt = x[:, :, 1:, max(vy, 0) : h + min(vy, 0), max(vx, 0) : w + min(vx, 0)]
    cur = x[:, :, :-1, max(-vy, 0) : h + min(-vy, 0), max(-vx, 0) : w + min(-vx, 0)]
    torch.testing.assert_close(nxt, cur, rtol=0, atol=1e-9)
    # The entering strip is new content, not the strip that left (no periodic wrap inside the crop).
    if vx > 0:
        assert not torch.allclose(x[:, :, 1:, :, :vx], x[:, :, :-1, :, w - vx :], atol=1e-3)


def test_sub_pixel_speed_moves_content() -> None:
    still = moving_texture(SHAPE, seed=0, speed=(0.0, 0.0))
    slow = moving_texture(SHAPE, seed=0, speed=(0.3, 0.0))
    assert torch.equal(still[:, :, 0], still[:, :, -1])
    torch.testing.assert_close(slow[:, :, 0], still[:, :, 0])  # same content, frame 0 unmoved
    assert not torch.allclose(slow[:, :, 1], slow[:, :, 0], atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_more_texture_gives_higher_spatial_demand(seed: int) -> None:
    demands = [spatial_demand(moving_texture(SHAPE, seed, (0.4, 0.2), texture)) for texture in (0.0, 0.25, 0.5, 1.0)]
    assert all(a < b for a, b in zip(demands, demands[1:])), demands
    assert demands[0] < 0.05 and demands[-1] > 0.25, demands


@pytest.mark.parametrize(
    ("seed", "direction", "texture"), [(0, (1.0, 0.5), 0.5), (1, (0.0, 1.0), 0.2), (2, (-1.0, 0.0), 1.0)]
)
def test_faster_motion_gives_higher_temporal_demand(seed: int, direction: tuple[float, float], texture: float) -> None:
    """Within the single-level LK's range (≲ 1 latent px/frame)."""
    demands = [
        temporal_demand(moving_texture(SHAPE, seed, (k * direction[0], k * direction[1]), texture))
        for k in (0.0, 0.25, 0.5, 1.0)
    ]
    assert demands[0] == 0.0
    assert all(a < b for a, b in zip(demands, demands[1:])), demands


@pytest.mark.parametrize(
    "kwargs",
    [{"shape": (1, 16, 8, 40)}, {"shape": (1, 0, 2, 8, 8)}, {"texture": 1.5}, {"speed": (float("nan"), 0.0)}],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        moving_texture(**kwargs)
