"""Judge prompts, written for this project.

Eight variants, like MT-bench's: pairwise or single (1-10), each plain or reference-guided (math,
reasoning and coding, where judges go wrong without a worked answer), each for the first turn or
for a two-turn conversation (judging the second answer in context). A prompt asks for JSON and,
for judges that cannot produce it, a final bracketed marker; `verdicts.py` reads both.

The name of the prompt is stored with every judgment (FastChat's `judge: [model, prompt]`) and
is part of the cache key through the full text, so editing a prompt re-judges only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .questions import Question

PROMPT_VERSION = "v1"

_CRITERIA = (
    "Judge how well each response serves the user: helpfulness, relevance, accuracy, depth, "
    "creativity and level of detail."
)
_FAIRNESS = (
    "The order in which the responses appear must not affect your decision, and neither may their "
    "length nor the names of the assistants. Be as objective as you can."
)
_REFERENCE_NOTE = (
    "A reference answer is provided. Compare each response with it, and find and correct any "
    "mistakes in the responses before deciding; a correct, clear response beats a long wrong one."
)

PAIR_SYSTEM = (
    "You are an impartial judge comparing two AI assistants' responses to the same user request. "
    f"{_CRITERIA} {_FAIRNESS}\n\n"
    "Think briefly, then reply with a JSON object: "
    '{"explanation": "<your short reasoning>", "verdict": "A" | "B" | "tie"}. '
    "If you cannot write JSON, end your reply with exactly one of these markers: "
    "[[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie."
)
SINGLE_SYSTEM = (
    "You are an impartial judge grading one AI assistant's response to a user request. "
    f"{_CRITERIA} Be as objective as you can.\n\n"
    "Think briefly, then reply with a JSON object: "
    '{"explanation": "<your short reasoning>", "rating": <a number from 1 to 10>}. '
    "If you cannot write JSON, end your reply with the rating in double brackets, e.g. [[7]]."
)

REPAIR = {
    "pair": "Your reply did not contain a verdict I can read. Reply with only one marker: [[A]], [[B]] or [[C]].",
    "single": "Your reply did not contain a rating I can read. Reply with only the rating, e.g. [[7]].",
}


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # e.g. "vicuna-pair-ref-multi-v1"
    kind: str  # "pair" | "single"
    messages: tuple[tuple[str, str], ...]  # (role, content)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def prompt_name(kind: str, reference: bool, multi_turn: bool) -> str:
    return "-".join(["vicuna", kind] + (["ref"] if reference else []) + (["multi"] if multi_turn else []) + [PROMPT_VERSION])


def _block(title: str, text: str) -> str:
    return f"[Start of {title}]\n{text}\n[End of {title}]"


def _dialogue(question: Question, turns: list[str], speaker: str) -> str:
    lines = []
    for user, reply in zip(question.turns, turns):
        lines.append(f"### User:\n{user}\n\n### {speaker}:\n{reply}")
    return "\n\n".join(lines)


def _reference(question: Question, turn: int) -> str:
    assert question.reference is not None
    if turn == 1:
        return _block("Reference Answer", question.reference[0]) + "\n\n"
    refs = "\n\n".join(f"### Reference answer {i} :\n{r}" for i, r in enumerate(question.reference[:turn], 1))
    return _block("Reference Answers", refs) + "\n\n"


def use_reference(question: Question, turn: int) -> bool:
    return question.needs_reference and bool(question.reference) and len(question.reference) >= turn


def pair_prompt(question: Question, answer_a: list[str], answer_b: list[str], turn: int = 1) -> JudgePrompt:
    """Compare A and B on `turn` (1, or 2 for the second answer of a two-turn conversation)."""
    ref = use_reference(question, turn)
    head = _reference(question, turn) if ref else ""
    if turn == 1:
        user = (
            head + _block("User Question", question.turns[0]) + "\n\n"
            + _block("Assistant A's Answer", answer_a[0]) + "\n\n"
            + _block("Assistant B's Answer", answer_b[0])
        )
    else:
        user = (
            head + _block("Assistant A's Conversation", _dialogue(question, answer_a[:turn], "Assistant A")) + "\n\n"
            + _block("Assistant B's Conversation", _dialogue(question, answer_b[:turn], "Assistant B")) + "\n\n"
            + f"Compare only the assistants' answers to user question {turn}; earlier turns are context."
        )
    system = PAIR_SYSTEM + ("\n\n" + _REFERENCE_NOTE if ref else "")
    return JudgePrompt(prompt_name("pair", ref, turn > 1), "pair", (("system", system), ("user", user)))


def single_prompt(question: Question, answer: list[str], turn: int = 1) -> JudgePrompt:
    ref = use_reference(question, turn)
    head = _reference(question, turn) if ref else ""
    if turn == 1:
        user = head + _block("User Question", question.turns[0]) + "\n\n" + _block("Assistant's Answer", answer[0])
    else:
        user = (
            head + _block("Conversation", _dialogue(question, answer[:turn], "Assistant")) + "\n\n"
            + f"Grade only the assistant's answer to user question {turn}; earlier turns are context."
        )
    system = SINGLE_SYSTEM + ("\n\n" + _REFERENCE_NOTE if ref else "")
    return JudgePrompt(prompt_name("single", ref, turn > 1), "single", (("system", system), ("user", user)))
