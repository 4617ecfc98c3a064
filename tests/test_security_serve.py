"""`vicuna serve` attacked: each test's docstring states the attack (issue #18, items 3-6).

Most run the apps in this process (an ASGI call, a test client, stdlib stand-ins for the other
roles); the process-list check starts a real `vicuna serve`."""

from __future__ import annotations

import asyncio
import json
from http.server import BaseHTTPRequestHandler

import pytest
from fake_worker import fake_worker
from local_http import serving

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.serve.protocol import RegisterRequest, WorkerModel

SECRET = "s3cret"
MiB = 1 << 20


def _registration(address: str) -> dict:
    body = RegisterRequest(worker_id="w1", address="http://127.0.0.1:1", models=[WorkerModel(name="m", backend="hf")]).model_dump()
    return {**body, "address": address}


def _call(app, path: str, headers: dict[str, str], chunks: int, chunk_size: int) -> tuple[int, int]:
    """POST a streamed (chunked, no Content-Length) body of `chunks` x `chunk_size` bytes straight
    into the ASGI app; returns (status, body bytes the app pulled from the connection)."""
    pulled = 0
    sent = 0
    status = {}

    async def receive() -> dict:
        nonlocal pulled, sent
        if sent == chunks:
            await asyncio.Event().wait()  # the body is over: nothing more until the client leaves
        sent += 1
        pulled += chunk_size
        return {"type": "http.request", "body": b"x" * chunk_size, "more_body": sent < chunks}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status["code"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in {"content-type": "application/json", **headers}.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 21001)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=120))
    return status["code"], pulled


def _worker_app(**kwargs):
    from vicuna_cli.serve.config import WorkerConfig
    from vicuna_cli.serve.worker import create_app

    cfg = WorkerConfig()
    settings = {"heartbeat": cfg.heartbeat, "max_batch_size": cfg.max_batch_size, "max_queue": cfg.max_queue,
                "max_body_bytes": cfg.max_body_bytes, **kwargs}
    return create_app([], None, "http://127.0.0.1:21002", secret=SECRET, **settings)


# ---------------------------------------------------------------------------------------------
# 3. Bodies: the secret before the body, and a cap on every role


@pytest.mark.parametrize("role", ["worker", "controller"])
def test_a_huge_body_without_the_secret_is_refused_unread(role):
    """Attack: anyone who reaches a worker or the controller streams a 64 MiB body without the
    secret; the server used to read (and keep) all of it before answering 401."""
    from vicuna_cli.serve.controller import create_app

    app = _worker_app() if role == "worker" else create_app(secret=SECRET)
    path = "/generate" if role == "worker" else "/register"
    status, pulled = _call(app, path, {}, chunks=64, chunk_size=MiB)
    assert status == 401
    assert pulled == 0  # decided from the headers alone
    status, pulled = _call(app, path, {"x-vicuna-secret": "wrong"}, chunks=64, chunk_size=MiB)
    assert (status, pulled) == (401, 0)


@pytest.mark.parametrize("role", ["worker", "controller"])
def test_a_body_over_the_cap_with_the_secret_is_413_after_the_cap(role):
    """Attack: a holder of the secret (or a bug) sends an endless body; every role stops reading
    at its --max-body-bytes and answers 413."""
    from vicuna_cli.serve.controller import create_app

    cap = 256 << 10
    app = _worker_app(max_body_bytes=cap) if role == "worker" else create_app(secret=SECRET, max_body_bytes=cap)
    path = "/generate" if role == "worker" else "/register"
    status, pulled = _call(app, path, {"x-vicuna-secret": SECRET}, chunks=4096, chunk_size=16 << 10)
    assert status == 413
    assert pulled <= cap + (16 << 10)


def test_the_caps_are_options_of_every_role():
    from vicuna_cli.serve.config import ApiConfig, ControllerConfig, WorkerConfig

    assert ControllerConfig().max_body_bytes == ApiConfig().max_body_bytes == MiB
    # The API re-encodes a client's body for the worker; JSON escapes can triple it.
    assert WorkerConfig().max_body_bytes >= 3 * ApiConfig().max_body_bytes


# ---------------------------------------------------------------------------------------------
# 4. Worker addresses


@pytest.mark.parametrize("address", [
    "http://127.0.0.1:9/admin", "http://127.0.0.1:9?x=1", "http://127.0.0.1:9#f", "http://user:pw@127.0.0.1:9",
    "file:///etc/passwd", "gopher://127.0.0.1:9", "http://:9", "http://127.0.0.1:99999", "http://127.0.0.1:9/",
    "http://bad host:9",
])
def test_registration_refuses_an_address_that_is_not_scheme_host_port(address):
    """Attack: a registration names a URL with a path, query, user part or another scheme, so the
    API's calls (`{address}/generate`, carrying the secret) land on another service or path."""
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.controller import create_app

    with TestClient(create_app(secret=SECRET)) as client:
        response = client.post("/register", json=_registration(address), headers={"x-vicuna-secret": SECRET})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "address"
        assert client.get("/workers").json() == []


