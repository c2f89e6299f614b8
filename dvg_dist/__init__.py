"""dvg_dist: distributed, sequence-parallel video generation with DVG (see README.md)."""

import os as _os


def _quiet_deepspeed_on_cpu_builds() -> None:
    """transformers imports DeepSpeed whenever it is installed (our ``deepspeed`` extra), and DeepSpeed's accelerator
    auto-detection then prints a WARNING line to *stdout* on a CPU-only torch — into every command's output, e.g.
    the directory ``make_tiny_checkpoint.py`` prints. On a CPU-only build the answer is known: say it."""
    if "DS_ACCELERATOR" in _os.environ:
        return
    from importlib.util import find_spec

    if find_spec("deepspeed") is None:
        return
    import torch

    if torch.version.cuda is None and not torch.cuda.is_available():
        _os.environ["DS_ACCELERATOR"] = "cpu"


_quiet_deepspeed_on_cpu_builds()

_API = ("DVG", "VideoOutput", "Plan", "StagePlan", "Chosen", "Demands", "StepInfo")


def __getattr__(name: str) -> object:
    """``from dvg_dist import DVG`` (the Python API, ``dvg_dist/api.py``), imported on first use."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dvg_dist' has no attribute {name!r}")


__all__ = list(_API)
