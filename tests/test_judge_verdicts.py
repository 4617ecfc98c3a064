"""Verdict parsing against judge replies as they come back in practice."""

from __future__ import annotations

import pytest

from vicuna_cli.judge.verdicts import parse_pair, parse_single

PAIR_CASES = [
    # FastChat / MT-bench style: explanation then the marker
    ("Assistant A gives a complete, correct answer while B misses the edge case.\n\n[[A]]", "A"),
    ("Both answers are fine, but B is clearer. Final verdict: [[B]]", "B"),
    ("They are equally helpful. [[C]]", "tie"),
    # the instruction echoed before the decision: the last marker decides
    ('I must output "[[A]]" if A is better, "[[B]]" if B is better, and "[[C]]" for a tie. '
     "After comparing, B is more accurate.\n\n[[B]]", "B"),
    ("Possible outputs: [[A]], [[B]] or [[C]]. My verdict: [[A]]", "A"),
    ("Options are [[A]]/[[B]]/[[C]].\nVerdict: [[C]]", "tie"),
    # both markers mentioned while reasoning, the decision at the end
    ("At first I leaned to [[A]], but on reflection the second answer is better: [[B]]", "B"),
    # markdown
    ("**Verdict:** **[[A]]**", "A"),
    ("### Final Verdict\n\n[[ B ]]", "B"),
    ("The winner is [[**A**]].", "A"),
    ("Final answer: `[[C]]`", "tie"),
    # named assistants and words
    ("[[Assistant B]]", "B"),
    ("It's a draw: [[tie]]", "tie"),
    # Arena-Hard's five-way verdicts
    ("My final verdict is Assistant A is significantly better: [[A>>B]]", "A"),
    ("My final verdict is [[B>A]].", "B"),
    ("My final verdict is tie: [[A=B]]", "tie"),
    # JSON, bare or fenced, with or without prose
    ('{"explanation": "A is correct", "verdict": "A"}', "A"),
    ('```json\n{"explanation": "B handles errors", "verdict": "B"}\n```', "B"),
    ('Here is my evaluation:\n```\n{"verdict": "tie", "explanation": "same"}\n```\nThanks!', "tie"),
    ('{"explanation": "B is better", "winner": "Assistant B"}', "B"),
    ('Sure. {"verdict": "C"}', "tie"),
    # other languages
    ("助手A的回答更准确、更详细。最终裁决：[[A]]", "A"),
    ("La respuesta B es más completa. Veredicto final: [[B]]", "B"),
    ("Beide Antworten sind gleich gut. Urteil: [[C]]", "tie"),
    ("Ответ A лучше. Вердикт: [[A]]", "A"),
    ("アシスタントBの方が優れています。[[B]]", "B"),
    # plain-text verdicts without brackets
    ("After careful comparison, final verdict: B", "B"),
    ("Verdict: Assistant A", "A"),
    # nothing usable
    ("Both responses have merits and drawbacks.", None),
    ("Please provide [[A]], [[B]] or [[C]].", None),
    ("", None),
    (None, None),
    ('{"explanation": "no verdict field"}', None),
    ("[[D]]", None),
]


@pytest.mark.parametrize("text,expected", PAIR_CASES)
def test_parse_pair(text, expected):
    assert parse_pair(text) == expected


SINGLE_CASES = [
    ('The answer is accurate and detailed. Rating: [[8]]', 8.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [[ 7 ]]", 7.0),
    ("**Rating: [[6]]**", 6.0),
    ("[[9/10]]", 9.0),
    ("Score: [[10]]", 10.0),
    # the format example echoed, then the real rating
    ('I should answer in the format "Rating: [[5]]". The response is excellent. Rating: [[9]]', 9.0),
    # single brackets (FastChat's fallback) and prose
    ("Rating: [4]", 4.0),
    ("Overall I would give it a rating of 7/10.", 7.0),
    ("Score: 6 out of 10", 6.0),
    # JSON, fenced or not; numbers as strings
    ('{"explanation": "good", "rating": 7}', 7.0),
    ('```json\n{"rating": "8", "explanation": "ok"}\n```', 8.0),
    ('{"score": 3.5}', 3.5),
    # other languages
    ("回答很准确。评分：[[7]]", 7.0),
    ("La respuesta es correcta. Calificación: [[6]]", 6.0),
    ("Bewertung: 8/10", 8.0),
    ("評価: [[5]]", 5.0),
    # out of range or absent
    ("Rating: [[85]]", None),
    ('{"rating": 0}', None),
    ("The response is helpful.", None),
    ("", None),
    ('{"rating": true}', None),
]


@pytest.mark.parametrize("text,expected", SINGLE_CASES)
def test_parse_single(text, expected):
    assert parse_single(text) == expected
