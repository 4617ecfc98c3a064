#!/usr/bin/env python
"""How long `vicuna chat` takes to fit a long history (as after `/load`) into the model's context,
and how many full chat-template renders that costs (issue #18, item 10).

The history is N exchanges of ~12 words each, then one new question; the model (default: the
embedded alias, whose Jinja chat template is the costly kind of render) is loaded with
`LocalBackend`, and `ChatSession._fit_context` is timed alone (no generation).

    OMP_NUM_THREADS=1 python benchmarks/bench_chat_fit.py --exchanges 300 2000
"""

from __future__ import annotations

import argparse
import random
import time

from vicuna_cli.chat.backends import LocalBackend
from vicuna_cli.chat.session import ChatSession
from vicuna_cli.core.generate import SamplingParams

WORDS = ["Paris", "hello", "how are you", "fine", "the capital", "of France"]


def history(exchanges: int) -> list[dict]:
    rng = random.Random(1)
    messages = []
    for i in range(exchanges):
        messages.append({"role": "user", "content": f"q{i} " + " ".join(rng.choices(WORDS, k=12))})
        messages.append({"role": "assistant", "content": f"a{i} " + " ".join(rng.choices(WORDS, k=12))})
    return messages + [{"role": "user", "content": "and now?"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--exchanges", type=int, nargs="+", default=[300, 2000])
    args = parser.parse_args()
    backend = LocalBackend(args.model, None, device="cpu")
    renders = []
    tokenizer = getattr(backend.template, "tokenizer", None)
    if tokenizer is not None:
        real = tokenizer.apply_chat_template
        tokenizer.apply_chat_template = lambda *a, **k: renders.append(1) or real(*a, **k)
    for n in args.exchanges:
        renders.clear()
        session = ChatSession(backend, SamplingParams(max_new_tokens=64))
        session.messages = history(n)
        start = time.perf_counter()
        session._fit_context()
        seconds = time.perf_counter() - start
        print(f"{n} exchanges: fitted in {seconds:.2f} s, {len(renders)} chat-template renders, "
              f"kept {len(session.messages)} messages of {2 * n + 1}")


if __name__ == "__main__":
    main()
