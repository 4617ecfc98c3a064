"""The wire formats of `vicuna serve`, as pydantic models.

Two protocols live here:
  - the public one: the subset of OpenAI's API that clients use (chat completions, completions,
    models, errors). Fields are validated here once, so a bad request is a 400 that names the
    field, never a 500 deeper in;
  - the internal one between the roles: workers register and heartbeat with the controller, the
    API asks the controller for a worker and streams a generation from it as JSON lines.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------------------------------------
# Errors (OpenAI's shape)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# Status -> OpenAI error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


def error_type(status: int) -> str:
    # Any other 4xx is still the client's doing (OpenAI has no type per status beyond these).
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "server_error")


class ServeError(Exception):
    """An error with an HTTP status; rendered in OpenAI's shape by every role."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=error_type(self.status), param=self.param, code=self.code)
        return {"error": info.model_dump()}

    @classmethod
    def from_body(cls, status: int, body: Any, source: str = "the upstream") -> "ServeError":
        """An error in OpenAI's shape is passed on; anything else is a 502 that does not repeat the
        body (it may come from a service the client must not read): the body goes to the log."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            code, param = error.get("code"), error.get("param")
            return cls(status, str(error["message"]), code if isinstance(code, str) else None, param if isinstance(param, str) else None)
        from .common import log_json

        log_json({"event": "bad_upstream_reply", "source": source, "status": status, "body": str(body)[:1000]})
        return cls(502, f"{source} answered HTTP {status} without an error in OpenAI's shape (its reply is in the server log)", "bad_upstream_reply")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "The worker queue is full"),
        (502, "A worker or the controller answered something unexpected (logged on the server)"),
        (503, "No live worker serves the model, or workers are still registering"),
    ]
}

# ---------------------------------------------------------------------------------------------
# OpenAI requests


def _first_unencodable(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string that is not valid UTF-8-encodable text, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_unencodable(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class _Request(BaseModel):
    # Unknown fields (tools, logit_bias, user, ...) are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    # Strict, as OpenAI is: "yes" or 1 is a 400, not a silent true.
    stream: Optional[StrictBool] = False
    stream_options: Optional["StreamOptions"] = None
    # OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}; kept as sent
    # (the openai backend forwards it unchanged), checked here so a bad one is a 400 before dispatch.
    response_format: Optional[dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        # JSON allows lone UTF-16 surrogates ("\\ud800"); they cannot be encoded as UTF-8 for the
        # tokenizer or the worker hop, so refuse them here as a 400 naming the field.
        bad = _first_unencodable(data)
        if bad is not None:
            raise ValueError(f"{bad or 'the request'} holds an unpaired UTF-16 surrogate; text must be valid Unicode")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        from ..core.structured import ResponseFormatError, check_response_format

        try:
            check_response_format(value)
        except ResponseFormatError as exc:  # a plain message (pydantic would prefix "Value error, ")
            raise PydanticCustomError("response_format", exc.message.removeprefix("response_format: ")) from None
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    include_usage: Optional[StrictBool] = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[StrictBool] = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= 32:
            raise ValueError("give 1 to 32 prompts")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


_Request.model_rebuild()

# ---------------------------------------------------------------------------------------------
# OpenAI responses (documented in the OpenAPI schema; built as dicts on the hot path)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vicuna"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[dict[str, Any]] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------------------------
# Internal: worker <-> controller <-> API


SECRET_HEADER = "x-vicuna-secret"


class GenerateParams(BaseModel):
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: Optional[int] = None  # None: what the context leaves
    seed: Optional[int] = None
    stop: list[str] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    response_format: Optional[dict[str, Any]] = None  # as the client sent it (validated)


class GenerateRequest(BaseModel):
    """API -> worker. Exactly one of `messages` (chat: the worker renders its template) and
    `prompt` (completions: raw text)."""

    model: str
    request_id: str
    messages: Optional[list[dict[str, str]]] = None
    prompt: Optional[str] = None
    params: GenerateParams = GenerateParams()


# Worker -> API: one JSON object per line, each one of
#   {"index": i, "text": str, "token_ids": [...], "logprobs": [...] | null, "finish_reason": str | null}
#   {"usage": {"prompt_tokens": int, "completion_tokens": int, "cached_tokens": int}}  (last line; cached_tokens optional)
#   {"keepalive": true}                                              (while nothing else is sent)
#   {"error": {...OpenAI error...}, "status": int}                  (a failure after the start)


class WorkerModel(BaseModel):
    name: str
    backend: str
    context_length: Optional[int] = None
    template: Optional[str] = None


def check_worker_address(address: str) -> str:
    """http(s)://host[:port] and nothing else: the API appends its own paths to it, and a path,
    query or user part would let a registration aim those calls somewhere else."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"a worker address must be http(s)://host:port, not {address!r} ({exc})") from None
    problem = ("it must not contain spaces or control characters" if any(c.isspace() or not c.isprintable() for c in address)
               else "its scheme must be http or https" if parts.scheme not in ("http", "https")
               else "it has no host" if not parts.hostname
               else "it must not hold a user or password" if parts.username is not None or parts.password is not None
               else "it must not have a path, query or fragment" if parts.path or parts.query or parts.fragment or address.endswith(("?", "#"))
               else "its port must be 1 to 65535" if port == 0
               else None)
    if problem:
        raise ValueError(f"a worker address must be http(s)://host:port, not {address!r}: {problem}")
    return address


class RegisterRequest(BaseModel):
    worker_id: str
    address: str  # http://host:port of the worker
    models: list[WorkerModel]
    max_batch_size: int = 1
    max_queue: int = 0
    running: int = 0
    waiting: int = 0
    rejoin: bool = False  # registered before (with this controller, or one that has restarted since)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_worker_address(value)


class HeartbeatRequest(BaseModel):
    worker_id: str
    running: int = 0
    waiting: int = 0


class HeartbeatResponse(BaseModel):
    known: bool  # False: the controller does not know this worker (it restarted): register again


class WorkerStatus(BaseModel):
    worker_id: str
    address: str
    models: list[WorkerModel]
    max_batch_size: int
    max_queue: int
    running: int
    waiting: int
    heartbeat_age: float  # seconds since the last heartbeat
    registered_for: float  # seconds since registration


class DispatchRequest(BaseModel):
    model: str
    n: int = Field(1, ge=1)  # sequences one worker must hold for one of the request's prompts
    sequences: int = Field(1, ge=1)  # sequences of the whole client request (prompts x n)


class DispatchResponse(BaseModel):
    candidates: list[str]  # worker addresses, least loaded first


class ReportRequest(BaseModel):
    address: str
    reason: str = ""
