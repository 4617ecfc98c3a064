"""The scripted judge of the judge and arena tests: the shared fake OpenAI server
(fake_openai.py) answering like a judge that reads the answers (one containing "correct" beats
one that does not), the questions and the answer files it judges, and readers for the results.
The fixtures `double` and `workdir` are in conftest.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fake_openai import FakeOpenAI

from vicuna_cli.judge.client import ApiClient, Cache
from vicuna_cli.judge.questions import Question

QUESTIONS = [
    Question(1, "writing", ["Write a poem."]),
    Question(2, "roleplay", ["Be a pirate."]),
    Question(3, "math", ["What is 2+2?"], reference=["4"]),
    Question(4, "coding", ["Reverse a list in Python."], reference=["xs[::-1]"]),
    Question(5, "writing", ["Write a limerick.", "Now make it sadder."]),
]


class JudgeDouble(FakeOpenAI):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "smart"  # smart | first | garbage | refuse

    def reply(self, body: dict) -> dict:
        user = body["messages"][1]["content"]
        if body["messages"][-1]["content"].startswith("Your reply did not"):
            user = "repair"
        if self.mode == "refuse":
            return {"role": "assistant", "content": None, "refusal": "I can't help with grading that."}
        if self.mode == "garbage" or user == "repair":
            return {"role": "assistant", "content": "Both answers have merits."}
        schema = "response_format" in body
        if "[The Start of Assistant 1's Answer]" in user:  # the 2023 method: two scores, first line
            one, two = (re.search(rf"\[The Start of Assistant {i}'s Answer\]\n(.*?)\n\[The End of", user, re.S).group(1) for i in (1, 2))
            s1, s2 = (9 if "correct" in a else 4 for a in (one, two))
            if self.mode == "first":
                s1, s2 = 8, 6
            text = json.dumps({"score_1": s1, "score_2": s2, "explanation": "reviewed"}) if schema else f"{s1} {s2}\nreviewed"
        elif "Assistant A's" in user:
            a = re.search(r"\[Start of Assistant A's \w+\]\n(.*?)\n\[End of", user, re.S).group(1)
            b = re.search(r"\[Start of Assistant B's \w+\]\n(.*?)\n\[End of", user, re.S).group(1)
            win = "A" if self.mode == "first" else ("A" if "correct" in a and "correct" not in b else "B" if "correct" in b and "correct" not in a else "tie")
            text = json.dumps({"explanation": "compared", "verdict": win}) if schema else f"Compared. [[{'C' if win == 'tie' else win}]]"
        else:
            ans = re.search(r"\[Start of (?:Assistant's Answer|Conversation)\]\n(.*?)\n\[End of", user, re.S).group(1)
            score = 9 if "correct" in ans.split("### Assistant:")[-1] else 3
            text = json.dumps({"explanation": "graded", "rating": score}) if schema else f"Rating: [[{score}]]"
        return {"role": "assistant", "content": text}


def write_answers(folder: Path, model: str, good: bool, skip: tuple = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    word = "correct" if good else "wrong"
    rows = [
        {"question_id": q.question_id, "answer_id": f"{model}-{q.question_id}", "model_id": model,
         "choices": [{"index": 0, "turns": [f"{word} answer {i} by {model}" for i in range(len(q.turns))]}], "tstamp": 0}
        for q in QUESTIONS if q.question_id not in skip
    ]
    (folder / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_workdir(tmp_path: Path) -> Path:
    """Answer files of three models ("meh" misses questions 2 and 4) and the questions file."""
    write_answers(tmp_path / "answers", "good", True)
    write_answers(tmp_path / "answers", "bad", False)
    write_answers(tmp_path / "answers", "meh", False, skip=(2, 4))
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q.as_dict()) + "\n" for q in QUESTIONS))
    return tmp_path


def judge_client(double, out: Path, **kw) -> ApiClient:
    return ApiClient(double.base, "sk-test", "judge-x", Cache(out / "judge_cache.sqlite"), **kw)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
