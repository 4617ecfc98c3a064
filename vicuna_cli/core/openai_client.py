"""The `openai` client as vicuna uses it (chat's OpenAI backend, judge's ApiClient): made in one
way, and its errors turned into VicunaErrors by ONE rule (`api_error`), so `vicuna chat --api-base`
and `vicuna judge` say the same thing about the same failure. Callers that retry (judge) ask
`retryable` first and map only what they give up on.

`openai` is imported inside the functions: it takes most of a second to import, which commands
that never call an endpoint should not pay.
"""

from __future__ import annotations

from typing import Any

from .errors import VicunaError

CONNECT_HINT = "is the server running, and is the API base right (it usually ends in /v1)?"


def new_client(api_base: str, api_key: str | None, timeout: float, max_retries: int) -> Any:
    import openai

    # The client insists on a key; local servers usually accept any.
    return openai.OpenAI(base_url=api_base, api_key=api_key or "none", timeout=timeout, max_retries=max_retries)


def api_message(exc: Any) -> str:
    """The server's own words: OpenAI's {"error": {"message"}} body, else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", exc))


def retryable(exc: BaseException) -> bool:
    """Worth another try: a timeout, a dropped connection, 408/409/429 or a 5xx."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError is one
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def connection_error(api_base: str, error: str) -> VicunaError:
    return VicunaError(f"could not connect to {api_base} ({error})", hint=CONNECT_HINT)


def describe_failure(exc: BaseException) -> str:
    """A short "what went wrong" for retry messages: "429 Rate limit", "APITimeoutError: ..."."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"{exc.status_code} {api_message(exc)}"
    return f"{type(exc).__name__}: {exc.__cause__ or exc}"


def api_error(exc: BaseException, api_base: str, *, key_hint: str, model: str | None = None,
              model_hint: str | None = None) -> VicunaError:
    """An `openai` exception -> the VicunaError the user sees (the caller raises it `from exc`).
    `key_hint` says where this command takes its key from; `model_hint` how to pick another model."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        what = "rejected the API key" if exc.status_code == 401 else "refused the request"
        return VicunaError(f"the endpoint {api_base} {what} ({exc.status_code}): {api_message(exc)}", hint=key_hint)
    if isinstance(exc, openai.NotFoundError) and model is not None:
        return VicunaError(f"{api_base} does not serve model {model!r} (404): {api_message(exc)}", hint=model_hint)
    if isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return VicunaError(f"{api_base} rejected the request ({exc.status_code}): {api_message(exc)}")
    if isinstance(exc, openai.APIStatusError):
        return VicunaError(f"{api_base} answered {exc.status_code}: {api_message(exc)}")
    if isinstance(exc, openai.APIConnectionError):
        return connection_error(api_base, describe_failure(exc))
    if isinstance(exc, openai.APIError):  # e.g. an error event in the middle of a stream
        return VicunaError(f"{api_base} reported an error: {api_message(exc)}")
    return VicunaError(f"{api_base}: {type(exc).__name__}: {exc}")
