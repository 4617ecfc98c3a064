"""`vicuna serve --arena` for real: the arena page in headless Chromium (prompt, two streams, vote,
names revealed, the row in SQLite, ratings from the export), and the attacks on its API (forged,
duplicate and unknown votes, moderation, the rate limit, fewer than two models) against real
`vicuna serve` processes serving the two tiny fixture models on loopback ports."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serve_cluster import wait_until
from serve_single import single_server
from web_browser import browser, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # real processes and a real browser

KEY = "arena-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BLOCKED = "zorblax"


@pytest.fixture(scope="module")
def arena(tmp_path_factory, sp_model_dir, bpe_model_dir):
    """`vicuna serve -m SP -m BPE --arena` with an API key and keyword moderation; yields (proc, db)."""
    root = tmp_path_factory.mktemp("arena")
    (root / "blocked.txt").write_text(f"{BLOCKED}\n")
    db = root / "arena.sqlite3"
    with single_server(root, [sp_model_dir, bpe_model_dir], "--api-key", KEY, "--arena", "--arena-db", str(db),
                       "--arena-max-tokens", "24", "--arena-temperature", "0", "--arena-rate-limit", "200",
                       "--moderation", f"keywords:{root / 'blocked.txt'}", headers=AUTH) as proc:
        yield proc, db, {str(sp_model_dir), str(bpe_model_dir)}


@pytest.fixture(scope="module")
def lonely(tmp_path_factory, bpe_model_dir):
    """An arena with one model, and a rate limit of 3 arena requests a minute."""
    root = tmp_path_factory.mktemp("arena_one")
    with single_server(root, bpe_model_dir, "--arena", "--arena-db", str(root / "arena.sqlite3"), "--arena-rate-limit", "3") as proc:
        yield proc


def rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        cursor = conn.execute("SELECT * FROM battles ORDER BY created")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]


def vicuna(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (a child process: it inherits PYTHONPATH, so this checkout runs)."""
    return subprocess.run([sys.executable, "-m", "vicuna_cli", *args], capture_output=True, text=True, timeout=300, env=os.environ)


def battle(url: str, prompt: str, headers: dict = AUTH) -> tuple[int, list, str]:
    """POST a battle; (status, SSE data items (parsed, [DONE] as a string), raw body)."""
    with httpx.stream("POST", f"{url}/arena/api/battles", json={"prompt": prompt}, headers=headers, timeout=120) as response:
        raw = response.read().decode()
    if response.status_code != 200:
        return response.status_code, [json.loads(raw)], raw
    items = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    return 200, [i if i == "[DONE]" else json.loads(i) for i in items], raw


