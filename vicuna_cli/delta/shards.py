"""Read a model's weights one tensor at a time, whatever the layout on disk.

A model directory holds safetensors or PyTorch `.bin` files: one file, or shards with an index
(`*.index.json`). `WeightSource` reads only the headers up front (names, dtypes, shapes), checks
that they form one sound set — every indexed shard present, no shard cut short, no tensor in two
shards, index and shards in agreement — and then hands out tensors one by one, so memory holds
one tensor per input rather than a model.

`.bin` files are pickles, and unpickling can run code: they are opened only with
`torch.load(weights_only=True, mmap=True)`, which accepts nothing but tensors and plain containers.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import VicunaError
from ..core.models import check_safetensors

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
BIN_PATTERNS = ("pytorch_model*.bin", "model*.bin", "adapter_model*.bin")

# An mmapped `.bin` keeps every page it has served resident until the file is unmapped, so the
# file is mapped afresh after this many bytes: memory stays near one tensor, and the pickle's
# table of contents is re-read (~50 ms for 360 tensors) only a few times per GB.
REMAP_BYTES = 256 * 2**20

_REDOWNLOAD = "the file is damaged or incomplete; download or copy it again"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    file: Path


class WeightSource:
    """The tensors of one model directory (`label` names it in errors: base, delta, ...)."""

    def __init__(self, root: Path, label: str):
        self.root = Path(root)
        self.label = label
        self.files, index = weight_files(self.root, label)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            infos = _safetensors_infos(file) if file.suffix == ".safetensors" else _bin_infos(file)
            for info in infos:
                if info.name in self.tensors:
                    raise VicunaError(
                        f"tensor {info.name} of the {label} appears in two shards: "
                        f"{self.tensors[info.name].file.name} and {file.name}",
                        hint=f"the shards in {self.root} come from different models or downloads; "
                        "download the model again",
                    )
                self.tensors[info.name] = info
        if index is not None:
            _check_index(self, index)
        self._bin: tuple[Path, dict, int] | None = None  # mapped file, its tensors, bytes served

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            from safetensors import safe_open

            # Opened per tensor: an open file keeps every page it has served mapped and counted
            # as this process's memory, which would grow to the whole shard.
            with safe_open(str(info.file), framework="pt") as f:
                tensor = f.get_tensor(name)
        else:
            if self._bin is None or self._bin[0] != info.file or self._bin[2] > REMAP_BYTES:
                self._bin = None  # unmap before mapping again
                self._bin = (info.file, _load_bin(info.file), 0)
            file, tensors, served = self._bin
            tensor = tensors[name]
            self._bin = (file, tensors, served + info.nbytes)
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise VicunaError(f"{info.file} changed while it was being read (tensor {name})")
        return tensor


def weight_files(root: Path, label: str) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of `root`, and the index's weight map if there is one. Safetensors win
    over `.bin` when a directory has both."""
    for kind in ("safetensors", "bin"):
        indexes = sorted(root.glob(f"*.{kind}.index.json"))
        if indexes:
            weight_map = _read_index(indexes[0])
            missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
            if missing:
                raise VicunaError(
                    f"the {label} is incomplete: {indexes[0].name} lists {len(missing)} shard(s) missing "
                    f"from {root}: {', '.join(missing[:3])}",
                    hint="download the missing shards again",
                )
            return [root / f for f in dict.fromkeys(sorted(weight_map.values()))], weight_map
    files = sorted(root.glob("*.safetensors")) or sorted(
        {p for pattern in BIN_PATTERNS for p in root.glob(pattern)}
    )
    if not files:
        raise VicunaError(
            f"the {label} {root} has no weights (*.safetensors or pytorch_model*.bin)",
            hint="point at a Hugging Face model directory",
        )
    return files, None


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VicunaError(f"{path} is not a valid shard index ({exc})", hint=_REDOWNLOAD) from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VicunaError(f"{path} is not a valid shard index: weight_map must map names to files")
    return weight_map


def _check_index(source: WeightSource, weight_map: dict[str, str]) -> None:
    for name, file in weight_map.items():
        info = source.tensors.get(name)
        if info is None or info.file.name != file:
            raise VicunaError(
                f"the index of the {source.label} says {name} is in {file}, but that shard does not hold it",
                hint=f"the index and the shards in {source.root} come from different downloads",
            )
    extra = [name for name in source.tensors if name not in weight_map]
    if extra:
        raise VicunaError(
            f"the shards of the {source.label} hold {len(extra)} tensor(s) its index does not list: "
            f"{', '.join(extra[:3])}",
            hint=f"the index and the shards in {source.root} come from different downloads",
        )


def _safetensors_infos(path: Path) -> list[TensorInfo]:
    check_safetensors(path)  # a clear error for a truncated or corrupt file
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    entries = sorted(
        ((name, meta) for name, meta in header.items() if name != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],  # file order: reads go forward through the file
    )
    infos = []
    for name, meta in entries:
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise VicunaError(f"{path}: tensor {name} has an unsupported dtype {meta.get('dtype')!r}")
        infos.append(TensorInfo(name, dtype, tuple(meta["shape"]), path))
    return infos


def _bin_infos(path: Path) -> list[TensorInfo]:
    return [TensorInfo(name, t.dtype, tuple(t.shape), path) for name, t in _load_bin(path).items()]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Map a `.bin` checkpoint lazily and safely; every way it can fail becomes one clear error."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VicunaError(
            f"refusing to load {path}: it is a pickle that holds more than tensors, and unpickling "
            "it could run code",
            hint="use a safetensors copy of the model, or convert this file on a machine you do not mind exposing",
        ) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "mmap" in text and "zipfile" in text:
            raise VicunaError(
                f"{path} is in the legacy (pre-1.6) PyTorch format, which cannot be read lazily",
                hint="re-save it with a recent torch (torch.save) or convert it to safetensors",
            ) from exc
        raise VicunaError(f"{path} is truncated or not a PyTorch checkpoint: {text.splitlines()[0]}",
                          hint=_REDOWNLOAD) from exc
    except (OSError, EOFError, ValueError) as exc:
        raise VicunaError(f"could not read {path}: {exc}", hint=_REDOWNLOAD) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise VicunaError(f"{path} does not hold a flat dictionary of named tensors (a state dict)")
    return state
