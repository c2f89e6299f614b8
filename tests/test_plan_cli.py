"""``launch/plan.py``: the planner CLI's JSON and words output, and its errors.

A few runs go through a real subprocess (what a user runs: exit codes, streams, no traceback); the many
malformed-flag cases call the script's ``main`` in-process, which is the same code without ~2 s of imports.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "plan.py"
BASE = ["--grid", "21x90x160", "--budget", "0.5", "--spatial-multiple", "2"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def plan_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plan_cli", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_plan(plan: dict, budget: float = 0.5) -> None:
    """Keys, types, and the consistency of the chosen row with the feasible table."""
    for key in ("grid", "steps", "budget", "mode", "boundaries", "step_counts", "executed_counts", "sketch_grid"):
        assert key in plan, key
    assert "demands" in plan
    counts = plan["step_counts"]
    assert isinstance(counts, list) and len(counts) == 4 and all(isinstance(n, int) for n in counts)
    assert sum(counts) == plan["steps"] == sum(plan["executed_counts"])
    weights = plan["weights"]
    assert set(weights) >= {"w_s", "w_t"} and abs(weights["w_s"] + weights["w_t"] - 1) < 1e-9
    feasible = plan["feasible"]
    assert isinstance(feasible, list) and feasible
    for row in feasible:
        assert set(row) >= {"s", "t23", "grids", "density", "executed_density", "flop_density"}
        assert isinstance(row["t23"], int) and isinstance(row["s"], float)
        assert len(row["grids"]) == 4 and row["grids"][-1] == plan["grid"]
        assert abs(row["density"] - budget) <= 0.02 + 1e-9
    chosen = plan["chosen"]
    assert set(chosen) >= {"s", "t23", "grids", "density", "flop_density"}
    assert 0 < chosen["flop_density"] < 1
    assert any(all(row[k] == chosen[k] for k in ("s", "t23", "grids", "density")) for row in feasible)


def test_json_with_synthetic_sketch_at_50_steps() -> None:
    proc = run(*BASE, "--steps", "50", "--synthetic-sketch", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)  # the whole stdout is one JSON object
    check_plan(plan)
    assert plan["grid"] == [21, 90, 160] and plan["steps"] == 50 and plan["mode"] == "dvg"
    assert plan["step_counts"] == [14, 11, 11, 14]
    assert plan["executed_counts"] == [15, 11, 11, 13]
    assert plan["boundaries"] == [14, 25, 36]
    assert plan["sketch_grid"] == [8, 44, 80]
    demands = plan["demands"]
    assert demands["source"] == "synthetic" and 0 < demands["spatial"] < 1 and 0 < demands["temporal"] < 1
    assert plan["weights"]["w_s"] == demands["w_s"]


def test_json_with_sketch_file_at_12_steps(tmp_path: Path) -> None:
    path = tmp_path / "sketch.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"x0_hat": torch.randn(1, 16, 8, 44, 80, generator=gen), "extra": torch.zeros(3)}, str(path))
    proc = run(*BASE, "--steps", "12", "--sketch", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    check_plan(plan)
    assert plan["step_counts"] == [3, 3, 2, 4]
    assert plan["boundaries"] == [3, 6, 8]
    # White noise: spatial demand ≈ 0.63 (docs/architecture.md, eq. 3), no coherent motion.
    assert plan["demands"]["source"] == "sketch" and 0.55 < plan["demands"]["spatial"] < 0.7


def test_infeasible_budget_is_one_line_naming_the_range() -> None:
    proc = run("--grid", "21x90x160", "--steps", "50", "--budget", "0.2")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("plan.py: error:") and "0.2" in lines[0] and "reachable" in lines[0]
    assert "Traceback" not in proc.stderr


def test_malformed_grid_exits_2_without_traceback() -> None:
    proc = run("--grid", "21x90", "--steps", "50", "--budget", "0.5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("plan.py: error: argument --grid") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--grid", "21xAx160", "--steps", "50", "--budget", "0.5"], "--grid"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "1.5"], "--budget"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0"], "--budget"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--demands", "x,y"], "--demands"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--demands", "0.3"], "--demands"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--demands", "0.3,1.2"], "--demands"),
        (["--grid", "21x90x160", "--steps", "3", "--budget", "0.5"], "steps"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--sketch", "/no/such.safetensors"], "--sketch"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--s-grid", "0"], "--s-grid"),
        (["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--mode", "fixed"], "--mode"),
        (
            ["--grid", "21x90x160", "--steps", "50", "--budget", "0.5", "--demands", "0.1,0.2", "--sketch", "a"],
            "not allowed",
        ),
    ],
)
def test_malformed_flags_exit_2_with_one_line(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("plan.py: error:") and needle in err


def test_sketch_file_with_several_tensors_lists_the_keys(
    plan_cli: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 2, 2, 4, 4), "b": torch.zeros(1, 2, 2, 4, 4)}, str(path))
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main([*BASE, "--steps", "50", "--sketch", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a, b" in err and "x0_hat" in err


def test_words_output(plan_cli: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main([*BASE, "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "w_s = w_t = 0.5" in out  # no demands given, and it says so
    assert "14, 11, 11, 14" in out and "8x44x80" in out
    chosen = [line for line in out.splitlines() if line.startswith("chosen:")]
    assert len(chosen) == 1 and "speed-up bound" in chosen[0] and "21x90x160" in chosen[0]
    assert sum(line.startswith("*") for line in out.splitlines()) == 1  # the chosen row is marked once

    assert plan_cli.main([*BASE, "--steps", "50", "--demands", "0.9,0.1", "--json"]) == 0
    spatial_heavy = json.loads(capsys.readouterr().out)
    assert plan_cli.main([*BASE, "--steps", "50", "--demands", "0.1,0.9", "--json"]) == 0
    temporal_heavy = json.loads(capsys.readouterr().out)
    # A spatially demanding video keeps more space (larger s) and a temporally demanding one more frames.
    assert spatial_heavy["chosen"]["s"] > temporal_heavy["chosen"]["s"]
    assert spatial_heavy["chosen"]["t23"] < temporal_heavy["chosen"]["t23"]
    assert spatial_heavy["demands"]["source"] == "given"
