"""Input moderation, as in the original Vicuna demo (which sent user inputs to OpenAI's
moderation endpoint first). `--moderation`:

  off               nothing is checked (default);
  keywords:FILE     a request is refused when an input contains a listed word or phrase (one per
                    line, `#` comments, case-insensitive, whole words);
  openai            inputs go to an OpenAI-compatible `/moderations` endpoint (OPENAI_API_KEY;
                    `--moderation-url` to point elsewhere). If it cannot answer, the request is
                    refused (fail closed, as FastChat does): moderation that silently stops
                    moderating is worse than none.

A refusal is a 400 with code `content_policy_violation` naming what matched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..core.errors import VicunaError
from .protocol import ServeError
from .security import read_list_file

OPENAI_MODERATION_URL = "https://api.openai.com/v1/moderations"


def refusal(reason: str) -> ServeError:
    return ServeError(
        400,
        f"the input was refused by moderation ({reason}) and was not sent to the model",
        "content_policy_violation",
        "messages",
    )


class NoModeration:
    name = "off"

    async def check(self, texts: list[str]) -> None:
        return None


class KeywordModeration:
    def __init__(self, path: Path):
        words = read_list_file(path, "--moderation keywords:", "words")
        self.name = f"keywords:{path}"
        # \b only works next to word characters; phrases like "c++" get plain boundaries.
        parts = [
            (r"\b" if w[0].isalnum() else "") + r"\s+".join(map(re.escape, w.split())) + (r"\b" if w[-1].isalnum() else "")
            for w in words
        ]
        self.pattern = re.compile("|".join(parts), re.IGNORECASE)

    async def check(self, texts: list[str]) -> None:
        for text in texts:
            match = self.pattern.search(text)
            if match:
                raise refusal(f"it contains the blocked term {match.group(0)!r}")


class OpenAIModeration:
    name = "openai"

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 10.0):
        import httpx

        self.url = url or OPENAI_MODERATION_URL
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key and self.url == OPENAI_MODERATION_URL:
            raise VicunaError("--moderation openai needs an API key", hint="set OPENAI_API_KEY")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def check(self, texts: list[str]) -> None:
        try:
            response = await self.client.post(self.url, json={"input": texts})
            response.raise_for_status()
            results = response.json()["results"]
        except Exception as exc:  # fail closed
            raise ServeError(503, f"the moderation service could not check the input ({type(exc).__name__}); try again later",
                             "moderation_unavailable") from None
        flagged = sorted({c for r in results if r.get("flagged") for c, hit in (r.get("categories") or {}).items() if hit})
        if any(r.get("flagged") for r in results):
            raise refusal("flagged: " + (", ".join(flagged) or "unspecified"))


def make_moderation(spec: str, url: str | None = None) -> Any:
    spec = (spec or "off").strip()
    if spec == "off":
        return NoModeration()
    if spec == "openai":
        return OpenAIModeration(url)
    if spec.startswith("keywords:") and spec[len("keywords:"):]:
        return KeywordModeration(Path(spec[len("keywords:"):]).expanduser())
    raise VicunaError(f"unknown --moderation {spec!r}", hint="use off, openai, or keywords:FILE")
