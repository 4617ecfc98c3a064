"""`vicuna train dpo`: sigmoid, IPO and hinge losses, the SFT term and the reward metrics equal
TRL's DPOTrainer on the same batch (its own forward, and its loss on given log-probs); packed equals
padded; a precomputed reference equals a frozen one; a learnable synthetic preference is learned;
the run dir is a chat model; bad inputs are refused or counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.dpo import DpoConfig, FIGURES, build_dpo_samples, collate as dpo_collate, dpo_loss, dpo_terms, run_dpo, sequence_logps
from vicuna_cli.train.labels import IGNORE
from vicuna_cli.train.rundir import read_metrics

from pair_runs import pair_config, trained_with_held_out, write_pairs


LAYOUTS = {"packed": dict(packing=True), "shared prompt": dict(packing=True, shared=True), "padded": dict(packing=False)}


def collate(samples, packing, pad_id, shared=False):
    """dpo.collate with the layout's samples: "shared prompt" records each pair's common prefix
    (as build_dpo_samples does under --share-prompt) so the packed row holds it once."""
    from dataclasses import replace

    from vicuna_cli.train.packing import common_prefix

    samples = [replace(s, shared=common_prefix(s.chosen, s.rejected) if shared else 0) for s in samples]
    return dpo_collate(samples, packing, pad_id)


def causal(model_dir: Path, seed: int | None = None):
    """The fixture model (or, with `seed`, one with other random weights: a reference that differs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval(), tokenizer


def samples_for(model_dir: Path, path: Path, n: int | None = None, max_length: int = 256):
    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.preferences import read_pairs

    _, tokenizer = causal(model_dir)
    pairs = read_pairs([str(path)], Counter())[:n]
    return build_dpo_samples(pairs, tokenizer, template_for_model(tokenizer), max_length, Counter())


def trl_example(sample) -> dict:
    """TRL's {prompt_ids, chosen_ids, rejected_ids} with the completion = our answer tokens (the
    ChatML newline after <|im_end|> is not an answer token: it is left out, which changes no
    log-prob of an earlier token)."""
    parts = []
    for ids, labels in sample.sides():
        supervised = [i for i, label in enumerate(labels) if label != IGNORE]
        assert supervised == list(range(supervised[0], supervised[-1] + 1))  # one answer turn
        parts.append((ids[:supervised[0]], ids[supervised[0]:supervised[-1] + 1]))
    (prompt, chosen), (prompt_r, rejected) = parts
    assert prompt == prompt_r
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def trl_trainer(model, ref, tokenizer, tmp_path, loss_type, weights=None, beta=0.1):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "assistant", "content": "go"}]}]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, beta=beta,
                     loss_type=loss_type, loss_weights=weights, per_device_train_batch_size=8,
                     gradient_checkpointing=False)
    return DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(pairs))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_log_probs_and_rewards_equal_trl_dpo_trainer(bpe_model_dir, tmp_path, loss):
    """TRL runs its own concatenated, padded forward of policy and reference; ours packs the pairs."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model, tokenizer = causal(bpe_model_dir)
    ref, _ = causal(bpe_model_dir, seed=7)
    samples = samples_for(bpe_model_dir, write_pairs(tmp_path / "pairs.jsonl", 8), 8)
    examples = [trl_example(s) for s in samples]
    trainer = trl_trainer(model, ref, tokenizer, tmp_path, [loss], beta=0.3)
    model.train()
    with torch.no_grad():
        expected = float(trainer.compute_loss(model, DataCollatorForPreference(tokenizer.pad_token_id)(examples)))
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        config = DpoConfig(model=str(bpe_model_dir), beta=0.3, loss=loss)
        for layout_name, layout in LAYOUTS.items():
            batch = collate(samples, pad_id=tokenizer.pad_token_id, **layout)
            policy, reference = sequence_logps(model, batch), sequence_logps(ref, batch)
            loss_sum, figures = dpo_terms(config, policy, reference.view(-1, 2), batch["answer_tokens"])
            assert float(loss_sum) / 8 == pytest.approx(expected, abs=1e-5), layout_name
            for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                         "logps/chosen", "logps/rejected"):
                assert float(figures[name]) / 8 == pytest.approx(metrics[name], abs=1e-5), (name, layout_name)
    assert 0 < metrics["rewards/accuracies"] < 1  # the reference differs: rewards are not all zero


def test_sft_term_equals_trl_sft_loss_for_one_pair(bpe_model_dir, tmp_path):
    """TRL's "sft" loss averages the chosen token NLL over the batch's tokens, ours per pair: the same for one pair."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model, tokenizer = causal(bpe_model_dir)
    ref, _ = causal(bpe_model_dir, seed=3)
    sample = samples_for(bpe_model_dir, write_pairs(tmp_path / "pairs.jsonl", 2), 1)
    trainer = trl_trainer(model, ref, tokenizer, tmp_path, ["sigmoid", "sft"], weights=[1.0, 0.7])
    with torch.no_grad():
        expected = float(trainer.compute_loss(model, DataCollatorForPreference(tokenizer.pad_token_id)([trl_example(sample[0])])))
        loss = dpo_loss(DpoConfig(model=str(bpe_model_dir), sft_weight=0.7), lambda _, b: sequence_logps(ref, b))
        ours, _ = loss(model, collate(sample, True, tokenizer.pad_token_id))
        plain, _ = dpo_loss(DpoConfig(model=str(bpe_model_dir)), lambda _, b: sequence_logps(ref, b))(
            model, collate(sample, True, tokenizer.pad_token_id))
    assert float(ours) == pytest.approx(expected, abs=1e-5)
    assert float(ours) - float(plain) > 0.1  # the term is there


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_on_given_log_probs_equals_trl(bpe_model_dir, tmp_path, loss):
    """TRL's loss code called on chosen log-probs we choose (large, tiny, unequal answer lengths)."""
    model, tokenizer = causal(bpe_model_dir)
    trainer = trl_trainer(model, None, tokenizer, tmp_path, [loss], beta=0.05)
    trainer.precompute_ref_logps = True  # the reference log-probs come with the inputs
    generator = torch.Generator().manual_seed(0)
    pairs, width = 6, 12
    lengths = torch.randint(1, 9, (2 * pairs,), generator=generator)
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion[row, width - n:] = 1  # TRL's order: all chosen, then all rejected
    per_token = -torch.rand(2 * pairs, width - 1, generator=generator, dtype=torch.float64) * 30 * completion[:, 1:]
    ref = -torch.rand(pairs, 2, generator=generator, dtype=torch.float64) * 200

    class Logps(torch.nn.Module):
        def forward(self, **kwargs):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros(2 * pairs, width, dtype=torch.long), "attention_mask": torch.ones(2 * pairs, width),
              "completion_mask": completion, "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    model.train()
    expected = float(trainer._compute_loss(Logps(), inputs, False))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    sums = per_token.sum(1)
    policy = torch.stack([sums[:pairs], sums[pairs:]], 1).reshape(-1)  # ours: chosen, rejected, chosen, ...
    counts = torch.stack([lengths[:pairs], lengths[pairs:]], 1).reshape(-1).double()
    loss_sum, figures = dpo_terms(DpoConfig(model="x", beta=0.05, loss=loss), policy, ref, counts)
    assert float(loss_sum) / pairs == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert float(figures[name]) / pairs == pytest.approx(metrics[name], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_shared_prompt_rows_equal_padded_in_loss_and_gradients(bpe_model_dir, tmp_path, attention):
    model, tokenizer = causal(bpe_model_dir)
    model.double().set_attn_implementation(attention)
    ref, _ = causal(bpe_model_dir, seed=5)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 6, seed=3)
    lines = pairs.read_text().splitlines()
    multi = json.loads(lines[0])  # one pair parts at an earlier turn: its answers hold a user turn
    multi["prompt"], multi["chosen"] = multi["prompt"][:1], [{"role": "assistant", "content": "fine"},
                                                             {"role": "user", "content": "and you"}, *multi["chosen"]]
    multi["rejected"] = [{"role": "assistant", "content": "fine"}, {"role": "user", "content": "and you?"}, *multi["rejected"]]
    pairs.write_text("\n".join([json.dumps(multi), *lines[1:]]) + "\n")
    samples = samples_for(bpe_model_dir, pairs)
    with torch.no_grad():
        values = sequence_logps(ref.double(), collate(samples, True, tokenizer.pad_token_id)).view(-1, 2).tolist()
    samples = [type(s)(**{**s.__dict__, "ref": tuple(v)}) for s, v in zip(samples, values)]
    shared = collate(samples, True, 0, shared=True)
    assert shared["input_ids"].shape[1] < collate(samples, True, 0)["input_ids"].shape[1]  # prompts once
    results = {}
    for name, layout in LAYOUTS.items():
        model.zero_grad()
        loss, figures = dpo_loss(DpoConfig(model="x", loss="ipo", sft_weight=0.5))(
            model, collate(samples, pad_id=tokenizer.pad_token_id, **layout))
        loss.backward()
        results[name] = (float(loss), {k: float(v) for k, v in figures.items()},
                         model.model.layers[0].self_attn.q_proj.weight.grad.clone(), model.lm_head.weight.grad.clone())
    loss_a, fig_a, q_a, head_a = results["padded"]
    assert q_a.abs().sum() > 0
    for name in ("packed", "shared prompt"):
        loss_b, fig_b, q_b, head_b = results[name]
        assert loss_a == pytest.approx(loss_b, rel=1e-7), name
        assert fig_a == pytest.approx(fig_b, rel=1e-7), name
        # fp64 throughout, but eager attention takes its softmax in fp32 and sdpa's masked backward
        # sums in another order: agreement to ~1e-8 of the gradient's scale (a wrong mask is off by percents)
        for a, b in ((q_a, q_b), (head_a, head_b)):
            assert float((a - b).abs().max()) <= 1e-7 * float(a.abs().max()), name


