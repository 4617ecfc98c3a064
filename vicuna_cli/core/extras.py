"""The one import helper for optional dependencies: a missing extra becomes a VicunaError that
names the `pip install` to run, instead of a bare ImportError deep inside a command."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import VicunaError


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import `module` or fail with the install line for vicuna's `extra`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        what = f" (needed for {purpose})" if purpose else ""
        raise VicunaError(
            f"the optional package {top!r} is not installed{what}: {exc}",
            hint=f"pip install 'vicuna-cli[{extra}]'",
        ) from exc


def available(module: str) -> bool:
    """True when `module` can be imported (used to pick a fast path, e.g. flash-attn)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
