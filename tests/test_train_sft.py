"""`vicuna train sft` end to end on the tiny fixture models: run dir, metrics, losses, LoRA,
the trained model in `vicuna chat`, and every bad input of the issue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import sft_config, write_data
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.train.rundir import read_metrics
from vicuna_cli.train.sft import run_sft


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.json")


@pytest.fixture(scope="module")
def finished_run(sp_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_sft(sft_config(sp_model_dir, data, out, max_steps=8, eval_split=0.2, eval_every=4))
    return out, result


def test_run_dir_holds_config_metrics_and_a_hf_model(finished_run):
    out, result = finished_run
    document = yaml.safe_load((out / "config.yaml").read_text())
    assert document["train"]["max_steps"] == 8 and document["train"]["global_batch_size"] == 4
    assert document["resolved"]["template"] == "vicuna_v1.1" and document["resolved"]["total_steps"] == 8
    assert document["resolved"]["attention"] == "sdpa"
    assert {"torch", "transformers", "accelerate", "vicuna-cli", "python"} <= set(document["versions"])
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    for m in steps:
        assert {"lr", "grad_norm", "tokens_per_s", "supervised_tokens", "tokens"} <= set(m)
        assert 0 < m["supervised_tokens"] < m["tokens"]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8, 8]  # every 4 steps, then the final eval
    assert result.eval_samples == 5 and result.samples == 19
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()


def test_trained_model_loads_into_vicuna_chat(finished_run, sp_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna_cli.core.templates import get_template

    out, _ = finished_run
    trained, base = load_file(out / "model.safetensors"), load_file(sp_model_dir / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    result = CliRunner().invoke(app, ["chat", "-m", str(out), "-p", "Hi there", "--temperature", "0",
                                      "--max-new-tokens", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    # the same greedy answer as transformers gives with the trained weights
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = get_template("vicuna_v1.1").render([{"role": "user", "content": "Hi there"}]).text
    ids = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert answer["stats"]["prompt_tokens"] == ids["input_ids"].shape[1]
    assert answer["answer"].strip() == tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_the_cli_prints_greppable_lines(sp_model_dir, data, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["train", "sft", "-m", str(sp_model_dir), "--data", str(data), "-o", str(out),
                                      "--max-length", "256", "--max-steps", "2", "--global-batch-size", "4",
                                      "--log-every", "1", "--no-packing", "--micro-batch-size", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all("| tokens/s " in line and "| supervised " in line and "| loss " in line for line in lines)
    assert result.stdout.strip() == str(out)


def test_a_config_recipe_with_flags_overriding_it(sp_model_dir, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {sp_model_dir}\ndata: [{data}]\nmax-length: 256\nglobal_batch_size: 4\nmax_steps: 3\n")
    out = tmp_path / "recipe-run"
    result = CliRunner().invoke(app, ["train", "sft", "--config", str(recipe), "-o", str(out), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (train["max_steps"], train["global_batch_size"], train["max_length"]) == (1, 4, 256)
    assert [m["step"] for m in read_metrics(out)] == [1]


def test_gradient_checkpointing_and_kernels_off_give_the_same_losses(sp_model_dir, data, tmp_path, finished_run):
    reference = [m["loss"] for m in read_metrics(finished_run[0]) if "loss" in m][:4]
    for name, extra in (("gc", {"gradient_checkpointing": True}), ("plain", {"kernels": "off"})):
        run_sft(sft_config(sp_model_dir, data, tmp_path / name, eval_split=0.2, **extra))
        losses = [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m]
        assert losses == pytest.approx(reference, rel=1e-5), name


def test_lora_writes_an_adapter_and_merges(sp_model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run_sft(sft_config(sp_model_dir, data, out, lora=True, merge=True, lora_r=4, lora_dropout=0.0, max_steps=3))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sp_model_dir, dtype=torch.float32), out / "adapter")
    ids = torch.tensor([[1, 30, 40, 50, 60]])
    with torch.no_grad():
        expected, got = peft(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(sp_model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-4)  # training changed the adapter


# --- bad input ----------------------------------------------------------------------------------


def test_an_output_dir_with_another_run_is_refused(sp_model_dir, data, finished_run, tmp_path):
    out, _ = finished_run
    with pytest.raises(VicunaError, match="holds another run") as info:
        run_sft(sft_config(sp_model_dir, data, out))
    assert "--resume auto" in info.value.hint and "--overwrite" in info.value.hint
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(VicunaError, match="not empty and holds no vicuna run"):
        run_sft(sft_config(sp_model_dir, data, stranger, overwrite=True))
    assert (stranger / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "checkpoints").mkdir(exist_ok=True)
    (again / "checkpoints" / "leftover").mkdir()
    run_sft(sft_config(sp_model_dir, data, again, max_steps=1, overwrite=True))
    assert not (again / "checkpoints" / "leftover").exists()
    assert [m["step"] for m in read_metrics(again)] == [1]


def test_max_length_beyond_the_models_positions(sp_model_dir, data, tmp_path):
    with pytest.raises(VicunaError, match=r"--max-length 4096 is beyond this model's 256 positions"):
        run_sft(sft_config(sp_model_dir, data, tmp_path / "r", max_length=4096))


def test_tokenizer_and_model_vocab_sizes_that_disagree(sp_model_dir, data, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = tmp_path / "small"
    shutil.copytree(sp_model_dir, small)
    cfg = AutoConfig.from_pretrained(small)
    cfg.vocab_size = 300
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    with pytest.raises(VicunaError, match=r"the tokenizer has 400 tokens but the model's embedding has 300 rows"):
        run_sft(sft_config(small, data, tmp_path / "r"))


def test_data_without_supervised_tokens(sp_model_dir, data, tmp_path):
    with pytest.raises(VicunaError, match=r"no training sample has a supervised token .*--max-length 20") as info:
        run_sft(sft_config(sp_model_dir, data, tmp_path / "r", max_length=20))
    assert "no assistant turn ends within --max-length: 24" in info.value.message
    only_users = tmp_path / "users.jsonl"
    only_users.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(VicunaError, match=r"no assistant turn: 1"):
        run_sft(sft_config(sp_model_dir, only_users, tmp_path / "r2"))


def test_flag_errors_name_the_flag(sp_model_dir, data, tmp_path):
    runner = CliRunner()
    base = ["train", "sft", "-m", str(sp_model_dir), "--data", str(data), "-o", str(tmp_path / "x")]
    both = runner.invoke(app, base + ["--global-batch-size", "4", "--global-batch-tokens", "4096"])
    assert both.exit_code != 0 and "not both" in str(both.exception)
    merge = runner.invoke(app, base + ["--merge"])
    assert "--merge merges a LoRA adapter" in str(merge.exception)
    with pytest.raises(VicunaError, match="unknown template 'nope'"):
        run_sft(sft_config(sp_model_dir, data, tmp_path / "t", template="nope"))


def test_qlora_and_flash_attention_are_refused_clearly_without_their_hardware(sp_model_dir, data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it now fails, as when not installed
    with pytest.raises(VicunaError, match=r"--qlora needs a CUDA GPU") as info:
        run_sft(sft_config(sp_model_dir, data, tmp_path / "q", qlora=True))
    assert "--lora" in info.value.hint
    with pytest.raises(VicunaError, match=r"'flash_attn' is not installed \(needed for --attention flash_attention_2\)"):
        run_sft(sft_config(sp_model_dir, data, tmp_path / "f", attention="flash_attention_2"))


def test_timed_checkpoints_keep_the_last_k(sp_model_dir, data, tmp_path):
    out = tmp_path / "timed"
    run_sft(sft_config(sp_model_dir, data, out, max_steps=3, save_every_minutes=1e-6, keep_checkpoints=2))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000003"]
    manifest = json.loads((out / "checkpoints" / "step-000003" / "COMPLETE.json").read_text())
    assert manifest["step"] == 3
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(manifest["files"])
    assert json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())["global_step"] == 3


def test_a_fixed_template_is_recorded_so_chat_uses_it(sp_model_dir, data, tmp_path):
    """Trained with --template alpaca, the model must chat in alpaca, not in the default vicuna_v1.1."""
    from vicuna_cli.core import models

    out = tmp_path / "alpaca-run"
    result = run_sft(sft_config(sp_model_dir, data, out, max_steps=1, template="alpaca"))
    assert models.TEMPLATE_RECORD in result.files
    assert models.resolve(str(out)).template == "alpaca"
    assert models.resolve(str(sp_model_dir)).template is None  # a plain model dir carries no record
    (out / models.TEMPLATE_RECORD).write_text("{not json")
    with pytest.raises(VicunaError, match="not valid JSON"):
        models.resolve(str(out))


@pytest.mark.parametrize("native_bf16, device, want", [
    (True, "cpu", "bf16"),    # AVX512-BF16/AMX: bf16 mixed precision (matmuls ~2x faster, BENCHMARKS.md)
    (False, "cpu", "no"),     # emulated bf16 would be slower than fp32: plain fp32
])
def test_auto_precision_follows_the_devices_native_bf16(monkeypatch, native_bf16, device, want):
    from vicuna_cli.core import placement
    from vicuna_cli.train.modeling import resolve_precision

    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", device) == want
    assert resolve_precision("float32", device) == "no" and resolve_precision("bfloat16", device) == "bf16"


def test_bf16_then_fp32_runs_in_one_process_and_bf16_learns(sp_model_dir, data, tmp_path):
    """accelerate keeps one process-wide precision; a second run asking for another one must not
    fail (sft._forget_other_precision). The bf16 run (autocast over fp32 master weights, what
    `auto` picks on a CPU with native bf16) lowers the loss and saves fp32 weights."""
    from safetensors.torch import load_file

    bf16 = tmp_path / "bf16"
    run_sft(sft_config(sp_model_dir, data, bf16, precision="bfloat16", max_steps=8))
    losses = [m["loss"] for m in read_metrics(bf16) if "loss" in m]
    assert yaml.safe_load((bf16 / "config.yaml").read_text())["resolved"]["mixed_precision"] == "bf16"
    assert losses[-1] < losses[0], losses
    assert {t.dtype for t in load_file(bf16 / "model.safetensors").values()} == {torch.float32}
    run_sft(sft_config(sp_model_dir, data, tmp_path / "fp32"))
    assert yaml.safe_load((tmp_path / "fp32" / "config.yaml").read_text())["resolved"]["mixed_precision"] == "no"
