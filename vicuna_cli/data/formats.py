"""Conversation files in and out: detection, streaming reads, atomic streaming writes.

Every record is turned into one internal shape, ShareGPT's:
    {"id": str, "conversations": [{"from": "system"|"human"|"gpt", "value": str}], ...other keys}
Reads stream (a JSON array through ijson, JSON Lines line by line), so memory does not grow with
the file; a syntax error is reported with its line, column and byte offset.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..core.errors import VicunaError
from ..core.store import AtomicFile

INPUT_FORMATS = {
    "sharegpt": 'ShareGPT JSON or JSONL: {"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}',
    "openai": 'OpenAI messages JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content"}]}',
    "alpaca": 'Alpaca: {"instruction", "input"?, "output"} (JSON array or JSONL)',
    "gpt4all": 'GPT4All prompt generations: {"prompt", "response", "source"?}',
    "oasst1": 'OASST1 message table {"message_id", "parent_id", "message_tree_id", "role", "text", "rank", ...} '
              'or its nested tree export {"message_tree_id", "prompt": {..., "replies"}}',
}
OUTPUT_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
ROLE_NAMES = {
    "human": "human", "user": "human", "prompter": "human",
    "gpt": "gpt", "assistant": "gpt", "chatgpt": "gpt", "bard": "gpt", "bing": "gpt", "model": "gpt",
    "system": "system",
}
_HEAD = 1 << 16
_SPACE = b"\xef\xbb\xbf \t\r\n"  # a UTF-8 byte order mark counts as space for detection


class Skip(Exception):
    """A record of the wrong shape: skipped and counted with `reason`, or fatal under --strict."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Raw:
    """One record as read: where it came from (for messages) and the parsed JSON value."""

    source: str
    index: int  # 0-based record number in its file
    line: int | None  # 1-based line, for JSON Lines
    value: Any


class _Counted:
    """A binary reader that replays the bytes peeked for detection, then counts what it reads."""

    def __init__(self, f: BinaryIO, head: bytes):
        self._f, self._head, self.read_bytes = f, head, 0

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = (self._head, b"") if n < 0 or n >= len(self._head) else (self._head[:n], self._head[n:])
        else:
            data = self._f.read(n)
        self.read_bytes += len(data)
        return data


def check_input(path: str | Path) -> None:
    """An input file (`-`: stdin) that can be opened, or a VicunaError naming why; commands call it
    before any slow loading, so a missing file fails at once."""
    if str(path) != "-" and not Path(path).exists():
        raise VicunaError(f"input {path} does not exist")
    if Path(path).is_dir():
        raise VicunaError(f"input {path} is a directory", hint="pass the data files themselves")


