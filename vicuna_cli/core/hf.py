"""The one door to transformers' `from_pretrained`: every model, tokenizer or config load in
vicuna goes through `load_pretrained` (tests/test_security_models.py scans the package for any
call that does not).

Why one door: a model folder can ship its own Python (`auto_map` in config.json plus
`modeling_*.py`). When `trust_remote_code` is not given, transformers asks "Do you wish to run the
custom code? [y/N]" on stdout and reads the answer from stdin, so `printf 'y\\n...' | vicuna chat
-m DIR` ran DIR's code. Here the answer is always given, never asked: False unless the user
passed --trust-remote-code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import VicunaError

TRUST_REMOTE_CODE_HELP = (
    "Run Python code shipped inside the model folder or Hub repo (its modeling_*.py / "
    "tokenization_*.py, named by auto_map in its config) with your user's rights. Off: such a "
    "model is refused. Only for models whose code you have read or trust."
)


def remote_code_refused(path: Path | str) -> VicunaError:
    return VicunaError(
        f"{path} needs to run its own Python code (auto_map in its config), and vicuna does not run a model's code "
        "unless asked",
        hint="read the folder's *.py files; if you trust them, pass --trust-remote-code "
        "(config file: trust_remote_code: true)",
    )


def load_pretrained(loader: Any, path: Path | str, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path, **kwargs)` with `trust_remote_code` always explicit.

    The default is the safe one so that a caller that forgets the flag refuses such a model
    (with an error naming --trust-remote-code) rather than running its code.
    """
    try:
        return loader.from_pretrained(path, trust_remote_code=bool(trust_remote_code), **kwargs)
    except ValueError as exc:
        # transformers' refusal of custom code it was told not to run (resolve_trust_remote_code).
        if not trust_remote_code and "trust_remote_code=True" in str(exc):
            raise remote_code_refused(path) from exc
        raise


def has_remote_code(model_dir: Path) -> bool:
    """Whether the model's config names code of its own (then only transformers can run it)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("auto_map"))


class quiet_transformers:
    """Silence transformers' tqdm bars and info logs while it converts or loads."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()
