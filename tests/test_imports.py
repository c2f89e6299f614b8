"""The algorithm package stays single-process and model-agnostic: dvg_dist/dvg imports no torch.distributed,
no diffusers and no transformers."""

import ast
import subprocess
import sys
from pathlib import Path

DVG = Path(__file__).resolve().parents[1] / "dvg_dist" / "dvg"
FORBIDDEN = ("torch.distributed", "diffusers", "transformers")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_dvg_sources_import_no_distributed_or_diffusers():
    offenders = [
        f"{p.name}: {name}"
        for p in sorted(DVG.glob("*.py"))
        for name in _imports(p)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]
    assert not offenders, f"dvg_dist/dvg must not import {FORBIDDEN}: {offenders}"


def test_importing_dvg_loads_neither_diffusers_nor_distributed_modules():
    code = (
        "import sys, dvg_dist.dvg, dvg_dist.config\n"
        "bad = [m for m in sys.modules if m.startswith(('diffusers', 'transformers', 'torch.distributed.fsdp'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing dvg_dist.dvg pulled in: {out}"
