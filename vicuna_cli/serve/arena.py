"""`vicuna serve --arena`: Chatbot Arena's side-by-side battles on the API server.

The page (`/arena`, static/arena.html) sends one prompt; the server picks two different served
models at random, starts both answers through the same path as `/v1/chat/completions` (moderation,
then the controller's dispatch, then worker streams: api.py's `start_chat`) and streams them on
one SSE response as `{"side": "a"|"b", "text": ...}` events, without naming the models. The
server keeps both answers, so a vote refers to what the server sent, not to what a client says it
saw. The names are revealed in the reply to the vote.

  POST /arena/api/battles               {"prompt"}  -> SSE: {"battle_id"}, side events, {"done"}, [DONE]
  POST /arena/api/battles/{id}/vote     {"vote": "a"|"b"|"tie"|"bothbad"} -> {"model_a", "model_b", "winner"}
  GET  /arena/api/status                {"models": N, "ready": N >= 2}

Abuse: both POSTs count against a per-client rate limit (429); a battle can be voted on once,
only by the client that started it, and only once both answers are complete (409 otherwise, the
same for an id the server never made); prompts go through the server's moderation.
"""

from __future__ import annotations

import asyncio
import json
import random
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse

from .arena_store import ArenaStore, RateLimiter, VoteRefused
from .common import log_json, merge_streams
from .protocol import ERROR_RESPONSES, GenerateParams, ServeError

MAX_PROMPT_CHARS = 8000  # FastChat's arena allows about as much (INPUT_CHAR_LEN_LIMIT)


class BattleRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class VoteRequest(BaseModel):
    vote: Literal["a", "b", "tie", "bothbad"]


class ArenaSettings(BaseModel):
    db: Path
    rate_limit: int
    max_tokens: int
    temperature: float


def install(
    app: FastAPI,
    settings: ArenaSettings,
    served_models: Callable[[], Awaitable[list[str]]],
    moderate: Callable[[list[str]], Awaitable[None]],
    start_chat: Callable[[Request, str, list[dict], GenerateParams], Awaitable[Any]],
    page: Path,
) -> ArenaStore:
    store = ArenaStore(settings.db)
    limiter = RateLimiter(settings.rate_limit)
    pick = random.SystemRandom()

    def client_of(request: Request) -> str:
        return store.client_id(request.client.host if request.client else "unknown")

    def limit(client: str) -> None:
        wait = limiter.allow(client)
        if wait is not None:
            raise ServeError(429, f"too many arena requests: at most {settings.rate_limit} per minute per client; "
                                  f"try again in {wait:.0f} s", "rate_limit_exceeded")

    async def pair() -> tuple[str, str]:
        models = sorted(set(await served_models()))
        if len(models) < 2:
            raise ServeError(503, f"the arena needs at least two served models; this server serves {len(models)}",
                             "arena_needs_two_models")
        a, b = pick.sample(models, 2)
        return a, b

    @app.get("/arena", include_in_schema=False)
    async def arena_page() -> Any:
        return FileResponse(page)

    @app.get("/arena/api/status")
    async def status() -> dict[str, Any]:
        count = len(set(await served_models()))
        return {"models": count, "ready": count >= 2}

    @app.post("/arena/api/battles", responses=ERROR_RESPONSES)
    async def battle(body: BattleRequest, request: Request) -> Any:
        client = client_of(request)
        limit(client)
        model_a, model_b = await pair()
        await moderate([body.prompt])
        messages = [{"role": "user", "content": body.prompt}]
        params = GenerateParams(temperature=settings.temperature, max_tokens=settings.max_tokens)
        jobs = [await start_chat(request, model_a, messages, params)]
        try:  # the row is written once both workers have taken their request: no battle without answers to come
            jobs.append(await start_chat(request, model_b, messages, params))
            battle_id = await asyncio.to_thread(store.create, client, model_a, model_b, body.prompt)
        except BaseException:
            for job in jobs:
                await job.close()
            raise
        request.state.log.update(battle=battle_id)
        return EventSourceResponse(_battle_events(store, battle_id, jobs), ping=15)

    @app.post("/arena/api/battles/{battle_id}/vote", responses=ERROR_RESPONSES)
    async def vote(battle_id: str, body: VoteRequest, request: Request) -> dict[str, Any]:
        client = client_of(request)
        limit(client)
        try:
            row = await asyncio.to_thread(store.vote, battle_id, client, body.vote)
        except VoteRefused as refused:
            raise ServeError(409, refused.message, f"battle_{refused.reason}") from None
        log_json({"role": "api", "event": "arena_vote", "battle": battle_id, "winner": row["vote"]})
        return {"battle_id": battle_id, "model_a": row["model_a"], "model_b": row["model_b"], "winner": row["vote"]}

    return store


async def _side(side: str, job: Any) -> AsyncIterator[tuple[str, dict]]:
    async with aclosing(job.events()) as events:
        async for event in events:
            yield side, event


async def _battle_events(store: ArenaStore, battle_id: str, jobs: list[Any]) -> AsyncIterator[dict]:
    """Both answers as they arrive; stored once both are complete. A failure of either ends the
    battle as an error event: it is never stored as answered, so it cannot be voted on."""
    texts: dict[str, list[str]] = {"a": [], "b": []}
    yield {"data": json.dumps({"battle_id": battle_id})}
    try:
        async with aclosing(merge_streams([_side("a", jobs[0]), _side("b", jobs[1])])) as events:
            async for side, event in events:
                if event.get("text"):
                    texts[side].append(event["text"])
                    yield {"data": json.dumps({"side": side, "text": event["text"]})}
                if event.get("finish_reason"):
                    yield {"data": json.dumps({"side": side, "finish_reason": event["finish_reason"]})}
        await asyncio.to_thread(store.finish, battle_id, "".join(texts["a"]), "".join(texts["b"]))
        yield {"data": json.dumps({"done": True, "battle_id": battle_id})}
    except Exception as exc:  # after the first byte, a failure can only be an event
        error = exc if isinstance(exc, ServeError) else ServeError(500, f"internal error: {type(exc).__name__}", "internal_error")
        log_json({"role": "api", "event": "arena_error", "battle": battle_id, "error": f"{type(exc).__name__}: {exc}"})
        yield {"data": json.dumps(error.body())}
    finally:
        for job in jobs:  # a client that left: the workers stop generating at once
            await job.close()
    yield {"data": "[DONE]"}
