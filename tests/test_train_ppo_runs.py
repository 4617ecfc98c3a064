"""`train ppo` end to end on tiny fixture models: a programmatic reward rises while the KL to the
reference stays bounded, the run dir is a chat-loadable model, bad input fails clearly, and a
SIGKILLed run resumed with --resume auto gives the same next steps as an uninterrupted one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import flags, kill_then_resume

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.ppo import PpoConfig, run_ppo
from vicuna_cli.train.rundir import read_metrics


PROMPTS = ["Hello there, how are you?", "The capital of France is Paris.", "I am fine, thank you.",
           "def add(a, b):", "café naïve", "你好世界。", "Hello, what is the capital?", "thank you, how are you?"]
TINY = {"max_length": 64, "max_new_tokens": 8, "rollout_batch_size": 16, "log_every": 1}


def write_prompts(path: Path, n: int = 32) -> Path:
    rows = [{"id": f"p{i}", "conversations": [{"from": "human", "value": f"{PROMPTS[i % len(PROMPTS)]} #{i}"}]}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def low_ids(prompts, texts, answers):
    """The share of answer tokens among the 50 lowest ids (about 10 % for the untrained model)."""
    return [sum(t < 50 for t in ids) / len(ids) for ids in answers]


def make_reward_model(model_dir: Path, out: Path) -> Path:
    """A random one-label classifier on the fixture model's architecture and tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(bpe_model_dir, tmp_path_factory) -> Path:
    return make_reward_model(bpe_model_dir, tmp_path_factory.mktemp("ppo_rm") / "rm")


def test_prompts_that_cannot_be_used_are_skipped_and_counted(bpe_model_dir, tmp_path):
    """HH-RLHF has dialogues whose turns do not alternate (two assistant turns in a row): such a
    prompt is skipped and counted, not a crash of the whole run (found by bench_ppo_step.py)."""
    from transformers import AutoTokenizer

    from vicuna_cli.train.ppo import build

    def pair(pid, prompt):
        return {"id": pid, "prompt": prompt, "chosen": [{"role": "assistant", "content": "Sure."}],
                "rejected": [{"role": "assistant", "content": "No."}]}

    user = {"role": "user", "content": "Tell me a joke."}
    rows = [pair("ok", [user]),
            pair("odd", [user, {"role": "assistant", "content": "Hm."}, {"role": "assistant", "content": "Well."},
                         {"role": "user", "content": "Go on."}]),
            pair("again", [user]),
            pair("long", [{"role": "user", "content": "word " * 200}])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, _, notes, _ = build(PpoConfig(model=str(bpe_model_dir), prompts=[str(path)], **TINY),
                                 AutoTokenizer.from_pretrained(bpe_model_dir))
    assert [s.id for s in samples] == ["ok"]
    assert notes["turns do not alternate user/assistant (skipped)"] == 1
    assert notes["repeated prompt (kept once)"] == 1
    assert notes["prompt longer than --max-length minus --max-new-tokens (skipped)"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_rollouts_and_training_raise_the_programmatic_reward_too(bpe_model_dir, tmp_path, seed):
    """The defaults on a CPU with native bf16 (asked for explicitly, so every CI machine runs this
    path): rollouts sampled from a bf16 copy, updates under bf16 autocast over the fp32 master
    weights. Measured over seeds 0-10 and 42 (2026-12-03, 20 steps, fp32 updates): reward x7.4
    median with bf16 rollouts (2 of 12 seeds under x3: 8 and 42) and x7.0 with fp32 ones (1 of 12:
    seed 9), so single seeds are a coin either way; these are seeds 0-2, which also pass with bf16
    updates."""
    prompts = write_prompts(tmp_path / "prompts.json")
    run = tmp_path / "run"
    run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=20, seed=seed,
                      learning_rate=2e-2, rollout_dtype="bfloat16", precision="bfloat16", **TINY), reward=low_ids)
    steps = [m for m in read_metrics(run) if "reward" in m]
    first = sum(m["reward"] for m in steps[:3]) / 3
    last = sum(m["reward"] for m in steps[-3:]) / 3
    assert last >= 3 * first, (first, last)
    assert max(m["kl"] for m in steps) < 10.0


