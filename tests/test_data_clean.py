"""`vicuna data clean` / `stats` end to end: worker-count determinism, interruption safety, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from data_helpers import conv, corpus, vicuna, write_json

from vicuna_cli.data import steps
from vicuna_cli.data.pipeline import CleanConfig, clean
from vicuna_cli.data.stats import StatsConfig, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_sharegpt_corpus import generate  # noqa: E402


def test_output_and_report_are_identical_for_any_worker_count(tmp_path, sp_model_dir):
    source = corpus(tmp_path / "in.json", 160)
    outputs, reports = [], []
    for workers in (1, 2, 3):
        out = tmp_path / f"out{workers}.jsonl"
        report = clean(CleanConfig(inputs=[str(source)], output=out, workers=workers, model=str(sp_model_dir),
                                   max_length=1024, blocklist_preset="original")).to_dict()
        outputs.append(out.read_bytes())
        reports.append({k: v for k, v in report.items() if k != "seconds"})
    assert outputs[0] == outputs[1] == outputs[2]
    assert reports[0] == reports[1] == reports[2]
    split = reports[0]["steps"][-1]
    # The corpus has long conversations, so pieces outnumber the conversations that reach split.
    assert split["out"] > split["in"] and split["notes"]["conversations split"] > 0
    assert reports[0]["length_unit"] == "tokens" and reports[0]["lengths"]["max"] <= 1024
    assert sum(reports[0]["histogram"].values()) == reports[0]["records_out"] == len(outputs[0].splitlines())


def test_a_crash_midway_leaves_no_output_and_no_temp_file(tmp_path, monkeypatch):
    source = corpus(tmp_path / "in.json", 120)
    real, seen = steps.process, []

    def failing(raw, *args):
        seen.append(raw.index)
        if raw.index == 70:
            raise RuntimeError("boom")
        return real(raw, *args)

    monkeypatch.setattr(steps, "process", failing)
    out = tmp_path / "out" / "clean.json"
    with pytest.raises(RuntimeError, match="boom"):
        clean(CleanConfig(inputs=[str(source)], output=out, workers=1))
    assert 70 in seen  # it failed after writing earlier chunks
    assert list(out.parent.iterdir()) == []


def test_ctrl_c_exits_130_and_leaves_no_partial_output(tmp_path):
    """Input comes from a FIFO that stays open: the run is certainly midway when SIGINT lands."""
    fifo = tmp_path / "in.json"
    os.mkfifo(fifo)
    records = list(generate(200, 5))
    out = tmp_path / "out" / "clean.json"
    proc = subprocess.Popen([sys.executable, "-m", "vicuna_cli", "data", "clean", str(fifo), "-o", str(out), "-j", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer_done = threading.Event()

    def feed():
        try:
            with open(fifo, "w", encoding="utf-8") as f:
                f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + ",\n")
                f.flush()
                writer_done.wait(60)  # hold the FIFO open: the reader blocks for more
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (out.parent.is_dir() and any(out.parent.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    partial = list(out.parent.iterdir())
    assert partial and partial[0].name.endswith(".partial")  # the temp output exists: we are midway
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    writer_done.set()
    thread.join(10)
    assert proc.returncode == 130  # typer turns Ctrl-C into exit code 130
    assert list(out.parent.iterdir()) == []


def test_cli_results_on_stdout_report_on_stderr_and_errors_exit_1(tmp_path):
    source = write_json(tmp_path / "in.json", [
        conv("a", ("human", "What is the capital of Spain?"), ("gpt", "Madrid is the capital.")),
        conv("a", ("human", "Same id again, different text?"), ("gpt", "Still a duplicate id.")),
    ])
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    result = vicuna("clean", str(source), "-o", str(out), "-j", "1", "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "dedup" in result.stderr and "same id: 1" in result.stderr
    assert f"wrote 1 conversations to {out}" in result.stderr
    assert json.loads(report.read_text())["records_out"] == 1
    again = vicuna("clean", str(source), "-o", str(out))
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.splitlines() == [f"error: output {out} already exists", "hint: pass --overwrite to replace it"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,}]')
    broken = vicuna("clean", str(bad), "-o", str(tmp_path / "x.json"))
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"error: invalid JSON in {bad} at line 1, column 11 (byte 10)")
    assert not (tmp_path / "x.json").exists()


def test_config_file_values_are_used_and_flags_override_them(tmp_path):
    source = write_json(tmp_path / "in.json", [conv("a", ("human", "Tell me about OpenAI."), ("gpt", "A research lab."))])
    config = tmp_path / "clean.yaml"
    config.write_text("blocklist-preset: original\nmin-chars: 0\nworkers: 1\n")
    out = tmp_path / "out.json"
    result = vicuna("clean", str(source), "-o", str(out), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == []  # the config's blocklist dropped it
    assert "no conversation survived" in result.stderr
    config.write_text("min-turns: -1\n")
    bad = vicuna("clean", str(source), "-o", str(tmp_path / "o2.json"), "--config", str(config))
    assert bad.returncode == 1 and bad.stderr.startswith(f"error: --min-turns (from {config}): ")


def test_stats_counts_turns_tokens_and_languages(tmp_path, bpe_model_dir):
    from transformers import AutoTokenizer

    from vicuna_cli.core.templates import template_for_model
    from vicuna_cli.data.split import TokenCounter, to_messages

    records = [
        conv("en", ("human", "Could you explain how photosynthesis works in plants?"), ("gpt", "Plants turn light into sugar and oxygen.")),
        conv("ko", ("gpt", "먼저 인사드립니다."), ("human", "안녕하세요 반갑습니다. 오늘 날씨가 어때요?"), ("gpt", "오늘은 맑고 따뜻한 날씨입니다.")),
        {"id": "bad", "conversations": None},
    ]
    source = write_json(tmp_path / "in.json", records)
    figures = stats(StatsConfig(inputs=[str(source)], model=str(bpe_model_dir), workers=1))
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    counter = TokenCounter(tokenizer, template_for_model(tokenizer))
    expected = [counter.count(to_messages(records[0]["conversations"])),
                counter.count(to_messages(records[1]["conversations"][1:]))]  # after role normalisation
    assert figures["records"] == 3 and figures["conversations"] == 2
    assert figures["skipped"] == {"no 'conversations' list": 1}
    assert figures["turns"]["by_role"] == {"gpt": 3, "human": 2} and figures["turns"]["max"] == 3
    assert figures["tokens"]["total"] == sum(expected) and figures["tokens"]["max"] == max(expected)
    assert figures["languages"] == {"en": 1, "ko": 1}
    result = vicuna("stats", str(source), "--json", "--no-languages")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["conversations"] == 2 and "languages" not in json.loads(result.stdout)
