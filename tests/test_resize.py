"""Anchor coordinates and the latent resizes (docs/architecture.md, eq. 11–12)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dvg_dist.dvg import (
    Grid,
    ResizeMode,
    anchor_linear_1d,
    anchors,
    area_anchor_spatial,
    nested_coords,
    resize,
    sample_at,
    stage_coords,
)

MODES = [ResizeMode.AREA_ANCHOR, ResizeMode.ANCHOR_LINEAR, ResizeMode.TRILINEAR]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _at(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x[:, :, t][:, :, :, h][:, :, :, :, w]


# -- anchors -------------------------------------------------------------------------------------------


def test_anchors_exhaustive_small():
    for target in range(1, 41):
        for length in range(1, target + 1):
            a = anchors(length, target).tolist()
            assert len(a) == length, f"anchors({length}, {target}) has {len(a)} entries"
            assert a[0] == 0, f"anchors({length}, {target}) = {a} does not start at 0"
            if length == 1:
                continue
            assert a[-1] == target - 1, f"anchors({length}, {target}) = {a} does not end at {target - 1}"
            assert all(p < q for p, q in zip(a, a[1:])), f"anchors({length}, {target}) = {a} not strictly increasing"
            raw = [round(i * (target - 1) / (length - 1)) for i in range(length)]
            if all(p < q for p, q in zip(raw, raw[1:])):
                assert a == raw, f"anchors({length}, {target}) = {a}, expected round(i·(L'-1)/(L-1)) = {raw}"


@pytest.mark.parametrize(
    ("length", "target", "want"),
    [
        (1, 7, [0]),
        (4, 9, [0, 3, 5, 8]),  # 8/3 = 2.67 → 3, 5.33 → 5
        (3, 6, [0, 2, 5]),  # 2.5 → 2 (half-to-even; half-up would give 3)
        (3, 4, [0, 2, 3]),  # 1.5 → 2
        (5, 8, [0, 2, 4, 5, 7]),  # 1.75, 3.5 → 4, 5.25
        (6, 6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_anchors_by_hand(length, target, want):
    got = anchors(length, target).tolist()
    assert got == want, f"anchors({length}, {target}) = {got}, expected {want}"


@pytest.mark.parametrize(("length", "target"), [(0, 5), (6, 5), (2, 1)])
def test_anchors_reject_bad_lengths(length, target):
    with pytest.raises(ValueError):
        anchors(length, target)


def _check_nested(chain: list[int]) -> None:
    coords = nested_coords(chain)
    assert len(coords) == len(chain)
    assert coords[-1].tolist() == list(range(chain[-1])), f"chain {chain}: last coords are not arange"
    for k, (c, length) in enumerate(zip(coords, chain)):
        assert len(c) == length, f"chain {chain}: stage {k} has {len(c)} coords, expected {length}"
        assert bool((c[1:] > c[:-1]).all()), f"chain {chain}: stage {k} coords {c.tolist()} not increasing"
        assert int(c[0]) == 0, f"chain {chain}: stage {k} does not start at coordinate 0"
        if length > 1:
            assert int(c[-1]) == chain[-1] - 1, f"chain {chain}: stage {k} does not end at {chain[-1] - 1}"
    for k in range(len(chain) - 1):
        coarse, fine = set(coords[k].tolist()), set(coords[k + 1].tolist())
        missing = sorted(coarse - fine)
        assert not missing, f"chain {chain}: stage {k} coords {missing} are not in stage {k + 1}"


@pytest.mark.parametrize("chain", [[5, 9, 17, 33], [4, 7, 8, 21], [1, 1, 3, 3], [2, 2, 2], [7], [3, 10, 11, 90]])
def test_nested_coords_chains(chain):
    _check_nested(chain)


def test_nested_coords_random_chains():
    rng = random.Random(1234)
    for _ in range(300):
        chain = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 5)))
        _check_nested(chain)


def test_stage_coords():
    grids = (Grid(4, 8, 12), Grid(5, 10, 14), Grid(5, 17, 23), Grid(9, 17, 23))
    coords = stage_coords(grids)
    assert len(coords) == 4
    for k, (g, (t, h, w)) in enumerate(zip(grids, coords)):
        assert (len(t), len(h), len(w)) == (g.t, g.h, g.w), f"stage {k}: coords of sizes {len(t)},{len(h)},{len(w)}"
    last = coords[-1]
    for ax, c, n in zip("thw", last, (9, 17, 23)):
        assert c.tolist() == list(range(n)), f"last stage {ax} coords are not arange({n})"
    # Stage 2 ⊂ stage 3 ⊂ full.
    for k in (1, 2):
        for ax in range(3):
            missing = set(coords[k][ax].tolist()) - set(coords[k + 1][ax].tolist())
            assert not missing, f"stage {k + 1} axis {'thw'[ax]} coords {sorted(missing)} not in stage {k + 2}"
    # The sketch is anchored on the full grid directly (fixed before the action is chosen).
    for ax, n_full in zip(range(3), (9, 17, 23)):
        want = anchors(len(coords[0][ax]), n_full).tolist()
        assert coords[0][ax].tolist() == want, f"sketch axis {'thw'[ax]}: {coords[0][ax].tolist()} vs {want}"
    single = stage_coords((Grid(3, 5, 7),))
    assert [c.tolist() for c in single[0]] == [[0, 1, 2], [0, 1, 2, 3, 4], list(range(7))]


# -- anchor_linear_1d ------------------------------------------------------------------------------------


def test_anchor_linear_1d_by_hand():
    x = torch.tensor([0.0, 10.0, 20.0])
    y = anchor_linear_1d(x, 6, dim=0)  # anchors(3, 6) = [0, 2, 5]
    want = torch.tensor([0.0, 5.0, 10.0, 10 + 10 / 3, 10 + 20 / 3, 20.0])
    assert torch.allclose(y, want, atol=1e-6), f"anchor-linear 3→6 gave {y.tolist()}, expected {want.tolist()}"
    down = anchor_linear_1d(torch.arange(9.0), 4, dim=0)  # anchors(4, 9) = [0, 3, 5, 8]
    assert down.tolist() == [0.0, 3.0, 5.0, 8.0], f"anchor-linear 9→4 gave {down.tolist()}"
    one = anchor_linear_1d(torch.tensor([3.5]), 4, dim=0)
    assert one.tolist() == [3.5] * 4, f"a single sample upsampled to 4 gave {one.tolist()}"
    same = torch.arange(5.0)
    assert anchor_linear_1d(same, 5, dim=0) is same


def test_anchor_linear_1d_along_each_dim():
    x = _rand(2, 3, 4, 5, 6)
    for dim, size in ((2, 7), (3, 11), (4, 3)):
        y = anchor_linear_1d(x, size, dim=dim)
        want_shape = list(x.shape)
        want_shape[dim] = size
        assert list(y.shape) == want_shape, f"dim {dim}: shape {list(y.shape)}, expected {want_shape}"
        ref = anchor_linear_1d(x.movedim(dim, 0), size, dim=0).movedim(0, dim)
        assert torch.allclose(y, ref, atol=1e-6), f"dim {dim} differs from the dim-0 path"


# -- resize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((4, 8, 12), (9, 17, 23)),  # up, odd targets
        ((9, 17, 23), (4, 8, 12)),  # down
        ((7, 13, 19), (3, 6, 10)),
        ((5, 8, 12), (5, 17, 12)),  # one axis only: h
        ((5, 8, 12), (5, 8, 25)),  # w
        ((2, 8, 12), (7, 8, 12)),  # t
        ((5, 8, 12), (3, 17, 7)),  # t down, h up, w down
        ((1, 1, 1), (3, 4, 5)),
    ],
)
def test_resize_shapes(mode, src, dst):
    x = _rand(2, 3, *src)
    y = resize(x, Grid(*dst), mode)
    assert tuple(y.shape) == (2, 3, *dst), f"{mode.value} {src}→{dst}: shape {tuple(y.shape)}"
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("mode", [ResizeMode.AREA_ANCHOR, ResizeMode.ANCHOR_LINEAR])
@pytest.mark.parametrize(("src", "dst"), [((4, 8, 12), (9, 17, 23)), ((3, 6, 10), (7, 13, 19)), ((5, 5, 5), (5, 9, 6))])
def test_upsampling_keeps_anchor_values_exactly(mode, src, dst):
    x = _rand(2, 3, *src, seed=3)
    y = resize(x, Grid(*dst), mode)
    at, ah, aw = (anchors(s, d) for s, d in zip(src, dst))
    got = _at(y, at, ah, aw)
    assert torch.equal(got, x), f"{mode.value} {src}→{dst}: anchors differ by {(got - x).abs().max().item():.3e}"


def test_area_anchor_keeps_spatial_anchors_of_every_frame():
    x = _rand(1, 2, 3, 6, 10, seed=4)
    dst = Grid(7, 13, 19)
    y = resize(x, dst, ResizeMode.AREA_ANCHOR)
    frames = anchor_linear_1d(x, dst.t, dim=2)  # time first, by the anchor formula
    ah, aw = anchors(6, 13), anchors(10, 19)
    got = y[:, :, :, ah][:, :, :, :, aw]
    err = (got - frames).abs().max().item()
    assert err < 1e-6, f"spatial anchors of the interpolated frames differ from the time-resized source by {err:.3e}"
    # Non-anchor pixels come from area interpolation, not from the anchor-linear formula.
    lin = resize(x, dst, ResizeMode.ANCHOR_LINEAR)
    assert not torch.allclose(y, lin, atol=1e-3), "area-anchor is identical to anchor-linear"


def test_area_anchor_downsampling_is_area_average():
    x = _rand(1, 2, 3, 8, 12, seed=5)
    y = area_anchor_spatial(x, 4, 6)
    want = x.reshape(1, 2, 3, 4, 2, 6, 2).mean(dim=(4, 6))
    assert torch.allclose(y, want, atol=1e-6), f"2×2 area average differs by {(y - want).abs().max().item():.3e}"


@pytest.mark.parametrize("axis", [2, 3, 4])
@pytest.mark.parametrize(("full", "small"), [(17, 8), (23, 12), (9, 4), (13, 2)])
def test_down_then_up_of_a_ramp_is_exact_with_anchor_linear(axis, full, small):
    shape = [1, 2, 5, 6, 7]
    shape[axis] = full
    view = [1] * 5
    view[axis] = full
    ramp = (torch.arange(full, dtype=torch.float32) * 0.37 - 1.5).reshape(view).expand(shape).contiguous()
    ramp = ramp * torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1, 1)
    big = Grid(*shape[2:])
    small_shape = list(shape[2:])
    small_shape[axis - 2] = small
    down = resize(ramp, Grid(*small_shape), ResizeMode.ANCHOR_LINEAR)
    back = resize(down, big, ResizeMode.ANCHOR_LINEAR)
    err = (back - ramp).abs().max().item()
    assert err < 1e-5, f"axis {axis} {full}→{small}→{full}: ramp comes back off by {err:.3e}"


def test_trilinear_mode_is_plain_interpolate():
    x = _rand(1, 2, 3, 6, 10, seed=6)
    y = resize(x, Grid(5, 11, 17), "trilinear")
    want = F.interpolate(x, size=(5, 11, 17), mode="trilinear", align_corners=False)
    assert torch.equal(y, want)


def test_resize_same_grid_is_identity_and_bad_rank_raises():
    x = _rand(1, 2, 3, 4, 5)
    for mode in MODES:
        assert resize(x, Grid(3, 4, 5), mode) is x
    with pytest.raises(ValueError):
        resize(x[0], Grid(3, 4, 5))
    with pytest.raises(ValueError):
        resize(x, Grid(3, 4, 5), "bicubic")


def test_sample_at():
    full = Grid(5, 6, 7)
    x = _rand(2, 3, 5, 6, 7)
    c = (torch.tensor([0, 4]), torch.tensor([1, 2, 5]), torch.tensor([6]))
    got = sample_at(x, c, full)
    assert got.shape == (2, 3, 2, 3, 1)
    assert got[1, 2, 1, 2, 0] == x[1, 2, 4, 5, 6]
    assert got[0, 1, 0, 0, 0] == x[0, 1, 0, 1, 6]
    with pytest.raises(ValueError):
        sample_at(x, c, Grid(5, 6, 8))