def test_registration_needs_the_address_to_prove_it_holds_the_secret():
    """Attack: with the secret, register an internal service's address (here one that answers
    404 with a page); the API would then POST requests and the secret to it and show the client
    its reply. The controller lists an address only after it answers the HMAC challenge."""
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.controller import create_app

    headers = {"x-vicuna-secret": SECRET}
    with TestClient(create_app(secret=SECRET)) as client:
        for fake in (fake_worker(SECRET, reply=(404, b"<h1>internal admin</h1>")), fake_worker("another-secret"),
                     fake_worker(SECRET, reply=(200, b'{"proof": "00"}'))):
            with fake as (address, calls):
                refused = client.post("/register", json=_registration(address), headers=headers)
                assert refused.status_code == 403 and refused.json()["error"]["code"] == "worker_unverified"
                assert "internal admin" not in refused.text
                assert len(calls) == 1 and "x-vicuna-secret" not in calls[0][1]  # the secret never went there
        assert client.get("/workers").json() == []
        with fake_worker(SECRET) as (address, calls):
            assert client.post("/register", json=_registration(address), headers=headers).status_code == 200
            assert [w["address"] for w in client.get("/workers").json()] == [address]
            assert "x-vicuna-secret" not in calls[0][1]


@pytest.mark.slow
def test_a_real_worker_advertising_another_address_is_not_listed(tmp_path):
    """Attack: a worker process holding the secret advertises an address that is not its own
    (another service's port); the real controller challenges that address and refuses it."""
    from processes import free_port
    from serve_cluster import Cluster, wait_until

    cluster = Cluster(tmp_path)
    try:
        cluster.start_controller()
        with fake_worker(None, reply=(404, b"not a worker")) as (elsewhere, calls):
            worker = cluster.start_worker(["m"], "--backend", "openai", "--upstream", f"http://127.0.0.1:{free_port()}/v1",
                                          "--advertise", elsewhere)
            refused = wait_until(lambda: [r for r in worker.log_records() if r.get("event") == "registration_refused"],
                                 60, "the refusal", [worker])
        assert "did not prove that it holds the shared secret" in refused[0]["error"]
        assert calls and all("x-vicuna-secret" not in headers for _, headers in calls)
        assert cluster.workers() == []
    finally:
        cluster.close()


def test_a_worker_proves_its_own_address_only():
    """Attack: use a real worker's open /challenge as an oracle to vouch for another address: the
    proof covers the worker's own address, so it is worthless for any other."""
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.security import worker_proof

    nonce = "0123456789abcdef0123"
    with TestClient(_worker_app()) as client:
        proof = client.get("/challenge", params={"nonce": nonce}).json()["proof"]
        assert proof == worker_proof(SECRET, nonce, "http://127.0.0.1:21002")
        assert proof != worker_proof(SECRET, nonce, "http://10.0.0.5:80")
        assert client.get("/challenge", params={"nonce": "short"}).status_code == 400


