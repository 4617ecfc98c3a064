"""`vicuna judge --config FILE.yaml`: defaults < file < flags, and errors that name the flag."""

from __future__ import annotations

import yaml
import pytest
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.config import build_config
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.judge.config import JudgeConfig


def test_precedence_and_flag_forms(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("concurrency: 4\nmax-tokens: 64\npair: [good, bad]\nprice: 2,8\ntimeout: 30\n")
    cfg = build_config(JudgeConfig, {"concurrency": 2}, path)
    assert cfg.concurrency == 2  # flag beats file
    assert (cfg.max_tokens, cfg.pair, cfg.price, cfg.timeout) == (64, ("good", "bad"), (2.0, 8.0), 30.0)  # file beats default
    assert (cfg.sampling.temperature, cfg.judge_model, cfg.retries, cfg.run_mode) == (0.0, "gpt-4.1", 6, "pair")  # defaults
    # --models is comma-separated on the command line, a list (or the same string) in YAML
    assert build_config(JudgeConfig, {"models": "a, b,,c"}).models == ["a", "b", "c"]
    path.write_text("models: [a, b]\nmode: pairwise-all\n")
    cfg = build_config(JudgeConfig, {}, path)
    assert (cfg.models, cfg.run_mode) == (["a", "b"], "pairwise-all")


@pytest.mark.parametrize(
    "text, message",
    [
        ("concurency: 4\n", r"^unknown option 'concurency' \(from .*judge.yaml\)$"),
        ("concurrency: 0\n", r"^--concurrency \(from .*judge.yaml\): Input should be greater than or equal to 1$"),
        ("max_tokens: many\n", r"^--max-tokens \(from .*judge.yaml\): Input should be a valid integer"),
        ("mode: sideways\n", r"^--mode \(from .*judge.yaml\): unknown 'sideways'; known: pair, pairwise-all, pairwise-baseline, pairwise-scores, single$"),
        ("structured: maybe\n", r"^--structured \(from .*judge.yaml\): unknown 'maybe'; known: auto, off, on$"),
        ("pair: [a, b, c]\n", r"^--pair \(from .*judge.yaml\): Tuple should have at most 2 items"),
        ("price: 2;8\n", r"^--price \(from .*judge.yaml\): expected INPUT,OUTPUT in USD per million tokens, e.g. 2,8, not '2;8'$"),
        ("price: '1'\n", r"^--price \(from .*judge.yaml\): expected INPUT,OUTPUT in USD per million tokens, e.g. 2,8, not '1'$"),
        ("explanation_chars: 4\n", r"^--explanation-chars \(from .*judge.yaml\): Input should be greater than or equal to 16$"),
        ("explanation_chars: 200\nstructured: 'off'\n", r"^--explanation-chars bounds the JSON schema's explanation: it needs --structured auto or on$"),
        ("pair: [a, b]\nmode: single\n", r"^--pair judges one pair; it does not go with --mode single$"),
    ],
)
def test_bad_keys_and_values_in_the_file(tmp_path, text, message):
    path = tmp_path / "judge.yaml"
    path.write_text(text)
    with pytest.raises(VicunaError, match=message) as exc:
        build_config(JudgeConfig, {}, path)
    if "unknown option" in message:
        assert "concurrency" in exc.value.hint and "max_tokens" in exc.value.hint


def test_cli_config_file_with_flag_override(double, workdir):  # noqa: F811
    config = workdir / "judge.yaml"
    config.write_text(yaml.safe_dump({
        "pair": ["good", "bad"], "answers": str(workdir / "answers"), "output": str(workdir / "out"),
        "bench": str(workdir / "question.jsonl"), "judge-model": "judge-x", "judge-api-base": double.base,
        "max-tokens": 64, "concurrency": 1, "temperature": 0.5,
    }))
    runner = CliRunner()
    res = runner.invoke(app, ["judge", "--config", str(config), "--max-tokens", "32"])
    assert res.exit_code == 0, res.output
    assert double.calls == 12
    assert {(r["max_tokens"], r["temperature"], r["model"]) for r in double.requests} == {(32, 0.5, "judge-x")}
    assert "position consistency: 100.0%" in res.stdout
    saved = yaml.safe_load((workdir / "out" / "config.yaml").read_text())  # the resolved config of the run
    assert (saved["max_tokens"], saved["concurrency"], saved["temperature"], saved["pair"]) == (32, 1, 0.5, ["good", "bad"])
    # a bad flag value names the flag, from the same validation as the file's values (cli.main
    # prints a VicunaError as one line: test_judge_run.py::test_cli_errors_are_one_line)
    res = runner.invoke(app, ["judge", "--config", str(config), "-j", "0"])
    assert isinstance(res.exception, VicunaError) and res.exception.message == "--concurrency: Input should be greater than or equal to 1"
    res = runner.invoke(app, ["judge", "--config", str(workdir / "nope.yaml")])
    assert isinstance(res.exception, VicunaError) and res.exception.message == f"config file {workdir / 'nope.yaml'} does not exist"
    assert double.calls == 12