class InputFile:
    """An opened input (`-` is stdin): its container, its record format, and its records."""

    def __init__(self, path: str | Path, input_format: str = "auto", formats: dict[str, str] | None = None,
                 detect: Callable[[Any, str], str] | None = None):
        # Conversation formats unless told otherwise (preferences.py passes the pair formats).
        self._formats, self._detect = formats or INPUT_FORMATS, detect or detect_format
        self.path = str(path)
        self.name = "<stdin>" if self.path == "-" else self.path
        check_input(self.path)
        self._file: BinaryIO = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        try:
            self._open(input_format)
        except BaseException:
            self.close()
            raise

    def _open(self, input_format: str) -> None:
        info = os.fstat(self._file.fileno())
        self.size = info.st_size if stat.S_ISREG(info.st_mode) else None  # None: a pipe, size unknown
        if self.path.endswith(".gz"):  # Hub datasets ship gzipped JSONL (HH-RLHF)
            import gzip

            self._gzipped = self._file
            self._file, self.size = gzip.GzipFile(fileobj=self._file), None  # type: ignore[assignment]
        head = self._file.read(_HEAD)
        while head and not head.lstrip(_SPACE) and len(head) % _HEAD == 0:  # only whitespace yet
            more = self._file.read(_HEAD)
            if not more:
                break
            head += more
        start = head.lstrip(_SPACE)[:1]
        if not start:
            raise VicunaError(f"input {self.name} is empty", hint="pass a file that holds conversations")
        if start not in (b"[", b"{"):
            raise VicunaError(
                f"unknown format: {self.name} is neither a JSON array nor JSON Lines (it starts with {start!r})",
                hint="supported: " + "; ".join(self._formats.values()),
            )
        self.container = "json" if start == b"[" else "jsonl"
        self._reader = _Counted(self._file, head.removeprefix(b"\xef\xbb\xbf"))  # the parsers reject a BOM
        self._records = self._json_records() if self.container == "json" else self._jsonl_records()
        self._first = next(self._records, None)
        if self._first is None:
            raise VicunaError(f"input {self.name} is empty: it holds no records", hint="pass a file that holds conversations")
        self.format = self._detect(self._first.value, self.name) if input_format == "auto" else input_format
        if self.format not in self._formats:
            raise VicunaError(f"unknown input format {self.format!r}; known: auto, {', '.join(self._formats)}")

    @property
    def read_bytes(self) -> int:
        return self._reader.read_bytes

    def records(self) -> Iterator[Raw]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._records

    def conversation_records(self, oasst_paths: str = "best") -> Iterator[Raw]:
        """Records that each hold one conversation: an OASST1 file's messages are assembled into
        trees and come out one record per path (oasst.py); other formats as read."""
        if self.format != "oasst1":
            return self.records()
        from .oasst import conversation_records

        return conversation_records(self.records(), oasst_paths)

    def close(self) -> None:
        if self._file is not sys.stdin.buffer:
            self._file.close()
        if getattr(self, "_gzipped", None) is not None:
            self._gzipped.close()

    def _json_records(self) -> Iterator[Raw]:
        import ijson

        index = 0
        try:
            for value in ijson.items(self._reader, "item", use_float=True):
                yield Raw(self.name, index, None, value)
                index += 1
        except ijson.JSONError as exc:
            raise self._syntax_error(exc, index) from None
        except UnicodeDecodeError as exc:
            raise VicunaError(f"{self.name} is not UTF-8 text near byte {self.read_bytes}: {exc.reason}") from None

    def _syntax_error(self, exc: Exception, index: int) -> VicunaError:
        where = locate_json_error(Path(self.path)) if self.path != "-" else None
        if where is None:  # stdin cannot be read twice: say how far the parser had read
            where = f"in record {index + 1}, before byte {self.read_bytes}"
        detail = str(exc).splitlines()[0].removeprefix("parse error: ")
        return VicunaError(f"invalid JSON in {self.name} {where}: {detail}", hint="fix the file (or re-export it) and run again")

    def _jsonl_records(self) -> Iterator[Raw]:
        import orjson

        line_no, index, offset, pending = 0, 0, 0, b""
        while True:
            chunk = self._reader.read(1 << 20)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop() if chunk else b""
            for line in lines:
                line_no += 1
                if line.strip():
                    try:
                        value = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        if index == 0 and line.strip() == b"{":
                            raise VicunaError(
                                f"unknown format: {self.name} holds one JSON object, not records",
                                hint="supported: a JSON array of records, or JSON Lines (one record a line)",
                            ) from None
                        byte = offset + len(line.decode("utf-8", "replace")[: exc.pos].encode())
                        raise VicunaError(
                            f"invalid JSON in {self.name} at line {line_no}, column {exc.colno} (byte {byte}): {exc.msg}",
                            hint="each line of a JSON Lines file must be one complete JSON value",
                        ) from None
                    yield Raw(self.name, index, line_no, value)
                    index += 1
                offset += len(line) + 1
            if not chunk:
                return


def locate_json_error(path: Path) -> str | None:
    """Where a JSON array first goes wrong: 'at line L, column C (byte B)'. Reads in windows."""
    decoder = json.JSONDecoder()
    line, column, done_bytes = 1, 0, 0  # position of buf[0] in the file
    buf, pos = "", 0
    with open(path, encoding="utf-8", errors="replace") as f:

        def more() -> bool:
            nonlocal buf
            chunk = f.read(1 << 22)
            buf += chunk
            return bool(chunk)

        def where(at: int) -> str:
            prefix = buf[:at]
            newline = prefix.rfind("\n")
            col = at - newline if newline >= 0 else column + at + 1
            return f"at line {line + prefix.count(chr(10))}, column {col} (byte {done_bytes + len(prefix.encode())})"

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if buf[pos:pos + 1] != "[":
            return where(pos)
        pos, expect_value = pos + 1, True
        while True:
            skip_ws()
            if pos >= len(buf):
                return where(pos)
            if buf[pos] == "]" and not expect_value:
                return None
            if not expect_value:
                if buf[pos] != ",":
                    return where(pos)
                pos, expect_value = pos + 1, True
                continue
            while True:
                try:
                    pos = decoder.raw_decode(buf, pos)[1]
                    break
                except json.JSONDecodeError as exc:
                    # A window can end mid-value: read on, unless the error is well inside it.
                    inside = len(buf) - exc.pos > 1 << 22 and not exc.msg.startswith("Unterminated")
                    if inside or not more():
                        return where(exc.pos)
            expect_value = False
            if pos > 1 << 22:  # drop what is parsed so memory stays bounded
                consumed, buf, pos = buf[:pos], buf[pos:], 0
                newline = consumed.rfind("\n")
                line += consumed.count("\n")
                column = len(consumed) - newline - 1 if newline >= 0 else column + len(consumed)
                done_bytes += len(consumed.encode())