def test_a_reward_model_with_another_tokenizer_rescores_the_text_and_says_so_once(bpe_model_dir, sp_model_dir,
                                                                                  tmp_path, capsys):
    rm = make_reward_model(sp_model_dir, tmp_path / "sp_rm")
    prompts = write_prompts(tmp_path / "prompts.json", 8)
    run = tmp_path / "run"
    run_ppo(PpoConfig(model=str(bpe_model_dir), reward_model=str(rm), prompts=[str(prompts)], output=run, max_steps=2,
                      **{**TINY, "rollout_batch_size": 4}))
    err = capsys.readouterr().err
    assert err.count("the reward model's tokenizer differs from the policy's") == 1
    rewards = [m["reward"] for m in read_metrics(run) if "reward" in m]
    assert len(rewards) == 2 and all(math.isfinite(r) and r != 0.0 for r in rewards)


def test_the_reward_scorer_scores_in_the_policys_precision_in_rows_of_the_training(reward_model_dir, tmp_path):
    """train ppo scores answers under the policy's autocast (bf16 on a CPU with native bf16), in
    packed rows no longer than the training's: close to the fp32 scores, not the same numbers."""
    from vicuna_cli.train.ppo_session import RewardScorer

    config = PpoConfig(model=str(reward_model_dir), reward_model=str(reward_model_dir), prompts=["p"], output=tmp_path / "o",
                       **TINY)
    prompts = [[{"role": "user", "content": f"{text} #{i}"}] for i, text in enumerate(PROMPTS)]
    answers = [f"{PROMPTS[-1 - i]} and more" for i in range(len(PROMPTS))]
    fp32 = RewardScorer(config, None, False)
    bf16 = RewardScorer(config, None, False, mixed_precision="bf16")
    assert fp32.batch_tokens == bf16.batch_tokens == config.max_length
    exact, fast = fp32(prompts, answers, []), bf16(prompts, answers, [])
    assert exact != fast and fast == pytest.approx(exact, abs=0.05 * max(map(abs, exact)))


def test_ppo_raises_a_programmatic_reward_with_bounded_kl_and_the_run_dir_chats(bpe_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json")
    run = tmp_path / "run"
    # fp32 training and rollouts: the path this test was written on (bf16, the default on a CPU with
    # native bf16, has its own test above; one seed's outcome is a coin with a few % bias)
    result = run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=20,
                               learning_rate=2e-2, log_samples=5, rollout_dtype="float32", precision="float32", **TINY),
                     reward=low_ids)
    steps = [m for m in read_metrics(run) if "reward" in m]
    assert [m["step"] for m in steps] == list(range(1, 21)) and result.steps == 20
    first = sum(m["reward"] for m in steps[:3]) / 3
    last = sum(m["reward"] for m in steps[-3:]) / 3
    assert 0.05 < first < 0.2 and last >= 3 * first, (first, last)  # stated: x3 within 20 steps
    assert max(m["kl"] for m in steps) < 8.0  # stated: KL to the reference < 8 nats per 8-token answer
    for key in ("kl", "entropy", "value_loss", "clip_fraction", "rollout_tokens_per_s", "train_tokens_per_s"):
        assert all(math.isfinite(m[key]) for m in steps), key
    assert steps[0]["kl"] == 0.0 and steps[0]["kl_coef"] == 0.05  # the policy starts as the reference
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [5, 10, 15, 20]
    assert {"prompt", "answer", "reward"} <= set(samples[0])

    # The run dir is the policy's model dir: chat loads it (native path), the value head is not in it.
    from safetensors.torch import load_file

    from vicuna_cli.core import models

    assert not any(k.startswith("loss_fn") or "v_head" in k for k in load_file(run / "model.safetensors"))
    loaded = models.load(str(run), device="cpu", dtype="float32", implementation="native")
    base = load_file(bpe_model_dir / "model.safetensors")
    assert not torch.equal(loaded.model.lm_head.weight, base["lm_head.weight"])


def test_ppo_lora_reference_is_the_adapter_off_and_rollouts_follow_the_adapter(bpe_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from vicuna_cli.train.modeling import add_lora
    from vicuna_cli.train.rollout import native_policy

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    peft_model = add_lora(model, PpoConfig(model=str(bpe_model_dir), prompts=["x"], lora=True, lora_r=4, **TINY))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=x).logits
        got = native_policy(peft_model)(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # rollouts sample from the adapted policy
    assert not torch.allclose(got, base, atol=1e-3)


def test_ppo_lora_run_writes_an_adapter(bpe_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json", 8)
    run = tmp_path / "run"
    run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=2, lora=True,
                      lora_r=4, learning_rate=1e-2, ppo_epochs=2, **{**TINY, "rollout_batch_size": 4}), reward=low_ids)
    steps = [m for m in read_metrics(run) if "reward" in m]
    assert len(steps) == 2 and steps[0]["kl"] == 0.0 and steps[1]["kl"] != 0.0
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_reward_model_dir_that_is_not_one_is_a_clear_error(bpe_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json", 4)
    with pytest.raises(VicunaError, match="is not a reward model"):
        run_ppo(PpoConfig(model=str(bpe_model_dir), reward_model=str(bpe_model_dir), prompts=[str(prompts)],
                          output=tmp_path / "run", max_steps=1, **TINY))
    with pytest.raises(VicunaError, match="no reward model: pass --reward-model"):
        run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=tmp_path / "run2", **TINY))


