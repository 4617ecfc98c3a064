"""`vicuna serve` pieces in this process (fast): the controller's registry and dispatch, request
validation, backend request mapping (vllm, openai proxy), the vllm import guard, moderation
against a local fake endpoint, API keys, metrics, the OpenAPI schema and the launcher's plan."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fake_worker import fake_worker
from pydantic import ValidationError

from vicuna_cli.core.errors import VicunaError
from vicuna_cli.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParams,
    GenerateRequest,
    HeartbeatRequest,
    RegisterRequest,
    ServeError,
    WorkerModel,
)


def _worker(address: str, *models: str, running: int = 0, waiting: int = 0) -> RegisterRequest:
    return RegisterRequest(worker_id=address, address=address, models=[WorkerModel(name=m, backend="hf") for m in models],
                           max_batch_size=4, max_queue=8, running=running, waiting=waiting)


# ---------------------------------------------------------------------------------------------
# Controller registry


def test_dispatch_prefers_the_least_loaded_and_spreads_a_burst():
    from vicuna_cli.serve.controller import Registry

    registry = Registry(expiry=60)
    registry.register(_worker("http://a", "m", running=3))
    registry.register(_worker("http://b", "m", running=1))
    registry.register(_worker("http://c", "other"))
    assert registry.dispatch("m") == ["http://b", "http://a"]
    # Between heartbeats, dispatched requests count as load (b: 1 + 1 so far, a: 3); equal loads
    # go to the worker chosen least recently.
    picks = [registry.dispatch("m")[0] for _ in range(4)]
    assert picks == ["http://b", "http://a", "http://b", "http://a"]
    registry.heartbeat(HeartbeatRequest(worker_id="http://a", running=0, waiting=0))
    assert registry.dispatch("m")[0] == "http://a"


def test_expiry_unknown_model_and_gone_model():
    from vicuna_cli.serve.controller import Registry

    now = [0.0]  # an injected clock: the expiry is crossed by moving it, not by sleeping
    registry = Registry(expiry=2.0, clock=lambda: now[0])
    registry.register(_worker("http://a", "m"))
    with pytest.raises(ServeError) as unknown:
        registry.dispatch("nope")
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found" and "served: m" in unknown.value.message
    now[0] = 2.0  # at the expiry: still live
    assert registry.dispatch("m") == ["http://a"]
    now[0] = 3.0  # past it: dropped
    with pytest.raises(ServeError) as gone:
        registry.dispatch("m")
    assert gone.value.status == 503 and gone.value.code == "no_worker"
    assert "its last worker (http://a) sent no heartbeat for 3.0 s" in gone.value.message
    assert registry.heartbeat(HeartbeatRequest(worker_id="http://a")) is False  # -> it registers again
    registry.register(_worker("http://a", "m"))
    assert registry.dispatch("m") == ["http://a"]


def test_a_worker_restarted_on_the_same_address_replaces_the_old_entry():
    from vicuna_cli.serve.controller import Registry

    registry = Registry(expiry=60)
    registry.register(_worker("http://a", "m"))
    registry.register(RegisterRequest(worker_id="new-id", address="http://a", models=[WorkerModel(name="m", backend="hf")]))
    assert [s.worker_id for s in registry.status()] == ["new-id"]


def test_controller_routes_need_the_secret_except_reads():
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.controller import create_app

    with fake_worker("s3") as (address, _), TestClient(create_app(expiry=60, secret="s3")) as client:
        body = _worker(address, "m").model_dump()
        denied = client.post("/register", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_secret"
        assert client.post("/register", json=body, headers={"x-vicuna-secret": "s3"}).status_code == 200
        assert client.post("/dispatch", json={"model": "m"}).status_code == 401
        assert client.post("/dispatch", json={"model": "m"}, headers={"x-vicuna-secret": "s3"}).json() == {"candidates": [address]}
        assert [w["address"] for w in client.get("/workers").json()] == [address]  # open: `serve status`
        bad = client.post("/heartbeat", json={"worker_id": 5}, headers={"x-vicuna-secret": "s3"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "worker_id"


# ---------------------------------------------------------------------------------------------
# Requests


def test_request_validation():
    ok = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                               stop="x", max_completion_tokens=5, max_tokens=9, tools=[{"ignored": True}])
    assert ok.messages[0].text() == "ab" and ok.stop_list() == ["x"] and ok.token_limit() == 5
    for bad in ({"stop": [""]}, {"n": 17}, {"temperature": 2.5}, {"top_logprobs": 21}, {"messages": []}, {"seed": 2**63}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(**{"model": "m", "messages": [{"role": "user", "content": "a"}], **bad})
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])


def test_lone_surrogates_are_refused_naming_the_field():
    """Valid JSON ("\\ud800") but not encodable text: found by fuzzing as a 500 at the worker hop."""
    with pytest.raises(ValidationError, match=r"messages\.0\.content holds an unpaired UTF-16 surrogate"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "\udc00x"}])
    with pytest.raises(ValidationError, match=r"stop\.0 holds"):
        CompletionRequest(model="m", prompt="hi", stop=["\ud800"])
    with pytest.raises(ValidationError, match=r"prompt holds"):
        CompletionRequest(model="m", prompt="\ud800")
    assert CompletionRequest(model="m", prompt="한국어 😀").prompts() == ["한국어 😀"]


def test_serve_error_from_an_upstream_body():
    error = ServeError.from_body(429, {"error": {"message": "slow down", "code": "rate_limit_exceeded", "param": None}})
    assert (error.status, error.message, error.code) == (429, "slow down", "rate_limit_exceeded")
    assert error.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    # Anything else is not repeated to the client (it may be an internal service's page): logged.
    other = ServeError.from_body(404, "<html>internal admin page</html>", "worker http://w:1")
    assert (other.status, other.code) == (502, "bad_upstream_reply") and "internal admin" not in other.message
    assert other.message == "worker http://w:1 answered HTTP 404 without an error in OpenAI's shape (its reply is in the server log)"


def test_vllm_request_mapping():
    from vicuna_cli.serve.backends.vllm_engine import vllm_sampling_kwargs

    p = GenerateParams(temperature=0.3, top_p=0.0, max_tokens=50, presence_penalty=0.5, frequency_penalty=-0.2,
                       logprobs=True, top_logprobs=3, n=2)
    assert vllm_sampling_kwargs(p, ["</s>", "USER:"], 40, 11) == {
        "n": 1, "temperature": 0.3, "top_p": 1e-8, "max_tokens": 40, "seed": 11, "stop": ["</s>", "USER:"],
        "presence_penalty": 0.5, "frequency_penalty": -0.2, "logprobs": 3,
    }
    assert vllm_sampling_kwargs(GenerateParams(), [], 16, None)["logprobs"] is None


def test_vllm_backend_names_the_extra_when_vllm_is_missing(monkeypatch):
    from vicuna_cli.serve.backends import VLLMBackend
    from vicuna_cli.serve.config import WorkerConfig

    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm now fails, installed or not
    cfg = WorkerConfig()
    with pytest.raises(VicunaError) as info:
        VLLMBackend("m", "some/model", None, cfg.max_batch_size, cfg.max_queue, cfg.dtype)
    assert "the optional package 'vllm' is not installed (needed for the vllm worker backend)" in info.value.message
    assert info.value.hint == "pip install 'vicuna-cli[vllm]'"


def test_vllm_backend_encodes_with_the_shared_rule(monkeypatch, sp_model_dir):
    """The vllm backend feeds vLLM the ids and stops of core/encoding.py (template stops first) and
    refuses an overflowing prompt with the hf backend's 400 (param included)."""
    import asyncio
    import types

    from transformers import AutoTokenizer

    from vicuna_cli.core.templates import get_template
    from vicuna_cli.serve.backends import VLLMBackend

    sampling_module = types.ModuleType("vllm.sampling_params")
    sampling_module.RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.sampling_params = sampling_module
    made = []
    fake_vllm.SamplingParams = lambda **kwargs: made.append(kwargs) or kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_module)

    backend = object.__new__(VLLMBackend)  # no engine: open() only prepares the requests
    backend.vllm, backend.tokenizer = fake_vllm, AutoTokenizer.from_pretrained(sp_model_dir)
    backend.template, backend.context_length, backend.max_queue, backend.active = get_template("vicuna_v1.1"), 512, 8, 0
    messages = [{"role": "user", "content": "hi"}]
    stream = asyncio.run(backend.open(GenerateRequest(model="m", request_id="r", messages=messages,
                                                      params=GenerateParams(stop=["\n", "</s>"], max_tokens=500))))
    prompt_tokens = len(backend.tokenizer(get_template("vicuna_v1.1").prompt_text(messages))["input_ids"])
    assert stream.prompt_tokens == prompt_tokens
    assert made[0]["stop"] == ["</s>", "USER:", "\n"] and made[0]["max_tokens"] == 512 - prompt_tokens < 500
    for source in stream.sources:
        asyncio.run(source.aclose())
    with pytest.raises(ServeError) as refused:
        asyncio.run(backend.open(GenerateRequest(model="m", request_id="r", messages=[{"role": "user", "content": "hi " * 600}])))
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "context_length_exceeded", "messages")


