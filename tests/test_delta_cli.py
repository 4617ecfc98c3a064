"""`vicuna apply-delta` / `make-delta` / `merge-lora` as a user runs them: stdout carries only the
output path, errors are one line with exit 1, flags validated by name, and a run killed midway
(SIGKILL) leaves no target behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vicuna_cli.core.config import build_config
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.delta import DeltaConfig, run


def vicuna(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vicuna_cli", *args], capture_output=True, text=True, timeout=300)


def weights_dir(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A model directory as far as apply-delta cares: weights, config.json, a tokenizer file."""
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def random_tensors(count: int, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(shape, generator=generator) for i in range(count)}


def test_help_lists_the_commands_and_the_vocab_rule():
    listed = vicuna("--help")
    assert all(name in listed.stdout for name in ("apply-delta", "make-delta", "merge-lora"))
    shown = vicuna("apply-delta", "--help").stdout
    assert "rows beyond the base vocabulary" in " ".join(shown.split())


def test_make_delta_then_apply_delta_from_a_config_file(tmp_path):
    tensors = random_tensors(3, (64, 32), seed=1)
    base = weights_dir(tmp_path / "base", tensors)
    tuned = {name: t + 0.01 * n for (name, t), n in zip(tensors.items(), random_tensors(3, (64, 32), seed=2).values())}
    target = weights_dir(tmp_path / "target", tuned)
    made = vicuna("make-delta", "--base", str(base), "--target", str(target), "-o", str(tmp_path / "delta"))
    assert made.returncode == 0, made.stderr
    assert made.stdout == f"{tmp_path / 'delta'}\n"  # results only
    assert "make-delta done" in made.stderr and "exact: base + delta gives the target bit for bit" in made.stderr
    options = tmp_path / "apply.yaml"
    options.write_text(f"base: {base}\ndelta: {tmp_path / 'delta'}\nmax-shard-size: 10KB\n")
    applied = vicuna("apply-delta", "--config", str(options), "-o", str(tmp_path / "out"))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == f"{tmp_path / 'out'}\n"
    assert "apply-delta: 3/3 tensors" in applied.stderr and "3 added" in applied.stderr
    shards = sorted((tmp_path / "out").glob("model-0000*-of-00003.safetensors"))
    got = {k: v for shard in shards for k, v in load_file(shard).items()}
    want = load_file(target / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_errors_are_one_line_and_exit_1(tmp_path):
    base = weights_dir(tmp_path / "base", random_tensors(1, (4, 4), seed=1))
    result = vicuna("merge-lora", "--base", str(base), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: give --delta DELTA to apply a delta, --lora ADAPTER to merge an adapter")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    ({"base": "b", "output": "o"}, "give --delta DELTA to apply a delta"),
    ({"base": "b", "delta": "d", "target": "t", "output": "o"}, "--target is only for --make"),
    ({"base": "b", "delta": "d", "output": "o", "make": True}, "--make computes a delta"),
    ({"base": "b", "lora": "a", "target": "t", "output": "o"}, "--lora merges an adapter"),
    ({"base": "b", "delta": "d", "output": "o", "max_shard_size": "5XB"}, "--max-shard-size: .*'5XB' is not a size"),
    ({"base": "b", "delta": "d", "output": "o", "dtype": "fp8"}, "--dtype: "),
    ({"delta": "d", "output": "o"}, "--base: Field required"),
])
def test_flag_validation_names_the_flag(flags, message):
    with pytest.raises(VicunaError, match=message):
        build_config(DeltaConfig, flags)


def test_sigkill_midway_leaves_no_target_and_the_next_run_cleans_up(tmp_path):
    # 64 tensors of 2 MB in 2 MB shards, each fsynced: the run outlives its first shard file.
    base = weights_dir(tmp_path / "base", random_tensors(64, (512, 1024), seed=1))
    delta = weights_dir(tmp_path / "delta", random_tensors(64, (512, 1024), seed=2))
    out = tmp_path / "target"
    args = ["apply-delta", "--base", str(base), "--delta", str(delta), "-o", str(out), "--max-shard-size", "2MB"]
    child = subprocess.Popen([sys.executable, "-m", "vicuna_cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in child.stderr:  # the first progress line: the work has started
        if line.startswith("apply-delta: 1/64 tensors") or time.monotonic() > deadline:
            break
    while not list(tmp_path.glob(".target.*.partial/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.001)  # ... and the first shard is being written
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed midway"
    assert not out.exists()
    leftovers = list(tmp_path.glob(".target.*.partial"))
    assert len(leftovers) == 1 and list(leftovers[0].glob("*.safetensors"))
    assert not (leftovers[0] / "config.json").exists()  # and nothing there looks like a model
    assert not (leftovers[0] / "model.safetensors.index.json").exists()

    result = run(DeltaConfig(base=str(base), delta=str(delta), output=out, max_shard_size="2MB"))
    assert not leftovers[0].exists() and result.counts == {"added": 64}
    first = load_file(out / "model-00001-of-00064.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    expected = load_file(base / "model.safetensors")[name] + load_file(delta / "model.safetensors")[name]
    assert torch.equal(first[name], expected)