class _Cluster(BaseHTTPRequestHandler):
    """Controller and 'worker' in one stand-in: /dispatch names itself; /generate answers `reply`."""

    reply: tuple[int, str, bytes] = (200, "application/json", b"")

    def do_GET(self) -> None:
        self._send(200, "application/json", b"[]")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/dispatch":
            self._send(200, "application/json", json.dumps({"candidates": [f"http://127.0.0.1:{self.server.server_address[1]}"]}).encode())
        else:
            self._send(*type(self).reply)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("reply", [
    (404, "text/html", b"<p>internal: db password is hunter2</p>"),
    (500, "application/json", b'{"detail": "internal: db password is hunter2"}'),
    (200, "application/x-ndjson", b"internal: db password is hunter2\n"),
    (200, "application/x-ndjson", b'["internal: db password is hunter2"]\n'),
    # An error in the workers' own shape is passed on (its status made sane), as a worker's 429 is.
    (200, "application/x-ndjson", b'{"error": {"message": "x", "code": "c"}, "status": "internal: db password is hunter2"}\n'),
], ids=["html-404", "json-500", "text-200", "list-200", "bad-status"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_api_never_shows_a_client_what_an_upstream_answered(reply, stream):
    """Attack: make a worker address answer with another service's content (an error page, a
    non-JSON line) and read it back through the API. The client gets a generic OpenAI-shaped
    502 (never a 500, never the body); the body goes to the server log."""
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.api import create_app

    _Cluster.reply = reply
    with serving(_Cluster) as port, TestClient(create_app(f"http://127.0.0.1:{port}", secret=SECRET)) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        response = client.post("/v1/chat/completions", json=body)
    assert "hunter2" not in response.text
    if stream and reply[0] == 200:  # the stream had started: an error event, then [DONE]
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        error = json.loads(events[-2])["error"]
        assert events[-1] == "[DONE]"
    else:
        assert response.status_code == 502, response.text
        error = response.json()["error"]
    assert error["code"] == ("c" if b'"error"' in reply[2] else "bad_upstream_reply") and error["type"] == "server_error"


# ---------------------------------------------------------------------------------------------
# 5. API keys never on a command line


def test_the_launcher_hands_api_keys_to_the_api_by_environment(monkeypatch):
    """Attack: any local user runs `ps` and reads the API key of `vicuna serve --config cfg.yaml`
    (`api_key:` in a 0600 file) from the API process's command line."""
    from vicuna_cli.serve.config import API_KEYS_ENV, ServeConfig
    from vicuna_cli.serve.launcher import api_env, plan

    monkeypatch.setenv(API_KEYS_ENV, "from-env")
    config = ServeConfig(api_key=["key-one", "key-two"])
    argv = [arg for _, args in plan(config) for arg in args]
    assert not any("key-one" in a or "key-two" in a or "from-env" in a for a in argv)
    assert "--api-key" not in argv
    assert api_env(config, {"PATH": "/bin"})[API_KEYS_ENV].split() == ["key-one", "key-two", "from-env"]


@pytest.mark.slow
def test_a_real_vicuna_serve_shows_no_key_in_the_process_list(tmp_path, sp_model_dir):
    """Attack: as above, against real processes: read every child's command line (psutil, as
    `ps` does) while `vicuna serve --config cfg.yaml` runs with `api_key:` in the file."""
    import httpx
    import psutil
    from serve_single import single_server

    key = "sk-local-7d1f0c9e"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"api_key:\n  - {key}\n")
    cfg.chmod(0o600)
    with single_server(tmp_path, sp_model_dir, "--config", str(cfg), headers={"authorization": f"Bearer {key}"}) as proc:
        children = psutil.Process(proc.process.pid).children(recursive=True)
        roles = [c.cmdline() for c in children]
        assert any("api" in cmd for cmd in roles) and any("controller" in cmd for cmd in roles)
        assert not any(key in " ".join(cmd) for cmd in [psutil.Process(proc.process.pid).cmdline(), *roles])
        assert httpx.get(f"{proc.url}/v1/models", timeout=10).status_code == 401  # the key still guards it


# ---------------------------------------------------------------------------------------------
# 6. No secret on a network bind


@pytest.fixture
def no_run(monkeypatch):
    """run_app recorded instead of serving; no secret in the environment."""
    from vicuna_cli.serve import common

    monkeypatch.delenv("VICUNA_SERVE_SECRET", raising=False)
    runs = []
    monkeypatch.setattr(common, "run_app", lambda app, host, port, timeout: runs.append(host))
    return runs


@pytest.mark.parametrize("role", ["controller", "worker", "api"])
def test_a_role_refuses_a_network_bind_without_a_secret(no_run, role):
    """Attack: a standalone controller (or worker, or API) started with --host 0.0.0.0 and no
    --secret took anyone's registration (or generation) silently."""
    from vicuna_cli.serve import config as serve_config

    configs = {"controller": serve_config.ControllerConfig, "worker": serve_config.WorkerConfig, "api": serve_config.ApiConfig}
    with pytest.raises(VicunaError) as refused:
        getattr(serve_config, f"run_{role}")(configs[role](host="0.0.0.0"))
    assert "without a shared secret" in refused.value.message and "--insecure" in refused.value.hint
    assert no_run == []


@pytest.mark.parametrize("role", ["controller", "api"])
def test_insecure_allows_it_and_says_so_loudly(no_run, capsys, role):
    from vicuna_cli.serve import config as serve_config

    configs = {"controller": serve_config.ControllerConfig, "api": serve_config.ApiConfig}
    getattr(serve_config, f"run_{role}")(configs[role](host="0.0.0.0", insecure=True))
    assert no_run == ["0.0.0.0"]
    assert "INSECURE" in capsys.readouterr().err
    getattr(serve_config, f"run_{role}")(configs[role](host="127.0.0.1"))  # loopback: fine without a secret
    getattr(serve_config, f"run_{role}")(configs[role](host="0.0.0.0", secret=SECRET))
    assert no_run == ["0.0.0.0", "127.0.0.1", "0.0.0.0"] and "INSECURE" not in capsys.readouterr().err


def test_the_command_line_refuses_it_too(monkeypatch, capsys):
    """As above, through `vicuna serve controller --host 0.0.0.0`: one red line and a hint."""
    import sys

    from vicuna_cli import cli

    monkeypatch.delenv("VICUNA_SERVE_SECRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["vicuna", "serve", "controller", "--host", "0.0.0.0", "--port", "0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "the controller would listen on 0.0.0.0 without a shared secret" in err and "--insecure" in err
