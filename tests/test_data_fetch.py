"""`vicuna data fetch` against a local HTTP server on 127.0.0.1 that supports Range and can drop the
connection halfway: resume within a run and across runs, checksum failures, the manifest, no-op re-runs."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.data.fetch import MANIFEST, fetch

PAYLOAD = random.Random(0).randbytes(3 << 20)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        if self.path != "/data/sharegpt.json":
            self.send_error(404)
            return
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        server.requests.append({"range": rng, "if_range": if_range})
        data, start = server.payload, 0
        if rng and (if_range is None or if_range == server.etag):
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", server.etag)
        self.end_headers()
        if server.drops > 0:  # send half, then cut the connection
            server.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.payload, httpd.etag, httpd.drops, httpd.requests = PAYLOAD, '"v1"', 0, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/data/sharegpt.json"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.drops = 1
    result = fetch(server.url, tmp_path, retries=3, sha256=sha(PAYLOAD))
    assert result.path == tmp_path / "sharegpt.json" and result.path.read_bytes() == PAYLOAD
    half = len(PAYLOAD) // 2
    assert server.requests == [{"range": None, "if_range": None}, {"range": f"bytes={half}-", "if_range": '"v1"'}]
    entry = yaml.safe_load((tmp_path / MANIFEST).read_text())["sharegpt.json"]
    assert entry | {"fetched_at": None} == {
        "source": server.url, "file": None, "revision": None, "size": len(PAYLOAD), "sha256": sha(PAYLOAD), "fetched_at": None,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "sharegpt.json"]  # no .part left


def test_an_interrupted_run_resumes_on_the_next_run(server, tmp_path):
    server.drops = 1
    with pytest.raises(VicunaError, match="interrupted at 1.5 MB") as err:
        fetch(server.url, tmp_path, retries=0)
    assert "resumes" in err.value.hint
    assert not (tmp_path / "sharegpt.json").exists()
    assert (tmp_path / ".sharegpt.json.part").stat().st_size == len(PAYLOAD) // 2
    result = fetch(server.url, tmp_path, retries=0)
    assert result.path.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={len(PAYLOAD) // 2}-"


def test_a_file_changed_since_the_partial_download_starts_over(server, tmp_path):
    server.drops = 1
    with pytest.raises(VicunaError):
        fetch(server.url, tmp_path, retries=0)
    server.payload, server.etag = PAYLOAD[::-1], '"v2"'
    result = fetch(server.url, tmp_path, retries=0)
    assert result.path.read_bytes() == PAYLOAD[::-1]  # If-Range did not match: a full 200 answer


def test_a_checksum_mismatch_is_not_kept_as_complete(server, tmp_path):
    with pytest.raises(VicunaError, match="checksum mismatch for sharegpt.json") as err:
        fetch(server.url, tmp_path, sha256="0" * 64)
    assert sha(PAYLOAD) in err.value.message
    assert list(tmp_path.iterdir()) == []
    requests = len(server.requests)
    fetch(server.url, tmp_path, sha256=sha(PAYLOAD))  # nothing was recorded: it downloads again
    assert len(server.requests) == requests + 1 and server.requests[-1]["range"] is None


def test_rerunning_a_completed_fetch_does_nothing_and_says_so(server, tmp_path):
    first = fetch(server.url, tmp_path)
    again = fetch(server.url, tmp_path)
    assert not first.already and again.already and len(server.requests) == 1
    cli = subprocess.run([sys.executable, "-m", "vicuna_cli", "data", "fetch", server.url, "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == str(tmp_path / "sharegpt.json")
    assert "already fetched" in cli.stderr and "nothing to do" in cli.stderr
    assert len(server.requests) == 1
    assert fetch(server.url, tmp_path, force=True).already is False and len(server.requests) == 2


def test_http_errors_local_copies_and_argument_checks(server, tmp_path):
    with pytest.raises(VicunaError, match="HTTP 404"):
        fetch(server.url.replace("sharegpt", "missing"), tmp_path / "a")
    source = tmp_path / "local.jsonl"
    source.write_bytes(b'{"messages": []}\n')
    copied = fetch(str(source), tmp_path / "b")
    assert copied.path.read_bytes() == source.read_bytes() and copied.entry["sha256"] == sha(source.read_bytes())
    assert fetch(str(source), tmp_path / "b").already
    with pytest.raises(VicunaError, match="need --file"):
        fetch("hf://owner/name", tmp_path / "c")
    with pytest.raises(VicunaError, match="--sha256 must be 64 hexadecimal digits"):
        fetch(server.url, tmp_path / "d", sha256="abc")
    with pytest.raises(VicunaError, match="is not a file, a URL"):
        fetch(str(tmp_path / "nothing-here"), tmp_path / "e")


class HubHandler(BaseHTTPRequestHandler):
    """The two Hub endpoints hf_hub_download uses: HEAD and GET of /datasets/{repo}/resolve/{rev}/{file}."""

    protocol_version = "HTTP/1.1"

    def _head(self) -> bool:
        found = self.path == "/datasets/lmsys/chats/resolve/main/data/train.jsonl"
        self.send_response(200 if found else 404)
        if found:
            self.send_header("X-Repo-Commit", "c" * 40)
            self.send_header("ETag", f'"{sha(PAYLOAD)}"')
        self.send_header("Content-Length", str(len(PAYLOAD)) if found else "0")
        self.end_headers()
        return found

    def do_HEAD(self):  # noqa: N802
        self._head()

    def do_GET(self):  # noqa: N802
        if self._head():
            self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


def test_a_hub_dataset_file_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    try:
        result = fetch("hf://lmsys/chats", tmp_path, file="data/train.jsonl", revision="main")
        assert result.path == tmp_path / "train.jsonl" and result.path.read_bytes() == PAYLOAD
        assert result.entry["commit"] == "c" * 40 and result.entry["revision"] == "main"
        assert fetch("hf://lmsys/chats", tmp_path, file="data/train.jsonl", revision="main").already
        with pytest.raises(VicunaError, match="could not download data/nope.jsonl from the Hub dataset lmsys/chats"):
            fetch("hf://lmsys/chats", tmp_path, file="data/nope.jsonl")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
