"""Shared by the `vicuna data` tests: ShareGPT records and files, an in-process clean, a generated
corpus (benchmarks/make_sharegpt_corpus.py) and the `vicuna data` command as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vicuna_cli.data.pipeline import CleanConfig, clean

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from make_sharegpt_corpus import generate  # noqa: E402


def conv(id, *turns, **extra):
    return {"id": id, "conversations": [{"from": role, "value": value} for role, value in turns], **extra}


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_clean(tmp_path: Path, records, name="out.json", **options):
    """Clean `records` (a list, written as JSON) or an input path; return (output, report dict)."""
    source = records if isinstance(records, Path) else write_json(tmp_path / "in.json", records)
    out = tmp_path / name
    report = clean(CleanConfig(inputs=[str(source)], output=out, workers=1, overwrite=True, **options)).to_dict()
    text = out.read_text(encoding="utf-8")
    rows = json.loads(text) if out.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return rows, report


def turns(record):
    return [(t["from"], t["value"]) for t in record["conversations"]]


def corpus(path: Path, n: int, seed: int = 3) -> Path:
    return write_json(path, list(generate(n, seed)))


def vicuna(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vicuna_cli", "data", *args], capture_output=True, text=True, timeout=timeout)