def test_only_the_answer_turns_are_scored(bpe_model_dir):
    """A multi-turn prompt's assistant turn is context, not answer: its tokens carry no label."""
    from vicuna_cli.core.templates import template_for_model

    _, tokenizer = causal(bpe_model_dir)
    pair = {"id": "m", "prompt": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thank you"},
                                  {"role": "user", "content": "how are you"}],
            "chosen": [{"role": "assistant", "content": "I am Paris"}], "rejected": [{"role": "assistant", "content": "the capital"}]}
    sample = build_dpo_samples([pair], tokenizer, template_for_model(tokenizer), 256, Counter())[0]
    for (ids, labels), answer in zip(sample.sides(), ("I am Paris", "the capital")):
        scored = [t for t in labels if t != IGNORE]
        assert tokenizer.decode(scored) == answer + "<|im_end|>"


def config(model_dir, data, out, **overrides) -> DpoConfig:
    return pair_config(DpoConfig, model_dir, data, out, learning_rate=2e-3, **overrides)


@pytest.fixture(scope="module")
def trained(bpe_model_dir, tmp_path_factory):
    return trained_with_held_out(tmp_path_factory.mktemp("dpo"), bpe_model_dir, 160, run_dpo, config,
                                 max_steps=40, eval_every=20)


def test_learns_a_synthetic_preference(trained):
    out, held, result = trained
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 40 and all(name in steps[0] for name in FIGURES)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log σ(0)
    first_eval = next(m for m in metrics if "eval_loss" in m)
    assert first_eval["step"] == 20
    assert result.eval_metrics["eval_rewards/accuracies"] >= 0.9, result.eval_metrics
    assert result.eval_metrics["eval_rewards/margins"] > 0 and result.eval_loss < 0.6931
    assert (out / "dpo_reference" / "logps.safetensors").is_file()


