"""Reading judgment records for `vicuna judge show`: files, kinds, question sets, duplicates.

Kinds: single grades (`model`, `score`), pairwise verdicts (`model_1`, `model_2`, `g1_winner` /
`g2_winner` or `winner`), and pairwise scores (`model_1`, `model_2`, `score: [s1, s2]`: the
original 2023 method, ours or FastChat's 2023 review tables, whose answer ids are mapped to
models through `--answers`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core.console import warn
from ..core.errors import VicunaError
from .original import answer_models, from_review
from .questions import Question, read_jsonl

def judgment_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.glob("*_single.jsonl")) + sorted(p.glob("*_pair.jsonl")) + sorted(p.glob("*_scores.jsonl")) + sorted(p.glob("review_*.jsonl"))
            if not found:
                raise VicunaError(f"{p} holds no *_single.jsonl, *_pair.jsonl, *_scores.jsonl or review_*.jsonl judgment files", hint="run `vicuna judge` first, or pass the files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise VicunaError(f"{p} does not exist", hint="pass judgment files or the directory that holds them")
    return files


def load(paths: list[Path], judge: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    single, pair, _ = load_all(paths, judge)
    return single, pair


def load_all(paths: list[Path], judge: str | None = None, answers: Path | None = None) -> tuple[list[dict[str, Any]], ...]:
    """(single, pair, scores) records of one judge (`judge`, or the only one there is)."""
    single, pair, scores = [], [], []
    models = None
    for path in judgment_files(paths):
        for i, row in enumerate(read_jsonl(path), 1):
            if "model" in row and "score" in row:
                single.append(row)
            elif "model_1" in row and "model_2" in row and ("winner" in row or ("g1_winner" in row and "g2_winner" in row)):
                pair.append(row)
            elif "model_1" in row and "model_2" in row and isinstance(row.get("score"), list):
                scores.append(row)
            elif "answer1_id" in row and "answer2_id" in row:
                if models is None and answers is not None:
                    models = answer_models(answers)
                scores.append(from_review(row, f"{path}:{i}", models))
            else:
                raise VicunaError(f"{path}:{i}: not a judgment record (fields: {', '.join(sorted(row))})")
    rows = single + pair + scores
    judges = sorted({str((r.get("judge") or ["?"])[0]) for r in rows})
    if judge is not None:
        keep = [[r for r in kind if str((r.get("judge") or ["?"])[0]) == judge] for kind in (single, pair, scores)]
        if not any(keep):
            raise VicunaError(f"no judgments by {judge!r}; judges found: {', '.join(judges)}")
        single, pair, scores = keep
    elif len(judges) > 1:
        raise VicunaError(f"judgments from several judges: {', '.join(judges)}", hint="pick one with --judge")
    return single, pair, scores


DUPLICATES = ("average", "last", "error")


def _match_key(row: dict[str, Any]) -> tuple[Any, ...]:
    if "model" in row:
        models: tuple[str, ...] = (row["model"],)
    elif isinstance(row.get("score"), list):  # pairwise scores: the shown order is part of the match (--swap)
        models = ("scores", str(row["model_1"]), str(row["model_2"]))
    else:
        models = tuple(sorted((str(row["model_1"]), str(row["model_2"]))))
    return (str((row.get("judge") or ["?"])[0]), models, str(row.get("question_id")), int(row.get("turn", 1)))


def resolve_duplicates(rows: list[dict[str, Any]], policy: str = "average") -> tuple[list[dict[str, Any]], int]:
    """(records to score, how many records repeat a judged match: same judge, models, question, turn).

    average: every record counts, so a match judged twice weighs its verdicts equally in the
    means and tallies -- what FastChat's show_result does with the rows of its files;
    last: only the last record of each match (file order); error: refuse.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_match_key(row)].append(row)
    count = len(rows) - len(groups)
    if not count or policy == "average":
        return rows, count
    if policy == "last":
        return [group[-1] for group in groups.values()], count
    example = next(k for k, g in groups.items() if len(g) > 1)
    raise VicunaError(
        f"{count} duplicate judgments (same judge, models, question and turn), e.g. question {example[2]} turn {example[3]} of {' vs '.join(m for m in example[1] if m != 'scores')}",
        hint="--duplicates average counts each (FastChat's way), --duplicates last keeps the last",
    )


def check_benches(rows: list[dict[str, Any]], questions: list[Question] | None, remap: bool) -> dict[str, Any]:
    """Judgments record their question set (name, hash). Records of another set than `questions`
    are refused, or with `remap` given the categories of `questions` by id, with a warning; with
    no `questions`, records of several sets are refused (their ids mean different questions)."""
    recorded = sorted({(str(r.get("bench")), str(r["bench_hash"])) for r in rows if r.get("bench_hash")})
    if not questions:
        if len(recorded) > 1:
            raise VicunaError("judgments of different question sets: " + ", ".join(f"{n} ({h})" for n, h in recorded),
                              hint="show them separately, or pass --bench QUESTIONS to re-map them all onto that set's categories")
        return {"recorded": [list(b) for b in recorded]}
    name, digest = questions[0].bench or ("?", "")
    categories = {q.question_id: q.category for q in questions}
    other = [r for r in rows if r.get("bench_hash") and r["bench_hash"] != digest]
    if other and not remap:
        n, h = next((str(r.get("bench")), r["bench_hash"]) for r in other)
        raise VicunaError(f"{len(other)} judgments were made on question set {n} ({h}), not {name} ({digest})",
                          hint="write this run to another -o directory, or look at them with `vicuna judge show --bench ...`")
    for r in other:
        r["category"] = categories.get(r.get("question_id"), "unknown")
    if other:
        sets = ", ".join(f"{n} ({h})" for n, h in recorded if h != digest)
        warn(f"{len(other)} judgments were made on {sets}, not on --bench {name} ({digest}): their categories are re-mapped by question id")
    unknown = sum(1 for r in rows if r.get("question_id") not in categories)
    if unknown:
        warn(f"{unknown} judgments have question ids that {name} does not hold: category 'unknown'")
    return {"recorded": [list(b) for b in recorded], "bench": [name, digest], "remapped": len(other), "unknown_ids": unknown}
