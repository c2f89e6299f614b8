"""Every command shown in README.md and docs/*.md, so the docs cannot rot.

The convention the pages follow: commands live in fenced ```` ```sh ```` blocks, one per line (a trailing backslash
continues it). A command that cannot run in CPU CI within seconds ends with ``# gpu`` (CUDA or real weights),
``# cluster`` (a Ray cluster, several machines) or ``# slow`` (training, benchmarks, ``make`` targets); it is not
run, but when it calls one of our scripts its flags are parsed by that script's own parser and the script must
exist. Every other command is run here — in-process, from a scratch directory whose ``configs``/``models`` are the
repository's and whose ``build/tiny-*`` are the tiny checkpoints — and must exit 0. The README's ```` ```python ````
blocks (the API example) run there too, unless their first line is one of the marks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"#\s*(gpu|cluster|slow)\s*$")
TINY = ("wan", "wan-moe", "wan-i2v", "hunyuan", "hunyuan15")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    mark: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def shell_commands(path: Path) -> list[Command]:
    """The commands of the page's ```sh blocks, continuations joined, comments dropped, each with its mark."""
    out: list[Command] = []
    inside, pending, start = False, "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("```"):
            inside = line == "```sh" if not inside else False
            continue
        if not inside or (not pending and (not line or line.startswith("#"))):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        mark = MARK.search(text)
        out.append(Command(path.name if path.parent == ROOT else f"docs/{path.name}", start, text,
                           mark.group(1) if mark else None))  # fmt: skip
    return out


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line, source)`` of each ```python block of the page that does not start with a mark."""
    out, inside, start, body = [], False, 0, []  # type: ignore[var-annotated]
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.strip().startswith("```"):
            if not inside and raw.strip() == "```python":
                inside, start, body = True, number + 1, []
            elif inside:
                inside = False
                if body and not MARK.search(body[0].strip()):
                    out.append((start, "\n".join(body)))
            continue
        if inside:
            body.append(raw)
    return out


def _script_argv(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(script, args)`` of a ``python X.py``, ``torchrun ... X.py`` or ``ray job submit ... -- python X.py`` line."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # FOO=bar prefixes
    if not tokens:
        return None
    if tokens[0] == "ray" and "--" in tokens:
        tokens = tokens[tokens.index("--") + 1 :]
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return tokens[1], tokens[2:]
    if tokens[0] == "torchrun":
        script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if script is not None:
            return tokens[script], tokens[script + 1 :]
    return None


def _launch_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "launch" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from dvg_dist.executors.ray_executor import build_parser as ray_parser
    from dvg_dist.runtime.check_gpu import build_parser as check_gpu_parser
    from dvg_dist.runtime.generate import build_parser as generate_parser
    from dvg_dist.runtime.plan_cli import build_parser as plan_parser
    from dvg_dist.serve.cli import build_parser as serve_parser

    return {
        "launch/generate.py": generate_parser,
        "launch/ray_generate.py": ray_parser,
        "launch/check_gpu.py": check_gpu_parser,
        "launch/plan.py": plan_parser,
        "launch/serve.py": serve_parser,
        "launch/make_tiny_checkpoint.py": lambda: _launch_module("make_tiny_checkpoint").build_parser(),
        "launch/train_demo.py": lambda: _launch_module("train_demo").build_parser(),
    }


def _runners() -> dict[str, Callable[[list[str]], int | None]]:
    from dvg_dist.executors.local import main as generate_main
    from dvg_dist.runtime.config_docs import main as config_docs_main
    from dvg_dist.runtime.plan_cli import main as plan_main

    return {
        "launch/generate.py": generate_main,
        "launch/plan.py": plan_main,
        "launch/config_docs.py": config_docs_main,
        "launch/make_tiny_checkpoint.py": lambda argv: _launch_module("make_tiny_checkpoint").main(argv),
    }


ALL = [c for page in PAGES for c in shell_commands(page)]


def test_the_pages_show_commands_and_mark_the_heavy_ones():
    assert ALL, "no ```sh blocks found"
    for page in PAGES:
        text = page.read_text()
        assert "```bash" not in text, f"{page.name}: use ```sh for commands (the convention this test reads)"
    for c in ALL:
        if c.mark is None:
            found = _script_argv(shlex.split(c.text, comments=True))
            assert found is not None and found[0] in _runners(), (
                f"{c}: not one of the scripts CI runs; mark it # gpu, # cluster or # slow"
            )


@pytest.mark.parametrize("command", [c for c in ALL if c.mark], ids=str)
def test_marked_commands_name_real_scripts_and_flags(command: Command):
    found = _script_argv(shlex.split(command.text, comments=True))
    if found is None:
        return  # make, pip, docker, ray start ...: nothing of ours to parse
    script, args = found
    assert (ROOT / script).is_file(), f"{command}: {script} does not exist"
    parser = _parsers().get(script)
    if parser is None:
        return  # bench/*.py parse inside their main; the file exists
    try:
        parser().parse_args(args)
    except SystemExit as e:
        assert e.code == 0, f"{command}: {script} rejects these flags (exit {e.code})"


@pytest.fixture
def sandbox(tiny_checkpoint, tmp_path, monkeypatch) -> Path:
    """A scratch working directory: the repository's configs/models/launch/bench, the tiny checkpoints in build/."""
    for name in ("configs", "models", "launch", "bench"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "build").mkdir()
    for family in TINY:
        (tmp_path / "build" / f"tiny-{family}").symlink_to(tiny_checkpoint(family))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_unmarked_commands_run(sandbox, capsys):
    runners = _runners()
    ran = []
    for c in [c for c in ALL if c.mark is None]:
        found = _script_argv(shlex.split(c.text, comments=True))
        assert found is not None
        script, args = found
        try:
            code = runners[script](args)
        except SystemExit as e:
            code = e.code  # type: ignore[assignment]
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (0, None), f"{c}: exit {code}: {err[-3:]}"
        ran.append(c)
    print(f"ran {len(ran)} documented commands in {os.getcwd()}")
    assert ran, "no documented command runs in CI: show at least the cheap ones unmarked"


def test_readme_python_examples_run(sandbox):
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "the README shows the Python API in a ```python block"
    for line, source in blocks:
        exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "readme_example"})
