"""Pytest plugin: ``tiny_checkpoint(family)`` builds each tiny diffusers checkpoint once per session.

Use it from a test module with ``pytest_plugins = ["conftest_tiny"]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tiny checkpoints are local; nothing may touch the hub

from dvg_dist.models.tiny import FAMILIES, build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(family) -> Path``: the seed-0 checkpoint of ``family``, built on first use."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown tiny family {family!r}")
        if family not in built:
            built[family] = build_tiny_checkpoint(family, root / family, seed=0)
        return built[family]

    return get
