"""The server's settings: one dataclass for ``launch/serve.py``'s flags and the ``args`` of a Serve config file
(``configs/serve-*.yaml``), strictly typed, and the checks that need no Ray and no weights.

Paths (the config, a local model directory, the output directory) are made absolute where the settings are
built, so replicas and rank actors started in another working directory read and write the same files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from ..models import InputError


@dataclass(frozen=True)
class ServeOptions:
    """What one application serves and how its replicas are placed and supervised."""

    config: str
    """YAML config (``configs/*.yaml``): the model and the default sampling settings of every request."""
    model: str | None = None
    """Overrides ``model.path`` (a diffusers directory or hub id)."""
    set: tuple[str, ...] = ()
    """``section.key=value`` config overrides, as ``--set``."""
    nproc: int = 1
    """Ranks per replica (one sequence-parallel group; one GPU each on a GPU cluster)."""
    replicas: int = 1
    """Replicas (groups), data-parallel over the jobs."""
    max_queue: int = 8
    """Jobs waiting (not running) at most; one more is refused with 429."""
    out: str = "out/serve"
    """Where rank 0 writes ``<id>.mp4`` + ``<id>.json`` (and ``inputs/<id>.png`` for image requests)."""
    cpus_per_rank: float = 1.0
    gpus_per_rank: float | None = None
    """None: 1 when the config's device may be CUDA and a GPU is visible (here, or in the Ray cluster), else 0."""
    strict_pack: bool = False
    """Each replica's ranks on one node (STRICT_PACK) rather than packed where they fit (PACK)."""
    request_timeout_s: float = 1800.0
    """A job still running after this long is stopped and failed."""
    setup_timeout_s: float = 600.0
    """Seconds a replica waits for its ranks to start, join the process group and load the model."""
    lease_s: float = 60.0
    """A running job whose replica has not reported for this long is failed (the replica died)."""
    health_check_period_s: float = 10.0
    """How often Serve asks a replica whether it is healthy (a replica that lost a rank says no and is restarted)."""
    max_history: int = 1000
    """Finished jobs the job table remembers (the oldest are forgotten first; their files stay)."""
    verbose: bool = False

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> ServeOptions:
        """From a mapping (a Serve config's ``args``): unknown keys and wrongly typed values are one-line errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"serve options must be a mapping; got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown serve option {unknown[0]}; the options are {', '.join(fields)}")
        if "config" not in data:
            raise ConfigError("serve options need config (a YAML config, e.g. configs/tiny-wan.yaml)")
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = _typed(name, value, fields[name].type)
        options = cls(**values)
        options._check_ranges()
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what travels to the replicas)."""
        data = dataclasses.asdict(self)
        data["set"] = list(self.set)
        return data

    def resolved(self) -> ServeOptions:
        """Absolute config, model (when it is a local path) and output paths."""
        model = self.model
        if model and Path(model).exists():
            model = str(Path(model).resolve())
        return dataclasses.replace(
            self, config=str(Path(self.config).resolve()), model=model, out=str(Path(self.out).resolve())
        )

    def _check_ranges(self) -> None:
        for name in ("nproc", "replicas", "max_queue", "max_history"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve option {name} must be >= 1; got {getattr(self, name)}")
        for name in ("cpus_per_rank", "request_timeout_s", "setup_timeout_s", "lease_s", "health_check_period_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve option {name} must be > 0; got {getattr(self, name)}")
        if self.gpus_per_rank is not None and self.gpus_per_rank < 0:
            raise ConfigError(f"serve option gpus_per_rank must be >= 0; got {self.gpus_per_rank}")

    # -- what the replicas need -------------------------------------------------------------------------

    def load_config(self) -> Config:
        """The base config of every request: the file, ``model``, then ``set`` (later wins); the model path made
        absolute when it is local."""
        overrides = [] if self.model is None else [f"model.path={json.dumps(self.model)}"]
        config = load_config(self.config, overrides + list(self.set))
        path = config.model.path
        if path and Path(path).exists():
            config.model.path = str(Path(path).resolve())
        return config

    def check(self) -> Config:
        """Every check that needs no Ray and no weights (the checkpoint, the default size/frames/budget, the
        parallel layout of ``nproc`` ranks, the output directory); returns the base config."""
        from ..runtime.distributed import validate_layout
        from ..runtime.engine import validate

        config = self.load_config()
        validate(config, [])
        validate_layout(config, self.nproc)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"out {out} exists and is not a directory")
        return config

    def gpus(self, config: Config) -> float:
        """GPUs per rank: the option, else 1 when the device may be CUDA and a GPU is visible, else 0."""
        if self.gpus_per_rank is not None:
            return self.gpus_per_rank
        device = config.model.device
        if not (device in ("auto", "cuda") or device.startswith("cuda:")):
            return 0.0
        try:
            import ray

            if ray.is_initialized():
                return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        except ImportError:  # pragma: no cover - the server needs the ray extra
            pass
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0

    def bundle(self, config: Config) -> dict[str, float]:
        """One rank's resources (one bundle of the replica's placement group)."""
        bundle = {"CPU": self.cpus_per_rank}
        gpus = self.gpus(config)
        if gpus:
            bundle["GPU"] = gpus
        return bundle


_NUMBER = (int, float)


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's annotation (a string, as ``from __future__ import annotations``
    leaves it)."""
    hint = str(hint)
    optional = "None" in hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"serve option {name} must not be null")
    if hint.startswith("str"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"serve option {name} must be a non-empty string; got {value!r}")
        return value
    if hint.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"serve option {name} must be true or false; got {value!r}")
        return value
    if hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"serve option {name} must be an integer; got {value!r}")
        return value
    if hint.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise ConfigError(f"serve option {name} must be a number; got {value!r}")
        return float(value)
    if hint.startswith("tuple"):
        if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"serve option {name} must be a list of strings (section.key=value); got {value!r}")
        return tuple(value)
    raise ConfigError(f"serve option {name}: unsupported type {hint}")  # pragma: no cover - a new field's type


__all__ = ["ServeOptions"]
