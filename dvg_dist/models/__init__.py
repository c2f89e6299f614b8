"""One adapter per diffusers family, chosen by the pipeline class a checkpoint's ``model_index.json`` names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .base import Adapter, Conditioning, FamilySpec, InputError, SequencePlan
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .hunyuan15 import HunyuanVideo15Adapter
from .ltx import LTXVideoAdapter
from .wan import WanAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    **{name: WanAdapter for name in WanAdapter.pipeline_classes},
    **{name: HunyuanVideoAdapter for name in HunyuanVideoAdapter.pipeline_classes},
    **{name: HunyuanVideo15Adapter for name in HunyuanVideo15Adapter.pipeline_classes},
    **{name: LTXVideoAdapter for name in LTXVideoAdapter.pipeline_classes},
    **{name: CogVideoXAdapter for name in CogVideoXAdapter.pipeline_classes},
}
"""Pipeline class name → adapter."""

FAMILIES: dict[str, type[Adapter]] = {
    "wan": WanAdapter,
    "hunyuanvideo": HunyuanVideoAdapter,
    "hunyuanvideo15": HunyuanVideo15Adapter,
    "ltx": LTXVideoAdapter,
    "cogvideox": CogVideoXAdapter,
}


def resolve_model_path(path: str) -> Path:
    """A local directory as is; a hub id (``org/name``) as the local snapshot of its JSON configs, so the
    checks that need no weights run before any weight is fetched (``from_pretrained`` gets the rest)."""
    local = Path(path)
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json"]))
    except Exception as e:  # offline, unknown repo, gated: all one line for the user
        raise InputError(
            f"model {path} is neither a local directory nor reachable on the hub ({type(e).__name__}); "
            "download it and pass the directory"
        ) from None


def read_model_index(path: str | Path) -> dict[str, Any]:
    """The checkpoint directory's ``model_index.json``; one-line errors for what is not a diffusers pipeline."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model not found: {p} (give a local diffusers pipeline directory)")
    index = p / "model_index.json"
    if not p.is_dir() or not index.is_file():
        raise InputError(f"{p} is not a diffusers pipeline directory (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{index} is not valid JSON ({e.msg} at line {e.lineno})") from None
    name = data.get("_class_name")
    if name not in ADAPTERS:
        raise InputError(f"{p} holds a {name}; supported pipelines: {', '.join(sorted(ADAPTERS))}")
    return data


def adapter_class(path: str | Path) -> type[Adapter]:
    return ADAPTERS[read_model_index(path)["_class_name"]]


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "Adapter",
    "CogVideoXAdapter",
    "Conditioning",
    "FamilySpec",
    "HunyuanVideo15Adapter",
    "HunyuanVideoAdapter",
    "InputError",
    "LTXVideoAdapter",
    "SequencePlan",
    "WanAdapter",
    "adapter_class",
    "read_model_index",
    "resolve_model_path",
]