def test_hf_engine_params_and_seeds_per_choice():
    from vicuna_cli.core.generate import SamplingParams
    from vicuna_cli.serve.backends.base import choice_seed
    from vicuna_cli.serve.backends.hf import engine_params

    p = GenerateParams(temperature=0.5, top_p=0, presence_penalty=1.0, logprobs=True, top_logprobs=2)
    params = SamplingParams(**engine_params(p, ("</s>",), 10, choice_seed(7, 2)))
    assert (params.seed, params.max_new_tokens, params.stop, params.presence_penalty, params.top_logprobs) == (9, 10, ("</s>",), 1.0, 2)
    assert 0 < params.top_p < 1e-6
    assert choice_seed(None, 3) is None


def test_openai_proxy_payloads():
    from vicuna_cli.serve.backends import OpenAIProxyBackend

    backend = OpenAIProxyBackend("hosted", "https://up.example/v1/", "gpt-x", None, max_queue=4)
    p = GenerateParams(temperature=0, top_p=1, max_tokens=8, seed=3, stop=["\n"], logprobs=True, top_logprobs=2, n=2)
    path, body = backend.payload(GenerateRequest(model="hosted", request_id="r", messages=[{"role": "user", "content": "hi"}], params=p))
    assert path == "/chat/completions"
    assert body == {"model": "gpt-x", "stream": True, "stream_options": {"include_usage": True}, "n": 2, "temperature": 0, "top_p": 1,
                    "max_tokens": 8, "seed": 3, "stop": ["\n"], "logprobs": True, "top_logprobs": 2,
                    "messages": [{"role": "user", "content": "hi"}]}
    path, body = backend.payload(GenerateRequest(model="hosted", request_id="r", prompt="Once", params=p))
    assert path == "/completions" and body["prompt"] == "Once" and body["logprobs"] == 2 and "messages" not in body


