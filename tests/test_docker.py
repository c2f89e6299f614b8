"""The Docker images and the Ray compose file, checked statically (no Docker daemon exists on these machines).

What can be checked without building: the compose file parses and wires what it claims, every path the files
copy or mount exists, their install commands are the documented ones (README.md and docs/*.md), and every dvg_dist
command line in them parses with the real argument parsers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from dvg_dist.executors.ray_executor import build_parser as ray_parser
from dvg_dist.runtime.generate import build_parser as generate_parser
from dvg_dist.serve.cli import build_parser as serve_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs with continuation lines joined and comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs(command: str) -> list[str]:
    """The ``pip install -c constraints.txt ...`` commands of a RUN line, as the README spells them."""
    found = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if "install" in words and "-c" in words:
            start = next(i for i, w in enumerate(words) if w.endswith("pip"))
            found.append(shlex.join(["pip", *words[start + 1 :]]))
    return found


def readme_installs() -> set[str]:
    """The ``pip install -c constraints.txt ...`` command lines the documentation shows (README.md and docs/*.md;
    the install section lives in docs/deploy.md), normalised: ``VAR=value`` prefixes such as ``DS_BUILD_OPS=0`` and
    a trailing ``# comment`` are dropped."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    raw = [ln.strip() for doc in docs for ln in doc.read_text().splitlines()]
    lines = [re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", ln) for ln in raw]
    commands = [ln.split("#")[0] for ln in lines if ln.startswith("pip install -c constraints.txt")]
    return {shlex.join(shlex.split(c)) for c in commands}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_only_what_exists(name: str) -> None:
    copies = [arg.split()[:-1] for inst, arg in instructions(name) if inst == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_as_the_readme_says(name: str) -> None:
    runs = [arg for inst, arg in instructions(name) if inst == "RUN"]
    installs = [cmd for run in runs for cmd in pip_installs(run)]
    assert len(installs) == 1, installs
    assert installs[0] in readme_installs(), f"{name} installs `{installs[0]}`, which the docs do not show"
    env = " ".join(arg for inst, arg in instructions(name) if inst == "ENV")
    assert "DS_BUILD_OPS=0" in env  # DeepSpeed must not try to compile CUDA ops at install


def test_cpu_image_is_the_make_test_environment() -> None:
    """Dockerfile.cpu installs the extras the Makefile installs, on the Python constraints.txt was tested with."""
    make = (ROOT / "Makefile").read_text()
    (make_extras,) = re.findall(r'-e "\.\[([a-z,]+)\]"', make)
    runs = " ".join(arg for inst, arg in instructions("Dockerfile.cpu") if inst == "RUN")
    (docker_extras,) = re.findall(r'-e "\.\[([a-z,]+)\]"', runs)
    assert set(make_extras.split(",")) == set(docker_extras.split(","))
    tested = re.search(r"Python (\d+\.\d+)", (ROOT / "constraints.txt").read_text())
    assert tested is not None
    base = next(arg for inst, arg in instructions("Dockerfile.cpu") if inst == "FROM")
    assert base.startswith(f"python:{tested.group(1)}")
    cuda_runs = " ".join(arg for inst, arg in instructions("Dockerfile") if inst == "RUN")
    assert f"python{tested.group(1)}" in cuda_runs


def test_readme_install_commands_name_real_extras() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = set(re.findall(r"^(\w+) = \[", pyproject.split("[project.optional-dependencies]")[1], re.M))
    assert readme_installs()
    for cmd in readme_installs():
        (named,) = re.findall(r"\[([a-z,]+)\]", cmd)
        assert set(named.split(",")) <= extras, cmd


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.ray.yaml").read_text())


def test_compose_parses_and_wires_a_ray_cluster() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"ray-head", "ray-worker", "submit", "serve"}
    head, worker, submit = services["ray-head"], services["ray-worker"], services["submit"]
    assert "--head" in head["command"] and "--port=6379" in head["command"]
    assert "--address=ray-head:6379" in worker["command"]
    gpus = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    for svc in services.values():
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"  # head, workers and the job CLI share one token
        assert any(v.startswith("outputs:/out") for v in svc["volumes"])
        build = svc["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert "outputs" in data["volumes"]
    assert submit["command"].startswith("ray job submit --address http://ray-head:8265")


def test_compose_mount_defaults_exist() -> None:
    for svc in compose()["services"].values():
        for volume in svc["volumes"]:
            default = re.fullmatch(r"\$\{\w+:-([^}]+)\}:.*", volume)
            if default:
                assert (DOCKER / default.group(1)).is_file(), volume


def _env_defaults(command: str) -> str:
    """``${WORKERS:-8}`` → ``8``: the command line compose runs with the defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)


def test_compose_job_command_parses_with_ray_generate() -> None:
    command = _env_defaults(compose()["services"]["submit"]["command"])
    words = shlex.split(command)
    script = words[words.index("--") + 2]
    assert (ROOT / script).is_file()
    args = ray_parser().parse_args(words[words.index("--") + 3 :])
    assert args.out == "/out" and args.prompts == "/prompts.jsonl"
    assert args.workers % args.sp == 0
    assert (ROOT / args.config).is_file()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_documented_generate_commands_parse(name: str) -> None:
    """The usage lines in the Dockerfiles' header comments are valid generate.py command lines."""
    text = (DOCKER / name).read_text()
    comment = "\n".join(ln.lstrip("# ") for ln in text.splitlines() if ln.startswith("#"))
    commands = re.findall(r"launch/generate\.py (.*?)(?:\n\n|\Z)", re.sub(r"\\\n\s*", " ", comment), re.S)
    for cmd in commands:
        args = generate_parser().parse_args(shlex.split(cmd.strip()))
        assert (ROOT / args.config).is_file()


def test_compose_serve_command_parses_with_serve_py() -> None:
    """The video server: launch/serve.py joins the cluster, its HTTP port is the one the head publishes."""
    services = compose()["services"]
    svc = services["serve"]
    assert svc["profiles"] == ["serve"] and svc["depends_on"]["ray-head"]["condition"] == "service_healthy"
    words = shlex.split(_env_defaults(svc["command"]))
    assert words[:2] == ["python", "launch/serve.py"] and (ROOT / words[1]).is_file()
    args = serve_parser().parse_args(words[2:])
    assert args.address == "ray-head:6379" and args.host == "0.0.0.0"
    assert args.out.startswith("/out/") and args.model == "/ckpt" and (ROOT / args.config).is_file()
    assert args.gpus_per_rank == 1 and args.nproc >= 1
    published = [_env_defaults(p) for p in services["ray-head"]["ports"]]
    assert f"{args.port}:{args.port}" in published, "the head (where Serve's proxy runs) must publish the port"
