"""Write tensors as sharded safetensors without ever holding a shard in memory.

The shard layout is planned from names, dtypes and shapes before any data exists, so each shard's
header is written first and each slab of a tensor goes to disk (and into the shard's sha256) the
moment it is computed. A shard is fsynced when it is complete; the caller renames the whole
directory into place at the end, so a reader never sees a half-written model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import threading
from pathlib import Path
from typing import Iterable

import torch

from ..core.errors import VicunaError
from ..core.store import human_size
from .shards import SAFETENSORS_DTYPES, TensorSpec

SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`5GB` (10^9, as transformers counts), `2GiB` (2^30), `500MB`, or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{text!r} is too small")
    return size


def plan_shards(tensors: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Fill shards in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes the planned tensors, in plan order, into `directory`.

    `write(name, parts)` takes a tensor as an iterable of flat slabs (in order, planned dtype), so
    a large output tensor never exists whole. A background thread does the file writes, hashing
    and fsyncs while the caller computes the next slabs; an error there (a full disk) is raised
    from the next `write` or from `finish`, which writes the index and returns
    {file name: (sha256, bytes)} of the shards.
    """

    def __init__(self, directory: Path, tensors: list[TensorSpec], max_bytes: int):
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_bytes)
        self.total_bytes = sum(t.nbytes for t in tensors)
        self.written = 0
        self.files: dict[str, tuple[str, int]] = {}
        self.weight_map: dict[str, str] = {}
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._shard = -1
        self._fh = None
        self._hash = None
        self._error: BaseException | None = None
        self._slabs: queue.Queue = queue.Queue(maxsize=8)  # slabs are a few MB: bounded memory
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        shard, planned = self._order[self._next]
        if name != planned.name:
            raise RuntimeError(f"writer got {name}, planned {planned.name}")
        size = 0
        for part in parts:
            if part.dtype != planned.dtype:
                raise RuntimeError(f"writer got {part.dtype} for {name}, planned {planned.dtype}")
            data = part.detach().contiguous().reshape(-1).view(torch.uint8)
            size += data.numel()
            self._put((shard, data))
        if size == 0:  # an empty tensor still opens its shard
            self._put((shard, torch.empty(0, dtype=torch.uint8)))
        if size != planned.nbytes:
            raise RuntimeError(f"writer got {size} bytes for {name}, planned {planned.nbytes}")
        self._next += 1
        self.weight_map[name] = shard_name(shard, len(self.shards))

    def finish(self) -> dict[str, tuple[str, int]]:
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        self._stop()
        if self._error is not None:
            raise self._error
        self._close_shard()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        text = json.dumps(index, indent=2) + "\n"
        self._io(lambda: (self.directory / INDEX_NAME).write_text(text, encoding="utf-8"))
        return self.files

    def abort(self) -> None:
        """Stop the writer thread and close the open shard (the caller removes the directory)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _put(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._slabs.put(item)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._slabs.put(None)
            self._thread.join()

    def _drain(self) -> None:
        # After an error, keep taking slabs (and drop them) so the producer never blocks.
        while (item := self._slabs.get()) is not None:
            if self._error is not None:
                continue
            try:
                shard, data = item
                if shard != self._shard:
                    self._close_shard()
                    self._open_shard(shard)
                array = data.numpy()
                self._io(lambda: self._fh.write(array))
                self._hash.update(array)
                self.written += array.nbytes
            except BaseException as exc:  # handed to the producer thread
                self._error = exc

    def _open_shard(self, shard: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        head = len(raw).to_bytes(8, "little") + raw
        self._shard = shard
        path = self.directory / shard_name(shard, len(self.shards))
        self._fh = self._io(lambda: open(path, "wb"))
        self._hash = hashlib.sha256(head)
        self._io(lambda: self._fh.write(head))
        self._shard_size = len(head) + offset

    def _close_shard(self) -> None:
        if self._fh is None:
            return
        fh = self._fh
        self._io(fh.flush)
        self._io(lambda: os.fsync(fh.fileno()))
        fh.close()
        self._fh = None
        self.files[Path(fh.name).name] = (self._hash.hexdigest(), self._shard_size)

    def _io(self, action):
        """Run a file operation; a full disk or any other OS error becomes one clear message."""
        try:
            return action()
        except OSError as exc:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            where = self.directory.parent
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise VicunaError(
                    f"the disk is full: writing to {where} failed after {human_size(self.written)} "
                    f"of {human_size(self.total_bytes)}; the partial output was removed",
                    hint=f"free at least {human_size(self.total_bytes - self.written)} there, or write elsewhere with -o",
                ) from exc
            raise VicunaError(f"could not write to {where}: {exc.strerror or exc}") from exc
