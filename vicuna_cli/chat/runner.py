"""`vicuna chat` as a function: build the backend and session from a config, then run the REPL
(stdin is a terminal) or the scripted mode (prompts from --prompt or stdin lines)."""

from __future__ import annotations

import json
import sys
from typing import Iterable, Literal, Optional

from pydantic import Field, model_validator

from ..core import console
from ..core.choices import Device, Dtype
from ..core.config import CommandConfig
from ..core.hf import TRUST_REMOTE_CODE_HELP
from ..core.generate import GenerationStats, SamplingParams
from ..core.quantize import QUANTIZE_HELP, Quantize
from ..core.threads import Threads
from .session import ChatSession


class ChatConfig(CommandConfig):
    model: Optional[str] = Field(None, description="Alias, model dir, .gguf or Hub id; with --api-base, the server's model id. Default: the embedded smollm2-135m-instruct.")
    template: Optional[str] = Field(None, description="Conversation template (see `vicuna templates`); default: the model's own, else vicuna_v1.1.")
    api_base: Optional[str] = Field(None, description="Chat with an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1.")
    api_key: Optional[str] = Field(None, description="API key for --api-base [env: OPENAI_API_KEY].")
    system: Optional[str] = Field(None, description="System message (default: the template's).")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens; 0 = off.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Penalty for repeated tokens; 1 = off (local models).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens per answer.")
    seed: Optional[int] = Field(None, description="Seed for reproducible sampling.")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1, mps.")
    dtype: Dtype = Field("auto", description="auto, bfloat16 (bf16), float16 (fp16) or float32 (fp32).")
    implementation: Literal["auto", "native", "transformers"] = Field(
        "auto", description="auto (native Llama on CPU when it fits, else transformers), native, or transformers.")
    # "auto": int8 where it runs (the 100-prompt quality gate passes on both paths, BENCHMARKS.md)
    quantize: Quantize = Field("auto", description=QUANTIZE_HELP)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE_HELP)
    threads: Threads = None
    prompt: list[str] = Field(default_factory=list, description="Ask this and exit (repeat for several turns).")
    json_output: bool = Field(False, description="Non-interactive: one JSON object per turn on stdout.")
    @model_validator(mode="after")
    def _template_is_local(self) -> "ChatConfig":
        if self.api_base and self.template:
            raise ValueError("--template applies to local models; the server at --api-base renders its own")
        return self

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


def make_backend(config: ChatConfig, model: Optional[str] = None):
    from .backends import LocalBackend, OpenAIBackend

    if config.api_base:
        return OpenAIBackend(config.api_base, config.api_key, model or config.model)
    return LocalBackend(model or config.model, config.template, config.device, config.dtype, config.implementation,
                        trust_remote_code=config.trust_remote_code, threads=config.threads, quantize=config.quantize)


def run(config: ChatConfig, interactive: Optional[bool] = None) -> None:
    if interactive is None:
        interactive = not config.prompt and sys.stdin.isatty()
    session = ChatSession(
        backend=make_backend(config),
        params=config.sampling(),
        system=config.system,
        notify=console.warn,
    )
    if interactive:
        from .repl import Repl

        Repl(session, config).run()
    else:
        prompts = config.prompt or (line.rstrip("\n") for line in _stdin_lines())
        run_scripted(session, prompts, config.json_output)


def _stdin_lines() -> Iterable[str]:
    """stdin as UTF-8 text whose undecodable bytes survive as surrogates, for ChatSession.clean
    to replace (and say so) instead of a UnicodeDecodeError ending the whole run."""
    import io

    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # already text (a test's StringIO)
        return sys.stdin
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape")


def run_scripted(session: ChatSession, prompts: Iterable[str], as_json: bool) -> None:
    """One turn per prompt, in one conversation. Answers only on stdout; stats on stderr."""
    for prompt in prompts:
        if not prompt.strip():
            continue
        prompt = session.clean(prompt)  # also echoed in --json, which must encode
        stream = session.ask(prompt)
        if as_json:
            answer = "".join(stream)
            record = {
                "model": session.backend.name,
                "prompt": prompt,
                "answer": answer,
                "stats": session.last_stats.as_dict(),
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            wrote = False
            try:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    wrote = True
            except BaseException:
                if wrote:  # end the partial answer, so the error line never glues onto it
                    sys.stdout.write("\n")
                raise
            sys.stdout.write("\n")  # one line per answer, even an empty one
        sys.stdout.flush()
        print_stats(session.last_stats)
    if session.invalid_inputs > 1:
        console.warn(f"{session.invalid_inputs} inputs were not valid UTF-8; their undecodable bytes were replaced with U+FFFD")


def print_stats(stats: Optional[GenerationStats]) -> None:
    if stats is None:
        return
    ttft = f"{stats.time_to_first_token:.2f} s" if stats.time_to_first_token is not None else "-"
    console.err.print(
        f"[dim]first token {ttft} · {stats.tokens_per_second:.1f} tok/s · "
        f"{stats.prompt_tokens} prompt + {stats.output_tokens} output tokens · {stats.finish_reason}[/dim]"
    )
