"""Weight deltas and LoRA merges, streamed tensor by tensor (`vicuna apply-delta`).

    from vicuna_cli.delta import DeltaConfig, run
    run(DeltaConfig(base="llama-7b", delta="vicuna-7b-delta", output="vicuna-7b"))
"""

from .config import DeltaConfig

__all__ = ["DeltaConfig", "DeltaResult", "render", "run"]


def __getattr__(name: str):
    # apply.py imports torch: loaded on first use, so the CLI can read DeltaConfig for --help.
    if name in ("DeltaResult", "render", "run"):
        from . import apply

        return getattr(apply, name)
    raise AttributeError(name)
