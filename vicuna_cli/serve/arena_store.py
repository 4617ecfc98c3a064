"""The arena's durable record: one SQLite row per battle the server created, and the votes on them.

Kept free of FastAPI so `vicuna judge arena export` reads the same file with the same code.

A battle row is written when the server picks the pair (before any model answers), completed
with both answers when both streams end, and voted on at most once, by the client that started
it: the vote is one conditional UPDATE, so two racing votes cannot both land. A client is stored
as a keyed hash of its address (HMAC-SHA256 with a random salt kept in the database), never as the
address itself; the export goes further and numbers the clients (FastChat's `arena_user_N`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..core.errors import VicunaError

# FastChat's `winner` values (clean_battle_data.py), keyed by what the page sends.
VOTES = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    battle_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    client TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer_a TEXT,
    answer_b TEXT,
    finished REAL,
    vote TEXT CHECK (vote IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    voted REAL
);
"""


def default_db() -> Path:
    """Where the arena keeps its battles unless --arena-db (serve) / --db (export) says otherwise."""
    from ..core.store import vicuna_home

    return vicuna_home() / "arena.sqlite3"


class VoteRefused(Exception):
    """Why a vote was not stored: `reason` is unknown, already_voted or unfinished."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class ArenaStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): every statement below is its own transaction
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a stored vote survives a power cut
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(32),))
            self.salt = bytes.fromhex(self.db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0])
        except sqlite3.Error as exc:
            raise VicunaError(f"cannot open the arena database {self.path}: {exc}", hint="choose another --arena-db") from None
        self.lock = threading.Lock()

    def client_id(self, address: str) -> str:
        return hmac.new(self.salt, address.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:24]

    def create(self, client: str, model_a: str, model_b: str, prompt: str) -> str:
        battle_id = f"battle-{secrets.token_urlsafe(18)}"  # unguessable: an id is the right to vote
        with self.lock:
            self.db.execute(
                "INSERT INTO battles (battle_id, created, client, model_a, model_b, prompt) VALUES (?, ?, ?, ?, ?, ?)",
                (battle_id, self.clock(), client, model_a, model_b, prompt),
            )
        return battle_id

    def finish(self, battle_id: str, answer_a: str, answer_b: str) -> None:
        with self.lock:
            self.db.execute("UPDATE battles SET answer_a = ?, answer_b = ?, finished = ? WHERE battle_id = ? AND finished IS NULL",
                            (answer_a, answer_b, self.clock(), battle_id))

    def vote(self, battle_id: str, client: str, vote: str) -> dict[str, Any]:
        """Store the vote (a key of VOTES) and return the battle row, or raise VoteRefused."""
        winner = VOTES[vote]
        with self.lock:
            changed = self.db.execute(
                "UPDATE battles SET vote = ?, voted = ? WHERE battle_id = ? AND client = ? AND vote IS NULL AND finished IS NOT NULL",
                (winner, self.clock(), battle_id, client),
            ).rowcount
            row = self._get(battle_id)
        if changed == 1:
            return row
        if row is None or row["client"] != client:  # another client's battle is as unknown as a made-up id
            raise VoteRefused("unknown", f"no battle {battle_id!r} was started by this client on this server")
        if row["vote"] is not None:
            raise VoteRefused("already_voted", f"battle {battle_id!r} has already been voted on")
        raise VoteRefused("unfinished", f"battle {battle_id!r} has no complete answers to vote on")

    def get(self, battle_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self._get(battle_id)

    def _get(self, battle_id: str) -> dict[str, Any] | None:
        cursor = self.db.execute("SELECT * FROM battles WHERE battle_id = ?", (battle_id,))
        row = cursor.fetchone()
        return dict(zip([c[0] for c in cursor.description], row)) if row else None

    def voted(self) -> list[dict[str, Any]]:
        with self.lock:
            cursor = self.db.execute("SELECT * FROM battles WHERE vote IS NOT NULL ORDER BY voted, battle_id")
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        self.db.close()


def open_existing(path: Path) -> ArenaStore:
    """The store of `vicuna judge arena export`: reading must not create an empty database."""
    if not Path(path).is_file():
        raise VicunaError(f"no arena database at {path}", hint="start one with `vicuna serve --arena`, or pass --db PATH")
    return ArenaStore(path)


def battle_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Voted battles in FastChat's battle format (fastchat/serve/monitor/clean_battle_data.py).

    `judge` numbers the clients in order of first vote, as FastChat's `arena_user_N`; `language`
    is not detected here ("unknown"); `tstamp` is the time of the vote."""
    users: dict[str, int] = {}
    records = []
    for row in rows:
        user = users.setdefault(row["client"], len(users))
        conversations = [
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[f"answer_{side}"]}]
            for side in ("a", "b")
        ]
        records.append({
            "question_id": row["battle_id"], "model_a": row["model_a"], "model_b": row["model_b"], "winner": row["vote"],
            "judge": f"arena_user_{user}", "conversation_a": conversations[0], "conversation_b": conversations[1],
            "turn": 1, "anony": True, "language": "unknown", "tstamp": row["voted"],
        })
    return records


class RateLimiter:
    """At most `limit` arena requests per client in any `window` seconds (a sliding window).

    Memory is bounded: clients idle for a whole window are forgotten once `max_clients` is
    reached, and a client's history never holds more than `limit` times."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000):
        self.limit, self.window, self.clock, self.max_clients = limit, window, clock, max_clients
        self.seen: dict[str, deque] = {}
        self.lock = threading.Lock()

    def allow(self, client: str) -> float | None:
        """None when allowed (and counted); else the seconds until the next request is allowed."""
        now = self.clock()
        with self.lock:
            if len(self.seen) >= self.max_clients:
                for key in [k for k, q in self.seen.items() if not q or now - q[-1] >= self.window]:
                    del self.seen[key]
            times = self.seen.setdefault(client, deque(maxlen=self.limit))
            while times and now - times[0] >= self.window:
                times.popleft()
            if len(times) >= self.limit:
                return self.window - (now - times[0])
            times.append(now)
            return None