def test_long_prompts_are_skipped_and_counted(bpe_model_dir, tmp_path):
    path = tmp_path / "prompts.json"
    rows = [{"id": "short", "conversations": [{"from": "human", "value": "Hello there"}]},
            {"id": "long", "conversations": [{"from": "human", "value": "Hello there, how are you? " * 30}]}]
    path.write_text(json.dumps(rows))
    run = tmp_path / "run"
    run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(path)], output=run, max_steps=1, **TINY), reward=low_ids)
    notes = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["data_notes"]
    assert notes == {"prompt longer than --max-length minus --max-new-tokens (skipped)": 1}
    with pytest.raises(VicunaError, match="no usable prompt"):
        run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(path)], output=tmp_path / "run2", max_steps=1,
                          **{**TINY, "max_new_tokens": 60}), reward=low_ids)


def test_nonfinite_rewards_skip_the_step_and_three_in_a_row_stop_with_a_checkpoint(bpe_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json", 8)
    calls = []

    def sometimes_nan(prompts, texts, answers):
        calls.append(1)
        return [math.nan if len(calls) == 2 else 0.5] * len(answers)

    run = tmp_path / "once"
    run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=3,
                      **{**TINY, "rollout_batch_size": 4}), reward=sometimes_nan)
    steps = [m for m in read_metrics(run) if m.get("step")]
    assert "skipped" in steps[1] and steps[1]["nonfinite_rewards"] == 4 and "skipped" not in steps[2]

    run = tmp_path / "always"
    with pytest.raises(VicunaError, match="at steps 1 to 3") as caught:
        run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=6,
                          **{**TINY, "rollout_batch_size": 4}), reward=lambda p, t, a: [math.inf] * len(a))
    assert "checkpoint saved to" in caught.value.message
    assert (run / "checkpoints" / "step-000003" / "method_state.json").is_file()


STEPS = 8
# One fixed torch thread count on both sides: the adaptive default (core/threads.py) may change it
# mid-run, and with it the order of float sums, which these exact comparisons must not see.
OPTIONS = {**TINY, "rollout_batch_size": 4, "max_steps": STEPS, "learning_rate": 1e-2, "ppo_epochs": 2,
           "save_every": 2, "keep_checkpoints": 3, "log_samples": 1, "threads": 1}


def ppo_losses(run: Path) -> list[tuple]:
    return [(m["loss"], m["reward"], m["kl"], m["kl_coef"]) for m in read_metrics(run) if "reward" in m]


