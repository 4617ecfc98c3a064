"""`vicuna train rm`: the Bradley–Terry loss and accuracy equal TRL's RewardTrainer on the same
batch, packed equals padded, a learnable synthetic preference is learned, the run dir loads back
as AutoModelForSequenceClassification, and bad inputs are counted or refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vicuna_cli.cli import app

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.rm import RewardConfig, build_pair_samples, collate, rm_loss, run_rm
from vicuna_cli.train.rundir import read_metrics

from pair_runs import pair_config, trained_with_held_out, write_pairs


def reward_model(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def samples_for(model_dir: Path, path: Path, n: int | None = None, share_prompt: bool = False):
    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.preferences import read_pairs

    _, tokenizer = reward_model(model_dir)
    pairs = read_pairs([str(path)], Counter())[:n]
    return build_pair_samples(pairs, tokenizer, template_for_model(tokenizer), 256, Counter(), share_prompt)


def test_loss_and_accuracy_equal_trl_reward_trainer(bpe_model_dir, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig as TrlConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model, tokenizer = reward_model(bpe_model_dir)
    samples = samples_for(bpe_model_dir, write_pairs(tmp_path / "pairs.jsonl", 8), 8)
    margins = [0.0, 0.5, -0.25, 1.0, 0.0, 2.0, 0.1, 0.0]
    samples = [type(s)(s.id, s.source, s.chosen, s.rejected, m) for s, m in zip(samples, margins)]
    examples = [{"chosen_ids": s.chosen, "rejected_ids": s.rejected, "margin": s.margin} for s in samples]
    args = TrlConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=8,
                     bf16=False, gradient_checkpointing=False)  # fp32, as ours
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(examples))
    model.train()  # TRL disables dropout; the tiny model has none either way
    with torch.no_grad():
        reference = trainer.compute_loss(model, DataCollatorForPreference(tokenizer.pad_token_id)(examples))
        reference_accuracy = trainer._metrics["train"]["accuracy"][-1]
        reference_margin = trainer._metrics["train"]["margin"][-1]
        for packing in (True, False):
            batch = collate(samples, packing, tokenizer.pad_token_id)
            ours = rm_loss(model, batch) / len(samples)
            scores = rm_loss(model, {**batch, "want_rewards": torch.tensor(1)})
            assert float(ours) == pytest.approx(float(reference), abs=1e-5), packing
            assert float((scores[0::2] > scores[1::2]).float().mean()) == pytest.approx(reference_accuracy, abs=1e-6)
            assert float((scores[0::2] - scores[1::2]).mean()) == pytest.approx(reference_margin, abs=1e-5)
    # the margins matter: without them the loss differs
    plain = [type(s)(s.id, s.source, s.chosen, s.rejected, 0.0) for s in samples]
    with torch.no_grad():
        assert abs(float(rm_loss(model, collate(plain, True, tokenizer.pad_token_id)) / 8) - float(reference)) > 1e-3


def test_packed_equals_padded_in_gradients_too(bpe_model_dir, tmp_path):
    model, tokenizer = reward_model(bpe_model_dir)
    samples = samples_for(bpe_model_dir, write_pairs(tmp_path / "pairs.jsonl", 6, seed=3))
    grads = []
    for packing in (True, False):
        model.zero_grad()
        loss = rm_loss(model, collate(samples, packing, tokenizer.pad_token_id))
        loss.backward()
        grads.append((float(loss), model.score.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


@pytest.mark.parametrize("model_fixture,attention", [("bpe_model_dir", "sdpa"), ("sp_model_dir", "sdpa"), ("bpe_model_dir", "eager")])
def test_a_shared_prompt_row_gives_the_rewards_and_gradients_of_whole_sides(model_fixture, attention, request, tmp_path):
    """--share-prompt holds a pair's common prompt once; causal attention makes it exact."""
    model_dir = request.getfixturevalue(model_fixture)
    model, tokenizer = reward_model(model_dir)
    model.set_attn_implementation(attention)
    path = write_pairs(tmp_path / "pairs.jsonl", 6, seed=5)
    whole, shared = samples_for(model_dir, path), samples_for(model_dir, path, share_prompt=True)
    assert all(s.shared > 0 for s in shared) and sum(map(len, shared)) < sum(map(len, whole))
    results = []
    for samples in (whole, shared):
        model.zero_grad()
        batch = collate(samples, True, tokenizer.pad_token_id)
        assert ("attention_mask" in batch) == (samples is shared)
        with torch.no_grad():
            rewards = rm_loss(model, {**batch, "want_rewards": torch.tensor(1)})
        loss = rm_loss(model, batch)
        loss.backward()
        layer = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append((rewards, float(loss), model.score.weight.grad.clone(), layer))
    (r0, l0, s0, q0), (r1, l1, s1, q1) = results
    assert torch.allclose(r0, r1, atol=1e-5) and l0 == pytest.approx(l1, abs=1e-5)
    assert torch.allclose(s0, s1, atol=1e-5) and torch.allclose(q0, q1, atol=1e-5)


def test_the_shared_prefix_leaves_each_side_its_last_token():
    from vicuna_cli.train.packing import common_prefix

    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 2  # a side that is the other's prefix keeps its last token
    assert common_prefix([7], [7]) == 0


