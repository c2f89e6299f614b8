"""The video server (dvg_dist/serve, launch/serve.py): settings, request checks, the job table, the Serve config
files and the launcher's usage errors without Ray; then the real thing.

``server``: one local Ray and one Serve for the module, HTTP on 127.0.0.1 only, two applications of the tiny Wan
checkpoint: ``/one`` (replicas of 1 rank, at most 2 waiting jobs) and ``/two`` (replicas of 2 gloo ranks), driven
with ``requests``; every wait is bounded. The reference video comes from ``launch/generate.py`` itself (a
subprocess, started while Serve starts). Tests run in file order: the ones that kill a rank or a replica last.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ray = pytest.importorskip("ray")

from dvg_dist.config import ConfigError, load_config  # noqa: E402
from dvg_dist.serve.jobs import JobTable, RequestChecker  # noqa: E402
from dvg_dist.serve.options import ServeOptions  # noqa: E402

pytest_plugins = ["conftest_tiny"]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-wan.yaml")
PROMPT, SEED = "a red ball rolling", 3
HTTP_TIMEOUT = 30
LONG = {"steps": 400, "mode": "full"}  # ~10 s of model calls on the tiny model: long enough to cancel or kill
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("wan"))


def _png_base64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- no Ray -------------------------------------------------------------------------------------------------


def test_options_are_strict_and_resolve_paths(tmp_path):
    options = ServeOptions.from_dict({"config": "configs/tiny-wan.yaml", "max_queue": 3, "cpus_per_rank": 1})
    assert options.cpus_per_rank == 1.0 and options.max_queue == 3 and options.nproc == 1
    resolved = options.resolved()
    assert Path(resolved.config).is_absolute() and Path(resolved.out).is_absolute()
    assert ServeOptions.from_dict(resolved.to_dict()) == resolved  # what travels to the replicas
    for bad, needle in [
        ({"config": "c.yaml", "max_qeue": 3}, "unknown serve option max_qeue"),
        ({"nproc": 2}, "serve options need config"),
        ({"config": "c.yaml", "max_queue": 0}, "max_queue must be >= 1; got 0"),
        ({"config": "c.yaml", "nproc": "2"}, "nproc must be an integer; got '2'"),
        ({"config": "c.yaml", "strict_pack": 1}, "strict_pack must be true or false"),
        ({"config": "c.yaml", "set": "sampling.steps=4"}, "set must be a list of strings"),
        ({"config": "c.yaml", "lease_s": 0}, "lease_s must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            ServeOptions.from_dict(bad)


def _cli_error(checkpoint: str, *flags: str) -> str:
    """The one-line message ``launch/generate.py`` refuses these flags with (its own checks, no model work)."""
    from dvg_dist.runtime.generate import build_parser, prepare

    args = build_parser().parse_args(["--config", CONFIG, "--model", checkpoint, "--prompt", PROMPT, *flags])
    with pytest.raises(ValueError) as info:
        prepare(args, 1)
    return str(info.value)


def test_request_checks_are_the_clis(checkpoint, tmp_path):
    checker = RequestChecker(load_config(CONFIG, [f"model.path={json.dumps(checkpoint)}"]), tmp_path)
    assert (checker.fps, checker.frame_step) == (16, 4)
    job = checker.job({"prompt": PROMPT, "seed": 5, "seconds": 0.5, "budget": 0.6}, "j1")
    assert job["settings"] == {"frame_num": 9, "budget": 0.6}  # 0.5 s x 16 fps = 8 frames -> nearest 4k+1: 9
    assert job["request"]["frames"] == 9 and job["request"]["steps"] == 12 and job["request"]["mode"] == "dvg"
    assert checker.frames_for(1.0) == 17 and checker.frames_for(0.01) == 1
    # The CLI's messages, word for word, for the same settings.
    for body, flags in [
        ({"frames": 16}, ["--frame_num", "16"]),
        ({"size": "65x64"}, ["--size", "65x64"]),
        ({"size": "64"}, ["--size", "64"]),
        ({"budget": 0.05}, ["--budget", "0.05"]),
        ({"budget": 2}, ["--budget", "2"]),
        ({"steps": 0}, ["--steps", "0"]),
    ]:
        with pytest.raises(ValueError) as info:
            checker.job({"prompt": PROMPT, **body}, "j2")
        assert str(info.value) == _cli_error(checkpoint, *flags), body
        assert "\n" not in str(info.value)
    for body, needle in [
        ({"prompt": PROMPT, "fps": 8}, "unknown field 'fps'"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"prompt": PROMPT, "seed": "3"}, "seed must be a non-negative integer"),
        ({"prompt": PROMPT, "frames": 17, "seconds": 1}, "give frames or seconds, not both"),
        ({"prompt": PROMPT, "seconds": 0}, r"seconds must be a number in \(0, 3600\]"),
        ({"prompt": PROMPT, "mode": "fast"}, "sampling.mode must be one of full, dvg"),
        ({"prompt": PROMPT, "image": "not base64!"}, "image must be a base64 string"),
        ({"prompt": PROMPT, "image": base64.b64encode(b"not an image").decode()}, "image is not a readable image"),
        ({"prompt": PROMPT, "image": _png_base64()}, "--image given but .* is a text-to-video checkpoint"),
        (["a list"], "the body must be a JSON object"),
    ]:
        with pytest.raises(ValueError, match=needle):
            checker.job(body, "j3")
    assert not list((tmp_path / "inputs").glob("*")), "a refused image was left behind"


def test_job_table_queue_cancel_lease_and_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    now = [100.0]
    table = JobTable(max_queue=2, lease_s=10, clock=lambda: now[0])

    def spec(i: str) -> dict:
        return {"id": i, "request": {"prompt": i}}

    assert table.submit(spec("a"))[0]["queue_position"] == 0  # type: ignore[index]
    assert table.submit(spec("b"))[0]["queue_position"] == 1  # type: ignore[index]
    assert table.submit(spec("c")) == (None, "queue full (2 jobs)")
    assert table.take("r1")["id"] == "a"  # type: ignore[index]  # FIFO; "a" is running, "b" moves up
    assert table.get("b")["queue_position"] == 0 and table.submit(spec("c"))[1] is None  # type: ignore[index]
    assert table.report("a", "r1", {"step": 1}) is False
    view, why = table.cancel("b")  # queued: cancelled at once, out of the queue
    assert why is None and view is not None and view["status"] == "cancelled"
    assert table.cancel("b")[1] == "job b already cancelled" and table.cancel("zzz") == (None, None)
    view, why = table.cancel("a")  # running: asked to stop; the replica learns it at its next report
    assert why is None and view is not None and (view["status"], view["cancel_requested"]) == ("running", True)
    assert table.report("a", "r1", {"step": 2}) is True
    assert table.report("a", "someone-else", None) is True  # not that replica's job: stop it
    table.finish("a", "r2", "succeeded")  # not the owner: ignored
    table.finish("a", "r1", "cancelled", "cancelled: stopped at step 2 of 12")
    assert table.get("a")["status"] == "cancelled" and table.get("a")["progress"] == {"step": 2}  # type: ignore[index]
    # A replica that stops reporting loses its running job after the lease.
    assert table.take("r1")["id"] == "c"  # type: ignore[index]
    now[0] += 10.5
    view = table.get("c")
    assert view is not None and view["status"] == "failed" and "replica r1 stopped reporting" in view["error"]
    health = table.health()
    assert health["status"] == "unavailable" and health["replicas"] == []
    assert {"replica": "r1", "error": "stopped reporting for 10s", "at": now[0]} in health["failures"]
    table.finish("c", "r1", "succeeded", result={"video": "x.mp4"})  # too late: it stays failed
    assert table.get("c")["status"] == "failed"  # type: ignore[index]
    table.submit(spec("d"))
    table.submit(spec("e"))
    assert table.take("r9")["id"] == "d" and table.take("r9")["id"] == "e"  # type: ignore[index]
    assert table.get("d")["error"] == "replica r9 never received the job (it asked for another)"  # type: ignore[index]
    table.finish("e", "r9", "succeeded", result={"timings": {"stage1": 0.5, "decode": 0.2, "total": 1.0}})
    families = {f.name: f for f in text_string_to_metric_families(table.metrics().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("dvg_queue_length", ())] == 0
    assert samples[("dvg_jobs", (("state", "cancelled"),))] == 2
    assert samples[("dvg_jobs", (("state", "failed"),))] == 2
    assert samples[("dvg_stage_seconds_count", (("stage", "stage1"),))] == 1
    assert ("dvg_stage_seconds_count", (("stage", "total"),)) not in samples
    assert samples[("dvg_jobs_rejected_total", (("reason", "queue_full"),))] == 1
    assert samples[("dvg_job_seconds_count", (("state", "failed"),))] == 2
    assert samples[("dvg_replicas_live", ())] == 2  # r1 came back (its late finish), and r9
    assert {r["replica"] for r in table.health()["replicas"]} == {"r1", "r9"}


def test_job_table_forgets_the_oldest_finished_jobs():
    table = JobTable(max_queue=10, lease_s=10, max_history=2)
    for i in range(4):
        table.submit({"id": str(i)})
        table.cancel(str(i))
    table.submit({"id": "live"})
    assert [j["id"] for j in table.list()] == ["live", "3", "2"]


def test_serve_config_files_build_the_application(checkpoint):
    from ray.serve.schema import ServeDeploySchema

    import dvg_dist.serve.app as app

    for name in ("serve-tiny-wan.yaml", "serve-wan2.1-t2v-14b.yaml"):
        data = yaml.safe_load((ROOT / "configs" / name).read_text())
        schema = ServeDeploySchema.model_validate(data)
        (application,) = schema.applications
        module, _, attr = application.import_path.partition(":")
        assert module == app.__name__ and callable(getattr(app, attr))
        options = ServeOptions.from_dict(application.args)
        config_file = Path(options.config)
        assert (config_file if config_file.is_absolute() else ROOT / config_file).name in {
            p.name for p in (ROOT / "configs").glob("*.yaml")
        }
    tiny = ServeOptions.from_dict({**application.args, "config": CONFIG, "model": checkpoint})
    tiny.check()  # the GPU example's settings pass the checks with the tiny model in place of the 14B one


def test_launcher_usage_errors_are_one_line_before_ray(checkpoint, tmp_path, capsys, monkeypatch):
    import dvg_dist.executors.ray_executor as ray_executor
    from dvg_dist.serve.cli import main

    def no_ray(address: object) -> bool:
        raise AssertionError("Ray must not start on a usage error")

    monkeypatch.setattr(ray_executor, "_init_ray", no_ray)

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    base = ["--config", CONFIG, "--model", checkpoint, "--out", str(tmp_path / "o")]
    try:
        for argv, needle in [
            (["--config", str(tmp_path / "nope.yaml")], "config file not found"),
            ([*base, "--nproc", "2", "--set", "parallel.ulysses_degree=3"], "world size 2 != cfg 1"),
            ([*base, "--nproc", "0"], "nproc must be >= 1; got 0"),
            ([*base, "--max-queue", "0"], "max_queue must be >= 1; got 0"),
            ([*base, "--set", "sampling.budget=2"], "sampling.budget must be in (0, 1]"),
            ([*base, "--port", "0"], "--port must be in 1-65535"),
            ([*base, "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
            ([*base, "--route-prefix", "v1"], "--route-prefix must start with /"),
            (["--model", checkpoint], "the following arguments are required: --config"),
        ]:
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code  # type: ignore[assignment]
            errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert code == 2 and len(errors) == 1 and needle in errors[0], (argv, errors)
    finally:
        busy.close()
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_documented_serve_commands_parse():
    """Every ``launch/serve.py`` line of docs/serve.md is a valid command line (the docs test only checks that
    the script exists)."""
    import re
    import shlex

    from dvg_dist.serve.cli import build_parser

    text = (ROOT / "docs" / "serve.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"^python launch/serve\.py (.*?)(?:#.*)?$", text, re.M)
    assert len(commands) >= 3
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        assert (ROOT / args.config).is_file() or args.config.startswith("/"), command


# -- the server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_video(checkpoint, tmp_path_factory):
    """Start ``launch/generate.py`` for (PROMPT, SEED); the fixture's value waits for it and returns the mp4."""
    out = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "generate.py"), "--config", CONFIG, "--model", checkpoint,
         "--prompt", PROMPT, "--seed", str(SEED), "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip

    def wait() -> bytes:
        text, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, text[-2000:]
        return (out / f"a-red-ball-rolling_s{SEED}_dvg.mp4").read_bytes()

    yield wait
    if proc.poll() is None:  # the module ended before a test waited for it
        proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint, cli_video, tmp_path_factory):
    """``{"one": url, "two": url, "out": {...}}``: Ray + Serve for the module, shut down at the end."""
    from ray import serve
    from ray.serve.api import RunTarget

    from dvg_dist.serve.app import build_app

    port = _free_port()
    outs = {name: tmp_path_factory.mktemp(f"serve-{name}") for name in ("one", "two")}
    common = {"config": CONFIG, "model": checkpoint, "health_check_period_s": 1.0, "lease_s": 10.0,
              "set": ["parallel.timeout_s=60"]}  # fmt: skip
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([
            RunTarget(build_app({**common, "nproc": 1, "max_queue": 2, "out": str(outs["one"])}), "one", "/one"),
            RunTarget(build_app({**common, "nproc": 2, "max_queue": 4, "out": str(outs["two"])}), "two", "/two"),
        ])  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        yield {"one": f"{base}/one", "two": f"{base}/two", "out": outs}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _post(url: str, body: object) -> requests.Response:
    return requests.post(f"{url}/v1/videos", json=body, timeout=HTTP_TIMEOUT)