# ---------------------------------------------------------------------------------------------
# Moderation and keys


class _FakeModeration:
    def __init__(self):
        self.flag = False
        self.requests = []
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/moderations"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self):
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                state.requests.append((self.headers.get("authorization"), body))
                results = [{"flagged": state.flag, "categories": {"violence": state.flag, "hate": False}} for _ in body["input"]]
                data = json.dumps({"results": results}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def test_openai_moderation_refuses_flagged_input_and_fails_closed(monkeypatch):
    import asyncio

    from vicuna_cli.serve.moderation import make_moderation

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    fake = _FakeModeration()
    try:
        moderation = make_moderation("openai", fake.url)
        asyncio.run(moderation.check(["hello"]))
        assert fake.requests == [("Bearer sk-test", {"input": ["hello"]})]
        fake.flag = True
        with pytest.raises(ServeError) as refused:
            asyncio.run(make_moderation("openai", fake.url).check(["something violent"]))
        assert refused.value.status == 400 and refused.value.code == "content_policy_violation"
        assert "(flagged: violence)" in refused.value.message
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    with pytest.raises(ServeError) as down:  # the endpoint is gone: refuse rather than let it through
        asyncio.run(make_moderation("openai", fake.url).check(["hello"]))
    assert down.value.status == 503 and down.value.code == "moderation_unavailable"


def test_openai_moderation_needs_a_key(monkeypatch):
    from vicuna_cli.serve.moderation import make_moderation

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(VicunaError, match="--moderation openai needs an API key"):
        make_moderation("openai")


def test_api_keys_from_flags_and_file(tmp_path):
    from vicuna_cli.serve.security import load_api_keys

    keys = tmp_path / "keys"
    keys.write_text("# ops\n  k2  \n\nk1\n")
    assert load_api_keys(["k1", ""], keys) == ["k1", "k2"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(VicunaError, match="holds no keys"):
        load_api_keys([], tmp_path / "empty")
    with pytest.raises(VicunaError, match="must not contain spaces"):
        load_api_keys(["a b"])


# ---------------------------------------------------------------------------------------------
# Metrics, schema, launcher


def test_request_timer_feeds_ttft_itl_and_counters():
    from vicuna_cli.serve.metrics import ApiMetrics, RequestTimer

    metrics = ApiMetrics()
    timer = RequestTimer(metrics, "m")
    timer.tokens(1)
    timer.tokens(3)  # three tokens in one event: three gaps
    timer.tokens(0)
    timer.finish(["length"], prompt_tokens=5, completion_tokens=4)
    text = metrics.render()[0].decode()
    assert 'vicuna:time_to_first_token_seconds_count{model_name="m"} 1.0' in text
    assert 'vicuna:inter_token_latency_seconds_count{model_name="m"} 3.0' in text
    assert 'vicuna:generation_tokens_total{model_name="m"} 4.0' in text
    assert 'vicuna:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    metrics.set_load([{"models": [{"name": "m"}], "running": 2, "waiting": 1}, {"models": [{"name": "m"}], "running": 1, "waiting": 0}])
    text = metrics.render()[0].decode()
    assert 'vicuna:num_requests_running{model_name="m"} 3.0' in text and 'vicuna:num_workers{model_name="m"} 2.0' in text


def test_openapi_schema_documents_the_error_statuses():
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.api import create_app

    with TestClient(create_app("http://127.0.0.1:9")) as client:
        schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    statuses = set(schema["paths"]["/v1/chat/completions"]["post"]["responses"])
    assert {"200", "400", "401", "404", "413", "429", "503"} <= statuses


def test_launcher_plan(tmp_path):
    from vicuna_cli.serve.config import ServeConfig
    from vicuna_cli.serve.launcher import plan

    config = ServeConfig(model=["a", "b"], workers_per_model=2, port=9000, controller_port=9001, worker_port=9100,
                         api_key=["k"], heartbeat=1, expiry=4, template="vicuna_v1.1")
    roles = plan(config)
    assert [r for r, _ in roles] == ["controller", "worker:9100", "worker:9101", "worker:9102", "worker:9103", "api"]
    assert roles[0][1][:5] == ["controller", "--port", "9001", "--expiry", "4"]
    worker = roles[3][1]
    assert worker[worker.index("-m") + 1] == "b" and worker[worker.index("--controller") + 1] == "http://127.0.0.1:9001"
    assert worker[worker.index("--template") + 1] == "vicuna_v1.1" and worker[worker.index("--heartbeat") + 1] == "1"
    assert worker[worker.index("--quantize") + 1] == "auto"  # each worker loads as the serve command asked (default)
    api = roles[-1][1]
    assert api[api.index("--worker-timeout") + 1] == "4"
    assert "k" not in [a for _, args in roles for a in args]  # keys go by environment (test_security_serve.py)


def test_servers_keep_idle_connections_longer_than_clients_do():
    """The API reuses pooled connections to workers (httpx drops idle ones after 5 s); if a server
    closed them at the same moment, a request could land on a closing socket (a ReadError that
    dropped a healthy worker in a fuzz run)."""
    import httpx

    from vicuna_cli.serve.common import SERVER_KEEPALIVE_S

    assert SERVER_KEEPALIVE_S >= 2 * httpx.Limits().keepalive_expiry


class _WorkerStream:
    """A worker's streamed response as the API reads it: one event line, then silence until the
    API closes it; a read in flight then breaks as a closed socket's does (httpx.ReadError)."""

    def __init__(self, index: int):
        import asyncio

        self.index, self.closed = index, asyncio.Event()

    async def aiter_lines(self):
        import httpx

        yield json.dumps({"index": 0, "text": f"t{self.index}", "token_ids": [1], "finish_reason": None})
        await self.closed.wait()
        raise httpx.ReadError("the connection was closed")

    async def aclose(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("prompts", [1, 4])
def test_a_client_that_leaves_closes_the_worker_streams_without_reporting_a_lost_worker(prompts):
    import asyncio

    from vicuna_cli.serve.api import Job, Upstream
    from vicuna_cli.serve.metrics import ApiMetrics, RequestTimer

    reports = []

    class Recording(Upstream):
        async def report(self, address: str, reason: str) -> None:
            reports.append((address, reason))

    async def scenario() -> list[dict]:
        upstream = Recording("http://127.0.0.1:9", None, worker_timeout=5.0)
        requests = [GenerateRequest(model="m", request_id=f"r-{i}", prompt="hi") for i in range(prompts)]
        job = Job(upstream, RequestTimer(ApiMetrics(), "m"), requests)
        job.streams = [(f"http://worker-{i}", _WorkerStream(i)) for i in range(prompts)]
        events = job.events()
        first = [await events.__anext__()]
        await events.aclose()  # what sse-starlette does when the client hangs up
        await asyncio.sleep(0.1)  # time for any reader still running to fail and report
        await upstream.close()
        return first + [{"closed": all(s.closed.is_set() for _, s in job.streams)}]

    events = asyncio.run(scenario())
    assert events[0]["text"].startswith("t") and events[-1] == {"closed": True}
    assert reports == []


# ---------------------------------------------------------------------------------------------
# Small ones from issue #18 (14)


def test_a_restarted_controller_answers_503_until_the_workers_are_back():
    """After a restart the registry is empty until each worker's next heartbeat: a model that may
    well exist is a retryable 503 then, not a 404 (which would tell clients it does not exist)."""
    from vicuna_cli.serve.controller import Registry

    clock = [100.0]
    registry = Registry(expiry=15, clock=lambda: clock[0])
    with pytest.raises(ServeError) as empty:
        registry.dispatch("m")
    assert empty.value.status == 503 and empty.value.code == "no_worker" and "retry" in empty.value.message
    rejoined = _worker("http://a:1", "other")
    rejoined.rejoin = True  # registered before: this controller is a restarted one
    registry.register(rejoined)
    clock[0] += 3
    with pytest.raises(ServeError) as registering:
        registry.dispatch("m")
    assert registering.value.status == 503 and "restarted 3 s ago" in registering.value.message and "retry" in registering.value.message
    registry.heartbeat(HeartbeatRequest(worker_id="http://a:1"))
    clock[0] += 13  # a whole expiry since the start: every live worker has had its heartbeat
    with pytest.raises(ServeError) as unknown:
        registry.dispatch("m")
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    fresh = Registry(expiry=15, clock=lambda: 0.0)  # a first start: unknown is unknown at once
    fresh.register(_worker("http://a:1", "other"))
    with pytest.raises(ServeError) as at_once:
        fresh.dispatch("m")
    assert at_once.value.status == 404


def test_a_request_that_can_never_fit_is_400_not_a_retryable_429():
    """32 prompts x n=16 can never be held by workers of batch 4 + queue 8: a 429 would have the
    client retry forever; a 400 says why."""
    from vicuna_cli.serve.controller import Registry

    registry = Registry(expiry=60)
    registry.register(_worker("http://a:1", "m"))  # 4 + 8 sequences
    registry.register(_worker("http://b:1", "m"))
    assert registry.dispatch("m", n=12, sequences=24)  # fits exactly
    with pytest.raises(ServeError) as too_many_choices:
        registry.dispatch("m", n=16, sequences=16)
    assert too_many_choices.value.status == 400 and too_many_choices.value.param == "n" and "at most 12" in too_many_choices.value.message
    with pytest.raises(ServeError) as too_many_prompts:
        registry.dispatch("m", n=2, sequences=32 * 2)
    error = too_many_prompts.value
    assert error.status == 400 and error.code == "request_too_large" and "needs 64 sequences" in error.message and "at most 24" in error.message


def test_405_is_an_invalid_request_and_booleans_are_strict():
    from fastapi.testclient import TestClient

    from vicuna_cli.serve.api import create_app

    with TestClient(create_app("http://127.0.0.1:9")) as client:
        wrong_method = client.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for field, value in (("stream", "yes"), ("stream", 1), ("logprobs", "true"), ("stream_options", {"include_usage": "yes"})):
            refused = client.post("/v1/chat/completions", json={**chat, field: value})
            assert refused.status_code == 400, (field, value)
            assert refused.json()["error"]["param"].startswith(field) and refused.json()["error"]["type"] == "invalid_request_error"
        refused = client.post("/v1/completions", json={"model": "m", "prompt": "x", "echo": "no"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"


def test_a_long_chat_request_is_rendered_in_one_template_pass(bpe_model_dir):
    """A request with hundreds of messages must not cost a Jinja render per assistant turn (the
    spans training needs would: two more each), or one request could keep a worker busy."""
    import asyncio

    from vicuna_cli.serve.backends import HFBackend
    from vicuna_cli.serve.config import WorkerConfig
    from vicuna_cli.serve.protocol import GenerateRequest

    cfg = WorkerConfig()
    backend = HFBackend("tiny", str(bpe_model_dir), None, "cpu", "float32", "auto", 2, cfg.max_queue, cfg.prefix_cache_mb)
    try:
        tokenizer = backend.template.tokenizer
        real, calls = tokenizer.apply_chat_template, []

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        tokenizer.apply_chat_template = counted
        messages = [{"role": role, "content": f"turn {i}"} for i in range(100) for role in ("user", "assistant")]
        # 201 messages overflow the tiny model's context: the one encode step renders once, then refuses.
        with pytest.raises(ServeError) as refused:
            backend.prompt_ids(GenerateRequest(model="tiny", request_id="r", messages=messages + [{"role": "user", "content": "end"}]))
        assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")
        assert len(calls) == 1
    finally:
        asyncio.run(backend.close())
