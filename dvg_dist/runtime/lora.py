"""LoRA adapters on the transformer(s): ``--lora PATH[:SCALE]`` (repeatable), ``--lora_2`` for the low-noise
expert of a Wan 2.2 A14B checkpoint, ``--fuse_lora``.

Two halves. :func:`check` runs before any weight loads (on every rank, like the rest of the validation): each file
must exist and be safetensors, and each of its keys — read through the pipeline's own ``lora_state_dict``, which
converts the original-Wan (``diffusion_model.…``) and musubi (``lora_unet_…``) formats to diffusers names — must name
a linear layer of the transformer with the shapes the LoRA implies. The transformer is built on the meta device from
its ``config.json`` for that, so a LoRA for another model size or family fails in one line instead of deep inside
PEFT. :func:`apply` then loads them with diffusers' own ``load_lora_weights`` (PEFT), one named adapter per file,
sets their scales, and optionally fuses them into the weights. The engine applies them right after loading the
pipeline, before the sequence-parallel hooks, FSDP2 and offload, so every rank holds the same adapted model and the
parallel machinery sees ordinary modules.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ..config import Config, LoraSpec, ModelConfig
from ..models import InputError, read_model_index

logger = logging.getLogger(__name__)

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def _target(field: str) -> str:
    return "transformer_2" if field == "loras_2" else "transformer"


def _flag(field: str) -> str:
    return "--lora_2" if field == "loras_2" else "--lora"


def _pipeline_class(path: Path) -> Any:
    import diffusers
    from diffusers.loaders import WanLoraLoaderMixin

    name = read_model_index(path)["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, WanLoraLoaderMixin):
        raise InputError(f"--lora: LoRAs are supported on Wan checkpoints (WanPipeline, WanImageToVideoPipeline); "
                         f"{path} is a {name}")  # fmt: skip
    return cls


def _meta_linears(path: Path, component: str) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every ``nn.Linear`` of ``component``, from its config
    alone (built on the meta device: no memory, no weights)."""
    import json

    import diffusers
    import torch

    config = json.loads((path / component / "config.json").read_text())
    model_cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = model_cls.from_config(config)
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def read_lora(spec: LoraSpec, pipeline_cls: Any, flag: str) -> dict[str, Any]:
    """The LoRA's state dict in diffusers names (the pipeline's own conversion), or a one-line :class:`InputError`."""
    from safetensors import SafetensorError, safe_open

    file = Path(spec.path)
    if not file.is_file():
        raise InputError(f"{flag}: LoRA file not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(
            f"{flag}: {file} is not a safetensors file (LoRAs load from safetensors only): {str(e).splitlines()[0]}"
        ) from None
    try:
        return dict(pipeline_cls.lora_state_dict(str(file)))
    except Exception as e:  # the format converters raise ValueError/KeyError/IndexError on foreign layouts
        raise InputError(f"{flag}: cannot read {file} as a LoRA ({type(e).__name__}: {e})".splitlines()[0]) from None


def check_state_dict(state: dict[str, Any], linears: dict[str, tuple[int, int]], file: str, flag: str) -> int:
    """Every key names a linear layer of the transformer with matching shapes; returns the number of layers the LoRA
    adapts. One line naming the first offending key otherwise."""
    layers: dict[str, dict[str, Any]] = {}
    for full, tensor in state.items():
        if full.startswith("text_encoder"):
            continue  # diffusers' Wan loader takes the transformer's keys only
        key = full.removeprefix("transformer.")
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise InputError(f"{flag}: {file}: key {full} is not a LoRA weight (lora_A / lora_B)")
        layers.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    if not layers:
        raise InputError(f"{flag}: {file} holds no transformer LoRA keys (found e.g. {next(iter(state), 'none')})")
    unknown = [name for name in layers if name not in linears]
    if unknown:
        example = next(iter(linears))
        raise InputError(
            f"{flag}: {file}: {len(unknown)} of its {len(layers)} layers match no module of the transformer, "
            f"e.g. {unknown[0]} (the transformer has e.g. {example}); a LoRA for another model?"
        )
    for name, parts in layers.items():
        a, b = parts.get(".lora_A.weight"), parts.get(".lora_B.weight")
        if a is None or b is None:
            raise InputError(f"{flag}: {file}: {name} has only one of lora_A / lora_B")
        fan_in, fan_out = linears[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise InputError(
                f"{flag}: {file}: {name} is {fan_in}->{fan_out} in the transformer, the LoRA is "
                f"{tuple(a.shape)} / {tuple(b.shape)} (lora_A / lora_B); a LoRA for another model size?"
            )
    return len(layers)


def check(config: Config, path: str | Path) -> None:
    """All of the LoRA checks that need no model weights (see the module docstring)."""
    m = config.model
    if not (m.loras or m.loras_2):
        return
    path = Path(path)
    pipeline_cls = _pipeline_class(path)
    if m.loras_2 and not (path / "transformer_2" / "config.json").is_file():
        raise InputError(
            f"--lora_2 adapts transformer_2, the low-noise expert of a Wan 2.2 A14B checkpoint; {path} has none "
            "(use --lora)"
        )
    for field in ("loras", "loras_2"):
        specs: tuple[LoraSpec, ...] = getattr(m, field)
        if not specs:
            continue
        linears = _meta_linears(path, _target(field))
        for spec in specs:
            state = read_lora(spec, pipeline_cls, _flag(field))
            check_state_dict(state, linears, spec.path, _flag(field))


def apply(pipe: Any, model: ModelConfig) -> list[dict[str, Any]]:
    """Load the configured LoRAs into the pipeline's transformer(s) with diffusers' ``load_lora_weights``, set their
    scales, and fuse them (then drop the LoRA layers) with ``fuse_lora``. Returns what was loaded, for the logs and
    the sidecar."""
    loaded: list[dict[str, Any]] = []
    for field in ("loras", "loras_2"):
        specs: tuple[LoraSpec, ...] = getattr(model, field)
        if not specs:
            continue
        target = _target(field)
        module = getattr(pipe, target, None)
        if module is None:
            raise InputError(f"{_flag(field)}: the pipeline has no {target}")
        names = [f"{target}_lora{i}" for i in range(len(specs))]
        for name, spec in zip(names, specs, strict=True):
            with warnings.catch_warnings():  # PEFT warns on every adapter after the first; several are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(spec.path, adapter_name=name, load_into_transformer_2=target == "transformer_2")
            loaded.append({"component": target, "path": spec.path, "scale": spec.scale, "adapter": name})
        module.set_adapters(names, weights=[s.scale for s in specs])
        if model.fuse_lora:
            module.fuse_lora(adapter_names=names)
            module.unload_lora()  # the fused weights stay; the LoRA layers go
        what = ", ".join(f"{s.path} (scale {s.scale:g})" for s in specs)
        logger.info("%s: LoRA %s %s", target, what, "fused into the weights" if model.fuse_lora else "loaded")
    return loaded
