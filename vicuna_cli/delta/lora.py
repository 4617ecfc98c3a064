"""Read a peft LoRA adapter (adapter_config.json + adapter_model.safetensors/.bin) without peft,
and pair its tensors with the base weights they change: W += (B @ A) * alpha / r per module.

peft names the tensors of module `M` as `base_model.model.M.lora_A.weight` / `.lora_B.weight`
(linear layers) or `M.lora_embedding_A` / `M.lora_embedding_B` (embeddings, merged transposed).
`M.base_layer.weight` (an embedding saved whole) and `modules_to_save` tensors such as
`base_model.model.lm_head.weight` replace the base tensor outright.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import VicunaError
from .shards import WeightSource

PREFIX = "base_model.model."
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json",
                 "tokenizer.model", "*.txt", "*.jinja"]
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraPair:
    a: str  # adapter tensor names
    b: str
    scale: float
    transposed: bool  # embeddings and fan_in_fan_out layers store the update transposed


@dataclass(frozen=True)
class AdapterPlan:
    pairs: dict[str, LoraPair]  # base tensor name -> its low-rank update
    replacements: dict[str, str]  # base tensor name -> adapter tensor that replaces it


def resolve_adapter(name: str) -> Path:
    """A local peft adapter directory, or a Hub repo id downloaded once."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise VicunaError(
                f"{path} is not a LoRA adapter: adapter_config.json is missing",
                hint="a peft adapter directory holds adapter_config.json and adapter_model.safetensors",
            )
        return path
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise VicunaError(f"LoRA adapter {name!r} is neither a directory nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:  # falls back to the local Hub cache when the network is unreachable
        return resolve_adapter(snapshot_download(name, allow_patterns=ADAPTER_FILES))
    except VicunaError:
        raise
    except Exception as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise VicunaError(f"could not download the LoRA adapter {name!r}: {first}",
                          hint="check the network (or HF_TOKEN), or pass a local adapter directory") from exc


def read_adapter_config(root: Path) -> dict:
    try:
        config = json.loads((root / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VicunaError(f"{root / 'adapter_config.json'} is not readable JSON ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise VicunaError(f"{root} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise VicunaError(f"{root} is a DoRA adapter, which this merge does not support",
                          hint="merge it with peft: model.merge_and_unload()")
    for key in ("lora_alpha", "r"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise VicunaError(f"{root / 'adapter_config.json'}: {key} must be a positive number")
    return config


def plan_adapter(base: WeightSource, adapter: WeightSource, config: dict) -> AdapterPlan:
    halves: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for name in adapter.tensors:
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        match = _PAIR.match(key)
        if match:
            halves.setdefault(match["module"], {})[match["kind"].split(".")[0][-1]] = name  # A or B
            continue
        target = key.replace(".base_layer.", ".")
        if target not in base.tensors:
            raise VicunaError(
                f"the adapter tensor {name} has no counterpart in the base (looked for {target})",
                hint="the adapter was trained on another model, or uses a peft feature this merge does not "
                "support (DoRA, trainable tokens, LoRA biases)",
            )
        replacements[target] = name
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            raise VicunaError(f"the adapter holds only lora_{next(iter(half))} for {module}; it is incomplete")
        target = f"{module}.weight"
        if target not in base.tensors:
            raise VicunaError(f"the adapter changes {module}, which the base does not have ({target} is missing)",
                              hint="merge the adapter into the model it was trained on")
        a, b = adapter.tensors[half["A"]], adapter.tensors[half["B"]]
        rank = a.shape[0]
        embedding = half["A"].endswith("lora_embedding_A")
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        rows, cols = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        # An embedding saved whole in the adapter (`base_layer`) is the weight the update applies to.
        shape = (adapter.tensors[replacements[target]] if target in replacements else base.tensors[target]).shape
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or tuple(shape) != (rows, cols):
            raise VicunaError(
                f"LoRA shapes do not fit {target}: A {list(a.shape)}, B {list(b.shape)}, weight {list(shape)}",
                hint="merge the adapter into the model it was trained on",
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[target] = LoraPair(half["A"], half["B"], scale, transposed)
    return AdapterPlan(pairs, replacements)


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
