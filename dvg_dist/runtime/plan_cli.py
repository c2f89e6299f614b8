"""``launch/plan.py``'s body — the DVG planner as a command line: which stage grids a latent gets under a token
budget (docs/architecture.md).

    python launch/plan.py --grid 21x90x160 --steps 50 --budget 0.5 --spatial-multiple 2 --synthetic-sketch 0
    python launch/plan.py --grid 21x90x160 --steps 50 --budget 0.5 --demands 0.3,0.6 --json

Demands come from ``--demands DS,DT``, a sketch latent (``--sketch FILE.safetensors``) or a synthetic sketch
at the planner's sketch grid (``--synthetic-sketch SEED``); without any, ``w_s = w_t = 0.5``. Prints the plan
in words, or one JSON object with ``--json``. Bad flags exit 2 with one ``plan.py: error:`` line; a budget
no action can meet exits 1 with the reachable range.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from dvg_dist.dvg import COST_PRESETS, Candidate, DVGOptions, Grid, InfeasibleBudget, Mode, Planner, analyse
from dvg_dist.dvg import demand_weights as weights_of
from dvg_dist.dvg.synthetic import DEMO_SPEED, DEMO_TEXTURE, demo_sketch

PROG = "plan.py"
MODES = (Mode.DVG, Mode.SPATIAL_ONLY, Mode.TEMPORAL_ONLY)
SKETCH_CHANNELS = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, ``plan.py: error: …``, exit 2 (argparse's code), no usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The flags; its ``error`` prints one ``plan.py: error: …`` line and exits 2."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--grid", required=True, help="full latent grid TxHxW, e.g. 21x90x160")
    p.add_argument("--steps", required=True, type=int, help="number of denoising steps N")
    p.add_argument("--budget", required=True, type=float, help="target token density ρ* in (0, 1]")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demands", metavar="DS,DT", help="spatial and temporal demand, each in [0, 1]")
    src.add_argument("--sketch", metavar="FILE", help="safetensors file with the sketch x̂0 [B, C, T, H, W]")
    src.add_argument("--synthetic-sketch", metavar="SEED", type=int, help="analyse a synthetic sketch latent")
    p.add_argument("--spatial-multiple", type=int, default=1, help="spatial sizes are multiples of M (Wan: 2)")
    p.add_argument(
        "--temporal-multiple", type=int, default=1, help="reduced stages' latent frames: multiples of M (CogVideoX: 2)"
    )
    p.add_argument("--s-grid", type=float, default=0.1, help="spacing of the spatial-ratio candidates")
    p.add_argument("--mode", default=Mode.DVG.value, choices=[m.value for m in MODES])
    p.add_argument("--shift", type=float, default=5.0, help="the model's own schedule shift (stage 1)")
    p.add_argument("--cost-model", default="wan2.1-14b", choices=sorted(COST_PRESETS))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of words")
    return p


def _parse_demands(parser: argparse.ArgumentParser, text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        d_s, d_t = (float(v) for v in parts)
    except ValueError:
        parser.error(f"argument --demands: expected two numbers DS,DT; got {text!r}")
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (d_s, d_t)):
        parser.error(f"argument --demands: both demands must be in [0, 1]; got {text!r}")
    return d_s, d_t


def _load_sketch(parser: argparse.ArgumentParser, path: str) -> torch.Tensor:
    """The sketch tensor of a safetensors file: its only tensor, or the one named ``x0_hat``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        parser.error(f"argument --sketch: no such file: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        parser.error(f"argument --sketch: cannot read {path} as safetensors: {exc}".replace("\n", " "))
    if "x0_hat" in tensors:
        x = tensors["x0_hat"]
    elif len(tensors) == 1:
        x = next(iter(tensors.values()))
    else:
        keys = ", ".join(sorted(tensors)) or "none"
        parser.error(f"argument --sketch: {path} holds {len(tensors)} tensors and none is 'x0_hat' (keys: {keys})")
    if x.dim() != 5 or x.numel() == 0 or not x.is_floating_point():
        parser.error(f"argument --sketch: expected a float latent [B, C, T, H, W]; got {x.dtype} {tuple(x.shape)}")
    return x


def build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Planner, dict[str, Any]]:
    """Validate the flags, make the planner and the demand analysis (``None`` entries where absent)."""
    try:
        full = Grid.parse(args.grid)
    except ValueError as exc:
        parser.error(f"argument --grid: {exc}")
    if not (math.isfinite(args.budget) and 0 < args.budget <= 1):
        parser.error(f"argument --budget: must be in (0, 1]; got {args.budget:g}")
    if args.steps < 1:
        parser.error(f"argument --steps: must be >= 1; got {args.steps}")
    if args.spatial_multiple < 1:
        parser.error(f"argument --spatial-multiple: must be >= 1; got {args.spatial_multiple}")
    if args.temporal_multiple < 1:
        parser.error(f"argument --temporal-multiple: must be >= 1; got {args.temporal_multiple}")
    if not (math.isfinite(args.shift) and args.shift > 0):
        parser.error(f"argument --shift: must be > 0; got {args.shift:g}")
    try:
        options = DVGOptions(s_grid=args.s_grid)
    except ValueError as exc:
        parser.error(f"argument --s-grid: {exc}")
    try:
        planner = Planner(
            full=full,
            num_steps=args.steps,
            budget=args.budget,
            options=options,
            spatial_multiple=args.spatial_multiple,
            cost_model=COST_PRESETS[args.cost_model],
            temporal_multiple=args.temporal_multiple,
        )
    except ValueError as exc:
        parser.error(str(exc))

    analysis: dict[str, Any] = {"source": "none", "demands": None, "detail": None}
    alpha = options.alpha
    if args.demands is not None:
        d_s, d_t = _parse_demands(parser, args.demands)
        w_s, w_t = weights_of(d_s, d_t, alpha)
        analysis.update(source="given", demands={"spatial": d_s, "temporal": d_t, "w_s": w_s, "w_t": w_t})
    elif args.sketch is not None or args.synthetic_sketch is not None:
        if args.sketch is not None:
            x = _load_sketch(parser, args.sketch)
            detail = f"{args.sketch}, shape {'x'.join(map(str, x.shape))}"
            if tuple(x.shape[2:]) != tuple(planner.sketch_grid().as_list()):
                detail += f", not the planner's sketch grid {planner.sketch_grid()}"
            analysis.update(source="sketch", detail=detail)
        else:
            g = planner.sketch_grid()
            x = demo_sketch((1, SKETCH_CHANNELS, g.t, g.h, g.w), args.synthetic_sketch)
            analysis.update(
                source="synthetic",
                detail=f"seed {args.synthetic_sketch}, 1x{SKETCH_CHANNELS}x{g}, "
                f"texture {DEMO_TEXTURE:g}, speed {DEMO_SPEED[0]:g},{DEMO_SPEED[1]:g} px/frame",
            )
        d = analyse(x, alpha, options.temporal_demand, options.pyramid_levels)
        analysis.update(demands=d.to_dict())
    analysis["w_s"] = analysis["demands"]["w_s"] if analysis["demands"] else 0.5
    return planner, analysis


