"""Who may call what: API keys, a request body limit, CORS, and the shared secret between roles.

The key check, the secret check and the body limit are plain ASGI middleware (not FastAPI
dependencies), so they cover every route, including unknown paths, `/metrics` and `/openapi.json`,
and they decide from the headers alone, before anything reads the body: a caller without the key
or secret cannot make a server buffer a huge body. `/health` stays open for load balancers. The web
pages (`/`, `/arena` and `/static/...`) hold no data and must load in a browser before the user can type a
key into it, so it is open too; everything it fetches needs the key.

A worker proves that it holds the secret before the controller lists its address (and so before
the API sends it the secret with a request): the controller asks the address for an HMAC of a
fresh nonce and of the address itself, which only a process holding the secret can compute.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from ..core.errors import VicunaError
from .protocol import SECRET_HEADER, ServeError

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = ("/health",)
PAGE_PATHS = ("/", "/arena", "/static/")


def read_list_file(path: Path, flag: str, what: str) -> list[str]:
    """Non-blank lines of a file, `#` comment lines dropped; errors name the flag."""
    label = f"{flag}{path}" if flag.endswith(":") else f"{flag} {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise VicunaError(f"{label}: {exc.strerror or exc}") from None
    items = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise VicunaError(f"{label} holds no {what}", hint=f"one {what[:-1]} per line; # starts a comment")
    return items


def load_api_keys(keys: Iterable[str] = (), keys_file: Path | None = None) -> list[str]:
    """Keys from `--api-key` flags plus a file with one key per line (`#` comments, blanks)."""
    found = [k.strip() for k in keys if k and k.strip()]
    if keys_file is not None:
        found += read_list_file(keys_file, "--api-keys-file", "keys")
    for key in found:
        if any(c.isspace() for c in key):
            raise VicunaError("an API key must not contain spaces", hint="check --api-key / --api-keys-file")
    return list(dict.fromkeys(found))


def _matches(given: str, keys: list[str]) -> bool:
    # compare_digest against every key: no early exit that would leak which prefix matched.
    return any([hmac.compare_digest(given.encode(), key.encode()) for key in keys])


def presented_key(headers: dict[bytes, bytes]) -> str:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


async def send_error(send: Callable[[dict], Awaitable[None]], error: ServeError, extra_headers: list | None = None) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], open_page: bool = True):
        self.app, self.keys, self.open_page = app, keys, open_page

    def _is_open(self, scope: dict) -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS or scope.get("method") == "OPTIONS":  # CORS preflight carries no key
            return True
        return self.open_page and scope.get("method") in ("GET", "HEAD") and (path in ("/", "/arena") or path.startswith("/static/"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or self._is_open(scope):
            return await self.app(scope, receive, send)
        key = presented_key(dict(scope.get("headers") or []))
        if not key:
            error = ServeError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        elif not _matches(key, self.keys):
            error = ServeError(401, "invalid API key", "invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await send_error(send, error, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for bodies over `limit` bytes: checked on Content-Length and while reading (chunked)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def error(self) -> ServeError:
        return ServeError(413, f"the request body is larger than the limit of {self.limit} bytes", "request_too_large")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, self.error())
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # An HTTPException: FastAPI turns any other error while reading a body into a 400.
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self.error().message)
            return message

        await self.app(scope, limited_receive, send)


def add_cors(app: Any, origins: list[str]) -> None:
    """CORS is off unless origins are given (`--cors-origin`, repeatable; `*` for any)."""
    if not origins:
        return
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["authorization", "content-type", "x-api-key"],
    )


class SecretMiddleware:
    """Internal routes (worker <-> controller <-> API) demand the shared secret when one is set;
    `open_paths` (health, read-only status, the worker's challenge) do not."""

    def __init__(self, app: ASGIApp, secret: str | None, open_paths: tuple[str, ...]):
        self.app, self.secret, self.open_paths = app, secret, open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.secret or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(SECRET_HEADER.encode(), b"")
        if hmac.compare_digest(given, self.secret.encode()):
            return await self.app(scope, receive, send)
        await send_error(send, ServeError(401, "missing or wrong shared secret between vicuna roles", "invalid_secret"))


def guard(app: Any, max_body_bytes: int, secret: str | None = None, open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
    """The body limit, inside the secret check: an unauthenticated body is never read at all."""
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(SecretMiddleware, secret=secret, open_paths=open_paths)


CHALLENGE_PATH = "/challenge"


def worker_proof(secret: str, nonce: str, address: str) -> str:
    """What a worker answers to the controller's challenge: bound to the address, so a proof that
    one worker gives cannot vouch for another address."""
    message = f"vicuna-worker-challenge\n{nonce}\n{address}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def secret_headers(secret: str | None) -> dict[str, str]:
    return {SECRET_HEADER: secret} if secret else {}
