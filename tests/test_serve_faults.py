"""Faults `vicuna serve` must survive, with the tiny fixture model and real processes: a burst
above --max-queue (429s, the rest complete), a controller restart (workers re-register), the
only worker killed (503), a graceful Ctrl-C of `vicuna serve -m`, and bad command lines.
Worker loss in the middle of a stream is in test_serve_clients.py (it needs a model slow enough
to be caught mid-answer)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serve_cluster import Cluster, Proc, free_port, get_json, wait_until

pytestmark = pytest.mark.slow  # real processes

TINY = ("--dtype", "float32", "--implementation", "native")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, sp_model_dir):
    root = tmp_path_factory.mktemp("serve_faults")
    cluster = Cluster(root, {"VICUNA_HOME": str(root / "home")})
    try:
        cluster.start_controller(expiry=4.0)
        cluster.worker = cluster.start_worker([str(sp_model_dir)], "--name", "tiny", "--max-batch-size", "4", "--max-queue", "4",
                                              *TINY, heartbeat=0.5)
        cluster.wait_workers(1, [cluster.worker])
        cluster.api = cluster.start_api(worker_timeout=4.0)
        yield cluster
    finally:
        cluster.close()


def chat_body(max_tokens: int = 24) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, "temperature": 0}


def test_burst_above_max_queue_gets_429_and_the_rest_complete(cluster):
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            calls = [client.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body()) for _ in range(200)]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=150)

    started = time.monotonic()
    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    full = [r for r in responses if r.status_code == 429]
    done = [r for r in responses if r.status_code == 200]
    assert full and len(done) >= 8, (len(full), len(done))  # at least a batch (4) plus the queue (4)
    for r in full:
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and "retry" in error["message"]
    for r in done:  # every accepted request got a whole answer
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("length", "stop") and body["choices"][0]["message"]["content"]
        assert 0 < body["usage"]["completion_tokens"] <= 24
    assert time.monotonic() - started < 150
    # The queue drains: the worker answers again.
    assert httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=60).status_code == 200


def test_controller_restart_workers_register_again(cluster):
    port = cluster.controller.port
    cluster.controller.kill()
    down = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30)
    assert down.status_code == 503 and down.json()["error"]["code"] == "controller_unreachable"
    cluster.start_controller(expiry=4.0, port=port)
    start = time.monotonic()
    workers = cluster.wait_workers(1, [cluster.worker], timeout=15)
    assert time.monotonic() - start < 5  # within a few 0.5 s heartbeats
    assert workers[0]["address"] == cluster.worker.url
    events = [r.get("event") for r in cluster.worker.log_records()]
    assert "unknown_to_controller" in events or events.count("registered") >= 2
    ok = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_killed_only_worker_is_a_clear_503(cluster):
    cluster.worker.kill()
    for _ in range(2):  # at once (unreachable), and again once the controller has dropped it
        response = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "no_worker" and error["type"] == "service_unavailable"
        assert error["message"].startswith("no live worker serves model 'tiny'") and cluster.worker.url in error["message"]
    time.sleep(4.5)  # past the expiry: still a 503 (a known model), not a 404
    assert httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30).status_code == 503
    assert cluster.workers() == []


def test_serve_all_in_one_starts_and_stops_gracefully(tmp_path, sp_model_dir):
    ports = [free_port() for _ in range(3)]
    env = {**__import__("os").environ, "VICUNA_HOME": str(tmp_path / "home")}
    log = tmp_path / "serve.log"
    proc = Proc("serve", ["-m", str(sp_model_dir), "--port", str(ports[0]), "--controller-port", str(ports[1]),
                          "--worker-port", str(ports[2]), "--heartbeat", "0.5", "--expiry", "2", "--shutdown-timeout", "5", *TINY[2:]],
                log, env)
    try:
        wait_until(lambda: get_json(f"http://127.0.0.1:{ports[0]}/v1/models"), 180, "vicuna serve", [proc])
        models = get_json(f"http://127.0.0.1:{ports[0]}/v1/models")["data"]
        assert [m["id"] for m in models] == [str(sp_model_dir)]
        reply = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/completions", json={"model": str(sp_model_dir), "prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert reply.status_code == 200
        import psutil

        children = psutil.Process(proc.process.pid).children()
        assert len(children) == 3  # controller, worker, API
        proc.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.process.wait(timeout=60) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        text = log.read_text()
        assert '"event":"deregistered"' in text and "vicuna serve: stopped" in text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{ports[0]}/health", timeout=2)
    finally:
        proc.stop(timeout=10)


def _vicuna(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vicuna_cli", "serve", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def vicuna_serve(monkeypatch, capsys):
    """`vicuna serve ARGS` through `cli.main` in this process, for command lines that fail
    before any server starts (the same error handling and exit codes as a real process)."""
    from vicuna_cli import cli

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["vicuna", "serve", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("args, message", [
    (["--heartbeat", "5", "--expiry", "3"], "--expiry (3 s) must be longer than --heartbeat (5 s)"),
    (["worker", "--backend", "tpu"], "--backend must be one of hf, vllm, openai, not 'tpu'"),
    (["worker", "--backend", "openai", "-m", "gpt-4o"], "--backend openai needs --upstream URL"),
    (["api", "--api-keys-file", "/nonexistent/keys.txt"], "--api-keys-file /nonexistent/keys.txt: No such file or directory"),
    (["api", "--moderation", "regex:x"], "unknown --moderation 'regex:x'"),
    (["api", "--moderation", "keywords:/nonexistent/words.txt"], "--moderation keywords:/nonexistent/words.txt: No such file"),
    (["controller", "--port", "70000"], "--port: Input should be less than or equal to 65535"),
    (["api", "--max-body-bytes", "10"], "--max-body-bytes: Input should be greater than or equal to 1024"),
])
def test_bad_command_lines_are_one_line_errors(vicuna_serve, args, message):
    code, err = vicuna_serve(*args)
    assert code == 1, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = _vicuna("controller", "--port", str(port))
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr


def test_status_of_a_missing_controller(vicuna_serve):
    code, err = vicuna_serve("status", "--controller", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach the controller" in err