def vote(url: str, battle_id: str, choice: str, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/arena/api/battles/{battle_id}/vote", json={"vote": choice}, headers=headers, timeout=30)


def test_the_page_streams_two_anonymous_answers_takes_a_vote_and_reveals_the_names(page, arena, tmp_path):
    from playwright.sync_api import expect

    proc, db, models = arena
    page.add_init_script(f"localStorage.setItem('vicuna.apiKey', {json.dumps(KEY)})")
    page.goto(f"{proc.url}/arena")
    expect(page).to_have_title("vicuna arena")
    expect(page.locator("#status")).to_have_text("2 models in the arena")
    expect(page.locator("#notice")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    page.evaluate("""() => {
        window.__states = {a: [], b: []};
        for (const side of ['a', 'b']) {
            const content = document.querySelector(`#side-${side} .content`);
            new MutationObserver(() => window.__states[side].push(content.textContent))
                .observe(content, {childList: true, subtree: true, characterData: true});
        }
    }""")
    page.fill("#prompt", "Hello there, how are you?")
    page.press("#prompt", "Enter")
    expect(page.locator("#votes")).to_be_visible()
    # Before the vote: no name anywhere on the page.
    assert page.locator(".side .name").all_text_contents() == ["Model A", "Model B"]
    assert not any(m in page.content() for m in models)
    [row] = rows(db)
    assert row["vote"] is None and row["prompt"] == "Hello there, how are you?" and {row["model_a"], row["model_b"]} == models
    shown = {s: page.locator(f"#side-{s} .content").text_content() for s in "ab"}
    assert shown == {"a": row["answer_a"], "b": row["answer_b"]}  # the server kept what the page showed
    assert all(shown.values()), "both fixture models should say something"
    for s in "ab":  # each answer arrived in pieces, each a prefix of the final one
        states = [t for t in dict.fromkeys(page.evaluate(f"window.__states.{s}")) if t]
        assert len(states) >= 2 and states[-1] == shown[s] and all(shown[s].startswith(t) for t in states), states

    page.click("#vote-a")
    expect(page.locator("#result")).to_have_text(
        f"Vote stored: A is better. A was {row['model_a']}, B was {row['model_b']}.")
    assert page.locator(".side .name").all_text_contents() == [f"Model A: {row['model_a']}", f"Model B: {row['model_b']}"]
    expect(page.locator("#side-a")).to_have_class("side winner")
    expect(page.locator("#votes")).to_be_hidden()
    [stored] = rows(db)
    assert stored["vote"] == "model_a" and stored["voted"] >= stored["finished"] >= stored["created"]
    assert stored["client"] != "127.0.0.1" and len(stored["client"]) == 24  # a keyed hash, not the address

    # The export and the ratings, as a user gets them from the command line.
    battles = tmp_path / "battles.jsonl"
    exported = vicuna("judge", "arena", "export", "--db", str(db), "-o", str(battles))
    assert exported.returncode == 0, exported.stderr
    [record] = [json.loads(line) for line in battles.read_text().splitlines()]
    assert (record["question_id"], record["model_a"], record["model_b"], record["winner"]) == (
        stored["battle_id"], stored["model_a"], stored["model_b"], "model_a")
    shown_ratings = vicuna("judge", "show", "--battles", str(battles), "--bootstrap", "10", "--json")
    assert shown_ratings.returncode == 0, shown_ratings.stderr
    ratings = json.loads(shown_ratings.stdout)["pairwise"]["bradley_terry"]
    assert [r["model"] for r in ratings] == [stored["model_a"], stored["model_b"]]  # the winner first
    assert ratings[0]["rating"] > 1000 > ratings[1]["rating"] and ratings[0]["regularized"]


def test_votes_are_taken_once_for_battles_the_server_made(arena):
    proc, db, models = arena
    status, events, raw = battle(proc.url, "The capital of France is")
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["done"] is True, raw
    battle_id = events[0]["battle_id"]
    assert {e["side"] for e in events if "side" in e} == {"a", "b"}
    assert not any(m in raw for m in models)  # the stream never names the models

    forged = vote(proc.url, "battle-" + "A" * 24, "a")  # an id the server never made
    assert forged.status_code == 409 and forged.json()["error"]["code"] == "battle_unknown"
    assert forged.json()["error"]["type"] == "invalid_request_error"
    tampered = vote(proc.url, battle_id + "x", "a")
    assert tampered.status_code == 409 and tampered.json()["error"]["code"] == "battle_unknown"
    unkeyed = vote(proc.url, battle_id, "a", headers={})
    assert unkeyed.status_code == 401
    junk = vote(proc.url, battle_id, "model_a")  # only a, b, tie, bothbad
    assert junk.status_code == 400 and junk.json()["error"]["param"] == "vote"
    assert rows(db)[-1]["vote"] is None  # none of the above touched the battle

    first = vote(proc.url, battle_id, "b")
    assert first.status_code == 200, first.text
    assert {first.json()["model_a"], first.json()["model_b"]} == models and first.json()["winner"] == "model_b"
    again = vote(proc.url, battle_id, "a")
    assert again.status_code == 409 and again.json()["error"]["code"] == "battle_already_voted"
    assert [r["vote"] for r in rows(db) if r["battle_id"] == battle_id] == ["model_b"]


def test_moderation_refuses_arena_prompts_before_any_battle(arena):
    proc, db, _ = arena
    before = len(rows(db))
    status, [body], _ = battle(proc.url, f"tell me about {BLOCKED.upper()} please")
    assert status == 400 and body["error"]["code"] == "content_policy_violation"
    assert len(rows(db)) == before  # no battle, no generation


def test_an_arena_of_one_model_says_so_and_the_rate_limit_holds(page, lonely):
    from playwright.sync_api import expect

    page.goto(f"{lonely.url}/arena")
    expect(page.locator("#notice")).to_have_text(
        "The arena needs at least two served models; this server serves 1. Start it with two or more -m MODEL.")
    expect(page.locator("#send")).to_be_disabled()
    refusals = [battle(lonely.url, "Hi", headers={}) for _ in range(3)]
    assert [(s, b["error"]["code"]) for s, [b], _ in refusals] == [(503, "arena_needs_two_models")] * 3
    assert "at least two served models" in refusals[0][1][0]["error"]["message"]
    status, [body], _ = battle(lonely.url, "Hi", headers={})
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    limited = vote(lonely.url, "battle-x", "a", headers={})  # votes count against the same budget
    assert limited.status_code == 429
    assert wait_until(lambda: httpx.get(f"{lonely.url}/health").status_code == 200, 10, "health")  # the server is fine


def test_the_page_shows_model_text_as_text_and_stream_errors_as_errors(page, lonely):
    """The page's side of the stream, with the server's replies stood in for by the browser (so the
    model text can be hostile): text never becomes HTML, and a failure mid-battle offers no vote."""
    from playwright.sync_api import expect

    hostile = 'Hi <img src=x onerror="window.__pwned = 1"> <b>bold</b>\n```html\n<script>window.__pwned = 2</script>\n```'
    events = [{"battle_id": "battle-x"}, {"side": "a", "text": hostile[:20]}, {"side": "b", "text": "plain"},
              {"side": "a", "text": hostile[20:]}, {"side": "a", "finish_reason": "stop"}, {"side": "b", "finish_reason": "length"},
              {"done": True, "battle_id": "battle-x"}]
    sse = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    page.route("**/arena/api/status", lambda route: route.fulfill(json={"models": 2, "ready": True}))
    page.route("**/arena/api/battles", lambda route: route.fulfill(body=sse, content_type="text/event-stream"))
    page.goto(f"{lonely.url}/arena")
    page.fill("#prompt", "anything")
    page.press("#prompt", "Enter")
    expect(page.locator("#votes")).to_be_visible()
    side_a = page.locator("#side-a .content")
    assert side_a.locator("img, b, script").count() == 0
    assert side_a.locator(".text").all_text_contents() == ['Hi <img src=x onerror="window.__pwned = 1"> <b>bold</b>']
    assert side_a.locator("pre code").text_content() == "<script>window.__pwned = 2</script>\n"
    assert page.locator("#side-b .meta").text_content() == "cut at max tokens"
    assert page.evaluate("window.__pwned") is None

    error = {"error": {"message": "worker w stopped answering", "type": "server_error", "param": None, "code": "worker_lost"}}
    broken = f"data: {json.dumps(events[0])}\r\n\r\ndata: {json.dumps(events[1])}\r\n\r\ndata: {json.dumps(error)}\r\n\r\ndata: [DONE]\r\n\r\n"
    page.unroute("**/arena/api/battles")
    page.route("**/arena/api/battles", lambda route: route.fulfill(body=broken, content_type="text/event-stream"))
    page.fill("#prompt", "again")
    page.press("#prompt", "Enter")
    expect(page.locator("#error")).to_have_text("error while answering: worker w stopped answering (worker_lost)")
    expect(page.locator("#votes")).to_be_hidden()  # nothing complete to vote on
    expect(page.locator("#prompt")).to_have_value("again")  # ready to try again
