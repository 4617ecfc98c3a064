"""An OpenAI-compatible chat client for judging (and API answers): cache, budget, retries.

- Persistent cache: every reply is stored in SQLite under the output directory, keyed by a hash
  of (model, full messages, sampling settings incl. response_format). An interrupted run resumes
  where it stopped and a repeated run makes no calls. SQLite (stdlib) rather than JSONL: writes
  from several threads are atomic per reply and lookups are indexed.
- Budget: `max_calls` stops cleanly (BudgetReached) before the call that would exceed it.
- Resilience: 429 and 5xx are retried with exponential backoff that honours `Retry-After` /
  `retry-after-ms`; timeouts and dropped connections are retried too. 401/403, unknown model and
  a model that refuses are VicunaErrors with a hint, at once.
- Structured output: the JSON schema is sent as `response_format` when the endpoint accepts it;
  an endpoint that rejects the field (400/422) is remembered and asked without it.
The `openai` client's own retries are off (max_retries=0) so that every call is counted here.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import VicunaError
from ..core.openai_client import api_error, connection_error, describe_failure, new_client, retryable
from ..core.store import ensure_writable

DEFAULT_API_BASE = "https://api.openai.com/v1"
CACHE_FILE = "judge_cache.sqlite"
KEY_HINT = "set the key in VICUNA_JUDGE_API_KEY or OPENAI_API_KEY (or pass --judge-api-key-env NAME)"


class BudgetReached(Exception):
    """--max-calls is used up; the run stops cleanly and a re-run continues from the cache."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    max_tokens: int = 1024

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


