"""The Ray executor: sp groups of actors, data-parallel groups, resume, a killed actor, ``ray job submit``.

One in-process Ray session for the module (``ray_session``), created after the ``ray job submit`` test,
which runs its own head in subprocesses (``ray start --head`` … ``ray stop``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from dvg_dist.config import load_config  # noqa: E402
from dvg_dist.executors.ray_executor import ExecutorOptions, GroupFailed, RayExecutor, main  # noqa: E402
from dvg_dist.executors.requests import BatchItem  # noqa: E402
from dvg_dist.runtime.engine import Engine, Request  # noqa: E402

pytest_plugins = ["conftest_tiny"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-wan.yaml")
PROMPTS = [("a red ball", 5), ("a blue cube", 7)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _jsonl(prompts: list[tuple[str, int]]) -> list[str]:
    return [json.dumps({"prompt": p, "seed": s}) for p, s in prompts]


def _name(index: int, prompt: str, seed: int) -> str:
    return f"{index:04d}_{prompt.replace(' ', '-')}_s{seed}_dvg"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("wan"))


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[tuple[str, int], torch.Tensor]:
    """Single-process latents (the Engine alone, no process group) for PROMPTS."""
    engine = Engine(load_config(CONFIG, [f"model.path={json.dumps(checkpoint)}"]))
    return {(p, s): engine.generate([Request(p, s)], progress=False).latent[0:1] for p, s in PROMPTS}


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _argv(checkpoint: str, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--model", checkpoint, "--prompts", str(prompts), "--out", str(out),
            "--save-latent", "--no-progress", "--cpus-per-worker", "0.5", "--set", "parallel.timeout_s=60",
            *extra]  # fmt: skip


def _assert_matches(out: Path, reference: dict[tuple[str, int], torch.Tensor]) -> None:
    for i, (prompt, seed) in enumerate(PROMPTS):
        name = _name(i, prompt, seed)
        for suffix in (".mp4", ".json", ".latent.safetensors"):
            assert (out / f"{name}{suffix}").is_file(), f"missing {name}{suffix}"
        latent, ref = load_file(out / f"{name}.latent.safetensors")["latent"], reference[(prompt, seed)]
        rel = float((latent - ref).abs().max() / ref.abs().max())
        assert rel < 1e-4, f"{name}: Ray latent differs from one process by {rel:.2e}"


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("lines", "extra", "needle"),
    [
        (['{"prompt": "x"}'], ["--workers", "3", "--sp", "2"], "--workers 3 must be a positive multiple of --sp 2"),
        (['{"prompt": "x"}'], ["--workers", "2", "--sp", "2", "--ulysses_degree", "3"], "world size 2 != cfg 1"),
        (['{"prompt": 1}', "{"], [], "no valid requests to run"),
        (['{"prompt": "x", "name": "a"}', '{"prompt": "y", "name": "a"}'], [], "would write the same outputs: a"),
    ],
)
def test_usage_errors_before_any_actor(checkpoint, tmp_path, capsys, lines, extra, needle):
    prompts = _write_prompts(tmp_path / "p.jsonl", lines)
    assert main(_argv(checkpoint, prompts, tmp_path / "o", *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


# Runs first, before the module's in-process session exists (``ray.init()`` would otherwise find this head).
def test_ray_job_submit_against_a_local_head(checkpoint, tmp_path):
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    bin_dir = str(Path(sys.executable).parent)
    # Ray 2.60 may turn token authentication on for a new head, and its job CLI then needs the token: give
    # both the same fresh token (a clean machine has no ~/.ray/auth_token).
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    ray_cli = str(Path(bin_dir) / "ray")
    start = subprocess.run(
        [ray_cli, "start", "--head", "--num-cpus", "2", "--port", str(port), "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "job-out"
        for _ in range(12):  # the head's job agent comes up a little after `ray start` returns (slower on a busy box)
            job = subprocess.run(
                [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
                 "python", "launch/ray_generate.py", "--config", "configs/tiny-wan.yaml", "--model", checkpoint,
                 "--prompt", "a red ball", "--seed", "5", "--workers", "2", "--sp", "2", "--cpus-per-worker", "0.5",
                 "--out", str(out), "--no-progress"],
                capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
            )  # fmt: skip
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        assert (out / "a-red-ball_s5_dvg.mp4").is_file() and (out / "a-red-ball_s5_dvg.json").is_file()
        assert [e["status"] for e in _manifest(out)] == ["ok"]
    finally:
        # Hazard: `ray stop` stops every Ray instance of this user on the machine (there is no per-head stop).
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)


def test_two_actors_sp2_match_one_process(ray_session, checkpoint, reference, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", _jsonl(PROMPTS))
    out = tmp_path / "out"
    assert main(_argv(checkpoint, prompts, out, "--workers", "2", "--sp", "2")) == 0
    _assert_matches(out, reference)
    side = json.loads((out / f"{_name(0, *PROMPTS[0])}.json").read_text())
    assert side["parallel"] == {"world_size": 2, "ulysses": 2, "ring": 1, "cfg": 1}
    assert side["prompt"] == PROMPTS[0][0] and side["seed"] == PROMPTS[0][1]
    entries = _manifest(out)
    assert [(e["name"], e["status"]) for e in entries] == [(_name(i, p, s), "ok") for i, (p, s) in enumerate(PROMPTS)]


def test_two_groups_of_sp1_share_the_requests(ray_session, checkpoint, reference, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", _jsonl(PROMPTS))
    out = tmp_path / "out"
    assert main(_argv(checkpoint, prompts, out, "--workers", "2", "--sp", "1")) == 0
    _assert_matches(out, reference)
    entries = _manifest(out)
    assert sorted(e["group"] for e in entries) == [0, 1], "each group took one request"
    assert json.loads((out / f"{_name(0, *PROMPTS[0])}.json").read_text())["parallel"] == {"world_size": 1}


def test_resume_skips_finished_work_and_a_malformed_line(ray_session, checkpoint, reference, tmp_path, caplog):
    first, second = PROMPTS
    out = tmp_path / "out"
    # Run 1: only the first prompt; line 2 is malformed and skipped with its number.
    lines = [json.dumps({"prompt": first[0], "seed": first[1], "name": "one"}), '{"prompt": "broken',
             json.dumps({"prompt": "x", "budget": 2})]  # fmt: skip
    prompts = _write_prompts(tmp_path / "p.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="dvg_dist.ray"):
        assert main(_argv(checkpoint, prompts, out, "--workers", "1", "--sp", "1")) == 0
    assert f"{prompts}:2: not valid JSON" in caplog.text and f"{prompts}:3: budget must be" in caplog.text
    video = out / "one.mp4"
    stamp = video.stat().st_mtime_ns
    # Run 2: the fixed file with both prompts: the first is skipped (not rewritten), the second runs.
    lines[1] = json.dumps({"prompt": second[0], "seed": second[1], "name": "two"})
    lines[2] = json.dumps({"prompt": "a green cone", "seed": 1, "name": "three", "budget": 0.7, "mode": "full"})
    _write_prompts(prompts, lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dvg_dist.ray"):
        assert main(_argv(checkpoint, prompts, out, "--workers", "1", "--sp", "1")) == 0
    assert "resuming: 1 of 3 request(s) already done" in caplog.text
    assert video.stat().st_mtime_ns == stamp, "a finished output was rewritten"
    assert [e["name"] for e in _manifest(out)] == ["one", "two", "three"]
    side = json.loads((out / "three.json").read_text())  # a line's own budget and mode
    assert (side["budget"], side["mode"], side["plan"]["mode"]) == (0.7, "full", "full")
    latent = load_file(out / "two.latent.safetensors")["latent"]
    assert float((latent - reference[second]).abs().max() / reference[second].abs().max()) < 1e-4
    # Run 3: everything done: no actor is even started.
    t0 = time.perf_counter()
    assert main(_argv(checkpoint, prompts, out, "--workers", "1", "--sp", "1")) == 0
    assert time.perf_counter() - t0 < 5 and len(_manifest(out)) == 3


def test_killed_actor_names_the_rank_and_the_retry_produces_the_output(
    ray_session, checkpoint, reference, tmp_path, caplog
):
    config = load_config(CONFIG, [f"model.path={json.dumps(checkpoint)}", "parallel.timeout_s=60"])
    prompt, seed = PROMPTS[0]
    killed: list[int] = []

    def kill_rank1(group, item, attempt) -> None:
        if attempt == 0:
            killed.append(group.pids[1])
            os.kill(group.pids[1], signal.SIGKILL)

    options = ExecutorOptions(workers=2, sp=2, cpus_per_worker=0.5, retries=1, request_timeout_s=60)
    executor = RayExecutor(config, tmp_path, options, save_latent=True, on_dispatch=kill_rank1)
    item = BatchItem(Request(prompt, seed), "killed", 1)
    t0 = time.perf_counter()
    try:
        with caplog.at_level(logging.ERROR, logger="dvg_dist.ray"):
            entries = executor.run([item])
    finally:
        executor.shutdown()
    assert time.perf_counter() - t0 < 120, "no hang"
    assert killed and f"rank 1 (pid {killed[0]}) failed: the actor process died" in caplog.text, caplog.text
    assert [(e["status"], e["attempts"]) for e in entries] == [("ok", 2)]
    latent = load_file(tmp_path / "killed.latent.safetensors")["latent"]
    assert float((latent - reference[(prompt, seed)]).abs().max() / reference[(prompt, seed)].abs().max()) < 1e-4

    # With no retry left the request fails with the rank named, in the manifest too.
    out = tmp_path / "no-retry"
    options = ExecutorOptions(workers=2, sp=2, cpus_per_worker=0.5, retries=0, request_timeout_s=60)
    executor = RayExecutor(config, out, options, on_dispatch=kill_rank1)
    try:
        entries = executor.run([BatchItem(Request(prompt, seed), "lost", 1)])
    finally:
        executor.shutdown()
    assert entries[0]["status"] == "failed" and "rank 1" in entries[0]["error"]
    assert _manifest(out)[0]["status"] == "failed" and not (out / "lost.mp4").exists()


def test_placement_timeout_says_check_ray_status(ray_session, checkpoint, tmp_path):
    config = load_config(CONFIG, [f"model.path={json.dumps(checkpoint)}"])
    options = ExecutorOptions(workers=2, sp=2, cpus_per_worker=4, placement_timeout_s=1)
    executor = RayExecutor(config, tmp_path, options)
    with pytest.raises(Exception, match=r"check `ray status`") as info:
        executor.start()
    assert not isinstance(info.value, GroupFailed)
