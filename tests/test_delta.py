"""`vicuna apply-delta` / make-delta / merge-lora through the Python API (vicuna_cli.delta).

Tiny random Llama models: a base, a "fine-tuned" target with one added vocabulary row (like
StableVicuna's [PAD]), and the delta between them, each sharded differently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.delta import DeltaConfig, run


def _llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def save_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int, fmt: str = "safetensors") -> None:
    """Write `tensors` as `shards` files with an index, split at other places than transformers does."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    prefix, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(shards):
        file = f"{prefix}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, directory / file) if fmt == "safetensors" else torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / f"{prefix}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def copy_side_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.suffix not in (".safetensors", ".bin") and not path.name.endswith(".index.json"):
            shutil.copy(path, dst / path.name)


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory, sp_model_dir) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("delta")
    tokenizer = AutoTokenizer.from_pretrained(sp_model_dir)
    vocab = len(tokenizer)
    base = _llama(vocab, seed=3)
    base.save_pretrained(root / "base", max_shard_size="40KB")
    tokenizer.save_pretrained(root / "base")

    # The "fine-tune": every weight moves a little and one token is added (StableVicuna's [PAD]).
    torch.manual_seed(4)
    weights = {k: v + torch.randn_like(v) * 0.01 for k, v in base.state_dict().items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = torch.cat([weights[name], torch.randn(1, 32) * 0.02])
    target = _llama(vocab + 1, seed=0)
    target.load_state_dict(weights)
    target.save_pretrained(root / "target", max_shard_size="100KB")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(root / "target")

    # The delta as FastChat published it, but in fp32 and sharded in three, against base's five.
    base_sd = base.state_dict()
    delta = {}
    for name, t in weights.items():
        d = t.clone()
        d[: base_sd[name].shape[0]] -= base_sd[name]
        delta[name] = d
    save_shards(delta, root / "delta", 3)
    copy_side_files(root / "target", root / "delta")
    (root / "delta" / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    return {"root": root, "base": root / "base", "target": root / "target", "delta": root / "delta",
            "vocab": vocab}


def apply(models, out: Path, **options) -> object:
    return run(DeltaConfig(base=str(models["base"]), delta=str(options.pop("delta", models["delta"])),
                           output=out, **options))


def test_apply_adds_in_fp32_and_takes_the_new_vocab_row_from_the_delta(models, tmp_path):
    out = tmp_path / "vicuna"
    result = apply(models, out)
    got, want = load_dir(out), load_dir(models["target"])
    assert set(got) == set(want)
    for name in want:  # the fp32 round trip is bit-exact
        assert torch.equal(got[name], want[name]), name
    vocab = models["vocab"]
    delta = {}
    for file in models["delta"].glob("*.safetensors"):
        delta.update(load_file(file))
    assert torch.equal(got["lm_head.weight"][vocab:], delta["lm_head.weight"][vocab:])
    assert sorted(result.resized) == [f"lm_head.weight: {vocab} -> {vocab + 1} rows (new rows from the delta)",
                                      f"model.embed_tokens.weight: {vocab} -> {vocab + 1} rows (new rows from the delta)"]
    assert result.counts == {"added": len(want)}
    # config and tokenizer come from the delta; its Python file does not
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 1
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"
    assert not list(out.glob("*.py"))
    # every written file is in the manifest with its true sha256
    manifest = json.loads((out / "vicuna-manifest.json").read_text())
    assert manifest["operation"] == "apply-delta" and manifest["config"]["dtype"] == "auto"
    on_disk = {p.name for p in out.iterdir()} - {"vicuna-manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
        assert (out / name).stat().st_size == entry["bytes"]
    assert not [p for p in tmp_path.iterdir() if p.name != "vicuna"]  # no temp dir left


def test_max_shard_size_splits_the_output(models, tmp_path):
    out = tmp_path / "sharded"
    result = apply(models, out, max_shard_size="30KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == len(result.files) > 3
    for shard in shards:  # a shard exceeds the limit only when one tensor alone does
        tensors = load_file(shard)
        assert shard.stat().st_size < 30_000 + 2_000 or len(tensors) == 1
    assert load_dir(out).keys() == load_dir(models["target"]).keys()


def test_bin_inputs_give_the_same_model(models, tmp_path, monkeypatch):
    from vicuna_cli.delta import shards

    monkeypatch.setattr(shards, "REMAP_BYTES", 0)  # remap the .bin for every tensor: exercises the reload
    base_bin, delta_bin = tmp_path / "base-bin", tmp_path / "delta-bin"
    save_shards(load_dir(models["base"]), base_bin, 2, fmt="bin")
    delta_bin.mkdir()
    delta = {}
    for file in models["delta"].glob("*.safetensors"):
        delta.update(load_file(file))
    torch.save(delta, delta_bin / "pytorch_model.bin")  # a single file, no index
    copy_side_files(models["base"], base_bin)
    copy_side_files(models["delta"], delta_bin)
    run(DeltaConfig(base=str(base_bin), delta=str(delta_bin), output=tmp_path / "out"))
    got, want = load_dir(tmp_path / "out"), load_dir(models["target"])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_make_delta_round_trip_is_bit_exact_in_fp32(models, tmp_path):
    made = run(DeltaConfig(base=str(models["base"]), target=str(models["target"]), make=True,
                           output=tmp_path / "delta", max_shard_size="50KB"))
    assert made.inexact == 0 and made.counts == {"subtracted": len(load_dir(models["target"]))}
    delta, target = load_dir(tmp_path / "delta"), load_dir(models["target"])
    vocab = models["vocab"]
    assert torch.equal(delta["lm_head.weight"][vocab:], target["lm_head.weight"][vocab:])
    apply(models, tmp_path / "back", delta=tmp_path / "delta")
    back = load_dir(tmp_path / "back")
    assert all(torch.equal(back[n], target[n]) for n in target)
    # cast at the end only: bf16 output is exactly the fp32 target rounded once
    apply(models, tmp_path / "bf16", delta=tmp_path / "delta", dtype="bf16")
    bf16 = load_dir(tmp_path / "bf16")
    assert all(torch.equal(bf16[n], target[n].to(torch.bfloat16)) for n in target)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_make_delta_in_fp16_reports_what_will_not_come_back(models, tmp_path):
    made = run(DeltaConfig(base=str(models["base"]), target=str(models["target"]), make=True,
                           output=tmp_path / "delta16", dtype="fp16"))
    assert made.inexact > 0
    apply(models, tmp_path / "back", delta=tmp_path / "delta16", dtype="fp32")
    back, target = load_dir(tmp_path / "back"), load_dir(models["target"])
    differing = sum(int((back[n] != target[n]).sum()) for n in target)
    assert differing == made.inexact
    assert all(torch.allclose(back[n], target[n], atol=1e-4) for n in target)


def test_merged_model_generates_like_the_target(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    apply(models, tmp_path / "vicuna")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "vicuna")
    ids = tokenizer("Hello there, the capital of France is", return_tensors="pt").input_ids
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "vicuna", dtype=torch.float32).eval()
    want = AutoModelForCausalLM.from_pretrained(models["target"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(got.generate(ids, **kwargs), want.generate(ids, **kwargs))


# ---------------------------------------------------------------------------------------------
# --check


def test_check_against_the_expected_model_and_against_sha256_sums(models, tmp_path):
    first = apply(models, tmp_path / "a", check=str(models["target"]))
    assert first.check == f"all {len(load_dir(models['target']))} tensors identical to {models['target']}"
    manifest = tmp_path / "a" / "vicuna-manifest.json"
    files = json.loads(manifest.read_text())["files"]
    sums = tmp_path / "SHA256SUMS"  # the `sha256sum` format a publisher would post
    sums.write_text("".join(f"{entry['sha256']}  {name}\n" for name, entry in files.items()))
    assert apply(models, tmp_path / "b", check=str(sums)).check == f"{len(files)} file(s) match the sha256 sums in {sums}"
    assert apply(models, tmp_path / "c", check=str(manifest)).check == f"{len(files)} file(s) match the sha256 sums in {manifest}"


def test_check_failure_names_the_tensors_and_leaves_nothing(models, tmp_path, capsys):
    with pytest.raises(VicunaError, match=r"check failed: \d+ mismatch"):
        apply(models, tmp_path / "out", check=str(models["base"]))  # the base is not the target
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and "shape [" in err and "values differ" in err
    assert list(tmp_path.iterdir()) == []
    sums = tmp_path / "sums.txt"
    sums.write_text("0" * 64 + "  model.safetensors\n")
    with pytest.raises(VicunaError, match="check failed"):
        apply(models, tmp_path / "out", check=str(sums))
    assert "sha256 differs; holds" in capsys.readouterr().err and not (tmp_path / "out").exists()
    sums.write_text("0" * 64 + "  pytorch_model-00001-of-00002.bin\n")
    with pytest.raises(VicunaError, match="none of the 1 files listed"):
        apply(models, tmp_path / "out", check=str(sums))


# ---------------------------------------------------------------------------------------------
# Bad input: each gets one clear error, and nothing is left behind


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_is_not_weights_only_is_refused_unopened(models, tmp_path):
    delta = tmp_path / "evil-delta"
    delta.mkdir()
    copy_side_files(models["delta"], delta)
    marker = tmp_path / "pwned"
    torch.save({"lm_head.weight": torch.zeros(2, 2), "payload": Evil(marker)}, delta / "pytorch_model.bin")
    with pytest.raises(VicunaError, match="refusing to load .*pytorch_model.bin: it is a pickle that holds more than tensors"):
        apply(models, tmp_path / "out", delta=delta)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("side", ["delta", "base"])
def test_a_missing_tensor_is_named(models, tmp_path, side):
    tensors = load_dir(models["target"]) if side == "delta" else load_dir(models["base"])
    del tensors["model.layers.1.mlp.down_proj.weight"]
    broken = tmp_path / side
    save_shards(tensors, broken, 2)
    copy_side_files(models[side], broken)
    paths = {"base": models["base"], "delta": models["delta"], side: broken}
    with pytest.raises(VicunaError) as info:
        run(DeltaConfig(base=str(paths["base"]), delta=str(paths["delta"]), output=tmp_path / "out"))
    assert f"the {side} is missing 1 tensor(s)" in info.value.message
    assert "model.layers.1.mlp.down_proj.weight" in info.value.message
    assert not (tmp_path / "out").exists()


def test_a_tensor_in_two_shards_is_refused(models, tmp_path):
    broken = tmp_path / "dup"
    broken.mkdir()
    tensors = {}
    for file in models["delta"].glob("*.safetensors"):
        tensors.update(load_file(file))
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:10]}, broken / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[9:]}, broken / "model-00002-of-00002.safetensors")  # overlap: names[9]
    copy_side_files(models["delta"], broken)
    with pytest.raises(VicunaError, match=rf"tensor {names[9]} of the delta appears in two shards"):
        apply(models, tmp_path / "out", delta=broken)


def test_an_index_naming_a_missing_shard_is_refused(models, tmp_path):
    broken = tmp_path / "partial"
    shutil.copytree(models["delta"], broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(VicunaError, match="the delta is incomplete: .* lists 1 shard"):
        apply(models, tmp_path / "out", delta=broken)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_truncated_shard_is_refused(models, tmp_path, fmt):
    broken = tmp_path / "cut"
    save_shards(load_dir(models["base"]), broken, 2, fmt=fmt)
    copy_side_files(models["base"], broken)
    shard = next(broken.glob(f"*-00002-of-00002.{fmt}"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(VicunaError, match="truncated"):
        run(DeltaConfig(base=str(broken), delta=str(models["delta"]), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_shape_mismatch_other_than_vocab_rows_names_the_tensor_and_both_shapes(models, tmp_path):
    tensors = load_dir(models["target"])
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]
    broken = tmp_path / "odd"
    save_shards(tensors, broken, 1)
    copy_side_files(models["delta"], broken)
    with pytest.raises(VicunaError, match=r"shape mismatch for model.layers.0.mlp.up_proj.weight: base \[64, 32\], delta \[65, 32\]"):
        apply(models, tmp_path / "out", delta=broken)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-2]  # fewer rows than the base: not an added token
    save_shards(tensors, broken, 1)
    with pytest.raises(VicunaError, match=r"shape mismatch for lm_head.weight"):
        apply(models, tmp_path / "out", delta=broken)


def test_an_existing_target_needs_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VicunaError, match="already exists") as info:
        apply(models, out)
    assert "--overwrite" in info.value.hint and (out / "keep.txt").read_text() == "mine"
    apply(models, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(VicunaError, match="would replace the base"):
        run(DeltaConfig(base=str(models["base"]), delta=str(models["delta"]), output=models["base"], overwrite=True))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs when this process may mount one (root), so the kernel itself says ENOSPC;
    otherwise None, and the test makes fsync fail with ENOSPC (where delayed allocation reports it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode == 0
    yield mount if mounted else None
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_refused_before_writing(models, tmp_path, small_disk, monkeypatch):
    if small_disk is None:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 4096, free=4096))
    where = small_disk or tmp_path
    with pytest.raises(VicunaError, match=r"not enough free space in .*: the output needs .* is free"):
        apply(models, where / "out")
    assert list(where.iterdir()) == []


def test_a_disk_that_fills_up_midway_leaves_nothing(models, tmp_path, small_disk, monkeypatch):
    from vicuna_cli.delta import apply as apply_module, writer

    monkeypatch.setattr(apply_module, "_require_free_space", lambda output, needed: None)
    if small_disk is None:
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer.os, "fsync", full)
    where = small_disk or tmp_path
    with pytest.raises(VicunaError, match=r"the disk is full: writing to .* failed after .* of .*") as info:
        apply(models, where / "out", max_shard_size="20KB")
    assert "free at least" in info.value.hint
    assert list(where.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# LoRA merge, checked against peft's own merge_and_unload


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "alpha_pattern": {"v_proj": 32}}],
                         ids=["alpha-over-r", "rslora-and-alpha-pattern"])
