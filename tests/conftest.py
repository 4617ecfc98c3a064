"""Shared fixtures: tiny random Llama models with tokenizers trained here, no network.

- `sp_model_dir`: a LLaMA-style SentencePiece BPE tokenizer (byte fallback, "▁" spaces, BOS added),
  no chat template -> vicuna_v1.1 is the default template.
- `bpe_model_dir`: a byte-level BPE tokenizer (like GPT-2 / SmolLM2) with a ChatML chat template.
Both models are 2 layers, hidden 32, so a forward pass takes a millisecond.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

CORPUS = (
    "Hello there, how are you? I am fine, thank you. The capital of France is Paris. "
    "USER: ASSISTANT: ### Human: ### Assistant: [INST] [/INST] <<SYS>> "
    "안녕하세요 반갑습니다. 한국어 문장입니다. 你好世界。中文测试。 🙂🎉🚀 café naïve "
    "def add(a, b):\n    return a + b\n"
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own empty VICUNA_HOME (slow tests point it at `embedded_model_home`)."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path_factory.mktemp("vicuna_home")))


def _tiny_llama(vocab_size: int, bos: int, eos: int, pad: int | None, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    corpus.write_text((CORPUS * 3 + "\n") * 30, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    model_dir = root / "model"
    model_dir.mkdir()
    shutil.copy(root / "sp.model", model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
    }))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _tiny_llama(len(tokenizer), 1, 2, None).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bpe")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator([CORPUS] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _tiny_llama(len(tokenizer), tokenizer.bos_token_id, eos, tokenizer.pad_token_id, seed=1).save_pretrained(model_dir)
    return model_dir


# `*_loaded`: transformers' implementation (the reference); `*_native`: core/native_llama.py.


def _load_cpu(model_dir: Path, implementation: str):
    from vicuna_cli.core import models

    return models.load(str(model_dir), device="cpu", dtype="float32", implementation=implementation)


@pytest.fixture(scope="session")
def sp_loaded(sp_model_dir):
    return _load_cpu(sp_model_dir, "transformers")


@pytest.fixture(scope="session")
def bpe_loaded(bpe_model_dir):
    return _load_cpu(bpe_model_dir, "transformers")


@pytest.fixture(scope="session")
def sp_native(sp_model_dir):
    return _load_cpu(sp_model_dir, "native")


@pytest.fixture(scope="session")
def bpe_native(bpe_model_dir):
    return _load_cpu(bpe_model_dir, "native")


@pytest.fixture(scope="session")
def embedded_model_home(tmp_path_factory) -> Path:
    """A VICUNA_HOME holding the converted embedded model, shared by the slow tests (converted
    once per session, ~25 s). Reuses VICUNA_TEST_MODEL_HOME when set, to skip the conversion."""
    from vicuna_cli.core import models

    home = Path(os.environ.get("VICUNA_TEST_MODEL_HOME") or tmp_path_factory.mktemp("embedded_home"))
    previous = os.environ.get("VICUNA_HOME")
    os.environ["VICUNA_HOME"] = str(home)
    try:
        models.resolve(models.DEFAULT_MODEL)
    finally:
        if previous is None:
            os.environ.pop("VICUNA_HOME", None)
        else:
            os.environ["VICUNA_HOME"] = previous
    return home


@pytest.fixture
def fake_openai():
    """The one fake OpenAI-compatible server (fake_openai.py), echoing the last user message;
    judge_double.py's `double` runs the same server with scripted verdicts."""
    from fake_openai import FakeOpenAI, running

    with running(FakeOpenAI()) as server:
        yield server


@pytest.fixture
def double():
    """The scripted judge (judge_double.py) on the shared fake OpenAI server."""
    from fake_openai import running
    from judge_double import JudgeDouble

    with running(JudgeDouble()) as server:
        yield server


@pytest.fixture
def workdir(tmp_path):
    """The answer files and questions that `double` judges (judge_double.make_workdir)."""
    from judge_double import make_workdir

    return make_workdir(tmp_path)


@pytest.fixture(scope="module")
def resume_reference(sp_model_dir, tmp_path_factory):
    """The uninterrupted LoRA run the resume tests compare with: (model dir, data, run dir)."""
    from train_helpers import STEPS, losses, resume_config, write_data
    from vicuna_cli.train.sft import run_sft

    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data.json", n=40, seed=1)
    reference = root / "reference"
    run_sft(resume_config(sp_model_dir, data, reference))
    assert len(losses(reference)) == STEPS
    return sp_model_dir, data, reference
