"""What is installed, which backends it makes available, and the version combinations we refuse.

``generate.py --version`` prints :func:`version_report`; every entry point calls :func:`check_versions` before any
weight loads, so a known-bad combination fails with one line naming the packages and the fix, instead of an
import error or a silent wrong result deep inside a run. Nothing here imports the optional packages: versions are
read from the installed distributions' metadata (fast, and safe when a package is broken).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from ..models import InputError

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "ray", "yunchang", "xfuser",
            "deepspeed", "flash-attn")  # fmt: skip
"""Distributions the report lists, in this order."""

TESTED = {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0", "ray": "2.60.0",
          "yunchang": "0.6.4", "deepspeed": "0.19.8"}  # fmt: skip
"""The versions ``constraints.txt`` pins and the suite runs against (shown next to what is installed)."""


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parse(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` → ``(2, 13, 0)``; pre-release tags are dropped (``"0.43.0.dev0"`` → ``(0, 43, 0)``)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


@dataclass(frozen=True)
class Rule:
    """A combination we refuse: ``bad(versions)`` is true when it applies; ``message`` says why and what to do."""

    bad: Callable[[dict[str, tuple[int, ...] | None]], bool]
    message: str


def _below(name: str, minimum: tuple[int, ...]) -> Callable[[dict[str, tuple[int, ...] | None]], bool]:
    return lambda v: v.get(name) is not None and v[name] < minimum  # type: ignore[operator]


RULES: tuple[Rule, ...] = (
    Rule(_below("torch", (2, 5)), "torch {torch} is too old: FSDP2 fully_shard and the SDPA LSE ops need >= 2.5"),
    Rule(
        _below("diffusers", (0, 42)),
        "diffusers {diffusers} is too old: the attention-dispatch parallel_config path and the HunyuanVideo-1.5 "
        "classes need >= 0.42",
    ),
    Rule(
        lambda v: v.get("transformers") is not None and v["transformers"] < (4, 50),  # type: ignore[operator]
        "transformers {transformers} is too old for diffusers' Wan/Hunyuan text encoders: need >= 4.50",
    ),
    Rule(
        lambda v: v.get("yunchang") is not None and v["yunchang"] < (0, 6),  # type: ignore[operator]
        "yunchang {yunchang} is too old: the xfuser backend needs LongContextAttention from >= 0.6 "
        "(pip install 'dvg_dist[xfuser]')",
    ),
    Rule(
        lambda v: v.get("deepspeed") is not None and v["deepspeed"] < (0, 15),  # type: ignore[operator]
        "deepspeed {deepspeed} is too old: DistributedAttention with uneven heads needs >= 0.15 "
        "(pip install 'dvg_dist[deepspeed]')",
    ),
    Rule(
        lambda v: v.get("xfuser") is not None and v.get("yunchang") is None,
        "xfuser {xfuser} is installed without yunchang, its attention kernel: pip install 'dvg_dist[xfuser]'",
    ),
)


def problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """Messages of every rule the installed (or given) versions break; empty when the combination is fine."""
    raw = versions if versions is not None else {name: installed(name) for name in PACKAGES}
    parsed = {name: (parse(v) if v else None) for name, v in raw.items()}
    shown = {name.replace("-", "_"): (v or "missing") for name, v in raw.items()}
    return [rule.message.format_map(_Default(shown)) for rule in RULES if rule.bad(parsed)]


class _Default(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


def check_versions() -> None:
    """Raise one :class:`InputError` line when the installed combination is known to be incompatible."""
    found = problems()
    if found:
        raise InputError("incompatible versions: " + "; ".join(found))


def attention_backends() -> dict[str, bool]:
    """Sequence-parallel attention backends and whether each one's package is installed (native always is)."""
    from ..parallel.backends import EXTERNAL_BACKENDS, NATIVE

    return {NATIVE: True, **{name: installed(module) is not None for name, (module, _) in EXTERNAL_BACKENDS.items()}}


def version_report() -> str:
    """The ``--version`` text: our version, Python, each package (with the tested pin), devices, backends."""
    import torch
    import torch.distributed as dist

    lines = [f"dvg_dist {installed('dvg_dist') or 'source tree'} (python {platform.python_version()})"]
    for name in PACKAGES:
        version = installed(name)
        tested = TESTED.get(name)
        note = "" if tested is None or (version and parse(version) == parse(tested)) else f"  (tested: {tested})"
        lines.append(f"  {name:<13} {version or 'not installed'}{note}")
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    lines.append(f"  devices       cpu{f', cuda {cuda} x{torch.cuda.device_count()}' if cuda else ''}")
    groups = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    lines.append(f"  groups        {', '.join(groups) or 'none'}")
    backends = attention_backends()
    lines.append(f"  attention     {', '.join(n if ok else f'{n} (not installed)' for n, ok in backends.items())}")
    found = problems()
    lines.append("  compatibility " + ("ok" if not found else "REFUSED: " + "; ".join(found)))
    return "\n".join(lines)
