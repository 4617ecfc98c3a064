"""`vicuna judge show`: tables, ratios, Bradley-Terry ratings and a plot from judgment files.

Reads FastChat's `*_single.jsonl` / `*_pair.jsonl` (its own files load unchanged) and ours.
- Pairwise: a game pair counts as a win only when both orders agree; a disagreement is a tie
  (FastChat's rule) and lowers the position-consistency rate (consistent / both orders read).
  Records with an unreadable verdict are counted as errors, never scored.
- Single: mean score per model and turn (score -1 = error, counted, not averaged in), per
  category, and the total-score ratio to a reference model ("Vicuna reaches 92% of ChatGPT")
  over the question turns every model has a valid score for.
- Bradley-Terry ratings on the Elo scale (400 * log10 strength, mean 1000) with bootstrap
  confidence intervals over the pairwise records.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core.errors import VicunaError
from .original import scores_tables
from .questions import Question
from .records import DUPLICATES, check_benches, judgment_files, load, load_all, resolve_duplicates  # noqa: F401 (the module's API)


def _category(row: dict[str, Any], categories: dict[Any, str]) -> str:
    return row.get("category") or categories.get(row.get("question_id")) or "unknown"


# ---------------------------------------------------------------------------------------------
# Pairwise


def pair_outcome(row: dict[str, Any]) -> tuple[str, bool | None]:
    """('model_1' | 'model_2' | 'tie' | 'error', consistent?) for one record, FastChat's rule."""
    if "winner" in row:  # checked first, as FastChat's loader does
        winner = row["winner"]
        if winner == "inconsistent":
            return "tie", False
        return ("error", None) if winner == "error" else (winner, None)
    g1, g2 = row["g1_winner"], row["g2_winner"]
    if "error" in (g1, g2):
        return "error", None
    return (g1, True) if g1 == g2 else ("tie", False)


