"""Human votes from the arena (`vicuna serve --arena`) next to LLM verdicts.

- `export`: the server's voted battles in FastChat's battle JSONL (arena_store.battle_records).
- `summarize_battles`: `judge show --battles FILE`: win/tie/loss and Bradley-Terry ratings with
  bootstrap CIs computed by the SAME functions as LLM pairwise verdicts (results.py): a battle is
  a pairwise record whose `winner` is the human vote ("tie (bothbad)" counts as a tie, as in
  FastChat's Elo analysis). With judgment files of the same battles, the agreement between the
  humans and the judge, as the MT-bench paper reports it (with ties as a third class, and on the
  battles where neither side called a tie).
- `battle_games`: `judge --battles FILE`: the battles as pairwise games for the existing judging
  run (both orders), one question per battle (its prompt), answers from the conversations.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..core.errors import VicunaError
from ..core.store import atomic_write_text
from .judging import Game
from .questions import Question, read_jsonl

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
CATEGORY = "arena"


def export(db: Path, output: Path | None) -> tuple[str, int]:
    """The voted battles as JSONL text, written atomically to `output` when given."""
    import json

    from ..serve.arena_store import battle_records, open_existing

    store = open_existing(db)
    try:
        records = battle_records(store.voted())
    finally:
        store.close()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if output is not None:
        atomic_write_text(output, text)
    return text, len(records)


def load_battles(path: Path) -> list[dict[str, Any]]:
    """Battles from JSON Lines (ours, FastChat's clean_battle.py) or one JSON array (FastChat's
    clean_battle_data.py writes `clean_battle_DATE.json` as a list)."""
    battles = _json_array(path)
    if battles is None:
        battles = read_jsonl(path)
    if not battles:
        raise VicunaError(f"{path} holds no battles", hint="export them with `vicuna judge arena export -o FILE`")
    for i, b in enumerate(battles, 1):
        missing = [k for k in ("model_a", "model_b", "winner") if k not in b]
        if missing:
            raise VicunaError(f"{path}:{i}: not a battle record (no {', '.join(missing)})", hint="FastChat's battle format: model_a, model_b, winner, ...")
        if b["winner"] not in WINNERS:
            raise VicunaError(f"{path}:{i}: unknown winner {b['winner']!r}; known: {', '.join(WINNERS)}")
        b.setdefault("question_id", f"{Path(path).name}:{i}")
    ids = Counter(str(b["question_id"]) for b in battles)
    twice = [q for q, n in ids.items() if n > 1]
    if twice:
        raise VicunaError(f"{path}: battle ids repeated: {', '.join(twice[:5])}", hint="each battle must have its own question_id")
    return battles


def _json_array(path: Path) -> list[dict[str, Any]] | None:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            if f.read(4096).lstrip()[:1] != "[":
                return None
            f.seek(0)
            data = json.load(f)
    except FileNotFoundError:
        raise VicunaError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise VicunaError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not all(isinstance(b, dict) for b in data):
        raise VicunaError(f"{path}: a JSON array of battles must hold objects only")
    return data


def pair_rows(battles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Battles as pairwise verdict records (results.pair_outcome reads `winner`)."""
    return [
        {"question_id": b["question_id"], "model_1": b["model_a"], "model_2": b["model_b"], "category": CATEGORY,
         "winner": {"model_a": "model_1", "model_b": "model_2"}.get(b["winner"], "tie")}
        for b in battles
    ]


def summarize_battles(path: Path, judgments: list[Path] | None = None, judge: str | None = None, rounds: int = 200) -> dict[str, Any]:
    from . import results

    battles = load_battles(path)
    rows = pair_rows(battles)
    pairwise = results.pairwise_tables(rows, {})
    pairwise["bradley_terry"] = results.bradley_terry(results.battles(rows), rounds=rounds)
    votes = Counter(b["winner"] for b in battles)
    result: dict[str, Any] = {
        "judge": "arena votes", "pairwise": pairwise,
        "arena": {"file": str(path), "battles": len(battles), "votes": {w: votes.get(w, 0) for w in WINNERS},
                  "voters": len({b.get("judge") for b in battles})},
    }
    if judgments:
        _, pair, _ = results.load_all(list(judgments), judge)
        result["arena"]["agreement"] = agreement(battles, pair)
    return result