def test_lora_merge_matches_peft(models, tmp_path, options):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], init_lora_weights=False, **options)
    torch.manual_seed(5)
    peft_model = get_peft_model(base, config)  # init_lora_weights=False: B is random, not zero
    head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn_like(head) * 0.01)  # a trained modules_to_save copy replaces the base's
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()

    result = run(DeltaConfig(base=str(models["base"]), lora=str(tmp_path / "adapter"), output=tmp_path / "out"))
    # merged: q/v/down_proj of 2 layers + the embedding; replaced: lm_head; kept: the other 13 of 21
    assert result.counts == {"kept": 13, "merged": 7, "replaced": 1}
    got, want = load_dir(tmp_path / "out"), merged.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # bit-exact: the same fp32 operations as peft
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, merged(ids).logits)



def test_lora_merge_of_a_fan_in_fan_out_model_matches_peft(tmp_path):
    """GPT-2 stores its linear layers transposed (Conv1D): peft sets fan_in_fan_out and the update
    is merged transposed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(6)
    GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "tokenizer.json").write_text("{}")  # resolution wants a tokenizer file
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), LoraConfig(
        r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.merge_and_unload().state_dict()
    result = run(DeltaConfig(base=str(tmp_path / "gpt2"), lora=str(tmp_path / "adapter"), output=tmp_path / "out"))
    assert result.counts["merged"] == 4
    got = load_dir(tmp_path / "out")
    for name in got:  # lm_head is tied to wte, so only wte is saved
        assert torch.equal(got[name], want[name]), name

def test_unsupported_or_broken_adapters_are_refused(models, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
              adapter / "adapter_model.safetensors")
    merge = DeltaConfig(base=str(models["base"]), lora=str(adapter), output=tmp_path / "out")
    with pytest.raises(VicunaError, match="is a DoRA adapter"):
        run(merge)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VicunaError, match="holds only lora_A for model.layers.0.self_attn.q_proj"):
        run(merge)
    save_file({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(32, 2)},
              adapter / "adapter_model.safetensors")  # k_proj is [16, 32] in this model
    with pytest.raises(VicunaError, match=r"LoRA shapes do not fit model.layers.0.self_attn.k_proj.weight"):
        run(merge)
    with pytest.raises(VicunaError, match="is not a LoRA adapter"):
        run(DeltaConfig(base=str(models["base"]), lora=str(models["delta"]), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
