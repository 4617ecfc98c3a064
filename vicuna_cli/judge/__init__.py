"""LLM-as-a-judge evaluation: question sets, answers, judging, results (`vicuna judge`)."""

from pathlib import Path

# Default directories, FastChat's llm_judge layout (shared by the command and JudgeConfig).
ANSWERS = Path("judge/model_answer")
JUDGMENTS = Path("judge/model_judgment")
ARENA_JUDGMENTS = Path("judge/arena_judgment")  # `judge --battles`: kept apart from the bench's judgments
