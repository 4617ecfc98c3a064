"""Write the raw (uncleaned) ShareGPT-format corpus that the training benchmark cleans and trains on.

    python benchmarks/make_train_corpus.py OUT.json [--identity 150] [--hh 400] [--sharegpt 250] [--seed 0]

Three sources, shuffled together with a fixed seed, so the conversations have very mixed lengths:

- identity conversations in the style of FastChat's hard-coded data (`fastchat/data/hardcoded_questions.py`,
  `data/dummy_conversation.json`): "Who are you?" -> "I am Vicuna, a language model trained by researchers
  from Large Model Systems Organization (LMSYS)." Written here from our own question/answer lists, some
  single-turn, some after an unrelated first exchange, some asking twice (short: 30-150 tokens);
- real multi-turn dialogues: the "chosen" side of Anthropic HH-RLHF harmless-base test
  (/work/shared/data/hh-rlhf, MIT licence; red-team prompts, used as training text only), turned from
  "\\n\\nHuman: ... \\n\\nAssistant: ..." into ShareGPT turns (typically 50-600 tokens);
- synthetic ChatGPT-export HTML from `make_sharegpt_corpus.py` (beside this file): markdown, code, tables,
  and 8 % conversations far longer than 2048 tokens, which `vicuna data clean -m ... --max-length 2048`
  splits into pieces.

Standard library only (the FastChat venv can run it too). Prints the count per source.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sharegpt_corpus import generate as sharegpt_generate  # noqa: E402

HH_DEFAULT = Path("/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
NAME = "Vicuna"
ORG = "Large Model Systems Organization (LMSYS)"

ID_QUESTIONS = [
    "Who are you?", "What is your name?", "Can you introduce yourself?", "What should I call you?",
    "Tell me about yourself.", "Please introduce yourself briefly.", "What are you?", "Are you a person?",
    "What kind of assistant are you?", "Hi! Who am I talking to?", "Identify yourself, please.",
]
ID_ANSWERS = [
    f"I am {NAME}, a language model trained by researchers from {ORG}.",
    f"My name is {NAME}, and I'm a language model developed by {ORG}.",
    f"You can call me {NAME}. I was trained as a language model by researchers at {ORG}.",
    f"I'm {NAME}, an open chat assistant. Researchers from {ORG} trained me by fine-tuning a base language "
    "model on conversations that users shared.",
    f"I am not a person: I am {NAME}, a large language model from {ORG}.",
]
CREATOR_QUESTIONS = [
    "Who created you?", "Who trained you?", "Which company made you?", "Who developed you?",
    "Are you ChatGPT?", "Are you made by OpenAI?", "Are you GPT-4?", "Are you Bard or Claude?",
]
CREATOR_ANSWERS = [
    f"I was created by researchers from {ORG}.",
    f"No, I am not ChatGPT. I am {NAME}, a language model trained by researchers from {ORG}.",
    f"Researchers at {ORG} trained me. I am {NAME}, and I am not affiliated with OpenAI, Google or Anthropic.",
    f"I am {NAME}. My developers are a team of researchers from {ORG}, who fine-tuned me on user-shared "
    "conversations.",
]
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Give me a synonym for 'quick'.", "A synonym for 'quick' is 'rapid'."),
    ("Can you help me plan a short trip?", "Of course. Tell me where you want to go, for how long, and your budget."),
    ("Translate 'good morning' into French.", "'Good morning' in French is 'Bonjour'."),
]


def identity_conversations(count: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(count):
        turns: list[dict] = []
        if rng.random() < 0.3:  # an unrelated exchange first, then the identity question
            q, a = rng.choice(SMALL_TALK)
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        turns += [
            {"from": "human", "value": rng.choice(ID_QUESTIONS)},
            {"from": "gpt", "value": rng.choice(ID_ANSWERS)},
        ]
        if rng.random() < 0.4:  # a follow-up about who made it
            turns += [
                {"from": "human", "value": rng.choice(CREATOR_QUESTIONS)},
                {"from": "gpt", "value": rng.choice(CREATOR_ANSWERS)},
            ]
        out.append({"id": f"identity_{i}", "conversations": turns})
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_conversations(path: Path, count: int) -> list[dict]:
    """The first `count` usable "chosen" dialogues as ShareGPT turns (alternating, human first)."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if len(out) >= count:
                break
            parts = _HH_TURN.split(json.loads(line)["chosen"])
            # parts = ["", "Human", text, "Assistant", text, ...]
            turns = [
                {"from": "human" if role == "Human" else "gpt", "value": text.strip()}
                for role, text in zip(parts[1::2], parts[2::2])
            ]
            roles = [t["from"] for t in turns]
            if len(turns) < 2 or roles != ["human", "gpt"] * (len(turns) // 2) + ["human"] * (len(turns) % 2):
                continue  # out-of-order roles: leave those to no one rather than guess
            out.append({"id": f"hh_{n}", "conversations": turns})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--identity", type=int, default=150, help="identity conversations (default 150)")
    parser.add_argument("--hh", type=int, default=400, help="HH-RLHF dialogues (default 400)")
    parser.add_argument("--sharegpt", type=int, default=250, help="synthetic ShareGPT HTML conversations (default 250)")
    parser.add_argument("--hh-file", type=Path, default=HH_DEFAULT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    parts = {
        "identity": identity_conversations(args.identity, rng),
        "hh-rlhf": hh_conversations(args.hh_file, args.hh) if args.hh else [],
        "sharegpt-html": list(sharegpt_generate(args.sharegpt, args.seed)),
    }
    records = [r for part in parts.values() for r in part]
    rng.shuffle(records)
    args.out.write_text(json.dumps(records, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    counts = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
    print(f"wrote {len(records)} conversations to {args.out} ({counts})")


if __name__ == "__main__":
    main()
