"""`--check`: compare a freshly written model with an expected model, or with sha256 sums (a
published checksum file in `sha256sum` or BSD format, or a vicuna manifest), before it is
published. A mismatch lists the tensors concerned and stops the run, so nothing wrong is left.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from ..core import console
from ..core.errors import VicunaError
from ..core.models import resolve
from .shards import WeightSource

_GNU = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_BSD = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")
_SHOWN = 20


def verify(output: Path, expected: str, weight_map: dict[str, str]) -> str:
    """Returns a one-line verdict; raises VicunaError (after a table on stderr) on any mismatch."""
    path = Path(expected).expanduser()
    if path.is_file():
        mismatches, verdict = _against_sums(output, path, weight_map)
    else:  # a bare weights directory will do; anything else goes through model resolution
        mismatches, verdict = _against_model(output, path if path.is_dir() else resolve(expected).path)
    if not mismatches:
        return verdict
    table = Table("mismatch", "detail", title=f"check against {escape(expected)}", title_justify="left")
    for what, detail in mismatches[:_SHOWN]:
        table.add_row(escape(what), escape(detail))
    if len(mismatches) > _SHOWN:
        table.add_row(f"... {len(mismatches) - _SHOWN} more", "")
    console.err.print(table)
    raise VicunaError(
        f"check failed: {len(mismatches)} mismatch(es) against {expected}",
        hint="nothing was written; check that the base is the exact model the delta was made against",
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_sums(path: Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum` file, a BSD-style one, or JSON (a vicuna manifest or
    a plain {name: sha256} map)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    sums: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
            files = data.get("files", data)
            sums = {Path(k).name: (v["sha256"] if isinstance(v, dict) else v) for k, v in files.items()}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise VicunaError(f"{path} is JSON but not a checksum map ({exc})") from exc
    else:
        for line in text.splitlines():
            gnu, bsd = _GNU.match(line.strip()), _BSD.match(line.strip())
            if gnu:
                sums[Path(gnu[2]).name] = gnu[1]
            elif bsd:
                sums[Path(bsd[1]).name] = bsd[2]
    if not sums or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) for v in sums.values()):
        raise VicunaError(f"no sha256 sums found in {path}",
                          hint="give lines like `<64 hex digits>  model-00001-of-00002.safetensors`")
    return {name: digest.lower() for name, digest in sums.items()}


def _against_sums(output: Path, path: Path, weight_map: dict[str, str]) -> tuple[list, str]:
    sums = read_sums(path)
    present = [name for name in sums if (output / name).is_file()]
    if not present:
        raise VicunaError(
            f"none of the {len(sums)} files listed in {path} are in the output "
            f"(it lists {', '.join(sorted(sums)[:3])})",
            hint="the sums describe another file layout: match it with --max-shard-size, "
            "or check against the expected model directory instead",
        )
    mismatches = []
    for name, digest in sums.items():
        if name not in present:
            mismatches.append((name, "listed in the checksum file but not written"))
        elif sha256_file(output / name) != digest:
            tensors = [t for t, f in weight_map.items() if f == name]
            held = f"; holds {len(tensors)} tensor(s): {', '.join(tensors[:5])}" if tensors else ""
            mismatches.append((name, f"sha256 differs{held}"))
    return mismatches, f"{len(present)} file(s) match the sha256 sums in {path}"


def _against_model(output: Path, expected: Path) -> tuple[list, str]:
    ours, theirs = WeightSource(output, "output"), WeightSource(expected, "expected model")
    mismatches = [(name, "only in the expected model") for name in theirs.tensors if name not in ours.tensors]
    for name, info in ours.tensors.items():
        other = theirs.tensors.get(name)
        if other is None:
            mismatches.append((name, "not in the expected model"))
        elif other.shape != info.shape:
            mismatches.append((name, f"shape {list(info.shape)}, expected {list(other.shape)}"))
        else:
            a, b = ours.read(name), theirs.read(name).to(info.dtype)
            if not torch.equal(a, b):
                diff = (a.double() - b.double()).abs()
                mismatches.append((name, f"{int((diff > 0).sum())} of {a.numel()} values differ, "
                                         f"max |diff| {diff.max().item():.3g}"))
    return mismatches, f"all {len(ours.tensors)} tensors identical to {expected}"