def _shifts(planner: Planner, shift: float) -> list[float]:
    return [shift if s is None else s for s in planner.options.stage_shifts]


def to_json(
    args: argparse.Namespace, planner: Planner, analysis: dict[str, Any], chosen: Candidate, feasible: list[Candidate]
) -> dict[str, Any]:
    """The ``--json`` object: the inputs, the stage schedule, demands and weights, the feasible table, the choice."""
    demands = analysis["demands"]
    w_s = analysis["w_s"]
    return {
        "grid": planner.full.as_list(),
        "steps": planner.num_steps,
        "budget": planner.budget,
        "mode": args.mode,
        "spatial_multiple": planner.spatial_multiple,
        "temporal_multiple": planner.temporal_multiple,
        "s_grid": planner.options.s_grid,
        "cost_model": args.cost_model,
        "shifts": _shifts(planner, args.shift),
        "boundaries": list(planner.boundaries),
        "step_counts": list(planner.step_counts),
        "executed_counts": list(planner.executed_counts),
        "sketch_grid": planner.sketch_grid().as_list(),
        "demands": None if demands is None else {**demands, "source": analysis["source"]},
        "weights": {"w_s": w_s, "w_t": 1.0 - w_s},
        "feasible": [c.to_dict() for c in feasible],
        "chosen": {**chosen.to_dict(), "speedup_bound": 1.0 / chosen.flop_density},
    }