def test_the_run_dir_is_a_chat_model(trained, bpe_model_dir):
    from safetensors.torch import load_file

    out, _, _ = trained
    trained_weights, base = load_file(out / "model.safetensors"), load_file(bpe_model_dir / "model.safetensors")
    assert not torch.equal(trained_weights["lm_head.weight"], base["lm_head.weight"])
    run = CliRunner().invoke(app, ["chat", "-m", str(out), "-p", "hello there", "--temperature", "0",
                                   "--max-new-tokens", "4", "--device", "cpu", "--json"])
    assert run.exit_code == 0, run.output
    answer = json.loads(run.stdout)
    # the same greedy answer as transformers gives with the trained weights and the model's template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert answer["stats"]["prompt_tokens"] == ids["input_ids"].shape[1]
    assert answer["answer"].strip() == tokenizer.decode(generated, skip_special_tokens=True).strip()


@pytest.mark.parametrize("lora, other_reference", [(False, False), (True, False), (False, True)])
def test_precomputed_reference_equals_a_frozen_one(bpe_model_dir, tmp_path, lora, other_reference):
    data = write_pairs(tmp_path / "pairs.jsonl", 24, seed=6)
    options = dict(max_steps=3, eval_split=0.25, eval_every=3, lora=lora, lora_r=4, lora_dropout=0.0)
    if other_reference:  # --ref-model: rewards are not zero before the first step
        model, tokenizer = causal(bpe_model_dir, seed=4)
        model.save_pretrained(tmp_path / "ref")
        tokenizer.save_pretrained(tmp_path / "ref")
        options["ref_model"] = str(tmp_path / "ref")
    pre = run_dpo(config(bpe_model_dir, data, tmp_path / "pre", **options))
    frozen = run_dpo(config(bpe_model_dir, data, tmp_path / "frozen", precompute=False, **options))
    assert not (tmp_path / "frozen" / "dpo_reference" / "logps.safetensors").exists()
    a, b = read_metrics(tmp_path / "pre"), read_metrics(tmp_path / "frozen")
    keys = ["loss", *FIGURES, "eval_loss", "eval_rewards/margins"]
    assert [[m.get(k) for k in keys] for m in a] == [pytest.approx([m.get(k) for k in keys], abs=1e-5) for m in b]
    assert a[1]["rewards/margins"] != 0  # the policy moved after the first step
    assert (a[0]["rewards/margins"] != 0) == other_reference
    assert pre.eval_metrics == pytest.approx(frozen.eval_metrics, abs=1e-5)


