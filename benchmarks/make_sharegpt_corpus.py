"""Write a synthetic ShareGPT-style HTML corpus, the shape of the raw dumps Vicuna was cleaned from.

    python benchmarks/make_sharegpt_corpus.py OUT.json [--conversations 20000] [--seed 0]

Each record is `{"id", "model"?, "conversations": [{"from": "human"|"gpt", "value"}]}`. Assistant
turns are ChatGPT-export HTML: a `<div class="markdown prose ...">` wrapper, paragraphs, nested
lists, tables, and code blocks whose header holds the language label and a "Copy code" button.
The mix is fixed by the seed and includes what cleaning has to deal with: "1 / 1" counters,
exact and re-identified duplicates, conversations far longer than a 2K context, leading assistant
and trailing user turns, empty answers, mentions of the source chatbot, Korean and Chinese text.
Standard library only, so the FastChat venv and vicuna's can both read the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "the model data training loss answer question system memory process thread value function "
    "result example table list file network request server client cache token layer vector "
    "simple fast safe clear small large first second final because when while which there "
    "should could would might always never often usually explain describe compare improve"
).split()
KOREAN = "안녕하세요 데이터 모델 학습 질문 답변 예시 설명 중요한 방법 사용자 결과".split()
CHINESE = "你好 数据 模型 训练 问题 回答 例子 解释 重要 方法 用户 结果".split()
LANGS = {
    "python": "def {f}({a}, {b}):\n    \"\"\"{doc}\"\"\"\n    if {a} &lt; {b}:\n        return {a} + {b}\n    return [x * 2 for x in range({b})]\n",
    "javascript": "function {f}({a}, {b}) {{\n  // {doc}\n  const out = {a}.map((x) =&gt; x + {b});\n  return out.filter(Boolean);\n}}\n",
    "bash": "for f in *.{a}; do\n  echo \"{doc}\" &gt;&gt; \"$f\"\ndone\n",
    "sql": "SELECT {a}, COUNT(*) AS n\nFROM {f}\nWHERE {b} &gt; 10\nGROUP BY {a};\n",
}
PROSE_DIV = '<div class="markdown prose w-full break-words dark:prose-invert light">'
SVG = (
    '<svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" class="h-4 w-4" '
    'height="1em" width="1em" xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 '
    '2 0 0 1-2 2H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" '
    'rx="1" ry="1"></rect></svg>'
)


class Maker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def words(self, n: int, vocab=WORDS) -> str:
        return " ".join(self.rng.choice(vocab) for _ in range(n))

    def sentence(self, lang: str = "en") -> str:
        vocab = {"ko": KOREAN, "zh": CHINESE}.get(lang, WORDS)
        text = self.words(self.rng.randint(6, 18), vocab)
        return text[0].upper() + text[1:] + ("." if lang == "en" else "。" if lang == "zh" else ".")

    def paragraph(self, lang: str) -> str:
        return " ".join(self.sentence(lang) for _ in range(self.rng.randint(1, 4)))

    def code_block(self) -> str:
        lang = self.rng.choice(sorted(LANGS))
        names = {k: self.rng.choice(WORDS) + str(self.rng.randint(0, 9)) for k in ("f", "a", "b")}
        body = LANGS[lang].format(doc=self.words(5), **names)
        highlighted = body.replace("return", '<span class="hljs-keyword">return</span>')
        return (
            '<pre><div class="bg-black rounded-md mb-4"><div class="flex items-center relative '
            'text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans justify-between rounded-t-md">'
            f'<span>{lang}</span><button class="flex ml-auto gap-2">{SVG}Copy code</button></div>'
            f'<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-{lang}">'
            f"{highlighted}</code></div></div></pre>"
        )

    def html_list(self, depth: int = 0) -> str:
        tag = self.rng.choice(["ul", "ol"])
        items = []
        for _ in range(self.rng.randint(2, 5)):
            inner = f"<p>{self.sentence()}</p>"
            if depth == 0 and self.rng.random() < 0.3:
                inner += self.html_list(depth + 1)
            items.append(f"<li>{inner}</li>")
        return f"<{tag}>{''.join(items)}</{tag}>"

    def table(self) -> str:
        cols = self.rng.randint(2, 4)
        head = "".join(f"<th>{self.rng.choice(WORDS)}</th>" for _ in range(cols))
        rows = "".join(
            "<tr>" + "".join(f"<td>{self.words(2)}</td>" for _ in range(cols)) + "</tr>"
            for _ in range(self.rng.randint(2, 5))
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    def answer(self, lang: str, blocks: int) -> str:
        parts = [f"<p>{self.paragraph(lang)}</p>"]
        for _ in range(blocks):
            kind = self.rng.random()
            if kind < 0.35:
                parts.append(self.code_block())
            elif kind < 0.65:
                parts.append(self.html_list())
            elif kind < 0.75:
                parts.append(self.table())
            else:
                parts.append(f"<p>{self.paragraph(lang)} <strong>{self.words(2)}</strong> <code>{self.rng.choice(WORDS)}_id</code>.</p>")
        counter = '<div class="text-xs">1 / 1</div>' if self.rng.random() < 0.2 else ""
        return f"{counter}{PROSE_DIV}{''.join(parts)}</div>"

    def question(self, lang: str) -> str:
        text = self.paragraph(lang)
        if self.rng.random() < 0.1:
            text += "\n\n" + self.words(8) + ":\n    " + self.words(4)
        return ("1 / 1" if self.rng.random() < 0.1 else "") + text

    def conversation(self, index: int) -> dict:
        rng = self.rng
        lang = "ko" if rng.random() < 0.05 else "zh" if rng.random() < 0.05 else "en"
        long = rng.random() < 0.08
        pairs = rng.randint(12, 30) if long else rng.choice([1, 1, 1, 2, 2, 3, 4, 6])
        blocks = 4 if long else rng.randint(0, 4)
        turns = []
        for _ in range(pairs):
            turns.append({"from": "human", "value": self.question(lang)})
            turns.append({"from": "gpt", "value": self.answer(lang, blocks)})
        shape = rng.random()
        if shape < 0.03:
            turns.insert(0, {"from": "gpt", "value": self.answer(lang, 1)})
        elif shape < 0.06:
            turns.append({"from": "human", "value": self.question(lang)})
        elif shape < 0.08:
            turns[1]["value"] = ""
        elif shape < 0.10:
            turns[-1]["value"] = turns[-1]["value"].replace("</p>", " As ChatGPT, trained by OpenAI, I think so.</p>", 1)
        record = {"id": f"sg_{index:06d}", "conversations": turns}
        if rng.random() < 0.5:
            record["model"] = rng.choice(["gpt-4", "gpt-3.5-turbo"])
        return record


def generate(count: int, seed: int):
    maker = Maker(seed)
    made: list[dict] = []
    for index in range(count):
        roll = maker.rng.random()
        if made and roll < 0.02:  # the same conversation shared twice (same id)
            yield maker.rng.choice(made)
            continue
        if made and roll < 0.04:  # the same first exchange under a new id
            twin = dict(maker.rng.choice(made), id=f"sg_{index:06d}")
            yield twin
            continue
        record = maker.conversation(index)
        if len(made) < 500:
            made.append(record)
        yield record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, record in enumerate(generate(args.conversations, args.seed)):
            f.write((",\n" if i else "") + json.dumps(record, ensure_ascii=False))
        f.write("\n]\n")
    print(f"wrote {args.conversations} conversations to {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
