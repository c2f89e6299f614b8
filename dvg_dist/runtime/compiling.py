"""``--compile``: ``torch.compile`` on the transformer(s), once for every stage shape DVG runs.

DVG calls the transformer on up to four grids per video (the sketch, two middle stages, the full grid), and a
different plan per video. Compiled with static shapes that is a recompile per grid and, across videos, soon the
recompile limit — after which torch silently runs eager. So:

- the sequence dimension is dynamic (``dynamic=True``): one compiled graph serves every token count;
- duck sizing is off (``use_duck_shape = False``): otherwise dims that happen to be equal on the first grid (a
  square latent, H = W) are guarded equal, and the first non-square stage recompiles;
- hitting the recompile limit raises instead of falling back to eager (``fail_on_recompile_limit_hit``);
- what was compiled, and how long it took, is measured from dynamo's own counters around each ``generate`` and
  reported as ``timings["compile"]`` (the denoising time then excludes it).

``blocks`` (the default of ``--compile``) compiles each repeated transformer block — diffusers'
``compile_repeated_blocks``, regional compilation: the blocks share one compiled graph, so compile time does not
grow with depth; ``full`` compiles the whole transformer. The sequence-parallel hooks stay outside the compiled
regions' collectives: the attention backends run under sequence parallelism are excluded from tracing
(``torch.compiler.disable``), so dynamo breaks the graph around the all-to-all / ring exchange and compiles the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("none", "blocks", "full")


@dataclass
class CompileReport:
    """What one ``generate`` compiled: graphs (dynamo's unique graphs) and seconds spent compiling them."""

    graphs: int = 0
    seconds: float = 0.0


def configure_dynamo() -> None:
    """The dynamo settings every compiled run needs (process-wide; they only affect compiled code)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    dynamo_config.fail_on_recompile_limit_hit = True


def compile_transformer(module: torch.nn.Module, how: str) -> str:
    """Compile ``module`` in place (``blocks`` or ``full``); returns what was compiled, for the log."""
    if how == "blocks":
        if getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks(dynamic=True)  # type: ignore[operator]
            return f"{type(module).__name__}: repeated blocks {', '.join(module._repeated_blocks)}"  # type: ignore[arg-type]
        how = "full"  # a transformer that declares no repeated blocks is compiled whole
    module.compile(dynamic=True)
    return f"{type(module).__name__}: whole module"


def compile_transformers(transformers: list[torch.nn.Module], how: str) -> None:
    """Compile every transformer the adapter may run (both experts of a two-expert model)."""
    if how == "none":
        return
    configure_dynamo()
    for module in transformers:
        logger.info("torch.compile (dynamic sequence length): %s", compile_transformer(module, how))


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextmanager
def measure_compile(enabled: bool) -> Iterator[CompileReport]:
    """Dynamo's compile counters around a block: the graphs compiled in it and the seconds that took."""
    report = CompileReport()
    if not enabled:
        yield report
        return
    graphs, seconds = _graphs(), _compile_seconds()
    try:
        yield report
    finally:
        report.graphs = _graphs() - graphs
        report.seconds = _compile_seconds() - seconds


def eager_under_compile(fn: Any) -> Any:
    """``fn`` excluded from dynamo tracing: the sequence-parallel attention's collectives run eagerly between two
    compiled regions (a graph break), never traced into one."""
    return torch.compiler.disable(fn, recursive=True)
