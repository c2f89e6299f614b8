"""Coordinate-hash noise (docs/architecture.md, eq. 13)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from dvg_dist.dvg import hash_noise, random_noise

M64 = (1 << 64) - 1


def _ref_value(seed: int, c: int, t: int, h: int, w: int) -> float:
    """Pure-Python reference of the hash (arbitrary-precision ints masked to 64 bits): what the torch
    int64 arithmetic must reproduce bit for bit, whatever the size of the coordinates or seed."""

    def srl(x: int, b: int) -> int:
        return x >> b  # x is kept unsigned in [0, 2^64)

    def mix(z: int) -> int:
        z = ((z ^ srl(z, 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ srl(z, 27)) * 0x94D049BB133111EB) & M64
        return z ^ srl(z, 31)

    golden = 0x9E3779B97F4A7C15
    axes = (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)
    key = mix(((seed & M64) * golden + golden) & M64)
    for coord, k in zip((c, t, h, w), axes):
        key = mix(key ^ (((coord + 1) * k) & M64))
    u1 = ((key >> 11) + 0.5) / (1 << 53)
    u2 = ((mix((key + golden) & M64) >> 11) + 0.5) / (1 << 53)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _ar(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.long)


def test_shape_and_dtype():
    z = hash_noise([1, 2, 3], 4, torch.arange(5), torch.arange(6), torch.arange(7))
    assert z.shape == (3, 4, 5, 6, 7), f"shape {tuple(z.shape)}, expected (3, 4, 5, 6, 7)"
    assert z.dtype == torch.float32
    z64 = hash_noise(1, 2, torch.arange(2), torch.arange(2), torch.arange(2), dtype=torch.float64)
    assert z64.dtype == torch.float64


@pytest.mark.parametrize(
    ("seed", "c", "t", "h", "w"),
    [
        (0, 0, 0, 0, 0),
        (7, 3, 5, 11, 13),
        (2**63 - 1, 15, 2**20, 2**20, 2**20 - 1),
        (123456789, 0, 0, 2**20, 0),
        (2**62 + 12345, 1, 2**30, 3, 2**31 + 7),
    ],
)
def test_matches_pure_python_reference(seed, c, t, h, w):
    got = hash_noise(seed, c + 1, _ar(t), _ar(h), _ar(w), dtype=torch.float64)[0, c, 0, 0, 0].item()
    want = _ref_value(seed, c, t, h, w)
    # Same integer hash → same uniforms; only libm vs vectorised log/cos may differ, in the last ulp.
    assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (
        f"seed={seed} (c,t,h,w)=({c},{t},{h},{w}): torch gives {got!r}, 64-bit reference {want!r} "
        f"(diff {got - want:.3e}) — int64 wrap-around differs from mod-2^64 arithmetic"
    )


def test_same_coordinate_same_value_on_different_grids():
    seed, c = 42, 3
    full_t, full_h, full_w = torch.arange(9), torch.arange(17), torch.arange(23)
    full = hash_noise(seed, c, full_t, full_h, full_w)
    sub_t, sub_h, sub_w = _ar(0, 2, 5, 8), _ar(0, 4, 9, 16), _ar(0, 1, 7, 12, 22)
    coarse = hash_noise(seed, c, sub_t, sub_h, sub_w)
    picked = full[:, :, sub_t][:, :, :, sub_h][:, :, :, :, sub_w]
    assert torch.equal(coarse, picked), (
        f"coarse grid differs from the full grid at the same coordinates by up to "
        f"{(coarse - picked).abs().max().item():.3e}"
    )
    # Order of the coordinates does not matter either (a sharded / permuted grid).
    perm = hash_noise(seed, c, _ar(8, 0), _ar(16, 4), _ar(22, 0))
    assert torch.equal(perm[:, :, 0, 0, 0], full[:, :, 8, 16, 22])
    assert torch.equal(perm[:, :, 1, 1, 1], full[:, :, 0, 4, 0])


def test_moments_over_a_million_samples():
    z = hash_noise(2024, 4, torch.arange(16), torch.arange(128), torch.arange(128), dtype=torch.float64)
    assert z.numel() >= 1_000_000
    mean, std = z.mean().item(), z.std().item()
    assert abs(mean) < 0.005, f"mean {mean:.5f} differs from 0 by more than 0.005"
    assert abs(std - 1) < 0.005, f"std {std:.5f} differs from 1 by {abs(std - 1):.5f} (> 0.005)"
    # Tails of a standard normal: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027.
    p2 = (z.abs() > 2).double().mean().item()
    p3 = (z.abs() > 3).double().mean().item()
    assert abs(p2 - 0.0455) < 0.002, f"P(|z|>2) = {p2:.4f}, expected 0.0455 ± 0.002"
    assert abs(p3 - 0.0027) < 0.0005, f"P(|z|>3) = {p3:.5f}, expected 0.0027 ± 0.0005"
    assert bool(torch.isfinite(z).all())


def test_neighbouring_coordinates_are_uncorrelated():
    z = hash_noise(5, 1, torch.arange(4), torch.arange(256), torch.arange(256), dtype=torch.float64)[0, 0]
    for name, a, b in (
        ("w", z[:, :, :-1], z[:, :, 1:]),
        ("h", z[:, :-1, :], z[:, 1:, :]),
        ("t", z[:-1], z[1:]),
    ):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01, f"lag-1 correlation along {name} is {corr:.4f} (|·| ≥ 0.01)"
    # Swapped axes give unrelated values: (t, h) = (1, 0) vs (0, 1).
    swapped = torch.corrcoef(torch.stack([z[1, 0, :], z[0, 1, :]]))[0, 1].item()
    assert abs(swapped) < 0.2, f"values at (t,h)=(1,0) and (0,1) are correlated: {swapped:.3f}"


def test_bit_identical_across_calls():
    args = (77, 3, torch.arange(5), torch.arange(9), torch.arange(11))
    a, b = hash_noise(*args), hash_noise(*args)
    assert torch.equal(a, b), f"two calls differ by up to {(a - b).abs().max().item():.3e}"


def test_bit_identical_across_processes(tmp_path):
    out = tmp_path / "noise.pt"
    code = (
        "import sys, torch\n"
        "from dvg_dist.dvg import hash_noise\n"
        "z = hash_noise([77, 2**63 - 1], 3, torch.arange(5), torch.arange(9), torch.tensor([0, 3, 2**20]),"
        " dtype=torch.float64)\n"
        "torch.save(z, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    theirs = torch.load(out)
    ours = hash_noise([77, 2**63 - 1], 3, torch.arange(5), torch.arange(9), _ar(0, 3, 2**20), dtype=torch.float64)
    same_bits = torch.equal(ours.view(torch.int64), theirs.view(torch.int64))
    assert same_bits, f"another process gives different bits; max |diff| {(ours - theirs).abs().max().item():.3e}"


def test_large_coordinates_and_seed():
    big = 2**20
    seed = 2**63 - 1
    coords = torch.arange(big - 64, big + 64)
    z = hash_noise(seed, 2, torch.tensor([big]), coords, coords, dtype=torch.float64)
    assert bool(torch.isfinite(z).all()), "non-finite values near coordinate 2^20"
    flat = z.flatten()
    assert flat.unique().numel() == flat.numel(), (
        f"only {flat.unique().numel()} distinct values among {flat.numel()} near coordinate 2^20"
    )
    mean, std = flat.mean().item(), flat.std().item()
    # 32768 samples: standard error of the mean ≈ 0.0055, of the std ≈ 0.004.
    assert abs(mean) < 0.03 and abs(std - 1) < 0.03, f"near 2^20: mean {mean:.4f}, std {std:.4f}"
    # A value computed alone equals the same coordinate inside the larger tensor.
    alone = hash_noise(seed, 2, torch.tensor([big]), torch.tensor([big]), torch.tensor([big + 5]), dtype=torch.float64)
    inside = z[:, :, 0, 64, 69]
    assert torch.equal(alone[:, :, 0, 0, 0], inside), f"alone {alone.flatten().tolist()} vs inside {inside.tolist()}"
    # h = 2^20 alone vs inside a tensor with small coordinates.
    mixed = hash_noise(3, 1, torch.arange(2), torch.tensor([0, 1, big, 5]), torch.arange(3))
    single = hash_noise(3, 1, torch.tensor([1]), torch.tensor([big]), torch.tensor([2]))
    assert torch.equal(mixed[0, 0, 1, 2, 2], single[0, 0, 0, 0, 0])


def test_seed_batch_gives_independent_fields_in_order():
    t, h, w = torch.arange(3), torch.arange(16), torch.arange(16)
    seeds = [11, 2**63 - 1, 0, 11 + 1]
    batch = hash_noise(seeds, 2, t, h, w)
    assert batch.shape[0] == len(seeds)
    for k, s in enumerate(seeds):
        single = hash_noise(s, 2, t, h, w)
        assert torch.equal(batch[k : k + 1], single), f"batch element {k} differs from the single-seed call (seed {s})"
    reversed_batch = hash_noise(seeds[::-1], 2, t, h, w)
    assert torch.equal(reversed_batch, batch.flip(0)), "seed order is not the batch order"
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            corr = torch.corrcoef(torch.stack([batch[i].flatten(), batch[j].flatten()]))[0, 1].item()
            assert abs(corr) < 0.1, f"fields of seeds {seeds[i]} and {seeds[j]} correlate: {corr:.3f}"


def test_empty_seed_list_raises():
    with pytest.raises(ValueError):
        hash_noise([], 1, torch.arange(1), torch.arange(1), torch.arange(1))


def test_random_noise_is_seeded_and_salted():
    a = random_noise([1, 2], (2, 3, 4, 5), salt=7)
    assert a.shape == (2, 2, 3, 4, 5)
    assert torch.equal(a, random_noise([1, 2], (2, 3, 4, 5), salt=7))
    assert torch.equal(a[1:], random_noise(2, (2, 3, 4, 5), salt=7))
    assert not torch.equal(a, random_noise([1, 2], (2, 3, 4, 5), salt=8)), "salt does not change the noise"
