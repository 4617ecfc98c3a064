"""Faults `vicuna serve` must survive, with the tiny fixture model and real processes: a burst
above --max-queue (429s, the rest complete), a controller restart (workers re-register), the
only worker killed (503), a graceful Ctrl-C of `vicuna serve -m`, and bad command lines.
Worker loss in the middle of a stream is in test_serve_clients.py (it needs a model slow enough
to be caught mid-answer)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from processes import free_port
from serve_cluster import Cluster, Proc, get_json, wait_until

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

    responses = asyncio.run(burst())  # bounded by wait_for above, not by a timed window
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
    # The queue drains: the worker answers again.
    assert httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=60).status_code == 200


def test_a_request_that_can_never_fit_the_queue_is_a_400(cluster):
    """32 prompts x n=16 against a worker holding 4 running + 4 waiting: a 429 would invite
    retries that can never succeed."""
    body = {"model": "tiny", "prompt": ["Hello"] * 32, "n": 16, "max_tokens": 2}
    response = httpx.post(f"{cluster.api.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "n=16" in error["message"] and "at most 8" in error["message"]
    fits = httpx.post(f"{cluster.api.url}/v1/completions", json={**body, "prompt": ["Hello"] * 2, "n": 4}, timeout=60)
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 8


def test_controller_restart_workers_register_again(cluster):
    port = cluster.controller.port
    cluster.controller.kill()
    down = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30)
    assert down.status_code == 503 and down.json()["error"]["code"] == "controller_unreachable"
    cluster.start_controller(expiry=4.0, port=port)
    # Before the worker is back: the model may well exist, so a retryable 503, not a 404.
    early = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30)
    if not cluster.workers():  # (the worker may have beaten us to it)
        assert early.status_code == 503 and early.json()["error"]["code"] == "no_worker", early.text
        assert "retry" in early.json()["error"]["message"]
    # Back by its own heartbeat (0.5 s), not by a restart: the bound only keeps a failure from
    # hanging; the log events below say how it came back.
    workers = cluster.wait_workers(1, [cluster.worker], timeout=15)
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
    # Past the expiry: still a 503 (a known model), not a 404. The property is "after at least
    # 4 s", a lower bound that a loaded machine can only lengthen, so a sleep cannot flake here.
    time.sleep(4.5)
    late = httpx.post(f"{cluster.api.url}/v1/chat/completions", json=chat_body(4), timeout=30)
    assert late.status_code == 503 and late.json()["error"]["message"].startswith("no live worker serves model 'tiny'"), late.text
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
    (["worker", "--advertise", "http://10.0.0.5:21002/admin"], "--advertise: a worker address must be http(s)://host:port"),
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


class _Endless(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that streams one token every 50 ms until its client closes
    the connection (bounded: 20 minutes): a generation that only ends by cancellation."""

    started = threading.Event()
    closed = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]}\n\n'
        try:
            for _ in range(24000):
                self.wfile.write(chunk)
                self.wfile.flush()
                type(self).started.set()
                time.sleep(0.05)
        except OSError:
            type(self).closed.set()

    def log_message(self, *args) -> None:
        pass


def _running(worker: Proc) -> int | None:
    health = get_json(f"{worker.url}/health")
    return None if health is None else health["running"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_client_that_leaves_stops_its_generation(tmp_path, stream):
    """The client hangs up mid-answer: the API closes the worker stream, and the worker cancels
    the generation and frees its slot, for non-streaming requests too (which used to run on to
    max_tokens: 114 s of a busy slot after a client left at 3 s)."""
    from local_http import serving

    _Endless.started.clear()
    _Endless.closed.clear()
    cluster = Cluster(tmp_path)
    with serving(_Endless) as upstream_port:
        try:
            cluster.start_controller()
            worker = cluster.start_worker(["endless"], "--backend", "openai", "--upstream", f"http://127.0.0.1:{upstream_port}/v1")
            cluster.wait_workers(1, [worker])
            api = cluster.start_api()
            body = json.dumps({"model": "endless", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
            client = socket.create_connection(("127.0.0.1", api.port), timeout=30)
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                           b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert _Endless.started.wait(60), "the upstream never got the request"
            wait_until(lambda: _running(worker) == 1, 30, "the worker to be generating", [worker, api])
            if stream:
                assert client.recv(4096)  # the answer had started
            client.close()
            wait_until(lambda: _running(worker) == 0, 30, "the worker to drop the generation", [worker, api])
            assert _Endless.closed.wait(30), "the worker kept its upstream stream open"
            if not stream:
                wait_until(lambda: [r for r in api.log_records() if r.get("path") == "/v1/chat/completions"], 10, "the access log line")
                lines = [r for r in api.log_records() if r.get("path") == "/v1/chat/completions"]
                assert lines[-1]["status"] == 499 and lines[-1]["error"] == "client_closed_request"
        finally:
            cluster.close()
