"""Preference data → one pairwise JSONL: `{"id", "prompt": [messages], "chosen": [messages],
"rejected": [messages], "source", "margin"?}` (OpenAI-style messages; the answers are the
assistant turn(s) that follow the prompt).

Readers: Anthropic HH-RLHF (whole dialogues, split where they diverge), Stanford SHP (score ratio
filter of the SHP paper), OASST1 ranked siblings, and generic `{prompt, chosen, rejected}`. Same
machinery as `data clean`: streamed inputs (formats.InputFile), counted steps and a report
(report.Report), --strict, an atomic output (formats.RecordWriter).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterator


from ..core.errors import VicunaError
from .formats import InputFile, Raw, RecordWriter, Skip
from .report import Progress, Report
from .steps import Result, text_key
from .config import PairsConfig  # noqa: F401  (also imported from here)

PAIR_FORMATS = {
    "hh-rlhf": 'Anthropic HH-RLHF: {"chosen", "rejected"} whole dialogues ("\\n\\nHuman: … \\n\\nAssistant: …")',
    "shp": 'Stanford SHP: {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"}',
    "oasst1": "OASST1 message table or tree export: ranked assistant siblings become pairs",
    "pairs": '{"prompt", "chosen", "rejected"} strings, or message lists (this command\'s own output)',
}
PAIR_STEPS = ("read", "empty", "identical", "ratio", "dedup")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
NO_REJECTED = "no 'rejected' answer"  # the reason `read_pairs(..., need_rejected=True)` refuses




def detect_pair_format(value: Any, name: str) -> str:
    from .oasst import is_message, is_tree

    if isinstance(value, dict):
        if "human_ref_A" in value and "human_ref_B" in value:
            return "shp"
        if "chosen" in value and "rejected" in value:
            return "pairs" if "prompt" in value else "hh-rlhf"
        if "chosen" in value:
            raise VicunaError(f"{name} record 1 has 'chosen' but {NO_REJECTED}: a preference pair needs both answers",
                              hint="DPO and reward models learn from pairs: add the worse answer as 'rejected' "
                              "(or train on the chosen answers alone with `vicuna train sft`)")
        if is_message(value) or is_tree(value):
            return "oasst1"
    keys = ", ".join(sorted(value)[:8]) if isinstance(value, dict) else type(value).__name__
    raise VicunaError(f"unknown preference format: the first record of {name} has {keys or 'no keys'}",
                      hint="supported: " + "; ".join(PAIR_FORMATS.values()) + " (or force one with --input-format)")


def hh_turns(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' → messages (text before the first marker is dropped)."""
    parts = _HH_TURN.split(text)
    return [{"role": _HH_ROLES[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def split_dialogues(chosen: list[dict[str, str]], rejected: list[dict[str, str]], where: str
                    ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen answer, rejected answer): the prompt is the turns both sides share, up to
    the assistant turn where they part (a prompt ends with the user's turn)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise VicunaError(f"{where}: chosen and rejected share no prompt (they differ from the first user turn)",
                          hint="each HH-RLHF pair must be two continuations of the same dialogue")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant" if what != "prompt" else "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                       and m.get("role") in ("system", "user", "assistant") for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise Skip(f"'{what}' is neither a string nor a list of {{role, content}} messages")


def to_pairs(raw: Raw, fmt: str, shp_min_ratio: float) -> list[dict[str, Any]]:
    """The pairs of one record (OASST1: of one tree); raises Skip for a record of the wrong shape."""
    value = raw.value
    if not isinstance(value, dict):
        raise Skip("not a JSON object")
    where = f"{raw.source} record {raw.index + 1}" + (f" (line {raw.line})" if raw.line else "")
    record_id = str(value["id"]) if isinstance(value.get("id"), (str, int)) else f"{Path(raw.source).stem}_{raw.index}"
    if fmt in ("hh-rlhf", "pairs") and value.get("rejected") is None:
        raise Skip(NO_REJECTED)
    if fmt == "hh-rlhf":
        if not isinstance(value.get("chosen"), str) or not isinstance(value.get("rejected"), str):
            raise Skip("hh-rlhf record without string 'chosen' and 'rejected'")
        prompt, chosen, rejected = split_dialogues(hh_turns(value["chosen"]), hh_turns(value["rejected"]), where)
        return [{"id": record_id, "prompt": prompt, "chosen": chosen, "rejected": rejected, "source": "hh-rlhf"}]
    if fmt == "shp":
        return [_shp_pair(value, record_id, shp_min_ratio)]
    if fmt == "oasst1":
        return _oasst_pairs(value)
    pair = {"id": record_id, "prompt": _messages(value.get("prompt"), "prompt"),
            "chosen": _messages(value.get("chosen"), "chosen"), "rejected": _messages(value.get("rejected"), "rejected"),
            "source": str(value.get("source") or Path(raw.source).stem)}
    if value.get("margin") is not None:
        if not isinstance(value["margin"], (int, float)):
            raise Skip("'margin' is not a number")
        pair["margin"] = float(value["margin"])
    return [pair]


def _shp_pair(value: dict[str, Any], record_id: str, min_ratio: float) -> dict[str, Any]:
    label = value.get("labels")
    if label not in (0, 1) or isinstance(label, bool):
        raise Skip(f"SHP 'labels' must be 0 or 1 (got {label!r})")
    a, b = value.get("human_ref_A"), value.get("human_ref_B")
    if not all(isinstance(x, str) for x in (value.get("history"), a, b)):
        raise Skip("SHP record without string 'history', 'human_ref_A' and 'human_ref_B'")
    scores = value.get("score_A"), value.get("score_B")
    if not all(isinstance(s, (int, float)) for s in scores):
        raise Skip("SHP record without numeric 'score_A' and 'score_B'")
    better, worse = (a, b) if label == 1 else (b, a)
    high, low = (scores[0], scores[1]) if label == 1 else (scores[1], scores[0])
    ratio = high / low if low > 0 else float("inf")
    pair = {"id": str(value.get("c_root_id_A", record_id)) + ":" + record_id, "prompt": [{"role": "user", "content": value["history"]}],
            "chosen": [{"role": "assistant", "content": better}], "rejected": [{"role": "assistant", "content": worse}],
            "source": "shp" + (f"/{value['domain']}" if isinstance(value.get("domain"), str) else "")}
    if ratio < min_ratio:
        pair["_drop"] = ("ratio", f"score ratio under {min_ratio:g}")
    return pair


def _oasst_pairs(value: dict[str, Any]) -> list[dict[str, Any]]:
    from .oasst import Tree, turns
    from .split import to_messages

    if "oasst_skip" in value:
        raise Skip(value["oasst_skip"])
    tree = Tree(value["oasst_tree"])
    pairs = [{"_drop": ("read", reason)} for reason in tree.skipped]
    for path, better, worse in tree.ranked_pairs():
        pairs.append({"id": f"{better['message_id']}>{worse['message_id']}", "prompt": to_messages(turns(path)),
                      "chosen": [{"role": "assistant", "content": better["text"]}],
                      "rejected": [{"role": "assistant", "content": worse["text"]}], "source": "oasst1"})
    return pairs


def pair_key(pair: dict[str, Any]) -> bytes:
    """Prompt + both answers, case- and whitespace-insensitive (dedup across sources)."""
    return text_key([f"{part}:{m['role']}:{m['content']}" for part in ("prompt", "chosen", "rejected") for m in pair[part]])


def check_pair(pair: dict[str, Any], result: Result) -> None:
    """The steps after `read`, in order: empty → identical → ratio (dedup is the caller's)."""
    drop = pair.pop("_drop", None)
    if drop and drop[0] == "read":  # a left-out OASST1 message
        result.dropped, result.reason = drop
        return
    if not any(m["role"] == "user" and m["content"].strip() for m in pair["prompt"]):
        result.dropped, result.reason = "empty", "empty prompt"
    elif not any(m["content"].strip() for m in pair["chosen"]) or not any(m["content"].strip() for m in pair["rejected"]):
        result.dropped, result.reason = "empty", "empty answer"
    elif pair["chosen"] == pair["rejected"]:
        result.dropped, result.reason = "identical", "chosen == rejected"
    elif drop:
        result.dropped, result.reason = drop
    result.pieces = [] if result.dropped else [pair]
    result.lengths = [sum(len(m["content"]) for part in ("prompt", "chosen", "rejected") for m in pair[part])]


def results(inputs: list[InputFile], shp_min_ratio: float) -> Iterator[Result]:
    """One Result per pair (or per record that gave none), in input order."""
    from .oasst import tree_records

    for inp in inputs:
        raws = tree_records(inp.records()) if inp.format == "oasst1" else inp.records()
        for raw in raws:
            where = f"{raw.source} record {raw.index + 1}" + (f" (line {raw.line})" if raw.line else "")
            try:
                pairs = to_pairs(raw, inp.format, shp_min_ratio)
            except Skip as skip:
                yield Result(dropped="read", reason=skip.reason, where=where)
                continue
            for pair in pairs:
                result = Result(id=pair.get("id"), where=where)
                check_pair(pair, result)
                if result.pieces:
                    result.key = pair_key(pair)
                yield result


def open_pair_inputs(paths: list[str], input_format: str) -> list[InputFile]:
    from .pipeline import open_inputs

    return open_inputs(paths, input_format, PAIR_FORMATS, detect_pair_format)


def pairs(config: PairsConfig) -> Report:
    """`vicuna data pairs`: every input's preference records → one pairwise JSONL + a report."""
    from .pipeline import check_output, strict_check, write_atomically

    started = time.monotonic()
    check_output(config.output, config.overwrite, config.inputs)
    report = Report({"dedup": config.dedup}, "characters", PAIR_STEPS, "data pairs")
    inputs = open_pair_inputs(config.inputs, config.input_format)

    def run(writer: RecordWriter) -> None:
        seen: set[bytes] = set()
        total = None if any(i.size is None for i in inputs) else sum(i.size for i in inputs)
        with Progress("pairs", total) as progress:
            for n, result in enumerate(results(inputs, config.shp_min_ratio), 1):
                strict_check(result, config.strict)
                if config.dedup and result.dropped is None:
                    if result.key in seen:
                        result.dropped, result.reason, result.pieces = "dedup", "same prompt and answers", []
                    seen.add(result.key)  # type: ignore[arg-type]
                report.add(result)
                for pair in result.pieces:
                    writer.write(pair)
                progress.update(sum(i.read_bytes for i in inputs), n)

    write_atomically(config.output, "jsonl", inputs, report, config.report, started, "no pair survived", run)
    return report


def read_pairs(paths: list[str], notes: Any, shp_min_ratio: float = 2.0, need_rejected: bool = False
               ) -> list[dict[str, Any]]:
    """Every usable pair of `paths` (any pair format), for training and scoring; what is left out
    is counted in `notes` by reason. Ids stay unique across files. With `need_rejected` a record
    without a 'rejected' answer stops the read, naming the record (DPO data must be pairs)."""
    inputs = open_pair_inputs(paths, "auto")
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        for result in results(inputs, shp_min_ratio):
            if need_rejected and result.reason == NO_REJECTED:
                raise VicunaError(f"{result.where}: {NO_REJECTED}: a preference pair needs both answers",
                                  hint="fix or remove that record (`vicuna data pairs` makes pairs from HH-RLHF, SHP "
                                  "or OASST1)")
            if result.dropped:
                notes[result.reason or result.dropped] += 1
            for pair in result.pieces:
                seen[pair["id"]] = seen.get(pair["id"], 0) + 1
                if seen[pair["id"]] > 1:
                    pair["id"] = f"{pair['id']}#{seen[pair['id']]}"
                out.append(pair)
    finally:
        for inp in inputs:
            inp.close()
    return out
