"""Input detection and conversion, output formats, and every bad input: a clear message, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from data_helpers import conv, run_clean, turns, write_json, write_jsonl

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.data.formats import InputFile, locate_json_error
from vicuna_cli.data.pipeline import CleanConfig, clean

QA = (("human", "What is the boiling point of water?"), ("gpt", "It is 100 degrees Celsius at sea level."))


def test_openai_messages_jsonl_is_detected_and_converted(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "What is the boiling point"}, {"type": "text", "text": "of water?"}]},
            {"role": "assistant", "content": "100 degrees Celsius at sea level."},
        ]},
        {"messages": [{"role": "tool", "content": "{}"}]},
    ])
    assert InputFile(source).format == "openai"
    rows, report = run_clean(tmp_path, source)
    assert rows == [{"id": "chat_0", "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What is the boiling point\nof water?"},
        {"from": "gpt", "value": "100 degrees Celsius at sea level."},
    ]}]
    assert report["steps"][0]["dropped"] == {"unknown role 'tool'": 1}


def test_alpaca_json_is_detected_and_converted(tmp_path):
    source = write_json(tmp_path / "alpaca.json", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    ])
    rows, _ = run_clean(tmp_path, source)
    assert [(r["id"], turns(r)) for r in rows] == [
        ("alpaca_0", [("human", "Translate to French.\n\nGood morning"), ("gpt", "Bonjour")]),
        ("alpaca_1", [("human", "Name a primary colour."), ("gpt", "Red is a primary colour.")]),
    ]


def test_sharegpt_jsonl_keeps_extra_fields_and_a_system_field(tmp_path):
    source = write_jsonl(tmp_path / "sg.jsonl", [conv("x", *QA, model="gpt-4", system="Be precise.")])
    rows, _ = run_clean(tmp_path, source, name="out.jsonl")
    assert rows == [{"id": "x", "model": "gpt-4", "conversations": [{"from": "system", "value": "Be precise."}] + conv("x", *QA)["conversations"]}]


def test_several_inputs_are_read_in_order_and_output_format_follows_the_extension(tmp_path):
    a = write_json(tmp_path / "a.json", [conv("a", *QA)])
    b = write_jsonl(tmp_path / "b.jsonl", [conv("b", ("human", "Second question, please?"), ("gpt", "Second answer."))])
    out = tmp_path / "out.jsonl"
    clean(CleanConfig(inputs=[str(a), str(b)], output=out, workers=1))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    forced = tmp_path / "out.data"
    clean(CleanConfig(inputs=[str(a)], output=forced, format="json", workers=1))
    assert json.loads(forced.read_text())[0]["id"] == "a"
    with pytest.raises(VicunaError, match="cannot tell the output format from .*out.txt"):
        clean(CleanConfig(inputs=[str(a)], output=tmp_path / "out.txt", workers=1))


def test_invalid_json_array_names_line_column_and_byte(tmp_path):
    good = json.dumps(conv("a", *QA))
    source = tmp_path / "bad.json"
    source.write_text(f'[\n{good},\n{{"id": "b", "conversations": [}}\n]\n')
    with pytest.raises(VicunaError) as err:
        run_clean(tmp_path, source)
    column = len('{"id": "b", "conversations": [') + 1
    byte = len(f"[\n{good},\n") + column - 1
    assert err.value.message.startswith(f"invalid JSON in {source} at line 3, column {column} (byte {byte}):")
    assert not (tmp_path / "out.json").exists()


def test_invalid_json_is_located_past_the_first_read_window(tmp_path):
    record = json.dumps(conv("x", ("human", "é" * 5000), ("gpt", "ok")), ensure_ascii=False)
    n = 1000  # ~10 MB of records, so the error lies beyond the 4 MB windows
    source = tmp_path / "big.json"
    source.write_text("[\n" + ",\n".join([record] * n) + ",\n{oops}\n]", encoding="utf-8")
    byte = len(("[\n" + ",\n".join([record] * n) + ",\n{").encode())
    assert locate_json_error(source) == f"at line {n + 2}, column 2 (byte {byte})"


def test_invalid_jsonl_line_is_reported_by_number(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(conv("a", *QA)) + "\n\n" + '{"id": "b", "conversations": [}\n')
    with pytest.raises(VicunaError, match=r"invalid JSON in .*bad.jsonl at line 3, column \d+ \(byte \d+\)"):
        run_clean(tmp_path, source)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("  \n\t\n", "is empty"),
        ("[]", "is empty: it holds no records"),
        ("hello", "unknown format: .* is neither a JSON array nor JSON Lines"),
        ('[{"question": "q", "answer": "a"}]', "unknown format: the first record of .* has answer, question"),
        ('{\n  "data": []\n}\n', "unknown format: .* holds one JSON object, not records"),
    ],
)
def test_empty_and_unknown_inputs(tmp_path, content, message):
    source = tmp_path / "in.json"
    source.write_text(content)
    with pytest.raises(VicunaError, match=message):
        run_clean(tmp_path, source)
    assert not (tmp_path / "out.json").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path):
    source = write_json(tmp_path / "in.json", [conv("a", *QA)])
    out = tmp_path / "out.json"
    out.write_text("precious")
    with pytest.raises(VicunaError, match="already exists") as err:
        clean(CleanConfig(inputs=[str(source)], output=out, workers=1))
    assert err.value.hint == "pass --overwrite to replace it"
    assert out.read_text() == "precious"
    clean(CleanConfig(inputs=[str(source)], output=out, workers=1, overwrite=True))
    assert json.loads(out.read_text())[0]["id"] == "a"
    with pytest.raises(VicunaError, match="is also an input"):
        clean(CleanConfig(inputs=[str(out)], output=out, workers=1, overwrite=True))


def test_missing_input_and_split_options_without_a_model(tmp_path):
    with pytest.raises(VicunaError, match="input .*nope.json does not exist"):
        clean(CleanConfig(inputs=[str(tmp_path / "nope.json")], output=tmp_path / "o.json"))
    source = write_json(tmp_path / "in.json", [conv("a", *QA)])
    with pytest.raises(VicunaError, match="needs the model's tokenizer") as err:
        clean(CleanConfig(inputs=[str(source)], output=tmp_path / "o.json", max_length=512))
    assert err.value.hint == "pass -m MODEL"


def test_a_byte_order_mark_and_stdin_are_accepted(tmp_path):
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(conv("a", *QA)).encode() + b"\n")
    rows, _ = run_clean(tmp_path, source)
    assert [r["id"] for r in rows] == ["a"]
    out = tmp_path / "piped.json"
    result = subprocess.run([sys.executable, "-m", "vicuna_cli", "data", "clean", "-", "-o", str(out)],
                            input=json.dumps([conv("b", *QA)]), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in json.loads(out.read_text())] == ["b"]
