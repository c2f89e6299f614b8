"""Coordinate-hash Gaussian noise (docs/architecture.md, eq. 13).

``ε(seed, c, t, h, w)`` is a pure function of the seed and *full-resolution* coordinates: the same sample
has the same value on every stage grid, device, rank and shard, and the first noise of a run is this
field at the sketch's coordinates — so a result depends on the seed alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's increment and finaliser multipliers, and odd per-axis multipliers (from the golden ratio /
# Murmur3 / xxHash families). Python ints here; they are only ever multiplied into int64 *tensors*, which
# wrap modulo 2^64 — a Python-int product would grow past 64 bits instead.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_AXIS = [_signed(k) for k in (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)]
_MASK53 = (1 << 53) - 1


def _srl(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def as_seed_list(seeds: int | Sequence[int]) -> list[int]:
    """One seed or a sequence of them (Python or numpy integers) as Python ints."""
    if isinstance(seeds, numbers.Integral):
        return [int(seeds)]
    return [int(s) for s in seeds]  # type: ignore[union-attr]


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: a bijection of 64-bit words with full avalanche."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _uniform(z: torch.Tensor) -> torch.Tensor:
    """The top 53 bits as a float64 in the open interval (0, 1)."""
    return (_srl(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def hash_noise(
    seeds: int | Sequence[int],
    channels: int,
    t: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard-normal noise ``[B, C, len(t), len(h), len(w)]`` at the given full-resolution coordinates.

    ``seeds``: one int or one per batch element. Computed in int64/float64 and cast to ``dtype`` last, so
    values are bit-identical across calls, processes and shardings on the same device type.
    """
    seed_list = as_seed_list(seeds)
    if not seed_list:
        raise ValueError("hash_noise needs at least one seed")

    def ints(values: torch.Tensor | list[int], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=device).reshape(shape)

    seed_t = ints([_signed(s) for s in seed_list], (-1, 1, 1, 1, 1))
    c_t = ints(torch.arange(channels), (1, -1, 1, 1, 1))
    t_t = ints(t, (1, 1, -1, 1, 1))
    h_t = ints(h, (1, 1, 1, -1, 1))
    w_t = ints(w, (1, 1, 1, 1, -1))
    # Each coordinate is mixed on its own before combining, so (t, h) = (1, 0) and (0, 1) are unrelated.
    key = _mix(seed_t * _GOLDEN + _GOLDEN)
    key = _mix(key ^ (c_t + 1) * _AXIS[0])
    key = _mix(key ^ (t_t + 1) * _AXIS[1])
    key = _mix(key ^ (h_t + 1) * _AXIS[2])
    key = _mix(key ^ (w_t + 1) * _AXIS[3])
    u1 = _uniform(key)
    u2 = _uniform(_mix(key + _GOLDEN))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype)


def random_noise(
    seeds: int | Sequence[int],
    shape: Sequence[int],
    salt: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Plain ``randn`` per batch element, seeded by (seed, salt): the "random re-noise" ablation."""
    seed_list = as_seed_list(seeds)
    out = []
    for s in seed_list:
        gen = torch.Generator().manual_seed((s * 1_000_003 + salt) % (1 << 63))
        out.append(torch.randn(*shape, generator=gen, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)
