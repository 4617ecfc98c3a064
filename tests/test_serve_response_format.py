"""`response_format` through `vicuna serve`: validation (400 naming `response_format`), the hf
worker backend enforcing it, the openai proxy forwarding it unchanged, the vLLM mapping, and one
end-to-end run of the embedded model with the official `openai` client (and the judge's client)."""

from __future__ import annotations

import asyncio
import json
import sys
from types import SimpleNamespace

import pytest
from structured_formats import VERDICT_FORMAT, VERDICT_SCHEMA

from vicuna_cli.serve.protocol import GenerateParams, GenerateRequest, ServeError


# -- validation at the API (no worker needed: a bad request never reaches the controller)


@pytest.fixture(scope="module")
def api():
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.api import create_app

    with TestClient(create_app("http://127.0.0.1:9")) as client:
        yield client


BAD_FORMATS = [
    ({"type": "xml"}, "response_format: type must be one of text, json_object, json_schema; got 'xml'"),
    ({"type": "json_schema"}, "response_format: type json_schema needs a 'json_schema' object with 'name' and 'schema'"),
    ({"type": "json_schema", "json_schema": {"name": "v"}}, "response_format: json_schema.schema must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "", "schema": {}}}, "response_format: json_schema.name must be a non-empty string"),
    ("json_object", "response_format: must be an object with a 'type', got str"),
]


@pytest.mark.parametrize("value, message", BAD_FORMATS)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_bad_response_format_is_a_400_naming_it(api, route, value, message):
    body = {"model": "tiny", "response_format": value, "max_tokens": 4}
    if route == "chat":
        response = api.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]})
    else:
        response = api.post("/v1/completions", json={**body, "prompt": "hi"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert error["message"] == message


# -- backends


def test_openai_proxy_forwards_response_format_unchanged():
    from vicuna_cli.serve.backends import OpenAIProxyBackend

    backend = OpenAIProxyBackend("hosted", "http://127.0.0.1:9/v1", upstream_model="up", api_key=None, max_queue=4)
    try:
        params = GenerateParams(response_format=VERDICT_FORMAT)
        path, body = backend.payload(GenerateRequest(model="hosted", request_id="r", messages=[{"role": "user", "content": "x"}], params=params))
        assert path == "/chat/completions" and body["response_format"] == VERDICT_FORMAT
        path, body = backend.payload(GenerateRequest(model="hosted", request_id="r", prompt="x", params=GenerateParams(response_format={"type": "json_object"})))
        assert path == "/completions" and body["response_format"] == {"type": "json_object"}
        _, body = backend.payload(GenerateRequest(model="hosted", request_id="r", prompt="x"))
        assert "response_format" not in body
    finally:
        asyncio.run(backend.close())


def test_vllm_structured_outputs_mapping():
    from vicuna_cli.serve.backends.vllm_engine import vllm_structured_kwargs, vllm_structured_outputs

    assert vllm_structured_outputs(None) is None
    assert vllm_structured_outputs({"type": "text"}) is None
    assert vllm_structured_outputs({"type": "json_object"}) == {"json_object": True}
    assert vllm_structured_outputs(VERDICT_FORMAT) == {"json": VERDICT_SCHEMA}

    new = SimpleNamespace(StructuredOutputsParams=lambda **kw: ("structured", kw))  # vLLM >= 0.12
    old = SimpleNamespace(GuidedDecodingParams=lambda **kw: ("guided", kw))  # before
    assert vllm_structured_kwargs(new, {"json": VERDICT_SCHEMA}) == {"structured_outputs": ("structured", {"json": VERDICT_SCHEMA})}
    assert vllm_structured_kwargs(old, {"json_object": True}) == {"guided_decoding": ("guided", {"json_object": True})}
    assert vllm_structured_kwargs(new, None) == {}


@pytest.fixture(scope="module")
def hf_backend(sp_model_dir):
    from vicuna_cli.serve.backends import HFBackend
    from vicuna_cli.serve.config import WorkerConfig

    cfg = WorkerConfig()
    backend = HFBackend("tiny", str(sp_model_dir), None, "cpu", "float32", "native", 4, cfg.max_queue, cfg.prefix_cache_mb)
    try:
        yield backend
    finally:
        asyncio.run(backend.close())


def generate(backend, response_format, **params):
    request = GenerateRequest(model="tiny", request_id="r", messages=[{"role": "user", "content": "Judge A vs B as JSON"}],
                              params=GenerateParams(response_format=response_format, **params))

    async def main():
        generation = await backend.open(request)
        texts, reasons = {}, {}
        async for event in generation.events():
            if "index" in event:
                texts[event["index"]] = texts.get(event["index"], "") + event["text"]
                if event["finish_reason"]:
                    reasons[event["index"]] = event["finish_reason"]
        return texts, reasons

    return asyncio.run(main())


def test_hf_backend_enforces_a_json_schema_for_every_choice(hf_backend):
    texts, reasons = generate(hf_backend, VERDICT_FORMAT, temperature=1.0, seed=4, n=3, max_tokens=200)
    assert reasons == {0: "stop", 1: "stop", 2: "stop"}
    for text in texts.values():
        value = json.loads(text)
        assert set(value) == {"verdict", "score"} and value["verdict"] in ("A", "B", "tie") and 1 <= value["score"] <= 10
    free, _ = generate(hf_backend, {"type": "text"}, temperature=0, max_tokens=40)  # text: unconstrained
    with pytest.raises(ValueError):
        json.loads(free[0])


def test_hf_backend_400s(hf_backend, monkeypatch):
    bad = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}
    with pytest.raises(ServeError) as info:
        generate(hf_backend, bad)
    assert (info.value.status, info.value.param, info.value.code) == (400, "response_format", "invalid_value")
    assert info.value.message == "response_format: the JSON schema cannot be compiled: Invalid range: minimum greater than maximum"
    assert hf_backend.counts() == (0, 0)  # nothing was queued

    from vicuna_cli.core import structured

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if the serve extra were not installed
    monkeypatch.setattr(structured, "_vocabularies", {})
    with pytest.raises(ServeError) as info:
        generate(hf_backend, {"type": "json_object"})
    assert (info.value.status, info.value.param, info.value.code) == (400, "response_format", "response_format_unavailable")
    assert "need the optional package 'xgrammar'" in info.value.message
    assert info.value.message.endswith("install it with pip install 'vicuna-cli[serve]'  (or: pip install --no-deps xgrammar apache-tvm-ffi)")


# -- end to end: the embedded model behind a live `vicuna serve`


@pytest.mark.slow
def test_live_server_with_the_openai_client_and_the_judge_client(tmp_path, embedded_model_home):
    import openai
    from serve_single import single_server

    from vicuna_cli.judge.client import ApiClient, Sampling
    from vicuna_cli.judge.verdicts import PAIR_SCHEMA, parse_pair

    (tmp_path / "home").symlink_to(embedded_model_home)  # single_server uses root/home as VICUNA_HOME
    model = "smollm2-135m-instruct"
    with single_server(tmp_path, model) as proc:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model=model, temperature=0, max_tokens=120, response_format=VERDICT_FORMAT,
            messages=[{"role": "user", "content": "Which is the better answer to 2+2, A: 4 or B: 5? Give a verdict and a score."}],
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)
        assert set(value) == {"verdict", "score"} and value["verdict"] in ("A", "B", "tie") and 1 <= value["score"] <= 10

        # What `vicuna judge` sends: the pairwise verdict schema as response_format.
        judge = ApiClient(f"{proc.url}/v1", None, model, max_retries=0)
        messages = [
            {"role": "system", "content": "You compare two answers. Reply with a one-sentence explanation and a verdict."},
            {"role": "user", "content": "Question: What is 2+2?\nAnswer A: 4\nAnswer B: 5"},
        ]
        reply = judge.complete(messages, Sampling(temperature=0, max_tokens=160), PAIR_SCHEMA)
        assert judge.schema_mode == "auto"  # the server accepted response_format (a 400 would turn it off)
        verdict = json.loads(reply.text)  # the reply is the JSON itself, no text parsing needed
        assert set(verdict) == {"explanation", "verdict"} and isinstance(verdict["explanation"], str)
        assert parse_pair(reply.text) == verdict["verdict"]
