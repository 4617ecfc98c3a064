"""A stdlib stand-in for a worker's address in controller tests: it answers the registration
challenge (GET /challenge?nonce=...) the way a real worker holding `secret` does, or with
whatever `reply` says (a service that is not a worker)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from local_http import serving

from vicuna_cli.serve.security import worker_proof


@contextmanager
def fake_worker(secret: str | None, reply: tuple[int, bytes] | None = None) -> Iterator[tuple[str, list]]:
    """Yields the address (http://127.0.0.1:PORT) and the (path, headers) of each call to it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, body = reply or (200, json.dumps({"proof": worker_proof(secret, parse_qs(urlsplit(self.path).query)["nonce"][0],
                                                                            f"http://127.0.0.1:{self.server.server_address[1]}")}).encode())
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    calls: list[tuple[str, dict[str, str]]] = []
    with serving(Handler) as port:
        yield f"http://127.0.0.1:{port}", calls
