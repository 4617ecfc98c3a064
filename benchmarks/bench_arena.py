#!/usr/bin/env python
"""Arena vote latency: from the click on a vote button of the arena page to the vote stored in the
battle's SQLite row, with `vicuna serve --arena` and headless Chromium on loopback.

For each of --battles battles the page sends a prompt (both models answer, --max-tokens each),
then the script clicks a vote button (cycling A, B, tie, both bad) and records, on the machine's
one wall clock (the page's `performance.timeOrigin + performance.now()`, Python's `time.time()`):

  click -> vote time     the server's `voted` timestamp (taken just before the UPDATE commits)
  click -> row visible   a second SQLite connection, polled from a thread started before the
                         click every --poll-ms, first sees the vote (an upper bound: + one poll)
  click -> names shown   the page shows the reveal, which the server sends only after the commit:
                         what the user waits for

and, interleaved with the votes as the peer in the same run, the page's round trip of a bare
`GET /health` (the floor any request from this page pays). Every wait is bounded.

    VICUNA_HOME=/tmp/vh python benchmarks/bench_arena.py --battles 20 --json benchmarks/records/arena-vote-latency-DATE.json

Models: by default the embedded model twice (the second under a symlinked directory, so the
arena sees two names); -m A -m B serves others. The answers' length does not enter the figure.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine_info, markdown_table, print_machine, write_results  # noqa: E402
from serve_single import single_server  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PAGE_HOOKS = """() => {
    window.__clickAt = null; window.__shownAt = null;
    document.getElementById('votes').addEventListener('click', () => { window.__clickAt = performance.timeOrigin + performance.now(); }, true);
    new MutationObserver(() => { if (!document.getElementById('result').hidden) window.__shownAt = performance.timeOrigin + performance.now(); })
        .observe(document.getElementById('result'), {attributes: true, attributeFilter: ['hidden']});
}"""
HEALTH_RTT = "async () => { const t = performance.now(); await fetch('health'); return performance.now() - t; }"


def default_models(tmp: Path) -> list[str]:
    from vicuna_cli.core.models import DEFAULT_MODEL, resolve

    path = resolve(DEFAULT_MODEL).path
    twin = tmp / f"{DEFAULT_MODEL}-twin"
    twin.symlink_to(path, target_is_directory=True)
    return [str(path), str(twin)]


def poll_vote(db: Path, battle_id: str, deadline: float, interval: float, seen: dict) -> None:
    conn = sqlite3.connect(db, timeout=5)
    try:
        while time.monotonic() < deadline:
            if conn.execute("SELECT vote FROM battles WHERE battle_id = ?", (battle_id,)).fetchone()[0] is not None:
                seen["at"] = time.time()
                return
            time.sleep(interval)
    finally:
        conn.close()


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def run(args: argparse.Namespace, tmp: Path) -> dict:
    from playwright.sync_api import sync_playwright

    models = args.model or default_models(tmp)
    db = tmp / "arena.sqlite3"
    arena = ("--arena", "--arena-db", str(db), "--arena-max-tokens", str(args.max_tokens), "--arena-temperature", "0",
             "--arena-rate-limit", "100000")
    rows: list[dict] = []
    # The tests' one way to run `vicuna serve -m ...` (tests/serve_single.py): free ports, a bounded
    # wait for both models, the process group stopped at the end.
    with single_server(tmp, models, *arena, env=dict(os.environ), worker_args=(), timeout=args.start_timeout) as proc:
        url = proc.url
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.set_default_timeout(args.answer_timeout * 1000)
            page.goto(f"{url}/arena")
            page.wait_for_selector("#send:not([disabled])")
            page.evaluate(PAGE_HOOKS)
            choices = ["a", "b", "tie", "bothbad"]
            for i in range(args.battles):
                page.fill("#prompt", f"Name one thing that is {['red', 'blue', 'green', 'round', 'cold'][i % 5]}.")
                page.press("#prompt", "Enter")
                page.wait_for_selector("#votes:not([hidden])")
                with sqlite3.connect(db) as conn:
                    battle_id = conn.execute("SELECT battle_id FROM battles WHERE vote IS NULL ORDER BY created DESC LIMIT 1").fetchone()[0]
                health_ms = page.evaluate(HEALTH_RTT)
                seen: dict = {}
                poller = threading.Thread(target=poll_vote, args=(db, battle_id, time.monotonic() + args.vote_timeout, args.poll_ms / 1000, seen))
                poller.start()
                page.click(f"#vote-{choices[i % 4]}")
                page.wait_for_selector("#result:not([hidden])", timeout=args.vote_timeout * 1000)
                poller.join(timeout=args.vote_timeout + 1)
                click_at, shown_at = (page.evaluate(f"window.__{k}At") / 1000 for k in ("click", "shown"))
                with sqlite3.connect(db) as conn:
                    voted = conn.execute("SELECT voted FROM battles WHERE battle_id = ?", (battle_id,)).fetchone()[0]
                if "at" not in seen:
                    raise SystemExit(f"battle {battle_id}: the vote was not seen in the database within {args.vote_timeout} s")
                rows.append({"battle": battle_id, "click_to_vote_time_ms": 1000 * (voted - click_at),
                             "click_to_row_visible_ms": 1000 * (seen["at"] - click_at),
                             "click_to_names_shown_ms": 1000 * (shown_at - click_at), "health_rtt_ms": health_ms})
                print(f"battle {i + 1}/{args.battles}: click->row {rows[-1]['click_to_row_visible_ms']:.1f} ms, "
                      f"click->names {rows[-1]['click_to_names_shown_ms']:.1f} ms, /health {health_ms:.1f} ms", file=sys.stderr)
            browser.close()
    keys = ["click_to_vote_time_ms", "click_to_row_visible_ms", "click_to_names_shown_ms", "health_rtt_ms"]
    return {"models": models, "rows": rows, "summary": {k: stats([r[k] for r in rows]) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--battles", type=int, default=20)
    parser.add_argument("-m", "--model", action="append", help="a model to serve (give two); default: the embedded model twice")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--poll-ms", type=float, default=0.5)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--answer-timeout", type=float, default=300.0)
    parser.add_argument("--vote-timeout", type=float, default=30.0)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--json", help="write the record here (default benchmarks/records/arena-vote-latency-TIME.json)")
    args = parser.parse_args()
    if args.model and len(args.model) != 2:
        parser.error("give two -m MODEL (or none)")
    info = machine_info()
    print_machine(info)
    with tempfile.TemporaryDirectory(prefix="bench-arena-") as tmp:
        result = run(args, Path(tmp))
    table = markdown_table(["from the vote click to", "median ms", "p90 ms", "min ms", "max ms", "n"], [
        [label, f"{s['median']:.1f}", f"{s['p90']:.1f}", f"{s['min']:.1f}", f"{s['max']:.1f}", s["n"]]
        for label, s in [("the server's vote time (before commit)", result["summary"]["click_to_vote_time_ms"]),
                         ("the row visible to another reader", result["summary"]["click_to_row_visible_ms"]),
                         ("the names shown on the page", result["summary"]["click_to_names_shown_ms"]),
                         ("(peer) a bare GET /health round trip", result["summary"]["health_rtt_ms"])]])
    print(table)
    path = write_results("arena-vote-latency", {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, **result}, args.json)
    print(f"record: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
