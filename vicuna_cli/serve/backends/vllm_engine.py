"""The `vllm` worker backend (GPU, behind the extra): vLLM's async engine fed the token ids that
core/encoding.py makes, so templates stay the ones from core/templates.py.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from ...core.encoding import EncodedPrompt
from ..protocol import GenerateParams, GenerateRequest, ServeError, WorkerModel
from .base import WorkerStream, choice_seed, encode_request


def vllm_sampling_kwargs(p: GenerateParams, stop: list[str], max_tokens: int, seed: int | None) -> dict[str, Any]:
    """GenerateParams -> vllm.SamplingParams keyword arguments (one choice per engine request)."""
    return {
        "n": 1,
        "temperature": p.temperature,
        "top_p": p.top_p if p.top_p > 0 else 1e-8,  # vLLM wants top_p in (0, 1]
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": list(stop),
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logprobs": (p.top_logprobs or 0) if p.logprobs else None,
    }


def vllm_structured_outputs(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's response_format -> keyword arguments of vLLM's StructuredOutputsParams (>= 0.12;
    GuidedDecodingParams before, same fields), as vLLM's own OpenAI server maps it."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return {"json_object": True}
    return {"json": response_format["json_schema"]["schema"]}


def vllm_structured_kwargs(vllm_sampling_params: Any, structured: dict[str, Any] | None) -> dict[str, Any]:
    """The vllm.SamplingParams keyword carrying the constraint on the installed vLLM release."""
    if structured is None:
        return {}
    params_class = getattr(vllm_sampling_params, "StructuredOutputsParams", None)
    if params_class is not None:
        return {"structured_outputs": params_class(**structured)}
    return {"guided_decoding": vllm_sampling_params.GuidedDecodingParams(**structured)}


class VLLMBackend:
    """vLLM's AsyncLLM (V1 engine; AsyncLLMEngine on older releases) fed our rendered token ids,
    so templates stay the ones from core/templates.py."""

    def __init__(self, name: str, model_ref: str | None, template: str | None, max_batch_size: int,
                 max_queue: int, dtype: str, *, trust_remote_code: bool = False):
        from ...core.extras import require
        from ...core.hf import load_pretrained
        from ...core.models import resolve
        from ...core.templates import template_for_model

        vllm = require("vllm", "vllm", "the vllm worker backend")
        try:
            from vllm.v1.engine.async_llm import AsyncLLM as engine_class
        except ImportError:
            engine_class = vllm.AsyncLLMEngine
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.vllm = vllm
        path = resolve(model_ref).path
        self.tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        self.template = template_for_model(self.tokenizer, template)
        self.engine = engine_class.from_engine_args(AsyncEngineArgs(model=str(path), max_num_seqs=max_batch_size, dtype=dtype,
                                                                    trust_remote_code=trust_remote_code))
        self.context_length = int(getattr(self.engine.model_config, "max_model_len", 0) or 2048)
        self.max_queue = max_queue
        self.active = 0
        self.model = WorkerModel(name=name, backend="vllm", context_length=self.context_length, template=self.template.name)

    def counts(self) -> tuple[int, int]:
        return self.active, 0

    def prompt_ids(self, request: GenerateRequest) -> EncodedPrompt:
        return encode_request(self.tokenizer, self.template, self.context_length, request)

    async def open(self, request: GenerateRequest) -> WorkerStream:
        import uuid

        from vllm import sampling_params
        from vllm.sampling_params import RequestOutputKind

        prompt = self.prompt_ids(request)
        ids, stop, p = prompt.ids, list(prompt.stop), request.params
        room = self.context_length - len(ids)
        if self.active + p.n > self.max_queue:
            raise ServeError(429, f"the worker's queue is full ({self.max_queue} requests); retry later", "queue_full")
        structured = vllm_structured_kwargs(sampling_params, vllm_structured_outputs(p.response_format))
        sources = []
        for index in range(p.n):
            kwargs = {**vllm_sampling_kwargs(p, stop, min(p.max_tokens or room, room), choice_seed(p.seed, index)), **structured}
            params = self.vllm.SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
            sources.append(self._events(index, ids, params, f"{request.request_id}-{index}-{uuid.uuid4().hex[:6]}"))
        return WorkerStream(len(ids), sources)

    async def _events(self, index: int, ids: list[int], params: Any, request_id: str) -> AsyncIterator[dict]:
        self.active += 1
        try:
            prompt = self.vllm.TokensPrompt(prompt_token_ids=ids)
            # Closing this generator (client gone) makes vLLM abort the request.
            async for output in self.engine.generate(prompt, params, request_id):
                out = output.outputs[0]
                logprobs = None
                if params.logprobs is not None and out.logprobs:
                    logprobs = [self._logprob_entry(tid, step, params.logprobs) for tid, step in zip(out.token_ids, out.logprobs)]
                finish = out.finish_reason if output.finished else None
                yield {"index": index, "text": out.text, "token_ids": list(out.token_ids), "logprobs": logprobs,
                       "finish_reason": {"abort": "cancelled"}.get(finish, finish)}
        finally:
            self.active -= 1

    def _logprob_entry(self, token_id: int, step: dict, top: int) -> dict:
        def one(tid: int, lp: Any) -> dict:
            text = lp.decoded_token if getattr(lp, "decoded_token", None) is not None else self.tokenizer.decode([tid])
            return {"token": text, "logprob": float(lp.logprob), "bytes": list(text.encode("utf-8"))}

        item = one(token_id, step[token_id])
        ranked = sorted(step.items(), key=lambda kv: kv[1].rank or 0)  # the sampled token may sit outside the top
        item["top_logprobs"] = [one(t, lp) for t, lp in ranked][:top]
        return item

    async def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)  # AsyncLLM has it; the old AsyncLLMEngine does not
        if shutdown is not None:
            shutdown()

