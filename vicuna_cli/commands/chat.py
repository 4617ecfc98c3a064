"""`vicuna chat`: talk to a local model or an OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import QUANTIZE, THREADS, TRUST_REMOTE_CODE


def chat(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Alias, model dir, .gguf or Hub id; with --api-base, the server's model id. Default: the embedded smollm2-135m-instruct."),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="Conversation template (see `vicuna templates`); default: the model's own, else vicuna_v1.1."),
    api_base: Optional[str] = typer.Option(None, "--api-base", help="Chat with an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="API key for --api-base [env: OPENAI_API_KEY].", show_envvar=False),
    system: Optional[str] = typer.Option(None, "--system", help="System message (default: the template's)."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling probability mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens; 0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalty for repeated tokens; 1 = off (local models)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Most tokens per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16 (bf16), float16 (fp16) or float32 (fp32)."),
    implementation: str = typer.Option("auto", "--implementation", help="auto (native Llama on CPU when it fits, else transformers), native, or transformers."),
    quantize: str = QUANTIZE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    threads: Optional[int] = THREADS,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Ask this and exit (repeat for several turns)."),
    json_output: bool = typer.Option(False, "--json", help="Non-interactive: one JSON object per turn on stdout."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options; flags override it."),
) -> None:
    """Chat in the terminal (a REPL with /help), or answer prompts from --prompt or stdin lines.

    Interactive when stdin is a terminal and no --prompt is given. Answers go to stdout, speed
    and logs to stderr. Ctrl-C stops an answer, Ctrl-D exits.
    """
    from ..chat.runner import ChatConfig, run
    from ..core.config import build_config
    from ._common import given_flags

    flags = given_flags(ctx)
    if "prompt" in flags and not flags["prompt"]:
        flags.pop("prompt")
    run(build_config(ChatConfig, flags, config))