def test_share_prompt_only_where_the_attention_takes_the_mask(tmp_path, monkeypatch):
    from vicuna_cli.train import modeling
    from vicuna_cli.train.config import TrainConfig
    from vicuna_cli.train.modeling import shares_prompt

    base = dict(model="m", output=tmp_path, device="cpu")
    assert shares_prompt(RewardConfig(**base)) and shares_prompt(RewardConfig(**base, attention="eager"))
    assert not shares_prompt(RewardConfig(**base, share_prompt=False))
    assert not shares_prompt(RewardConfig(**base, packing=False))
    assert not shares_prompt(TrainConfig(**base))  # sft has no pairs
    monkeypatch.setattr(modeling, "pick_training_attention", lambda *a: ("flash_attention_2", "varlen"))
    assert not shares_prompt(RewardConfig(**base))


def config(model_dir, data, out, **overrides) -> RewardConfig:
    return pair_config(RewardConfig, model_dir, data, out, learning_rate=3e-3, **overrides)


@pytest.fixture(scope="module")
def trained(bpe_model_dir, tmp_path_factory):
    return trained_with_held_out(tmp_path_factory.mktemp("rm"), bpe_model_dir, 240, run_rm, config, epochs=3)


def test_learns_a_synthetic_preference_and_loads_back_as_a_sequence_classifier(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, held, result = trained
    assert result.eval_metrics["eval_accuracy"] >= 0.95, result.eval_metrics
    assert set(result.eval_metrics["eval_accuracy_by_source"]) == {"alpha", "beta"}
    last = read_metrics(out)[-1]
    assert last["eval_accuracy"] == result.eval_metrics["eval_accuracy"] and last["eval_margin"] > 0
    # the run dir is a transformers sequence classifier whose score is ours
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    sample = samples_for(out, held, 1)[0]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([sample.chosen])).logits.squeeze()
        ours = rm_loss(model, {**collate([sample], True, tokenizer.pad_token_id), "want_rewards": torch.tensor(1)})[0]
    assert float(hf) == pytest.approx(float(ours), abs=1e-5)


def test_rm_score_pairs_agrees_with_the_training_eval(trained):
    out, held, result = trained
    run = CliRunner().invoke(app, ["rm", "score", "-m", str(out), str(held), "--json", "--batch-tokens", "300"])
    assert run.exit_code == 0, run.output
    figures = json.loads(run.stdout)
    assert figures["kind"] == "pairs" and figures["pairs"] == 60
    assert figures["accuracy"] == pytest.approx(result.eval_metrics["eval_accuracy"])
    assert figures["mean_margin"] == pytest.approx(result.eval_metrics["eval_margin"], abs=1e-4)
    assert {s: v["accuracy"] for s, v in figures["by_source"].items()} == pytest.approx(
        result.eval_metrics["eval_accuracy_by_source"])


def test_rm_score_adds_a_reward_to_conversations_and_fastchat_answers(trained, bpe_model_dir, tmp_path):
    out, _, _ = trained
    conversations = tmp_path / "c.json"
    conversations.write_text(json.dumps([
        {"id": "good", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "fine Paris thank you"}]},
        {"id": "bad", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "fine the thank you"}]}]))
    scored = tmp_path / "scored.jsonl"
    run = CliRunner().invoke(app, ["rm", "score", "-m", str(out), str(conversations), "-o", str(scored)])
    assert run.exit_code == 0, run.output
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["good", "bad"] and rows[0]["reward"] > rows[1]["reward"]
    answers = tmp_path / "model.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "answer_id": f"a{q}", "model_id": "m", "choices": [
        {"index": 0, "turns": [text]}]}) + "\n" for q, text in (("vicuna80-01", "Paris is fine"), ("vicuna80-02", "the the the"), (999, "x"))))
    run = CliRunner().invoke(app, ["rm", "score", "-m", str(out), str(answers), "-o", str(tmp_path / "a.jsonl"), "--json"])
    assert run.exit_code == 0, run.output
    figures = json.loads(run.stdout)
    assert figures["kind"] == "answers" and figures["scored"] == 2
    assert figures["skipped"] == {"answer to a question not in the bench": 1}
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["vicuna80-01", "vicuna80-02"] and all(isinstance(r["reward"], float) for r in rows)
    # a chat model is not a reward model
    with pytest.raises(VicunaError, match="is not a reward model"):
        from vicuna_cli.train.score import ScoreConfig, score

        score(ScoreConfig(model=str(bpe_model_dir), input=str(conversations), output=tmp_path / "x.jsonl"))


def test_bad_pairs_are_counted_and_never_truncated(bpe_model_dir, tmp_path):
    from vicuna_cli.core.templates import template_for_model

    _, tokenizer = reward_model(bpe_model_dir)
    long = " ".join(["hello there"] * 200)
    pairs = [{"id": "long", "prompt": [{"role": "user", "content": long}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]},
             {"id": "ok", "prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "assistant", "content": "go"}]}]
    notes: Counter = Counter()
    samples = build_pair_samples(pairs, tokenizer, template_for_model(tokenizer), 64, notes)
    assert [s.id for s in samples] == ["ok"]
    assert notes == {"pair longer than --max-length (skipped, not truncated)": 1}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(pairs[0]) + "\n")
    with pytest.raises(VicunaError, match=r"no usable preference pair \(1 read; pair longer than --max-length"):
        run_rm(config(bpe_model_dir, data, tmp_path / "run", max_length=64))


def test_a_reward_model_is_not_a_chat_model(bpe_model_dir, tmp_path):
    from vicuna_cli.core import models

    model, tokenizer = reward_model(bpe_model_dir)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(VicunaError, match=r"is a reward model \(LlamaForSequenceClassification\)"):
        models.load(str(tmp_path / "rm"), device="cpu")
