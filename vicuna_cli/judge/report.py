"""Terminal tables for `vicuna judge show` (rich, on stdout) and the run summary (stderr)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..core.console import err, out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        left = i == 0 or c in ("model", "model_1", "model_2", "category", "vs")
        # names are never cut: a narrow (or piped, 80-column) console squeezes the numbers instead
        width = max([len(c)] + [len(r[i]) for r in rows])
        table.add_column(c, justify="left" if left else "right", min_width=width, no_wrap=True)
    for r in rows:
        table.add_row(*r)
    return table


def render(result: dict[str, Any]) -> None:
    out.print(f"judge: {result['judge']}")
    single = result.get("single")
    if single:
        rows = [[r["model"], _num(r["score"]), _num(r["turn_1"]), _num(r["turn_2"]), str(r["n"]), str(r["error"])] for r in single["models"]]
        out.print(_table("Single grading (1-10)", ["model", "score", "turn 1", "turn 2", "judged", "errors"], rows))
        ratio = single["total_score_ratio"]
        if ratio:
            rows = [[m, _pct(v)] for m, v in ratio["ratios"].items()]
            out.print(_table(f"Total-score ratio to {ratio['reference']} ({ratio['questions']} question turns all models have)", ["model", "ratio"], rows))
        models = [r["model"] for r in single["models"]]
        rows = [[c["category"], *(_num(c.get(m)) for m in models)] for c in single["categories"]]
        out.print(_table("Mean score by category", ["category", *models], rows))
    if result.get("scores"):
        _render_scores(result["scores"])
    pairwise = result.get("pairwise")
    if pairwise:
        rows = [
            [p["model_1"], p["model_2"], str(p["win"]), str(p["loss"]), str(p["tie"]), str(p["inconsistent"]),
             str(p["error"]), _pct(p["win_rate_adjusted"]), _pct(p["position_consistency"])]
            for p in pairwise["pairs"]
        ]
        cols = ["model_1", "model_2", "win", "loss", "tie", "incons", "err", "win adj", "consist"]
        title = ("Pairwise (arena votes: win/loss for model_1; a both-bad vote counts as a tie)" if result.get("arena") else
                 "Pairwise (win/loss for model_1; a win needs both orders to agree, else a tie (incons); consist = position consistency)")
        out.print(_table(title, cols, rows))
        rows = [
            [c["category"], f"{c['model_1']} vs {c['model_2']}", str(c["win"]), str(c["loss"]), str(c["tie"]), str(c["error"]), _pct(c["win_rate_adjusted"])]
            for c in pairwise["categories"]
        ]
        out.print(_table("Pairwise by category", ["category", "vs", "win", "loss", "tie", "errors", "win rate adj."], rows))
        rows = [[m["model"], str(m["win"]), str(m["loss"]), str(m["tie"]), _pct(m["win_rate"]), _pct(m["loss_rate"]), _pct(m["win_rate_adjusted"])] for m in pairwise["models"]]
        out.print(_table("Per model (all its pairwise records)", ["model", "win", "loss", "tie", "win rate", "loss rate", "win rate adj."], rows))
        bt = pairwise["bradley_terry"]
        if bt:
            rows = [[r["model"], f"{r['rating']:.0f}", f"{r['ci_low']:.0f} .. {r['ci_high']:.0f}"] for r in bt]
            note = " (a prior was added: some model never won or never lost)" if bt[0]["regularized"] else ""
            out.print(_table(f"Bradley-Terry ratings, Elo scale, 95% bootstrap CI{note}", ["model", "rating", "95% CI"], rows))
        else:
            out.print("Bradley-Terry ratings: no readable pairwise verdicts to rate")
        out.print(
            f"position consistency: {_pct(pairwise['position_consistency'])}; "
            f"unreadable verdicts: {pairwise['errors']} of {pairwise['records']} records"
        )
    if result.get("arena"):
        _render_arena(result["arena"])
    if single:
        out.print(f"single grading: unreadable verdicts: {single['errors']} of {single['records']} records")
    if result.get("references"):
        out.print("reference answers: " + ", ".join(f"{n} judgments used {src}" for src, n in result["references"].items()), markup=False)
    dupes = result.get("duplicates") or {}
    if dupes.get("count"):
        done = {"average": "averaged (each counts, as in FastChat)", "last": "dropped (only the last of each match kept)"}[dupes["policy"]]
        out.print(f"{dupes['count']} duplicate judgments {done}; --duplicates average|last|error chooses")


def run_summary(summary: Any) -> None:
    s = summary
    speed = f", {s.calls / s.elapsed:.2f} calls/s" if s.calls and s.elapsed else ""
    err.print(
        f"{s.records} judgments written to {s.path} in {s.elapsed:.1f} s: {s.calls} judge calls{speed}, "
        f"{s.cache_hits} from cache, {s.retries} retries, {s.prompt_tokens}+{s.completion_tokens} tokens, "
        f"{s.errors} unreadable verdicts (recorded as errors)",
        highlight=False,
        markup=False,
    )


def _render_scores(scores: dict[str, Any]) -> None:
    """The original 2023 evaluation's figures: total scores, their ratio, win/tie/loss."""
    for p in scores["pairs"]:
        if p["ratio"] is not None:
            out.print(f"{p['b']} reaches {_pct(p['ratio'])} of {p['a']} (total score {p['b_total']:g} vs {p['a_total']:g} over {p['n']} reviews)", markup=False)
    rows = [[p["a"], p["b"], f"{p['a_total']:g}", f"{p['b_total']:g}", _pct(p["ratio"]), str(p["b_wins"]), str(p["ties"]), str(p["a_wins"]), str(p["n"]), str(p["errors"])]
            for p in scores["pairs"]]
    cols = ["A", "B", "A total", "B total", "B/A", "B wins", "ties", "A wins", "reviews", "errors"]
    out.print(_table("Pairwise scores (the 2023 method: two scores per review; B/A = total-score ratio)", cols, rows))
    rows = [[c["category"], f"{c['b']} vs {c['a']}", f"{c['a_total']:g}", f"{c['b_total']:g}", _pct(c["ratio"]), str(c["b_wins"]), str(c["ties"]), str(c["a_wins"]), str(c["errors"])]
            for c in scores["categories"]]
    out.print(_table("Pairwise scores by category", ["category", "B vs A", "A total", "B total", "B/A", "B wins", "ties", "A wins", "errors"], rows))
    if scores["first_shown_advantage"] is not None:
        out.print(f"the answer shown first scored {scores['first_shown_advantage']:+.2f} on average over the other (position bias; --swap judges both orders)")
    out.print(f"pairwise scores: unreadable reviews: {len(scores['errors'])} of {scores['records']} records (never averaged in)")
    for e in scores["errors"][:20]:
        out.print(f"  question {e['question_id']} ({e['model_1']} vs {e['model_2']}): first line {e['first_line']!r}", markup=False, highlight=False)
    if len(scores["errors"]) > 20:
        out.print(f"  ... and {len(scores['errors']) - 20} more (--json lists all)")


def _render_arena(arena: dict[str, Any]) -> None:
    """Human votes (`judge show --battles`): what was voted, and the judge's agreement with it."""
    votes = arena["votes"]
    out.print(f"arena: {arena['battles']} battles from {arena['voters']} voters in {arena['file']}: "
              f"A better {votes['model_a']}, B better {votes['model_b']}, tie {votes['tie']}, both bad {votes['tie (bothbad)']}", markup=False)
    agree = arena.get("agreement")
    if not agree:
        return
    if not agree["battles"]:
        out.print(f"agreement: the judgment files hold no readable verdict on these battles ({agree['judge_errors']} unreadable)")
        return
    rows = [["with ties (3 classes)", str(agree["battles"]), _pct(agree["agreement"])],
            ["without ties", str(agree["without_ties"]["battles"]), _pct(agree["without_ties"]["agreement"])]]
    out.print(_table(f"Agreement of judge {agree['judge']} with the human votes", ["setting", "battles", "agreement"], rows))
    out.print(f"human ties {agree['human_ties']}, judge ties {agree['judge_ties']}; battles not judged: {agree['unjudged']}; "
              f"unreadable verdicts: {agree['judge_errors']}", markup=False)
