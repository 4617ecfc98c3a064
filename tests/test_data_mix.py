"""`vicuna data mix`: deterministic for a seed, shares within 1 % of the weights, dedup across
sources, sampling with replacement once a source runs out, and bad weights as errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vicuna_cli.cli import app
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.data.mix import MixConfig, mix


def sharegpt(path: Path, prefix: str, n: int, shared: int = 0) -> Path:
    records = [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"{prefix} question {i}"},
                                                          {"from": "gpt", "value": f"{prefix} answer {i}"}]} for i in range(n)]
    records += [{"id": f"{prefix}-dup{i}", "conversations": [{"from": "human", "value": f"shared question {i}"},
                                                              {"from": "gpt", "value": f"shared answer {i}"}]} for i in range(shared)]
    path.write_text(json.dumps(records))
    return path


def alpaca(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"do {i}", "input": "", "output": f"done {i}"}) + "\n" for i in range(n)))
    return path


def origin(record) -> str:
    text = record["conversations"][0]["value"]
    return "shared" if text.startswith("shared") else text.split()[0]


@pytest.fixture
def sources(tmp_path):
    return (sharegpt(tmp_path / "a.json", "a", 600, shared=50), sharegpt(tmp_path / "b.json", "b", 250, shared=50),
            alpaca(tmp_path / "c.jsonl", 100))


def test_mix_is_deterministic_with_shares_within_one_percent(sources, tmp_path):
    a, b, c = sources
    specs = [f"{a}:0.5", f"{b}:0.3", f"{c}:0.2"]
    out1, out2, out3 = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl", tmp_path / "m3.jsonl"
    result = mix(MixConfig(sources=specs, output=out1, seed=7, total=2000))
    mix(MixConfig(sources=specs, output=out2, seed=7, total=2000))
    mix(MixConfig(sources=specs, output=out3, seed=8, total=2000))
    assert out1.read_bytes() == out2.read_bytes() != out3.read_bytes()
    records = [json.loads(line) for line in out1.read_text().splitlines()]
    assert len(records) == 2000
    counts = Counter(origin(r) for r in records)
    # a's 50 shared records count as a's; b's copies of them were removed (dedup across sources)
    shares = {"a": (counts["a"] + counts["shared"]) / 2000, "b": counts["b"] / 2000, "do": counts["do"] / 2000}
    assert shares == pytest.approx({"a": 0.5, "b": 0.3, "do": 0.2}, abs=0.01)
    by_path = {Path(s.path).name: s for s in result}
    assert by_path["b.json"].duplicates == 50 and by_path["a.json"].duplicates == 0
    # 650 distinct in a for 1000 wanted: all of them once, then 350 repeats (with replacement)
    assert by_path["a.json"].taken == 1000 and by_path["a.json"].repeated == 350
    assert len({r["id"] for r in records if origin(r) in ("a", "shared")}) == 650
    assert by_path["c.jsonl"].repeated == 300 and by_path["b.json"].repeated == 600 - 250


def test_record_counts_and_default_total(sources, tmp_path):
    a, b, c = sources
    out = tmp_path / "m.json"
    result = mix(MixConfig(sources=[f"{a}:100", f"{c}:40"], output=out))
    records = json.loads(out.read_text())
    assert Counter(origin(r) for r in records if origin(r) != "shared")["do"] == 40 and len(records) == 140
    assert [s.repeated for s in result] == [0, 0]
    # no --total: as many records as the sources hold distinct ones
    mix(MixConfig(sources=[f"{a}:0.5", f"{b}:0.5"], output=tmp_path / "all.jsonl"))
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 650 + 250


@pytest.mark.parametrize("specs, message", [
    (["{a}:x"], r"mix weight 'x' of .*a.json does not parse"),
    (["{a}"], r"has no weight"),
    (["{a}:0.0", "{b}:0.0"], r"weights sum to 0"),
    (["{a}:0", "{b}:0"], r"record counts sum to 0"),
    (["{a}:0.5", "{b}:100"], r"either all shares"),
    (["{a}:-1"], r"does not parse|must be a finite number"),
])
def test_bad_weights_are_errors_and_write_nothing(sources, tmp_path, specs, message):
    a, b, _ = sources
    out = tmp_path / "m.jsonl"
    with pytest.raises(VicunaError, match=message):
        mix(MixConfig(sources=[s.format(a=a, b=b) for s in specs], output=out))
    assert not out.exists()


def test_cli_mix_of_pairs(tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                             for i in range(20)))
    out = tmp_path / "mix.jsonl"
    result = CliRunner().invoke(app, ["data", "mix", f"{pairs}:10", "-o", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 10 and set(records[0]) == {"id", "prompt", "chosen", "rejected", "source"}
    bad = CliRunner().invoke(app, ["data", "mix", f"{pairs}:abc", "-o", str(tmp_path / "x.jsonl")])
    assert isinstance(bad.exception, VicunaError) and "does not parse" in bad.exception.message
