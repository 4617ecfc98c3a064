"""Config precedence (defaults < --config file < flags) and validation messages naming the flag."""

import pytest

from vicuna_cli.chat.runner import ChatConfig
from vicuna_cli.core.config import build_config, save_config
from vicuna_cli.core.errors import VicunaError


def test_precedence(tmp_path):
    path = tmp_path / "chat.yaml"
    path.write_text("temperature: 0.2\ntop-p: 0.5\nmax_new_tokens: 64\n")
    config = build_config(ChatConfig, {"temperature": 0.9}, path)
    assert config.temperature == 0.9  # flag beats file
    assert config.top_p == 0.5  # file beats default (kebab-case keys accepted)
    assert config.max_new_tokens == 64
    assert config.top_k == 0  # default


def test_invalid_value_names_the_flag(tmp_path):
    with pytest.raises(VicunaError, match=r"^--top-p: "):
        build_config(ChatConfig, {"top_p": 1.5})
    path = tmp_path / "c.yaml"
    path.write_text("temperature: -1\n")
    with pytest.raises(VicunaError, match=r"--temperature \(from .*c.yaml\)"):
        build_config(ChatConfig, {}, path)


def test_unknown_key_and_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("temprature: 0.1\n")
    with pytest.raises(VicunaError, match="unknown option 'temprature'") as info:
        build_config(ChatConfig, {}, path)
    assert "temperature" in info.value.hint
    path.write_text("- a list\n")
    with pytest.raises(VicunaError, match="mapping"):
        build_config(ChatConfig, {}, path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(VicunaError, match="not valid YAML"):
        build_config(ChatConfig, {}, path)
    with pytest.raises(VicunaError, match="does not exist"):
        build_config(ChatConfig, {}, tmp_path / "missing.yaml")


def test_template_with_api_base_is_rejected():
    with pytest.raises(VicunaError, match=r"^--template applies to local models"):
        build_config(ChatConfig, {"api_base": "http://127.0.0.1:1/v1", "template": "alpaca"})


def test_resolved_config_round_trips(tmp_path):
    config = build_config(ChatConfig, {"temperature": 0.3, "seed": 5})
    save_config(config, tmp_path / "config.yaml")
    assert build_config(ChatConfig, {}, tmp_path / "config.yaml") == config


@pytest.mark.parametrize("spelling, name", [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp16", "float16"),
                                            ("half", "float16"), ("fp32", "float32"), ("float32", "float32"), ("auto", "auto")])
def test_every_command_takes_every_dtype_spelling(spelling, name):
    """`--dtype bf16` and `--dtype bfloat16` mean the same in chat, serve, train and apply-delta, and
    one name is stored."""
    from vicuna_cli.chat.runner import ChatConfig
    from vicuna_cli.delta.apply import DeltaConfig
    from vicuna_cli.serve.config import ServeConfig, WorkerConfig
    from vicuna_cli.train.config import TrainConfig

    assert build_config(ChatConfig, {"dtype": spelling}).dtype == name
    assert build_config(ServeConfig, {"dtype": spelling}).dtype == name
    assert build_config(WorkerConfig, {"model": ["m"], "dtype": spelling}).dtype == name
    assert build_config(DeltaConfig, {"base": "b", "delta": "d", "output": "o", "dtype": spelling}).dtype == name
    assert build_config(TrainConfig, {"model": "m", "data": ["d.json"], "output": "o", "precision": spelling}).precision == name


def test_an_unknown_dtype_lists_the_spellings():
    from vicuna_cli.chat.runner import ChatConfig

    with pytest.raises(VicunaError) as info:
        build_config(ChatConfig, {"dtype": "int3"})
    assert info.value.message.startswith("--dtype: ") and "bfloat16 (bf16)" in info.value.message
