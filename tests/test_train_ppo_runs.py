"""`train ppo` end to end on tiny fixture models: a programmatic reward rises while the KL to the
reference stays bounded, the run dir is a chat-loadable model, bad input fails clearly, and a
SIGKILLed run resumed with --resume auto gives the same next steps as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vicuna_cli.train.ppo import PpoConfig, run_ppo
from vicuna_cli.train.rundir import read_metrics

PROMPTS = ["Hello there, how are you?", "The capital of France is Paris.", "I am fine, thank you.",
           "def add(a, b):", "café naïve", "你好世界。", "Hello, what is the capital?", "thank you, how are you?"]


def write_prompts(path: Path, n: int = 16) -> Path:
    rows = [{"id": f"p{i}", "conversations": [{"from": "human", "value": f"{PROMPTS[i % len(PROMPTS)]} #{i}"}]}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def share_of(token: int):
    def reward(prompts, texts, answers):
        return [sum(t == token for t in ids) / len(ids) for ids in answers]
    return reward


def test_smoke(bpe_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json")
    config = PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=tmp_path / "run", max_length=64,
                       max_new_tokens=8, rollout_batch_size=8, max_steps=3, learning_rate=1e-3, log_every=1,
                       log_samples=1)
    result = run_ppo(config, reward=share_of(5))
    for m in read_metrics(tmp_path / "run"):
        print(m)
    print((tmp_path / "run" / "samples.jsonl").read_text()[:500])
    print(sorted(p.name for p in (tmp_path / "run").iterdir()))
