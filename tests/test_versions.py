"""``--version`` and the start-up refusal of known-incompatible version combinations."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dvg_dist.runtime import versions
from dvg_dist.runtime.generate import build_parser

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0", "yunchang": "0.6.4", "xfuser": None}


def test_parse() -> None:
    assert versions.parse("2.13.0+cpu") == (2, 13, 0)
    assert versions.parse("0.43.0.dev0") == (0, 43, 0)
    assert versions.parse("2.8.3.post2") == (2, 8, 3)
    assert versions.parse("1.0rc1") == (1, 0)


def test_the_tested_combination_passes() -> None:
    assert versions.problems(GOOD) == []
    assert versions.problems() == []  # this environment is the tested one
    versions.check_versions()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"torch": "2.4.1"}, "torch 2.4.1 is too old"),
        ({"diffusers": "0.35.0"}, "diffusers 0.35.0 is too old"),
        ({"transformers": "4.44.2"}, "transformers 4.44.2 is too old"),
        ({"yunchang": "0.5.0"}, "dvg_dist[xfuser]"),
        ({"xfuser": "0.7.0", "yunchang": None}, "xfuser 0.7.0 is installed without yunchang"),
    ],
)
def test_known_bad_combinations_are_named(change: dict[str, str | None], needle: str) -> None:
    found = versions.problems({**GOOD, **change})
    assert len(found) == 1 and needle in found[0]


def test_version_flag_needs_no_other_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"torch         {metadata.version('torch')}" in out
    assert f"diffusers     {metadata.version('diffusers')}" in out
    assert "attention     native" in out and "compatibility ok" in out
    assert "gloo" in out
    if not torch.cuda.is_available():
        assert "devices       cpu\n" in out


def test_generate_refuses_an_incompatible_install_before_any_work(tmp_path: Path) -> None:
    """A stale diffusers is refused in one line, exit 2, before the checkpoint is even looked at."""
    code = (
        "import sys; from importlib import metadata; real = metadata.version\n"
        "metadata.version = lambda n: '0.30.0' if n == 'diffusers' else real(n)\n"
        "from dvg_dist.executors.local import main; sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", "configs/tiny-wan.yaml", "--model", str(tmp_path / "missing"),
         "--prompt", "x", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("generate.py: error: incompatible versions: diffusers 0.30.0 is too old")
    assert not out.exists()
