"""`vicuna rm score`: a reward model (a `train rm` run dir, or any transformers sequence
classifier with one label) over a pairwise file (accuracy, margins, per source), a conversation
file, or FastChat answer files (each record gets a `reward`).

Sequences are rendered with the model's template exactly as `train rm` rendered them and scored
at their last token, several sequences packed into one row per forward pass (no padding).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..core.errors import VicunaError
from .config import ScoreConfig  # noqa: F401  (also imported from here)




@dataclass
class Scored:
    kind: str
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    figures: dict[str, Any] = field(default_factory=dict)
    output: Optional[Path] = None
    seconds: float = 0.0


def check_reward_model(name: str) -> Any:
    """The resolved model, or a VicunaError when `name` is not a sequence classifier."""
    from ..core import models

    resolved = models.resolve(name)
    config_file = resolved.path / "config.json"
    architectures = (json.loads(config_file.read_text()).get("architectures") or []) if config_file.is_file() else []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise VicunaError(f"{name} is not a reward model (architectures: {', '.join(architectures) or 'none'})",
                          hint="train one with `vicuna train rm`, or pass a *ForSequenceClassification model")
    return resolved


class RewardModel:
    def __init__(self, name: str, device: str, template: Optional[str]):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..core import models
        from ..core.templates import template_for_model
        from ..data.split import TokenCounter

        resolved = check_reward_model(name)
        self.device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        with models._quiet_transformers():
            self.tokenizer = models.load_pretrained(AutoTokenizer, resolved.path)
            self.model = models.load_pretrained(AutoModelForSequenceClassification, resolved.path, dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise VicunaError(f"{name} has {self.model.config.num_labels} labels; a reward model has one")
        self.model.to(self.device).eval()
        self.template = template_for_model(self.tokenizer, template or models.recorded_template(resolved.path))
        self.counter = TokenCounter(self.tokenizer, self.template)
        self.positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def encode(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        texts = [self.counter.render(messages) for messages in conversations]
        return [list(e.ids) for e in self.counter.encode_batch(texts)]

    def score(self, sequences: Sequence[list[int]], batch_tokens: int, mixed_precision: str = "no") -> list[float]:
        """One reward per sequence, sequences packed greedily into rows of `batch_tokens`;
        `mixed_precision` "bf16"/"fp16": under that autocast, as the training that asks scores in."""
        import torch

        from .rm import rewards

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)

        out: list[float] = []
        for group in _rows(sequences, batch_tokens):
            ends, at = [], 0
            for ids in group:
                at += len(ids)
                ends.append([0, at - 1])
            batch = {"input_ids": torch.tensor([[t for ids in group for t in ids]], device=self.device),
                     "position_ids": torch.tensor([[p for ids in group for p in range(len(ids))]], device=self.device),
                     "ends": torch.tensor(ends, device=self.device)}
            with torch.inference_mode(), torch.autocast(self.device, dtype=dtype, enabled=dtype is not None):
                out += rewards(self.model, batch).float().tolist()
        return out


def _rows(sequences: Sequence[list[int]], capacity: int) -> Iterator[list[list[int]]]:
    row: list[list[int]] = []
    used = 0
    for ids in sequences:
        if row and used + len(ids) > capacity:
            yield row
            row, used = [], 0
        row.append(ids)
        used += len(ids)
    if row:
        yield row


def detect_kind(path: str) -> str:
    from ..data import mix

    kind = mix.detect_kind(path)
    if kind == "pairs":
        return kind
    from ..data.formats import InputFile

    inp = InputFile(path, formats={"any": ""}, detect=lambda value, name: "any")
    try:
        first = next(inp.records()).value
    finally:
        inp.close()
    return "answers" if isinstance(first, dict) and "choices" in first and "question_id" in first else "conversations"


def score(config: ScoreConfig) -> Scored:
    started = time.monotonic()
    kind = detect_kind(config.input) if config.kind == "auto" else config.kind
    if kind != "pairs" and config.output is None:
        raise VicunaError(f"scoring {kind} writes them with a `reward` field: pass -o OUT.jsonl")
    if config.output is not None:
        from ..data.pipeline import check_output

        check_output(config.output, config.overwrite, [config.input])
    model = RewardModel(config.model, config.device, config.template)
    limit = min(config.max_length or model.positions, model.positions)
    result = Scored(kind)
    if kind == "pairs":
        _score_pairs(model, config, limit, result)
    else:
        records, conversations = _conversations(config, kind, result)
        sequences = model.encode(conversations)
        fits = [i for i, ids in enumerate(sequences) if len(ids) <= limit]
        if len(fits) < len(sequences):
            result.skipped["longer than the model's positions (not scored, reward null)"] += len(sequences) - len(fits)
        values = dict(zip(fits, model.score([sequences[i] for i in fits], config.batch_tokens)))
        for i, record in enumerate(records):
            record["reward"] = values.get(i)
        _write(config.output, records)  # type: ignore[arg-type]
        scored = [v for v in values.values()]
        result.figures = {"scored": len(scored), "mean_reward": sum(scored) / len(scored) if scored else None}
        result.output = config.output
    result.seconds = time.monotonic() - started
    return result


def _score_pairs(model: RewardModel, config: ScoreConfig, limit: int, result: Scored) -> None:
    from ..data.preferences import read_pairs

    pairs = read_pairs([config.input], result.skipped)
    result.records = len(pairs)
    sequences = model.encode([p["prompt"] + p[side] for p in pairs for side in ("chosen", "rejected")])
    keep = [k for k in range(len(pairs)) if max(len(sequences[2 * k]), len(sequences[2 * k + 1])) <= limit]
    if len(keep) < len(pairs):
        result.skipped["pair longer than the model's positions (not scored)"] += len(pairs) - len(keep)
    scores = model.score([sequences[2 * k + side] for k in keep for side in (0, 1)], config.batch_tokens)
    by_source: dict[str, list[float]] = defaultdict(list)
    for j, k in enumerate(keep):
        by_source[pairs[k].get("source") or ""].append(scores[2 * j] - scores[2 * j + 1])
    margins = [m for values in by_source.values() for m in values]

    def figures(values: list[float]) -> dict[str, Any]:
        return {"pairs": len(values), "accuracy": sum(m > 0 for m in values) / len(values),
                "mean_margin": sum(values) / len(values)}

    result.figures = {**(figures(margins) if margins else {"pairs": 0}),
                      "by_source": {s: figures(v) for s, v in sorted(by_source.items())}}
    if config.output is not None:
        rows = [{**pairs[k], "reward_chosen": scores[2 * j], "reward_rejected": scores[2 * j + 1]} for j, k in enumerate(keep)]
        _write(config.output, rows)
        result.output = config.output


def _conversations(config: ScoreConfig, kind: str, result: Scored) -> tuple[list[dict], list[list[dict[str, str]]]]:
    """The records to annotate and each one's messages."""
    if kind == "answers":
        from ..judge.questions import answer_turns, load_bench, read_jsonl

        questions = {q.question_id: q for q in load_bench(config.bench)}
        records, conversations = [], []
        for row in read_jsonl(Path(config.input)):
            question = questions.get(row.get("question_id"))
            if question is None:
                result.skipped["answer to a question not in the bench"] += 1
                continue
            turns = answer_turns(row, config.input)
            messages = [m for q, a in zip(question.turns, turns)
                        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            records.append(row)
            conversations.append(messages)
        result.records = len(records)
        return records, conversations
    from ..data.formats import InputFile, Skip, to_sharegpt
    from ..data.split import to_messages

    records, conversations = [], []
    inp = InputFile(config.input)
    try:
        for raw in inp.conversation_records():
            try:
                record = to_sharegpt(raw, inp.format)
            except Skip as skip:
                result.skipped[skip.reason] += 1
                continue
            records.append(record)
            conversations.append(to_messages(record["conversations"]))
    finally:
        inp.close()
    result.records = len(records)
    return records, conversations


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..data.formats import RecordWriter, output_format

    writer = RecordWriter(path, output_format(path, None))
    try:
        for row in rows:
            writer.write(row)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
