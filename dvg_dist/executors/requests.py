"""Batch requests for the Ray executor: a tolerant JSONL reader (a bad line is reported and skipped, the
others run) and the ``manifest.jsonl`` that makes a re-run resume.

``runtime.cli.read_requests`` refuses a whole file on one malformed line (right for a one-shot
``generate.py``); a long batch job instead reports the line number and carries on.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..dvg.options import Mode
from ..models import InputError
from ..runtime.engine import Request
from ..runtime.outputs import output_name

logger = logging.getLogger("dvg_dist.ray")

KEYS = {"prompt", "seed", "negative_prompt", "image", "name", "budget", "mode"}
MANIFEST = "manifest.jsonl"


@dataclass
class BatchItem:
    """One request of a batch with its own budget/mode (None: the config's) and its output name."""

    request: Request
    name: str
    line: int
    budget: float | None = None
    mode: str | None = None


def _parse_line(item: Any, where: str) -> None:
    """Raise ``InputError`` naming ``where`` unless ``item`` is a valid request object."""
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object")
    unknown = set(item) - KEYS
    if unknown:
        raise InputError(f"{where}: unknown keys {sorted(unknown)}")
    if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise InputError(f"{where}: needs a non-empty string 'prompt'")
    if "seed" in item and (not isinstance(item["seed"], int) or isinstance(item["seed"], bool)):
        raise InputError(f"{where}: seed must be an integer")
    budget = item.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise InputError(f"{where}: budget must be a number in (0, 1]")
    mode = item.get("mode")
    if mode is not None and mode not in {m.value for m in Mode}:
        raise InputError(f"{where}: mode must be one of {', '.join(m.value for m in Mode)}")
    for key in ("name", "negative_prompt", "image"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise InputError(f"{where}: {key} must be a string")
    name = item.get("name")
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise InputError(f"{where}: name must be a plain file stem")


def read_batch(args: argparse.Namespace, config: Config) -> tuple[list[BatchItem], list[str]]:
    """``--prompt`` or ``--prompts FILE`` (plain lines or JSONL with prompt/seed/negative_prompt/image/name/
    budget/mode). Returns (valid items, one message per skipped line naming its number). Output names follow
    generate.py (``NNNN_<slug>_s<seed>_<mode>``, NNNN = position among the valid requests) unless "name"."""
    s = config.sampling
    raw: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("--prompt is empty")
        raw.append((0, {"prompt": args.prompt}))
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise InputError(f"prompts file not found: {path}")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if not text.startswith("{"):
                raw.append((number, {"prompt": text}))
                continue
            try:
                item = json.loads(text)
                _parse_line(item, f"{path}:{number}")
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{number}: not valid JSON ({e.msg}); skipped")
                continue
            except InputError as e:
                errors.append(f"{e}; skipped")
                continue
            raw.append((number, item))
    items: list[BatchItem] = []
    for index, (number, item) in enumerate(raw):
        req = Request(
            item["prompt"],
            item.get("seed", s.seed),
            item.get("negative_prompt", args.negative_prompt),
            item.get("image", args.image),
            item.get("name"),
        )
        mode = item.get("mode") or s.mode.value
        name = req.name or output_name(req.prompt, req.seed, mode, index if len(raw) > 1 else None)
        budget = item.get("budget")
        items.append(BatchItem(req, name, number, None if budget is None else float(budget), item.get("mode")))
    names = [it.name for it in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two requests would write the same outputs: {', '.join(duplicates)}; give them a 'name'")
    return items, errors


def item_config(config: Config, item: BatchItem) -> Config:
    """The config with the item's own budget/mode (validated by the dataclasses)."""
    from dataclasses import replace

    if item.budget is None and item.mode is None:
        return config
    try:
        sampling = replace(
            config.sampling,
            budget=config.sampling.budget if item.budget is None else item.budget,
            mode=Mode(item.mode) if item.mode is not None else config.sampling.mode,
        )
    except (ConfigError, ValueError) as e:
        raise InputError(f"line {item.line}: {e}") from None
    return replace(config, sampling=sampling)


def finished(out: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries with status ok whose files all exist, by name (the last line for a name wins).
    A torn last line (the driver killed mid-append) is ignored."""
    path = out / MANIFEST
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        files = entry.get("files") or {}
        if entry.get("status") == "ok" and files and all((out / f).is_file() for f in files.values()):
            done[entry["name"]] = entry
        else:
            done.pop(entry["name"], None)
    return done


def append_manifest(out: Path, entry: dict[str, Any]) -> None:
    """One JSON line, appended and flushed with a single write (the driver is the manifest's only writer)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MANIFEST, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
