"""The config reference page (``docs/configs.md``), rendered from the config dataclasses themselves: every field of
``model``, ``sampling``, ``parallel`` and ``dvg`` with its type, default, the flags that set it and its docstring,
so the page cannot drift from the code (``tests/test_config_docs.py`` fails when the file is stale).

``python launch/config_docs.py --write`` rewrites the page; ``--check`` exits 1 when it is out of date.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any

from ..config import ModelConfig, ParallelConfig, SamplingConfig
from ..dvg.options import DVGOptions

SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("sampling", SamplingConfig),
    ("parallel", ParallelConfig),
    ("dvg", DVGOptions),
)
"""``Config``'s fields, in its order, and the dataclass of each."""

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configs.md"

# Flags with their own handling in ``cli.config_from_args`` (the rest are ``cli.FLAG_FIELDS``).
_SPECIAL_FLAGS = {
    "sampling.negative_prompt": ["--negative_prompt"],
    "parallel.text_encoder": ["--text_encoder_rank0 (sets rank0)"],
    "dvg.fixed": ["--fixed S,R"],
}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field of ``cls``'s class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _flags() -> dict[str, list[str]]:
    """``{section.key: [flag spellings]}`` of ``launch/generate.py`` (dash twins left out)."""
    from .cli import FLAG_FIELDS, OneLineParser, add_generation_args

    parser = OneLineParser()
    add_generation_args(parser)
    spellings: dict[str, list[str]] = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        names = [n for n in action.option_strings if "-" not in n[2:]]
        spellings[action.dest] = names
    out = {key: spellings[dest] for dest, key in FLAG_FIELDS.items()}
    return {**out, **_SPECIAL_FLAGS}


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("dvg_dist.config.", "").replace("dvg_dist.dvg.options.", "")
    if isinstance(hint, type):
        text = hint.__name__
    return text.replace("NoneType", "None")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every config field has a default
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        return "[" + ", ".join("null" if v is None else str(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f'"{value}"' if isinstance(value, str) else str(value)


def _choices(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " One of: " + ", ".join(f"`{m.value}`" for m in hint) + "."
    return ""


def render() -> str:
    """The whole page."""
    flags = _flags()
    lines = [
        "# Config reference",
        "",
        "Generated from the config dataclasses (`dvg_dist/config.py`, `dvg_dist/dvg/options.py`) by",
        "`python launch/config_docs.py --write`; do not edit by hand (`tests/test_config_docs.py` fails when it is",
        "stale).",
        "",
        "A config is a YAML file with up to four sections, `model`, `sampling`, `parallel` and `dvg`; every key is",
        "optional and an unknown key is an error naming it. On the command line the flags in the third column set",
        "their field, and `--set section.key=value` sets any field (the value parsed as YAML; repeatable; later",
        "wins): the file first, then the flags, then the `--set` overrides. `configs/*.yaml` are worked examples.",
        "",
        "```yaml",
        "model: {path: build/tiny-wan, dtype: float32}",
        "sampling: {steps: 12, budget: 0.5, size: 64x64, frame_num: 17}",
        "parallel: {ulysses_degree: 2}",
        "dvg: {stage_shifts: [null, 9.0, 11.0, 11.0]}",
        "```",
    ]
    hints_of = {cls: typing.get_type_hints(cls) for _, cls in SECTIONS}
    for section, cls in SECTIONS:
        docs = field_docs(cls)
        intro = " ".join(inspect.cleandoc(cls.__doc__ or "").split())
        lines += ["", f"## `{section}` ({cls.__name__})", "", intro, "", "| key | type | default | flags | meaning |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for f in dataclasses.fields(cls):
            hint = hints_of[cls][f.name]
            key = f"{section}.{f.name}"
            flag = ", ".join(f"`{x}`" for x in flags.get(key, []))
            meaning = (docs.get(f.name, "") + _choices(hint)).replace("|", "\\|")
            kind = _type_name(hint).replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{kind}` | `{_default(f)}` | {flag or '—'} | {meaning} |")
    return "\n".join(lines) + "\n"


def undocumented() -> list[str]:
    """``section.key`` of every field without a docstring (the page would show an empty meaning)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="config_docs.py", description="Render docs/configs.md from the config classes.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {PAGE.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the page is stale")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    elif args.check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE} is stale: run python launch/config_docs.py --write")
            return 1
        print(f"{PAGE} is current")
    else:
        print(text, end="")
    return 0