def test_reference_log_probs_are_reused_and_recomputed_when_stale(bpe_model_dir, tmp_path, monkeypatch):
    from vicuna_cli.train import reference

    calls = []
    compute = reference.compute
    monkeypatch.setattr(reference, "compute", lambda *a: calls.append(len(a[4])) or compute(*a))
    data = write_pairs(tmp_path / "pairs.jsonl", 16, seed=8)
    out = tmp_path / "run"
    run_dpo(config(bpe_model_dir, data, out, max_steps=2, save_every=1))
    stored = (out / "dpo_reference" / "logps.safetensors").read_bytes()
    assert calls == [16, 0]  # train pairs, no eval pairs
    run_dpo(config(bpe_model_dir, data, out, max_steps=3, save_every=1, resume="auto"))
    assert calls == [16, 0]  # reused on resume
    # another reference model on resume: the stored file no longer fits, computed again and replaced
    other = tmp_path / "other"
    model, tokenizer = causal(bpe_model_dir, seed=11)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    run_dpo(config(bpe_model_dir, data, out, max_steps=4, save_every=1, resume="auto", ref_model=str(other)))
    assert calls == [16, 0, 16, 0]
    assert (out / "dpo_reference" / "logps.safetensors").read_bytes() != stored
    # the data file edited in place (one pair fewer), resumed: computed for the new data
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    run_dpo(config(bpe_model_dir, data, out, max_steps=5, save_every=1, resume="auto", ref_model=str(other)))
    assert calls == [16, 0, 16, 0, 15, 0]


