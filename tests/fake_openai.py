"""The one fake OpenAI-compatible server of the tests (chat --api-base, the judge client, arena).

A stdlib HTTP server on a free 127.0.0.1 port (local_http.serving) that answers
`GET /v1/models` and `POST /v1/chat/completions`, streamed (SSE, chunked by hand so a cut
connection is detectable) or not. It records every request and can be told to misbehave:
an API key to enforce, queued error replies (status, headers, body), `response_format`
refused, a stream fault (`fault`: error_event | drop | http500), or a reply held back.
What it answers is `reply(body)` (an assistant message dict): "echo: <last user message>" here;
the judge's scripted verdicts subclass it (judge_double.py).
"""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator

from local_http import serving

MODEL_ID = "fake-echo-1"
# Non-streamed replies report these counts, so cost and token totals are known exactly.
USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeOpenAI:
    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []  # every request: {"method", "path", "headers", "body"}
        self.requests: list[dict] = []  # the bodies of the chat completions asked for
        self.lock = threading.Lock()
        self.api_key: str | None = None  # when set, requests must carry "Bearer <api_key>"
        self.fault = "ok"  # ok | error_event (after the first chunk) | drop (cut mid-stream) | http500
        self.fail: list[tuple[int, dict, dict]] = []  # queued (status, headers, body) replies, used first
        self.reject_schema = False  # answer a request with response_format with a 400
        self.delay = 0.0  # hold each reply this long (released early when the server stops)
        self.hold: Callable[[dict], None] | None = None  # called before each reply (may block)
        self.released = threading.Event()
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def completions(self) -> list[dict]:
        with self.lock:
            return list(self.requests)

    def auth_headers(self) -> list[str | None]:
        with self.lock:
            return [r["headers"].get("authorization") for r in self.log]

    def reply(self, body: dict) -> dict:
        last_user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        return {"role": "assistant", "content": "echo: " + last_user}


@contextmanager
def running(state: FakeOpenAI) -> Iterator[FakeOpenAI]:
    try:
        with serving(_handler(state)) as port:
            state.port = port
            yield state
    finally:
        state.released.set()  # a held reply must not outlive the test


def _handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streaming, so a cut connection is detectable

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _record(self, body: Any) -> None:
            with state.lock:
                state.log.append({"method": self.command, "path": self.path,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})

        def _send_json(self, status: int, payload: Any, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if state.api_key is None or self.headers.get("Authorization") == f"Bearer {state.api_key}":
                return True
            self._send_json(401, error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
            return False

        def _chunk(self, text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _event(self, payload: Any) -> None:
            self._chunk("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n")

        def do_GET(self) -> None:
            self._record(None)
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "tests"}]})
            else:
                self._send_json(404, error_body(f"no route {self.path}", "invalid_request_error"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) if length else b"null")
            except json.JSONDecodeError:
                body = None
            self._record(body)
            asked = self.path == "/v1/chat/completions" and isinstance(body, dict)
            if asked:
                with state.lock:
                    state.requests.append(body)  # counted even when refused: a 401 is a call made
            if not self._authorized():
                return
            if not asked:
                self._send_json(404, error_body(f"no route {self.path}", "invalid_request_error"))
                return
            with state.lock:
                queued = state.fail.pop(0) if state.fail else None
            if state.delay:
                state.released.wait(state.delay)
            if state.hold:
                state.hold(body)
            if queued:
                self._send_json(queued[0], queued[2], queued[1])
            elif state.fault == "http500":
                self._send_json(500, error_body("the fake server broke", "server_error"))
            elif state.reject_schema and "response_format" in body:
                self._send_json(400, error_body("response_format is not supported", "invalid_request_error"))
            elif body.get("stream"):
                self._stream(body, state.reply(body))
            else:
                self._send_json(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": state.reply(body), "finish_reason": "stop"}], "usage": USAGE,
                })

        def _stream(self, body: dict, message: dict) -> None:
            answer = message.get("content") or ""
            pieces = [answer[i : i + 4] for i in range(0, len(answer), 4)]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": body.get("model")}

            def chunk(delta: dict, finish: str | None = None) -> dict:
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            self._event(chunk({"role": "assistant", "content": ""}))
            for i, piece in enumerate(pieces):
                self._event(chunk({"content": piece}))
                if i == 0 and state.fault == "error_event":
                    self._event(error_body("the model crashed mid-answer", "server_error"))
                    self._chunk("")  # end the chunked body cleanly: the error is in the data
                    return
                if i == 0 and state.fault == "drop":
                    self.close_connection = True  # no terminating chunk: the body is cut short
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            self._event(chunk({}, "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({**base, "choices": [], "usage": {
                    "prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                    "completion_tokens": len(pieces), "total_tokens": 0}})
            self._event("[DONE]")
            self._chunk("")  # the zero-length chunk that ends the body

    return Handler
