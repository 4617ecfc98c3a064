"""LLM-as-a-judge evaluation: question sets, answers, judging, results (`vicuna judge`)."""