def to_words(
    args: argparse.Namespace, planner: Planner, analysis: dict[str, Any], chosen: Candidate, feasible: list[Candidate]
) -> str:
    """The plan in words: schedule, demands, the feasible table with the chosen row marked, a "chosen:" line."""

    def ints(values: list[int]) -> str:
        return ", ".join(str(v) for v in values)

    def path(c: Candidate) -> str:
        return " -> ".join(str(g) for g in c.grids)

    w_s = analysis["w_s"]
    demands = analysis["demands"]
    lines = [
        f"latent grid:      {planner.full} (T x H x W), spatial multiple {planner.spatial_multiple}"
        + (f", temporal multiple {planner.temporal_multiple}" if planner.temporal_multiple > 1 else ""),
        f"steps:            {planner.num_steps}, budget {planner.budget:g}, mode {args.mode}",
        f"cost model:       {args.cost_model} (FLOP density: attention quadratic in tokens)",
        f"boundaries:       switch after model calls {ints(planner.boundaries)}",
        f"step counts:      {ints(planner.step_counts)} (released counting: a boundary call counts to the next stage)",
        f"executed counts:  {ints(planner.executed_counts)} (model calls run on each stage's grid)",
        f"shifts:           {', '.join(f'{s:g}' for s in _shifts(planner, args.shift))}",
        f"sketch grid:      {planner.sketch_grid()}",
    ]
    if demands is None:
        lines.append("demands:          none given (no --demands, --sketch or --synthetic-sketch): w_s = w_t = 0.5")
    else:
        source = {"given": "given on the command line", "sketch": "from the sketch", "synthetic": "synthetic sketch"}
        detail = f": {analysis['detail']}" if analysis["detail"] else ""
        lines.append(
            f"demands:          D_s={demands['spatial']:.4f} D_t={demands['temporal']:.4f} "
            f"({source[analysis['source']]}{detail})"
        )
    lines.append(f"weights:          w_s={w_s:.4f} w_t={1 - w_s:.4f} (alpha {planner.options.alpha:g})")
    if args.mode != Mode.DVG.value:
        lines.append(f"                  (mode {args.mode} ignores the weights: the action closest to the budget wins)")
    lines += [
        "",
        f"feasible actions: {len(feasible)} with |density - {planner.budget:g}| <= {planner.options.delta:g}, "
        "sorted by (|gap|, -density, -s, -T23); * = chosen",
    ]
    head = ["", "s", "T23", "stage 1", "stage 2", "stage 3", "stage 4", "density", "executed", "flops"]
    rows = [
        [
            "*" if c == chosen else "",
            f"{c.s:g}",
            str(c.t23),
            *(str(g) for g in c.grids),
            f"{c.density:.4f}",
            f"{c.executed_density:.4f}",
            f"{c.flop_density:.4f}",
        ]
        for c in feasible
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                v.rjust(n) if i in (1, 2, 7, 8, 9) else v.ljust(n) for i, (v, n) in enumerate(zip(r, widths))
            ).rstrip()
        )
    lines += [
        "",
        f"chosen: s={chosen.s:g} T23={chosen.t23} grids {path(chosen)}; density {chosen.density:.4f} "
        f"(executed {chosen.executed_density:.4f}), flop density {chosen.flop_density:.4f}, "
        f"speed-up bound 1/flop_density = {1.0 / chosen.flop_density:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, build, plan, print. Returns 0, or 1 for an infeasible budget; bad flags raise ``SystemExit(2)``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    planner, analysis = build(args, parser)
    try:
        chosen, feasible = planner.choose(analysis["w_s"], Mode(args.mode))
    except InfeasibleBudget as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(args, planner, analysis, chosen, feasible)))
    else:
        print(to_words(args, planner, analysis, chosen, feasible))
    return 0