def detect_format(value: Any, name: str) -> str:
    if isinstance(value, dict):
        if "conversations" in value:
            return "sharegpt"
        if "messages" in value:
            return "openai"
        if "instruction" in value and "output" in value:
            return "alpaca"
        if "prompt" in value and "response" in value:
            return "gpt4all"
        from .oasst import is_message, is_tree

        if is_message(value) or is_tree(value):
            return "oasst1"
    keys = ", ".join(sorted(value)[:8]) if isinstance(value, dict) else type(value).__name__
    raise VicunaError(
        f"unknown format: the first record of {name} has {keys or 'no keys'}",
        hint="supported: " + "; ".join(INPUT_FORMATS.values()) + " (or force one with --input-format)",
    )


def to_sharegpt(raw: Raw, input_format: str) -> dict[str, Any]:
    """Convert one record to the internal ShareGPT shape; raise Skip if it has the wrong shape."""
    value = raw.value
    if not isinstance(value, dict):
        raise Skip("not a JSON object")
    fallback_id = f"{'stdin' if raw.source == '<stdin>' else Path(raw.source).stem}_{raw.index}"
    if input_format == "sharegpt":
        turns = value.get("conversations")
        if not isinstance(turns, list):
            raise Skip("no 'conversations' list")
        out = [_turn(t, "from", "value", i) for i, t in enumerate(turns)]
        record = {k: v for k, v in value.items() if k not in ("conversations", "system")}
        if isinstance(value.get("system"), str) and value["system"].strip():
            out.insert(0, {"from": "system", "value": value["system"]})
    elif input_format == "openai":
        messages = value.get("messages")
        if not isinstance(messages, list):
            raise Skip("no 'messages' list")
        out = [_turn(m, "role", "content", i) for i, m in enumerate(messages)]
        record = {k: v for k, v in value.items() if k != "messages"}
    elif input_format == "gpt4all":
        prompt, response = value.get("prompt"), value.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise Skip("gpt4all record without string 'prompt' and 'response'")
        out = [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
        record = {k: v for k, v in value.items() if k not in ("prompt", "response")}
    elif input_format == "oasst1":  # already a path of a tree (InputFile.conversation_records)
        if "oasst_skip" in value:
            raise Skip(value["oasst_skip"])
        if not isinstance(value.get("conversations"), list):
            raise Skip("OASST1 record read without assembling its tree")
        out, record = value["conversations"], {k: v for k, v in value.items() if k != "conversations"}
    else:
        instruction, extra, output = value.get("instruction"), value.get("input") or "", value.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise Skip("alpaca record without string 'instruction' and 'output'")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out = [{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]
        record = {k: v for k, v in value.items() if k not in ("instruction", "input", "output")}
    record["id"] = str(value["id"]) if isinstance(value.get("id"), (str, int)) else fallback_id
    record["conversations"] = out
    return record


def _turn(turn: Any, role_key: str, text_key: str, i: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise Skip(f"turn {i} is not an object")
    role = ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
    if role is None:
        raise Skip(f"unknown role {turn.get(role_key)!r}")
    text = turn.get(text_key)
    if isinstance(text, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text") for p in text if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(text) or not all(isinstance(p, str) for p in parts):
            raise Skip("non-text message content")
        text = "\n".join(parts)
    if not isinstance(text, str):
        raise Skip(f"turn {i} has no {text_key!r} string")
    return {"from": role, "value": text}


def output_format(path: Path, requested: str | None) -> str:
    if requested:
        return requested
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise VicunaError(
            f"cannot tell the output format from {path}",
            hint="name it *.json or *.jsonl, or pass --format json|jsonl",
        )
    return fmt


class RecordWriter:
    """Streams records to a temp file beside `path` (core/store.py's AtomicFile); `commit()`
    renames it into place, so Ctrl-C or a crash never leaves a partial output."""

    def __init__(self, path: Path, fmt: str):
        import orjson

        self._dumps = orjson.dumps
        self.path, self.fmt, self.count = Path(path), fmt, 0
        self._out = AtomicFile(self.path, "wb", buffering=1 << 20)
        self._f = self._out.file
        if fmt == "json":
            self._f.write(b"[")

    def write(self, record: dict[str, Any]) -> None:
        data = self._dumps(record)
        if self.fmt == "json":
            self._f.write(b"\n" + data if not self.count else b",\n" + data)
        else:
            self._f.write(data + b"\n")
        self.count += 1

    def commit(self) -> None:
        if self.fmt == "json":
            self._f.write(b"\n]\n")
        self._out.commit()

    def discard(self) -> None:
        self._out.discard()