def cache_key(model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> str:
    blob = json.dumps({"model": model, "messages": messages, "sampling": sampling}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Cache:
    """Judge replies on disk; safe to share between threads of one process."""

    def __init__(self, path: Path):
        path = Path(path)
        ensure_writable(path.parent, "judge cache")
        self.path = path
        self._lock = threading.Lock()
        with self._guard():
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, text TEXT, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS capabilities (name TEXT PRIMARY KEY, value TEXT)")
            self._db.commit()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A damaged file shows up at any query (a corrupt page is read only when needed), so every
        access turns sqlite's error into one the user can act on. Called with self._lock held."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise VicunaError(f"the judge cache {self.path} is not usable: {exc}",
                              hint=f"delete it ({self.path}) to start afresh; the judge calls it saved are then made again") from exc

    def get(self, key: str) -> Reply | None:
        with self._lock, self._guard():
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,)
            ).fetchone()
        return Reply(row[0], row[1], row[2], cached=True) if row else None

    def put(self, key: str, model: str, reply: Reply) -> None:
        with self._lock, self._guard():
            self._db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, reply.text, reply.prompt_tokens, reply.completion_tokens, time.time()),
            )
            self._db.commit()

    def capability(self, name: str) -> str | None:
        with self._lock, self._guard():
            row = self._db.execute("SELECT value FROM capabilities WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_capability(self, name: str, value: str) -> None:
        with self._lock, self._guard():
            self._db.execute("INSERT OR REPLACE INTO capabilities VALUES (?, ?)", (name, value))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock, self._guard():
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class ApiClient:
    """Chat completions from one model at one OpenAI-compatible endpoint."""

    def __init__(
        self,
        api_base: str,
        api_key: str | None,
        model: str,
        cache: Cache | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 6,
        max_calls: int | None = None,
        schema: str = "auto",  # auto | on | off
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.api_base, self.model, self.cache = api_base, model, cache
        self._api_key, self._timeout, self._client = api_key or "none", timeout, None
        self.max_retries, self.max_calls, self.schema_mode = max_retries, max_calls, schema
        self.max_backoff, self.sleep = max_backoff, sleep
        self.calls = self.cache_hits = self.retries = 0
        self.prompt_tokens = self.completion_tokens = 0
        self._lock = threading.Lock()
        self._capability = f"{api_base}|{model}|response_format"

    @property
    def client(self) -> Any:
        """The `openai` client, made at the first cache miss: importing `openai` takes most of a
        second, which a run served entirely from the cache should not pay."""
        with self._lock:
            if self._client is None:
                self._client = new_client(self.api_base, self._api_key, self._timeout, max_retries=0)
            return self._client

    # -- structured output support, remembered per endpoint and model

    def schema_supported(self) -> bool:
        if self.schema_mode != "auto":
            return self.schema_mode == "on"
        return self.cache is None or self.cache.capability(self._capability) != "unsupported"

    def _schema_rejected(self) -> None:
        if self.cache is not None:
            self.cache.set_capability(self._capability, "unsupported")
        self.schema_mode = "off"

    def sampling_for(self, sampling: Sampling, schema: dict[str, Any] | None) -> dict[str, Any]:
        settings = sampling.as_dict()
        if schema is not None and self.schema_supported():
            settings["response_format"] = {"type": "json_schema", "json_schema": schema}
        return settings

    def key(self, messages: list[dict[str, str]], sampling: Sampling, schema: dict[str, Any] | None = None) -> str:
        return cache_key(self.model, messages, self.sampling_for(sampling, schema))

    def cached(self, messages: list[dict[str, str]], sampling: Sampling, schema: dict[str, Any] | None = None) -> bool:
        return self.cache is not None and self.cache.get(self.key(messages, sampling, schema)) is not None

    # -- calls

    def complete(self, messages: list[dict[str, str]], sampling: Sampling, schema: dict[str, Any] | None = None) -> Reply:
        while True:
            settings = self.sampling_for(sampling, schema)
            key = cache_key(self.model, messages, settings)
            if self.cache is not None and (hit := self.cache.get(key)) is not None:
                with self._lock:
                    self.cache_hits += 1
                return hit
            try:
                reply = self._call(messages, settings)
            except _SchemaRejected:
                self._schema_rejected()
                continue
            if self.cache is not None:
                self.cache.put(key, self.model, reply)
            return reply

    def _reserve_call(self) -> None:
        with self._lock:
            if self.max_calls is not None and self.calls >= self.max_calls:
                raise BudgetReached(f"--max-calls {self.max_calls} reached")
            self.calls += 1

    def _call(self, messages: list[dict[str, str]], settings: dict[str, Any]) -> Reply:
        import openai

        attempt = 0
        while True:
            self._reserve_call()
            refused = False
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, **settings)
                return self._reply(response)
            except openai.APIError as exc:
                rejected = isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError))
                if rejected and "response_format" in settings and self.schema_mode != "on":  # "off" if another thread saw it first
                    raise _SchemaRejected() from exc
                if not retryable(exc):
                    raise api_error(exc, self.api_base, key_hint=KEY_HINT, model=self.model,
                                    model_hint="check --judge-model (or -m) against the server's /v1/models") from exc
                wait = retry_after(exc.response.headers) if isinstance(exc, openai.APIStatusError) else None
                error = describe_failure(exc)
                refused = isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError)
            attempt += 1
            if attempt > self.max_retries and refused:
                raise connection_error(self.api_base, error)
            if attempt > self.max_retries:
                raise VicunaError(
                    f"{self.api_base} kept failing after {self.max_retries} retries ({error})",
                    hint="lower --concurrency, raise --timeout, or re-run later: finished judgments are cached",
                )
            with self._lock:
                self.retries += 1
            if wait is None:
                wait = min(self.max_backoff, 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            self.sleep(min(wait, self.max_backoff))

    def _reply(self, response: Any) -> Reply:
        if not getattr(response, "choices", None):
            raise VicunaError(f"{self.api_base} sent a reply with no choices")
        message = response.choices[0].message
        text, refusal = message.content, getattr(message, "refusal", None)
        if refusal and not text:
            raise VicunaError(
                f"the model {self.model!r} refused to answer: {refusal}",
                hint="use another model (--judge-model), or check the prompt it was given",
            )
        usage = getattr(response, "usage", None)
        reply = Reply(
            text or "",
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
        )
        with self._lock:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
        return reply


class _SchemaRejected(Exception):
    pass