def battles(pair_rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of a: 1, 0.5 or 0) for every readable record."""
    out = []
    for row in pair_rows:
        outcome, _ = pair_outcome(row)
        if outcome != "error":
            out.append((row["model_1"], row["model_2"], {"model_1": 1.0, "model_2": 0.0}.get(outcome, 0.5)))
    return out


def _tally() -> dict[str, int]:
    return {"win": 0, "loss": 0, "tie": 0, "inconsistent": 0, "error": 0, "consistent": 0, "both_read": 0}


def pairwise_tables(pair_rows: list[dict[str, Any]], categories: dict[Any, str]) -> dict[str, Any]:
    per_pair: dict[tuple[str, str], dict[str, int]] = defaultdict(_tally)
    per_cat: dict[tuple[str, str, str], dict[str, int]] = defaultdict(_tally)
    per_model: dict[str, dict[str, int]] = defaultdict(_tally)
    for row in pair_rows:
        m1, m2 = row["model_1"], row["model_2"]
        outcome, consistent = pair_outcome(row)
        if m1 > m2:  # one row per unordered pair, named in sorted order
            m1, m2 = m2, m1
            outcome = {"model_1": "model_2", "model_2": "model_1"}.get(outcome, outcome)
        key = (m1, m2)
        for tally in (per_pair[key], per_cat[(m1, m2, _category(row, categories))]):
            if outcome == "error":
                tally["error"] += 1
                continue
            tally[{"model_1": "win", "model_2": "loss", "tie": "tie"}[outcome]] += 1
            if consistent is not None:
                tally["both_read"] += 1
                tally["consistent"] += int(consistent)
                tally["inconsistent"] += int(not consistent)
        if outcome != "error":
            for model, mine in ((m1, "model_1"), (m2, "model_2")):
                t = per_model[model]
                t["win" if outcome == mine else "tie" if outcome == "tie" else "loss"] += 1
        else:
            per_model[m1]["error"] += 1
            per_model[m2]["error"] += 1

    def rates(t: dict[str, int]) -> dict[str, Any]:
        n = t["win"] + t["loss"] + t["tie"]
        return {
            **{k: t[k] for k in ("win", "loss", "tie", "inconsistent", "error")},
            "win_rate": t["win"] / n if n else None,
            "loss_rate": t["loss"] / n if n else None,
            "win_rate_adjusted": (t["win"] + 0.5 * t["tie"]) / n if n else None,
            "position_consistency": t["consistent"] / t["both_read"] if t["both_read"] else None,
        }

    both = sum(t["both_read"] for t in per_pair.values())
    return {
        "pairs": [{"model_1": a, "model_2": b, **rates(t)} for (a, b), t in sorted(per_pair.items())],
        "categories": [{"model_1": a, "model_2": b, "category": c, **rates(t)} for (a, b, c), t in sorted(per_cat.items())],
        "models": sorted(
            ({"model": m, **rates(t)} for m, t in per_model.items()),
            key=lambda r: -(r["win_rate_adjusted"] or 0),
        ),
        "position_consistency": sum(t["consistent"] for t in per_pair.values()) / both if both else None,
        "errors": sum(t["error"] for t in per_pair.values()),
        "records": len(pair_rows),
    }


# ---------------------------------------------------------------------------------------------
# Bradley-Terry
#
# Fitted with the classic minorization-maximization iteration (Hunter 2004, "MM algorithms for
# generalized Bradley-Terry models"), ties counted as half a win each way, in numpy: a few lines,
# monotone convergence, and no scipy/sklearn dependency (neither is installed by vicuna's extras).


def _strongly_connected(wins: Any) -> bool:
    import numpy as np

    n = len(wins)
    reach = (wins > 0) | np.eye(n, dtype=bool)
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)):
        reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
    return bool(reach.all())


def fit_bt(models: list[str], games: list[tuple[str, str, float]], weights: Any = None, tol: float = 1e-10) -> tuple[Any, bool]:
    """Elo-scale ratings (mean 1000) for `models`, and whether a prior was needed.

    The MLE exists only when every model can be reached from every other through wins; when it
    does not (a model that never won or never lost), one virtual tie per compared pair is added.
    """
    import numpy as np

    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    first = np.array([index[a] for a, _, _ in games], dtype=np.intp)
    second = np.array([index[b] for _, b, _ in games], dtype=np.intp)
    score = np.array([s for _, _, s in games], dtype=float)
    w = np.ones(len(games)) if weights is None else np.asarray(weights, dtype=float)
    wins = np.zeros((n, n))
    # unbuffered adds, in game order: the same sums as a loop over the games, without the
    # per-game Python cost (the bootstrap fits hundreds of resamples)
    np.add.at(wins, (first, second), w * score)
    np.add.at(wins, (second, first), w * (1 - score))
    regularized = False
    if not _strongly_connected(wins):
        compared = (wins + wins.T) > 0
        wins = wins + 0.5 * compared
        if not _strongly_connected(wins):
            wins = wins + 0.01 * (1 - np.eye(n))
        regularized = True
    total = wins + wins.T
    won = wins.sum(axis=1)
    p = np.ones(n)
    for _ in range(100_000):
        denom = (total / (p[:, None] + p[None, :])).sum(axis=1)
        new = won / denom
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - p) / p) < tol:
            p = new
            break
        p = new
    return 400 * np.log10(p) + 1000, regularized


def bradley_terry(games: list[tuple[str, str, float]], rounds: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Ratings with 95% bootstrap intervals (records resampled with replacement)."""
    import numpy as np

    models = sorted({m for g in games for m in g[:2]})
    if len(models) < 2:
        return []
    ratings, regularized = fit_bt(models, games)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        counts = np.bincount(rng.integers(0, len(games), len(games)), minlength=len(games))
        samples.append(fit_bt(models, games, counts)[0])
    low, high = np.percentile(np.array(samples), [2.5, 97.5], axis=0) if samples else (ratings, ratings)
    rows = [
        {"model": m, "rating": float(r), "ci_low": float(lo), "ci_high": float(hi), "regularized": regularized}
        for m, r, lo, hi in zip(models, ratings, low, high)
    ]
    return sorted(rows, key=lambda r: -r["rating"])