def _choice(winner: str, model_a: str, model_b: str) -> str:
    return {"model_a": model_a, "model_b": model_b}.get(winner, "tie")


def agreement(battles: list[dict[str, Any]], judge_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the judge picks what the human picked, on the battles both decided."""
    from .results import pair_outcome

    verdicts: dict[str, tuple[frozenset, str]] = {}
    errors = 0
    for row in judge_rows:
        outcome, _ = pair_outcome(row)
        if outcome == "error":
            errors += 1
            continue
        picked = {"model_1": row["model_1"], "model_2": row["model_2"]}.get(outcome, "tie")
        verdicts[str(row["question_id"])] = (frozenset((row["model_1"], row["model_2"])), picked)
    pairs: list[tuple[str, str]] = []
    for b in battles:
        found = verdicts.get(str(b["question_id"]))
        if found and found[0] == frozenset((b["model_a"], b["model_b"])):
            pairs.append((_choice(b["winner"], b["model_a"], b["model_b"]), found[1]))
    decided = [(h, j) for h, j in pairs if h != "tie" and j != "tie"]
    confusion = Counter(("tie" if h == "tie" else "win", "tie" if j == "tie" else ("same" if j == h else "other")) for h, j in pairs)
    return {
        "judge": str((judge_rows[0].get("judge") or ["?"])[0]) if judge_rows else None,
        "battles": len(pairs),
        "unjudged": len(battles) - len(pairs),
        "judge_errors": errors,
        "agreement": sum(h == j for h, j in pairs) / len(pairs) if pairs else None,
        "without_ties": {"battles": len(decided), "agreement": sum(h == j for h, j in decided) / len(decided) if decided else None},
        "human_ties": sum(1 for h, _ in pairs if h == "tie"),
        "judge_ties": sum(1 for _, j in pairs if j == "tie"),
        "confusion": {f"human {h} / judge {j}": n for (h, j), n in sorted(confusion.items())},
    }


def battle_games(battles: list[dict[str, Any]]) -> tuple[list[Game], dict[str, dict[Any, list[str]]]]:
    """Two games (both orders) per battle, judging its last turn in the conversation's context."""
    games: list[Game] = []
    answers: dict[str, dict[Any, list[str]]] = {}
    for b in battles:
        qid = b["question_id"]
        sides = [b.get("conversation_a"), b.get("conversation_b")]
        if not all(isinstance(c, list) and c for c in sides):
            raise VicunaError(f"battle {qid} has no conversations to judge", hint="export battles with `vicuna judge arena export`, which keeps them")
        turns = [[m.get("content") or "" for m in c if m.get("role") == "user"] for c in sides]
        replies = [[m.get("content") or "" for m in c if m.get("role") == "assistant"] for c in sides]
        if turns[0] != turns[1] or any(len(r) != len(turns[0]) for r in replies) or not turns[0]:
            raise VicunaError(f"battle {qid}: the two conversations do not hold the same prompts, each answered once",
                              hint="only battles where both models answered the same prompts can be judged")
        if b["model_a"] == b["model_b"]:
            raise VicunaError(f"battle {qid} pits {b['model_a']} against itself")
        question = Question(qid, CATEGORY, turns[0])
        for model, reply in zip((b["model_a"], b["model_b"]), replies):
            answers.setdefault(model, {})[qid] = reply
        turn = len(turns[0])
        games += [Game(question, turn, (b["model_a"], b["model_b"])), Game(question, turn, (b["model_a"], b["model_b"]), swapped=True)]
    return games, answers