def test_bad_input_is_refused_or_counted(bpe_model_dir, tmp_path):
    from vicuna_cli.core.templates import template_for_model

    _, tokenizer = causal(bpe_model_dir)
    long = " ".join(["hello there"] * 80)
    pairs = [{"id": "long-prompt", "prompt": [{"role": "user", "content": long}],
              "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
             {"id": "long-answer", "prompt": [{"role": "user", "content": "hi"}],
              "chosen": [{"role": "assistant", "content": long[:200]}], "rejected": [{"role": "assistant", "content": "b"}]},
             {"id": "same", "prompt": [{"role": "user", "content": "hi"}],
              "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "hello"}]},
             # HH-RLHF has prompts that end with an assistant turn: the template refuses them
             {"id": "two-assistants", "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
              "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]},
             {"id": "ok", "prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "assistant", "content": "go"}]}]
    notes: Counter = Counter()
    samples = build_dpo_samples(pairs, tokenizer, template_for_model(tokenizer), 64, notes)
    assert [s.id for s in samples] == ["ok"]
    assert notes == {"prompt alone fills --max-length (skipped)": 1,
                     "pair longer than --max-length (skipped, not truncated)": 1,
                     "chosen and rejected tokenize the same": 1,
                     "turns do not alternate user/assistant (skipped)": 1}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(pairs[0]) + "\n")
    with pytest.raises(VicunaError, match=r"no usable preference pair \(1 read; prompt alone fills --max-length"):
        run_dpo(config(bpe_model_dir, data, tmp_path / "run", max_length=64))
    # pairs without 'rejected': the record is named, first or later
    missing = tmp_path / "missing.jsonl"
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go"}
    missing.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    with pytest.raises(VicunaError, match=r"missing.jsonl record 2 \(line 2\): no 'rejected' answer"):
        run_dpo(config(bpe_model_dir, missing, tmp_path / "run2"))
    missing.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(VicunaError, match=r"missing.jsonl record 1 has 'chosen' but no 'rejected' answer"):
        run_dpo(config(bpe_model_dir, missing, tmp_path / "run3"))


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta: Input should be greater than 0"),
    (["--beta", "-0.5"], "--beta: Input should be greater than 0"),
    (["--loss", "kto"], "--loss: Input should be 'sigmoid', 'ipo' or 'hinge'"),
    (["--sft-weight", "-1"], "--sft-weight: Input should be greater than or equal to 0"),
])
def test_bad_options_name_the_flag(bpe_model_dir, tmp_path, flags, message):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    run = CliRunner().invoke(app, ["train", "dpo", "-m", str(bpe_model_dir), "--data", str(data), "-o",
                                   str(tmp_path / "run"), *flags])
    assert run.exit_code != 0
    assert isinstance(run.exception, VicunaError) and message in str(run.exception), run.output
    assert not (tmp_path / "run").exists()


def test_a_reference_with_another_tokenizer_is_refused(bpe_model_dir, sp_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    with pytest.raises(VicunaError, match="has another tokenizer than"):
        run_dpo(config(bpe_model_dir, data, tmp_path / "run", ref_model=str(sp_model_dir)))


def test_the_cli_runs_dpo_with_lora_and_merge(bpe_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16, seed=9)
    out = tmp_path / "run"
    run = CliRunner().invoke(app, ["train", "dpo", "-m", str(bpe_model_dir), "--data", str(data), "-o", str(out),
                                   "--max-length", "128", "--global-batch-size", "8", "--max-steps", "2", "--lora",
                                   "--lora-r", "4", "--merge", "--loss", "ipo", "--learning-rate", "1e-3"])
    assert run.exit_code == 0, run.output
    assert run.stdout.strip() == str(out)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)  # IPO at the reference