# ---------------------------------------------------------------------------------------------
# Single grading


def single_tables(rows: list[dict[str, Any]], categories: dict[Any, str], reference: str | None = None) -> dict[str, Any]:
    # a question turn judged more than once keeps every score: the means run over records, as
    # FastChat's show_result computes them, and the total-score ratio takes each turn's mean
    scores: dict[str, dict[tuple[Any, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    errors: dict[str, int] = defaultdict(int)
    cat_of: dict[tuple[Any, int], str] = {}
    for row in rows:
        key = (row["question_id"], int(row.get("turn", 1)))
        cat_of[key] = _category(row, categories)
        score = row["score"]
        if not isinstance(score, (int, float)) or score < 0:
            errors[row["model"]] += 1
            scores[row["model"]]  # the model still appears
        else:
            scores[row["model"]][key].append(float(score))

    def mean_where(model: str, keep: Any = lambda key: True) -> float | None:
        return _mean([v for key, values in scores[model].items() if keep(key) for v in values])

    models = sorted(scores, key=lambda m: -(mean_where(m) or 0))
    table = []
    for m in models:
        table.append({
            "model": m,
            "score": mean_where(m),
            "turn_1": mean_where(m, lambda k: k[1] == 1),
            "turn_2": mean_where(m, lambda k: k[1] == 2),
            "n": len(scores[m]),
            "error": errors[m],
        })
    cats = sorted({cat_of[k] for m in models for k in scores[m]})
    per_cat = [{"category": c, **{m: mean_where(m, lambda k: cat_of[k] == c) for m in models}} for c in cats]
    common = set.intersection(*(set(s) for s in scores.values())) if scores else set()
    ratio = None
    if models:
        reference = reference or models[0]
        if reference not in scores:
            raise VicunaError(f"no single-grading scores for reference model {reference!r}; models: {', '.join(models)}")

        def total(model: str) -> float:
            return sum(_mean(scores[model][k]) or 0.0 for k in common)

        base = total(reference)
        ratio = {
            "reference": reference,
            "questions": len(common),
            "ratios": {m: (total(m) / base if base else None) for m in models},
        }
    return {"models": table, "categories": per_cat, "total_score_ratio": ratio, "errors": sum(errors.values()), "records": len(rows)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------


def summarize(
    paths: list[Path],
    questions: list[Question] | None = None,
    judge: str | None = None,
    reference: str | None = None,
    rounds: int = 200,
    duplicates: str = "average",
    remap: bool = True,
    answers: Path | None = None,
) -> dict[str, Any]:
    single, pair, scores = load_all(paths, judge, answers)
    if not single and not pair and not scores:
        raise VicunaError("the judgment files hold no records", hint="run `vicuna judge` first")
    benches = check_benches(single + pair + scores, questions, remap)
    categories = {q.question_id: q.category for q in questions or []}
    result: dict[str, Any] = {"judge": judge or str(((single + pair + scores)[0].get("judge") or ["?"])[0])}
    kept, count = resolve_duplicates(single + pair + scores, duplicates)
    single = [r for r in kept if "model" in r]
    pair = [r for r in kept if "model_1" in r and not isinstance(r.get("score"), list)]
    scores = [r for r in kept if isinstance(r.get("score"), list)]
    result["duplicates"] = {"policy": duplicates, "count": count}
    result["benches"] = benches
    sources = [r["reference_source"] for r in kept if r.get("reference_source")]
    result["references"] = {src: sources.count(src) for src in sorted(set(sources))}
    if single:
        result["single"] = single_tables(single, categories, reference)
    if scores:
        result["scores"] = scores_tables(scores, lambda row: _category(row, categories))
    if pair:
        result["pairwise"] = pairwise_tables(pair, categories)
        result["pairwise"]["bradley_terry"] = bradley_terry(battles(pair), rounds=rounds)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Relative scores (total-score ratio, else BT ratings with CIs) and per-category scores."""
    from ..core.extras import require

    matplotlib = require("matplotlib", "judge", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    single, pairwise = result.get("single"), result.get("pairwise")
    if single and single["total_score_ratio"]:
        ratio = single["total_score_ratio"]
        names = list(ratio["ratios"])
        values = [100 * (ratio["ratios"][m] or 0) for m in names]
        left.barh(names, values, color="#4c72b0")
        left.set_xlabel(f"% of {ratio['reference']}'s total score ({ratio['questions']} question turns)")
        for y, v in enumerate(values):
            left.text(v, y, f" {v:.0f}%", va="center")
        cats = single["categories"]
        models = [row["model"] for row in single["models"]]
        ylabel = "mean score (1-10)"
        series = {m: [c.get(m) or 0 for c in cats] for m in models}
    elif result.get("scores") and not pairwise:  # the 2023 method: total-score ratios, B/A
        scores = result["scores"]
        names = [f"{p['b']} / {p['a']}" for p in scores["pairs"]]
        values = [100 * (p["ratio"] or 0) for p in scores["pairs"]]
        left.barh(names, values, color="#4c72b0")
        left.set_xlabel("total score of B, % of A's")
        cats = [{"category": c} for c in sorted({c["category"] for c in scores["categories"]})]
        models = names
        ratios = {(f"{c['b']} / {c['a']}", c["category"]): 100 * (c["ratio"] or 0) for c in scores["categories"]}
        series = {m: [ratios.get((m, c["category"]), 0) for c in cats] for m in models}
        ylabel = "B's total score, % of A's"
    elif pairwise and pairwise["bradley_terry"]:
        bt = pairwise["bradley_terry"]
        names = [r["model"] for r in bt]
        values = [r["rating"] for r in bt]
        err = [[r["rating"] - r["ci_low"] for r in bt], [r["ci_high"] - r["rating"] for r in bt]]
        left.barh(names, values, xerr=err, color="#4c72b0", capsize=4)
        left.set_xlim(min(r["ci_low"] for r in bt) - 50, max(r["ci_high"] for r in bt) + 50)
        left.set_xlabel("Bradley-Terry rating (Elo scale, 95% bootstrap CI)")
        cats, models, series = _category_win_rates(pairwise)
        ylabel = "adjusted win rate (tie = 1/2)"
    else:  # every verdict was unreadable: say so instead of drawing empty axes
        left.text(0.5, 0.5, "no readable verdicts", ha="center", va="center", transform=left.transAxes)
        cats, models, series = [], [], {}
        ylabel = ""
    left.invert_yaxis()
    left.set_title("Relative score")
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        right.bar(x + i * width - 0.4 + width / 2, series[m], width, label=m)
    right.set_xticks(x, [c["category"] for c in cats], rotation=30, ha="right")
    right.set_ylabel(ylabel)
    right.set_title("By category")
    if models:  # room above the bars for the legend
        right.set_ylim(0, 1.3 * max([v for m in models for v in series[m]] + [1e-9]))
        right.legend(fontsize="small", loc="upper left", ncol=min(3, len(models)))
    fig.suptitle(f"judge: {result['judge']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _category_win_rates(pairwise: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str], dict[str, list[float]]]:
    """Per category and model: adjusted win rate over all its pairwise records."""
    tally: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in pairwise["categories"]:
        n = row["win"] + row["loss"] + row["tie"]
        for model, points in ((row["model_1"], row["win"] + 0.5 * row["tie"]), (row["model_2"], row["loss"] + 0.5 * row["tie"])):
            tally[(row["category"], model)][0] += points
            tally[(row["category"], model)][1] += n
    cats = [{"category": c} for c in sorted({c for c, _ in tally})]
    models = sorted({m for _, m in tally})
    series = {m: [(tally[(c["category"], m)][0] / tally[(c["category"], m)][1]) if tally[(c["category"], m)][1] else 0 for c in cats] for m in models}
    return cats, models, series