def test_ppo_sigkill_then_resume_auto_gives_the_same_next_steps(bpe_model_dir, reward_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.json", 24)
    base = {"model": str(bpe_model_dir), "reward_model": str(reward_model_dir), "prompts": [str(prompts)], **OPTIONS}
    reference = tmp_path / "reference"
    run_ppo(PpoConfig(**base, output=reference))
    assert len(ppo_losses(reference)) == STEPS
    out = tmp_path / "killed"
    args = ["--reward-model", str(reward_model_dir), *flags(OPTIONS)]
    command = [sys.executable, "-m", "vicuna_cli", "train", "ppo", "-m", str(bpe_model_dir), "--prompts", str(prompts),
               "-o", str(out), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_then_resume(process, out, STEPS, lambda: run_ppo(PpoConfig(**base, output=out, resume="auto")))
    assert ppo_losses(out) == ppo_losses(reference)
    samples = lambda run: [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert samples(out) == samples(reference)


def test_a_nonfinite_loss_ends_the_step_and_it_is_skipped(bpe_model_dir, tmp_path, monkeypatch):
    from vicuna_cli.train import ppo

    prompts = write_prompts(tmp_path / "prompts.json", 8)
    step = []
    forward = ppo.PpoLoss.forward

    def poisoned(self, model, batch):
        loss, figures = forward(self, model, batch)
        return (loss * math.nan if len(step) == 2 else loss), figures

    def counting(prompts, texts, answers):
        step.append(1)
        return low_ids(prompts, texts, answers)

    monkeypatch.setattr(ppo.PpoLoss, "forward", poisoned)
    run = tmp_path / "run"
    run_ppo(PpoConfig(model=str(bpe_model_dir), prompts=[str(prompts)], output=run, max_steps=3, ppo_epochs=3,
                      **{**TINY, "rollout_batch_size": 4}), reward=counting)
    steps = [m for m in read_metrics(run) if m.get("step")]
    assert "skipped" not in steps[0] and steps[0]["updates"] == 3
    assert steps[1]["skipped"].startswith("non-finite loss") and steps[1]["updates"] == 1  # the rest not run
    assert "skipped" not in steps[2] and math.isfinite(steps[2]["loss"])


def test_rollout_model_shares_the_policy_tensors_and_bf16_is_a_copy(bpe_model_dir):
    from transformers import AutoModelForCausalLM

    from vicuna_cli.train.rollout import native_policy

    policy = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    shared = native_policy(policy)
    weight = policy.model.layers[0].self_attn.o_proj.weight
    assert shared.model.layers[0].self_attn.o_proj.weight.data_ptr() == weight.data_ptr()  # no copy
    x = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        want = policy(input_ids=x).logits
        torch.testing.assert_close(shared(input_ids=x, use_cache=False).logits, want, rtol=1e-4, atol=1e-5)
        weight.add_(0.5)  # what an optimizer step does in place: the rollout model sees it without a rebuild
        moved = policy(input_ids=x).logits
        torch.testing.assert_close(shared(input_ids=x, use_cache=False).logits, moved, rtol=1e-4, atol=1e-5)
        copy = native_policy(policy, torch.bfloat16)
        assert copy.model.embed_tokens.weight.dtype == torch.bfloat16
        torch.testing.assert_close(copy(input_ids=x, use_cache=False).logits.float(), moved, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("native_bf16, requested, policy, want", [
    (True, "auto", torch.float32, torch.bfloat16),   # fp32 policy on a bf16 CPU: sample from a bf16 copy
    (False, "auto", torch.float32, None),            # no native bf16: the policy's own tensors
    (True, "auto", torch.bfloat16, None),            # already bf16: nothing to copy
    (True, "float32", torch.float32, None),          # its own dtype by name: shared, no copy
    (False, "bfloat16", torch.float32, torch.bfloat16),  # asked for: honoured everywhere
])
def test_rollout_sampling_dtype(monkeypatch, native_bf16, requested, policy, want):
    from vicuna_cli.core import placement
    from vicuna_cli.train.rollout import sampling_dtype

    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: native_bf16)
    assert sampling_dtype(requested, policy, torch.device("cpu")) == want


def test_every_ppo_option_has_one_flag_and_no_default_of_its_own():
    """`train ppo`'s flags are derived from PpoConfig (tests/test_options.py checks defaults and help
    for every command); here: the SFT-only fields of the shared config are not PPO flags."""
    import typer

    from vicuna_cli.cli import app

    ppo = typer.main.get_command(app).commands["train"].commands["ppo"]
    params = {p.name: p for p in ppo.params if p.name != "help"}
    not_ppo = {"data", "eval_split", "eval_data", "eval_every", "global_batch_size", "global_batch_tokens"}
    assert set(PpoConfig.model_fields) - not_ppo <= set(params)  # every PPO option is a flag
    assert not not_ppo & set(params)
    assert all(params[name].default == PpoConfig.model_fields[name].default
               for name in set(PpoConfig.model_fields) - not_ppo
               if not PpoConfig.model_fields[name].is_required() and PpoConfig.model_fields[name].default_factory is None)
    assert "--data" not in [opt for p in params.values() for opt in p.opts]


@pytest.mark.slow
def test_ppo_two_gloo_processes_match_one_process(bpe_model_dir, reward_model_dir, tmp_path):
    from processes import free_port

    prompts = write_prompts(tmp_path / "prompts.json", 8)
    options = {**TINY, "rollout_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "ppo_epochs": 2,
               "micro_batch_tokens": 64}
    single = tmp_path / "single"
    run_ppo(PpoConfig(model=str(bpe_model_dir), reward_model=str(reward_model_dir), prompts=[str(prompts)],
                      output=single, **options))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vicuna_cli", "train", "ppo", "-m", str(bpe_model_dir),
               "--reward-model", str(reward_model_dir), "--prompts", str(prompts), "-o", str(double), "--device", "cpu",
               *flags(options)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert yaml.safe_load((double / "config.yaml").read_text())["resolved"]["processes"] == 2
    one, two = read_metrics(single), read_metrics(double)
    for key in ("reward", "kl", "loss", "value_loss", "clip_fraction"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-6), key
