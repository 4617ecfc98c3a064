"""`vicuna data mix`: one training file from several sources in given proportions.

`A.json:0.5 B.jsonl:0.3 C.json:0.2` asks for those shares of the output (decimals, normalised),
`A.json:1000` for that many records (integers); the output size is `--total`, by default the
number of distinct records of all sources. Each source is sampled without replacement until it
runs out, then with replacement (reported as repeats), from a generator seeded by --seed and the
source's position, so a mix is a function of its inputs and seed. A record already taken from an
earlier source is removed from later ones (dedup across sources) and counted. Conversation
formats are written as ShareGPT records, preference formats as the pairwise records of
`data pairs`; the two kinds do not mix. The output is shuffled and written atomically.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional


from ..core import console
from ..core.errors import VicunaError
from ..core.store import atomic_write_text
from .formats import RecordWriter, Skip, output_format, to_sharegpt
from .config import MixConfig  # noqa: F401  (also imported from here)




@dataclass
class Source:
    path: str
    weight: float
    count: bool  # the weight is a number of records, not a share
    records: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    skipped: int = 0
    duplicates: int = 0
    taken: int = 0
    repeated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "weight": self.weight, "records_read": self.read, "skipped": self.skipped,
                "duplicates_removed": self.duplicates, "distinct": len(self.records), "taken": self.taken,
                "repeated": self.repeated}


def parse_source(spec: str) -> Source:
    path, colon, weight = spec.rpartition(":")
    if not colon or not path:
        raise VicunaError(f"mix source {spec!r} has no weight", hint="write PATH:SHARE (e.g. a.json:0.5) or PATH:RECORDS (a.json:1000)")
    try:
        value = float(weight)
    except ValueError:
        raise VicunaError(f"mix weight {weight!r} of {path} does not parse as a number",
                          hint="write PATH:SHARE (e.g. a.json:0.5) or PATH:RECORDS (a.json:1000)") from None
    if not value >= 0 or value == float("inf"):
        raise VicunaError(f"mix weight {weight!r} of {path} must be a finite number ≥ 0")
    return Source(path, value, count=weight.strip().isdigit())


def plan(sources: list[Source], total: Optional[int]) -> list[int]:
    """Records to take from each source."""
    counts = {s.count for s in sources}
    if len(counts) > 1:
        raise VicunaError("mix weights are either all shares (decimals, e.g. 0.5) or all record counts (integers)",
                          hint="write a.json:0.5 b.json:0.5, or a.json:1000 b.json:500")
    if counts == {True}:
        if total is not None:
            raise VicunaError("--total goes with shares; record counts already fix the size")
        wanted = [int(s.weight) for s in sources]
        if not sum(wanted):
            raise VicunaError("the mix's record counts sum to 0: nothing to write")
        return wanted
    weights = sum(s.weight for s in sources)
    if not weights:
        raise VicunaError("the mix weights sum to 0", hint="give each source a share above 0")
    size = total or sum(len(s.records) for s in sources)
    # Largest remainder: the shares add up to `size` exactly and each is within one record.
    exact = [size * s.weight / weights for s in sources]
    wanted = [int(x) for x in exact]
    for i in sorted(range(len(sources)), key=lambda i: (-(exact[i] - wanted[i]), i))[: size - sum(wanted)]:
        wanted[i] += 1
    return wanted


def _read(source: Source, kind: str) -> None:
    from collections import Counter

    if kind == "pairs":
        from .preferences import read_pairs

        notes: Counter = Counter()
        source.records = read_pairs([source.path], notes)
        source.skipped = sum(notes.values())
        return
    from .formats import InputFile

    inp = InputFile(source.path)
    try:
        for raw in inp.conversation_records():
            try:
                source.records.append(to_sharegpt(raw, inp.format))
            except Skip:
                source.skipped += 1
    finally:
        inp.close()


def detect_kind(path: str) -> str:
    from .formats import InputFile
    from .preferences import detect_pair_format

    inp = InputFile(path, formats={"any": ""}, detect=lambda value, name: "any")
    try:
        first = next(inp.records()).value
    finally:
        inp.close()
    try:
        return "pairs" if detect_pair_format(first, path) != "oasst1" else "conversations"
    except VicunaError:
        return "conversations"


def _key(record: dict[str, Any], kind: str) -> bytes:
    from .preferences import pair_key
    from .steps import conversation_key

    return pair_key(record) if kind == "pairs" else conversation_key(record["conversations"])


def mix(config: MixConfig) -> list[Source]:
    from .pipeline import check_output, write_atomically

    started = time.monotonic()
    sources = [parse_source(spec) for spec in config.sources]
    fmt = output_format(config.output, config.format)
    check_output(config.output, config.overwrite, [s.path for s in sources])
    kind = detect_kind(sources[0].path) if config.kind == "auto" else config.kind
    seen: set[bytes] = set()
    for source in sources:
        _read(source, kind)
        source.read = len(source.records) + source.skipped
        distinct = []
        for record in source.records:
            key = _key(record, kind)
            if key in seen:
                source.duplicates += 1
            else:
                seen.add(key)
                distinct.append(record)
        source.records = distinct
    wanted = plan(sources, config.total)
    chosen: list[dict[str, Any]] = []
    for position, (source, n) in enumerate(zip(sources, wanted)):
        if n and not source.records:
            raise VicunaError(f"mix source {source.path} has no usable record, but {n} are wanted from it")
        rng = random.Random(f"{config.seed}:{position}")
        order = list(range(len(source.records)))
        rng.shuffle(order)
        picks = order[:n] + [rng.randrange(len(source.records)) for _ in range(n - len(order))]
        source.taken, source.repeated = n, max(0, n - len(order))
        chosen += [source.records[i] for i in picks]
    random.Random(f"{config.seed}:order").shuffle(chosen)

    def body(writer: RecordWriter) -> None:
        for record in chosen:
            writer.write(record)

    write_atomically(config.output, fmt, [], None, None, started, "the mix is empty", body)
    if config.report:
        figures = {"kind": kind, "seed": config.seed, "records_out": len(chosen), "sources": [s.to_dict() for s in sources],
                   "seconds": round(time.monotonic() - started, 2)}
        atomic_write_text(config.report, json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return sources


def print_mix(sources: list[Source]) -> None:
    from rich.table import Table

    total = sum(s.taken for s in sources) or 1
    table = Table("source", "weight", "read", "skipped", "duplicates", "distinct", "taken", "share", "repeated",
                  title="data mix", title_justify="left")
    for s in sources:
        table.add_row(s.path, f"{s.weight:g}", str(s.read), str(s.skipped), str(s.duplicates), str(len(s.records)),
                      str(s.taken), f"{s.taken / total:.1%}", str(s.repeated))
    console.err.print(table)
    for s in sources:
        if s.repeated:
            console.warn(f"{s.path} ran out after {len(s.records)} distinct records: {s.repeated} taken again (with replacement)")
