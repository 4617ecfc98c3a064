"""Shared by the batch-engine tests: the batch-1 reference answer and driving a BatchEngine."""

from __future__ import annotations

from vicuna_cli.core.batch import BatchEngine
from vicuna_cli.core.generate import Engine


def batch_one(loaded, prompt_ids, params):
    engine = Engine(loaded.model, loaded.tokenizer, loaded.context_length)
    generation = engine.generate(prompt_ids, params)
    text = "".join(generation)
    return generation.output_ids, text, generation.stats.finish_reason


def run_to_end(engine: BatchEngine, limit: int = 2000) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not go idle")


def collect(request):
    events = request.drain()
    assert events and events[-1].finish_reason is not None
    assert all(e.finish_reason is None for e in events[:-1])
    return [t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason
