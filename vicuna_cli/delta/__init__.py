"""Weight deltas and LoRA merges, streamed tensor by tensor (`vicuna apply-delta`).

    from vicuna_cli.delta import DeltaConfig, run
    run(DeltaConfig(base="llama-7b", delta="vicuna-7b-delta", output="vicuna-7b"))
"""

from .apply import DeltaConfig, DeltaResult, render, run

__all__ = ["DeltaConfig", "DeltaResult", "render", "run"]