def _get(url: str, path: str) -> requests.Response:
    return requests.get(f"{url}{path}", timeout=HTTP_TIMEOUT)


def _wait(url: str, job_id: str, until=FINISHED, timeout: float = 90.0, step: int = 0) -> dict:
    """Poll the job until its status is in ``until`` (and, for running, its progress reached ``step``)."""
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        view = _get(url, f"/v1/videos/{job_id}").json()
        if view["status"] in until and (step == 0 or (view["progress"] or {}).get("step", 0) >= step):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {until} (step {step}) within {timeout:g}s: {view}")


def _replica(url: str, timeout: float = 120.0, other_than: str | None = None) -> dict:
    """A live group replica from ``/health`` (one other than ``other_than``: the restarted one)."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = _get(url, "/health")
        body = r.json()
        live = [x for x in body["replicas"] if x["replica"] != other_than]
        if live:
            assert r.status_code == 200 and body["status"] == "ok", body
            return live[0]
        assert r.status_code == 503 and body["status"] == "unavailable", body
        time.sleep(0.5)
    raise AssertionError(f"no live replica at {url} within {timeout:g}s (other than {other_than}): {body}")


@pytest.mark.slow
def test_submit_poll_fetch_is_byte_identical_to_generate_py(server, cli_video):
    url = server["one"]
    r = _post(url, {"prompt": PROMPT, "seed": SEED})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and len(job["id"]) == 32
    assert r.headers["location"] == f"/one/v1/videos/{job['id']}"
    request = {k: v for k, v in job["request"].items() if k != "negative_prompt"}
    assert request == {"prompt": PROMPT, "seed": SEED, "size": "64x64", "frames": 17, "seconds": 1.062, "steps": 12,
                       "mode": "dvg", "budget": 0.5, "guidance_scale": 5.0, "image": False}  # fmt: skip
    assert _get(url, f"/v1/videos/{job['id']}/content").status_code in (409, 200)
    view = _wait(url, job["id"])
    assert view["status"] == "succeeded", view
    assert view["progress"]["step"] == 12 and view["progress"]["num_steps"] == 12
    assert view["progress"]["stage"] == view["progress"]["num_stages"] == 4
    result = view["result"]
    assert result["frames"] == 17 and result["parallel"] == {"world_size": 1} and result["plan"]["mode"] == "dvg"
    content = _get(url, f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content == cli_video(), "the server's mp4 differs from launch/generate.py's"
    side = json.loads(Path(result["sidecar"]).read_text())
    assert (side["prompt"], side["seed"], side["files"]) == (PROMPT, SEED, {"video": f"{job['id']}.mp4"})
    assert Path(result["video"]).parent == server["out"]["one"]
    listed = _get(url, "/v1/videos").json()["data"]
    assert listed[0]["id"] == job["id"]


@pytest.mark.slow
def test_two_ranks_per_replica_give_the_same_bytes(server, cli_video):
    url = server["two"]
    replica = _replica(url)
    assert len(replica["ranks"]) == 2 and replica["nproc"] == 2
    job = _post(url, {"prompt": PROMPT, "seed": SEED}).json()
    view = _wait(url, job["id"])
    assert view["status"] == "succeeded", view
    assert view["result"]["parallel"] == {"world_size": 2, "ulysses": 2, "ring": 1, "cfg": 1}
    assert _get(url, f"/v1/videos/{job['id']}/content").content == cli_video()


@pytest.mark.slow
def test_bad_requests_get_400_with_the_one_line_message(server, checkpoint):
    url = server["one"]
    before = _get(url, "/v1/videos").json()["data"]
    for body, expected in [
        ({"prompt": PROMPT, "frames": 16}, _cli_error(checkpoint, "--frame_num", "16")),
        ({"prompt": PROMPT, "budget": 0.05}, _cli_error(checkpoint, "--budget", "0.05")),
        ({"prompt": PROMPT, "size": "65x64"}, _cli_error(checkpoint, "--size", "65x64")),
        ({"prompt": PROMPT, "image": _png_base64()}, f"--image given but {checkpoint} is a text-to-video checkpoint"),
        ({"prompt": PROMPT, "seconds": 1, "frames": 17}, "give frames or seconds, not both"),
        (
            {"prompt": PROMPT, "quality": "high"},
            "unknown field 'quality'; the fields are prompt, seed, size, frames, "
            "seconds, image, budget, mode, steps, guidance_scale, negative_prompt",
        ),
    ]:
        r = _post(url, body)
        assert (r.status_code, r.json()) == (400, {"error": expected}), body
    r = requests.post(f"{url}/v1/videos", data="{not json", timeout=HTTP_TIMEOUT)
    assert (r.status_code, r.json()) == (400, {"error": "the body must be JSON"})
    assert _get(url, "/v1/videos").json()["data"] == before, "a refused request was queued"
    assert _get(url, "/v1/videos/0123").status_code == 404
    assert _get(url, "/v1/videos/0123/content").status_code == 404
    assert requests.delete(f"{url}/v1/videos/0123", timeout=HTTP_TIMEOUT).status_code == 404


@pytest.mark.slow
def test_queue_bound_429_and_cancelling_queued_and_running_jobs(server):
    url = server["one"]
    running = _post(url, {"prompt": "long", "seed": 1, **LONG}).json()["id"]
    _wait(url, running, until=("running",), step=1)
    queued = [_post(url, {"prompt": f"queued {i}", "seed": i, "seconds": 0.5}) for i in range(2)]
    assert [r.status_code for r in queued] == [202, 202] and [r.json()["queue_position"] for r in queued] == [0, 1]
    assert queued[0].json()["request"]["frames"] == 9
    full = _post(url, {"prompt": "one too many"})
    assert (full.status_code, full.json()) == (429, {"error": "queue full (2 jobs)"})
    first = queued[0].json()["id"]
    r = requests.delete(f"{url}/v1/videos/{first}", timeout=HTTP_TIMEOUT)
    assert (r.status_code, r.json()["status"]) == (200, "cancelled")
    r = requests.delete(f"{url}/v1/videos/{first}", timeout=HTTP_TIMEOUT)
    assert (r.status_code, r.json()) == (409, {"error": f"job {first} already cancelled"})
    assert _get(url, f"/v1/videos/{queued[1].json()['id']}").json()["queue_position"] == 0
    r = requests.delete(f"{url}/v1/videos/{running}", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    view = _wait(url, running, timeout=30)
    assert view["status"] == "cancelled" and view["error"].startswith("cancelled: stopped at step "), view
    assert view["progress"]["step"] < 400
    assert _get(url, f"/v1/videos/{running}/content").status_code == 409
    # The replica goes on: the other queued job (9 frames, from seconds) runs to the end.
    second = _wait(url, queued[1].json()["id"])
    assert second["status"] == "succeeded" and second["result"]["frames"] == 9, second


@pytest.mark.slow
def test_two_ranks_stop_together_on_cancel(server):
    url = server["two"]
    job = _post(url, {"prompt": "long", "seed": 2, **LONG}).json()["id"]
    _wait(url, job, until=("running",), step=2)
    assert requests.delete(f"{url}/v1/videos/{job}", timeout=HTTP_TIMEOUT).status_code == 200
    view = _wait(url, job, timeout=30)
    assert view["status"] == "cancelled", view
    replica = _replica(url, timeout=10)  # no rank left inside a collective: the same replica goes on
    assert replica["replica"] == view["replica"]
    after = _wait(url, _post(url, {"prompt": PROMPT, "seed": 4, "steps": 4, "mode": "full"}).json()["id"])
    assert after["status"] == "succeeded" and after["replica"] == view["replica"], after


@pytest.mark.slow
def test_metrics_count_jobs_by_state_and_time_stages(server):
    from prometheus_client.parser import text_string_to_metric_families

    r = _get(server["one"], "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}  # fmt: skip
    assert samples[("dvg_queue_length", ())] == 0 and samples[("dvg_queue_capacity", ())] == 2
    assert samples[("dvg_jobs", (("state", "succeeded"),))] >= 2
    assert samples[("dvg_jobs", (("state", "cancelled"),))] >= 2
    assert samples[("dvg_jobs_rejected_total", (("reason", "queue_full"),))] >= 1
    assert samples[("dvg_job_seconds_count", (("state", "succeeded"),))] >= 2
    assert samples[("dvg_stage_seconds_count", (("stage", "stage1"),))] >= 2
    assert samples[("dvg_stage_seconds_count", (("stage", "decode"),))] >= 2
    assert samples[("dvg_replicas_live", ())] == 1
    assert _get(server["one"], "/health").json()["replicas"][0]["nproc"] == 1


@pytest.mark.slow
def test_group_supervision_timeout_stubborn_and_raising_ranks(server):
    """RankGroup.run's decisions with stand-in ranks (no model): a timed-out job is stopped like a cancel and the
    group stays usable; a rank that will not stop, or raises alone, makes the group unusable at once."""
    import threading

    from dvg_dist.serve.ranks import JobCancelled, RankGroup

    class Rank:
        def __init__(self, stubborn: bool = False, fail_at: int | None = None) -> None:
            self.stubborn, self.fail_at, self.cancel, self.step = stubborn, fail_at, False, 0
            self.lock = threading.Lock()

        def run(self, job: dict, out: str) -> dict:
            for step in range(1, 401):
                time.sleep(0.02)
                with self.lock:
                    self.step, stop = step, self.cancel and not self.stubborn
                if step == self.fail_at:
                    raise RuntimeError(f"boom at {step}")
                if stop:
                    raise JobCancelled(f"stopped at step {step} of 400")
            return {"video": "x.mp4"}

        def poll(self, job_id: str, cancel: bool) -> dict:
            with self.lock:
                self.cancel = self.cancel or cancel
                return {"step": self.step, "num_steps": 400}

    actor = ray.remote(max_restarts=0)(Rank)

    def group(*ranks: dict) -> RankGroup:
        g = RankGroup(None, len(ranks), {"CPU": 0})  # type: ignore[arg-type]
        g.actors = [actor.options(num_cpus=0, max_concurrency=2).remote(**r) for r in ranks]
        g.pids = [1000 + i for i in range(len(ranks))]
        ray.get([a.poll.remote("", False) for a in g.actors], timeout=60)  # started
        return g

    reports: list = []

    def report(progress):
        reports.append(progress)
        return False

    g = group({})
    outcome = g.run({"id": "t"}, "", report, timeout_s=1.0, poll_s=0.1, grace_s=20)
    assert outcome.status == "failed" and not outcome.broken, outcome
    assert outcome.error.startswith("timed out after 1s (stopped at step "), outcome
    assert reports and reports[-1]["num_steps"] == 400
    assert g.run({"id": "u"}, "", lambda p: True, poll_s=0.1).status == "cancelled"  # a DELETE, the same path
    g.kill()
    g = group({"stubborn": True})
    outcome = g.run({"id": "v"}, "", report, timeout_s=0.5, poll_s=0.1, grace_s=1.0)
    assert (outcome.status, outcome.broken) == ("failed", True), outcome
    assert outcome.error == "timed out after 0.5s and did not stop within 1s"
    g.kill()
    g = group({}, {"fail_at": 5})
    t0 = time.monotonic()
    outcome = g.run({"id": "w"}, "", report, poll_s=0.1)
    assert time.monotonic() - t0 < 5, "the healthy rank was waited for"
    assert (outcome.status, outcome.broken) == ("failed", True)
    assert outcome.error == "rank 1 (pid 1001) failed: RuntimeError: boom at 5"
    g.kill()


@pytest.mark.slow
def test_killed_rank_fails_its_job_and_serve_restarts_the_replica(server):
    url = server["one"]
    replica = _replica(url)
    job = _post(url, {"prompt": "doomed", "seed": 1, **LONG}).json()["id"]
    _wait(url, job, until=("running",), step=1)
    t0 = time.monotonic()
    os.kill(replica["ranks"][0], signal.SIGKILL)
    view = _wait(url, job, timeout=60)
    assert time.monotonic() - t0 < 60, "no hang"
    assert view["status"] == "failed", view
    assert view["error"] == f"rank 0 (pid {replica['ranks'][0]}) failed: the actor process died", view
    health = _get(url, "/health").json()
    assert any(f["replica"] == replica["replica"] and "rank 0" in f["error"] for f in health["failures"]), health
    # Serve replaces the replica (its health check fails): new ranks, and jobs run again.
    fresh = _replica(url, other_than=replica["replica"])
    assert fresh["ranks"] != replica["ranks"]
    after = _wait(url, _post(url, {"prompt": PROMPT, "seed": SEED}).json()["id"])
    assert after["status"] == "succeeded" and after["replica"] == fresh["replica"], after


@pytest.mark.slow
def test_killed_replica_process_fails_its_job_after_the_lease(server):
    url = server["two"]
    replica = _replica(url)
    job = _post(url, {"prompt": "doomed", "seed": 1, **LONG}).json()["id"]
    _wait(url, job, until=("running",), step=1)
    os.kill(replica["pid"], signal.SIGKILL)  # the group's replica itself: its ranks die with it
    view = _wait(url, job, timeout=60)
    assert view["status"] == "failed" and f"replica {replica['replica']} stopped reporting" in view["error"], view
    fresh = _replica(url, other_than=replica["replica"])
    after = _wait(url, _post(url, {"prompt": PROMPT, "seed": SEED, "steps": 4, "mode": "full"}).json()["id"])
    assert after["status"] == "succeeded" and after["replica"] == fresh["replica"], after
