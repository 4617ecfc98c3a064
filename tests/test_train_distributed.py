"""A real 2-process CPU run (gloo, DDP through accelerate) equals a 1-process run with the same
global batch: same per-step losses and the same final weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import flags, write_data

from vicuna_cli.train.config import TrainConfig
from vicuna_cli.train.launch import launch_command, strip_flags
from vicuna_cli.train.rundir import read_metrics
from vicuna_cli.train.sft import run_sft

from processes import free_port

# One fixed torch thread count on both sides: the adaptive default (core/threads.py) may change it
# mid-run, and with it the order of float sums, which these exact comparisons must not see.
OPTIONS = {"max_length": 256, "global_batch_size": 8, "max_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0,
           "save_every": 2, "log_every": 1, "eval_split": 0.1, "eval_every": 2, "threads": 1,
           "precision": "float32"}  # exact sums across process counts


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(sp_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_data(tmp_path / "data.json", n=30, seed=2)
    single = tmp_path / "single"
    run_sft(TrainConfig(model=str(sp_model_dir), data=[str(data)], output=single, **OPTIONS))
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "vicuna_cli", "train", "sft", "-m", str(sp_model_dir),
               "--data", str(data), "-o", str(double), "--device", "cpu", *flags(OPTIONS)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    resolved = yaml.safe_load((double / "config.yaml").read_text())["resolved"]
    assert resolved["processes"] == 2 and resolved["distributed"] == "DistributedType.MULTI_CPU"
    one, two = read_metrics(single), read_metrics(double)
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for key in ("loss", "eval_loss"):
        values = [m[key] for m in one if key in m]
        assert len(values) == {"loss": 4, "eval_loss": 3}[key]
        assert [m[key] for m in two if key in m] == pytest.approx(values, rel=1e-6), key
    assert [m["supervised_tokens"] for m in two if "loss" in m] == [m["supervised_tokens"] for m in one if "loss" in m]
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert sorted(p.name for p in (double / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert {p.name for p in (double / "checkpoints" / "step-000004").iterdir()} >= {
        "random_states_0.pkl", "random_states_1.pkl", "COMPLETE.json", "trainer_state.json", "optimizer.bin"}


def test_accelerate_config_relaunches_the_same_command(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    argv = ["train", "sft", "-m", "M", "--accelerate-config", str(config), "--num-processes=8", "--data", "d.json"]
    assert strip_flags(argv) == ["train", "sft", "-m", "M", "--data", "d.json"]
    command = launch_command(config, 8, argv)
    assert command[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "8",
                           "-m", "vicuna_cli", "train", "sft", "-m", "M", "--data", "d.json"]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).parent.parent / "recipes" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "fsdp":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
