"""`vicuna serve` as real processes on loopback ports, with the tiny fixture models: the OpenAI
surface (chat, completions, streaming, n, stop, usage), errors in OpenAI's shape, API keys,
moderation, body limit, CORS, metrics, access logs, `serve status`, and the openai proxy backend.

One cluster for the module: a controller, two workers serving `tiny` (one of them also serves
`chatml`), an open API server, a locked-down API server, and a proxy worker.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from serve_cluster import Cluster, wait_until

pytestmark = pytest.mark.slow  # real processes

WORKER_ARGS = ("--dtype", "float32", "--implementation", "native", "--max-batch-size", "4")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, sp_model_dir, bpe_model_dir):
    root = tmp_path_factory.mktemp("serve_api")
    cluster = Cluster(root, {"VICUNA_HOME": str(root / "home")})
    try:
        cluster.start_controller()
        w1 = cluster.start_worker([str(sp_model_dir)], "--name", "tiny", *WORKER_ARGS)
        w2 = cluster.start_worker([str(sp_model_dir), str(bpe_model_dir)], "--name", "tiny", "--name", "chatml", *WORKER_ARGS)
        cluster.wait_workers(2, [w1, w2])
        keys = root / "keys.txt"
        keys.write_text("# team keys\nkey-from-file\n\n")
        blocked = root / "blocked.txt"
        blocked.write_text("# words we refuse\nforbidden fruit\nbanana\n")
        cluster.api = cluster.start_api()
        cluster.locked = cluster.start_api(
            "--api-key", "key-one", "--api-keys-file", str(keys), "--moderation", f"keywords:{blocked}",
            "--max-body-bytes", "2048", "--cors-origin", "http://page.test",
        )
        proxy = cluster.start_worker(["tiny"], "--name", "proxy-tiny", "--backend", "openai", "--upstream", f"{cluster.api.url}/v1")
        cluster.wait_workers(3, [proxy])
        cluster.worker_procs = [w1, w2, proxy]
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def reference(sp_native):
    """What the engine itself answers greedily, and the prompt size, for one chat message."""
    from vicuna_cli.core.generate import Engine, SamplingParams
    from vicuna_cli.core.templates import template_for_model

    lm = sp_native
    template = template_for_model(lm.tokenizer)
    messages = [{"role": "user", "content": "Hello there"}]
    ids = lm.tokenizer(template.render(messages).text)["input_ids"]
    gen = Engine(lm.model, lm.tokenizer, lm.context_length).generate(ids, SamplingParams(temperature=0, max_new_tokens=12, stop=template.stop))
    text = "".join(gen)
    return {"messages": messages, "prompt_tokens": len(ids), "text": text, "stats": gen.stats}


def post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60, **kwargs)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat(cluster, **body) -> httpx.Response:
    return post(f"{cluster.api.url}/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], **body})


# ---------------------------------------------------------------------------------------------
# The OpenAI surface


def test_models_and_health(cluster):
    models = httpx.get(f"{cluster.api.url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["chatml", "proxy-tiny", "tiny"]
    assert {m["id"]: m["max_model_len"] for m in models["data"]}["tiny"] == 256
    assert httpx.get(f"{cluster.api.url}/v1/models/chatml").json()["id"] == "chatml"
    assert httpx.get(f"{cluster.api.url}/v1/models/nope").status_code == 404
    assert httpx.get(f"{cluster.api.url}/health").json() == {"status": "ok"}


def test_chat_greedy_matches_the_engine_with_usage(cluster, reference):
    response = chat(cluster, temperature=0, max_tokens=12)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": reference["text"]}
    assert choice["finish_reason"] == reference["stats"].finish_reason
    usage = body["usage"]
    assert usage["prompt_tokens"] == reference["prompt_tokens"]
    assert usage["completion_tokens"] == reference["stats"].output_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_equals_non_streaming_and_usage_chunk(cluster, reference):
    with httpx.stream("POST", f"{cluster.api.url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": reference["messages"], "temperature": 0, "max_tokens": 12,
        "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [reference["stats"].finish_reason]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == reference["prompt_tokens"]
    assert chunks[-1]["usage"]["completion_tokens"] == reference["stats"].output_tokens
    # Without include_usage, no chunk carries a usage field.
    with httpx.stream("POST", f"{cluster.api.url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": reference["messages"], "max_tokens": 3, "stream": True}) as response:
        assert all("usage" not in c for c in sse_events(response)[:-1])


def test_n_choices_with_seed_are_reproducible(cluster):
    first = chat(cluster, n=3, seed=7, temperature=1.0, max_tokens=10).json()
    again = chat(cluster, n=3, seed=7, temperature=1.0, max_tokens=10).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1  # each choice gets its own seed
    assert first["usage"]["completion_tokens"] == 30  # 3 x 10: the random tiny model never says EOS this soon


def test_stop_string_cuts_the_answer(cluster, reference):
    text = reference["text"]
    cut = next(i for i in range(2, len(text)) if not text[i].isspace())
    stop = text[cut:cut + 2]
    body = chat(cluster, temperature=0, max_tokens=12, stop=[stop]).json()
    assert body["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_logprobs_chat_and_completions(cluster):
    body = chat(cluster, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy picks the most likely
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]  # raw bytes of a partial char
    assert chat(cluster, max_tokens=2).json()["choices"][0]["logprobs"] is None
    done = post(f"{cluster.api.url}/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4,
                                                         "temperature": 0, "logprobs": 2}).json()
    lp = done["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_completions_prompt_list_n_and_echo(cluster):
    response = post(f"{cluster.api.url}/v1/completions", {"model": "tiny", "prompt": ["Hello", "The capital"], "n": 2,
                                                             "temperature": 0, "echo": True})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"].startswith("Hello") and body["choices"][2]["text"].startswith("The capital")
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both choices agree
    assert body["usage"]["completion_tokens"] == 4 * 16  # OpenAI's default max_tokens for completions
    with httpx.stream("POST", f"{cluster.api.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5


def test_chat_template_of_the_model_is_used(cluster, bpe_model_dir):
    """`chatml` has a ChatML template: its prompt is the tokenizer's own render of the messages."""
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = post(f"{cluster.api.url}/v1/chat/completions", {"model": "chatml", "max_tokens": 2, "messages": messages}).json()
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert body["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    status = {m["name"]: m for w in cluster.workers() for m in w["models"]}
    assert status["chatml"]["template"] == "auto" and status["tiny"]["template"] == "vicuna_v1.1"


def test_openai_proxy_backend_answers_like_its_upstream(cluster, reference):
    body = post(f"{cluster.api.url}/v1/chat/completions", {"model": "proxy-tiny", "messages": reference["messages"],
                                                              "temperature": 0, "max_tokens": 12}).json()
    assert body["model"] == "proxy-tiny"
    assert body["choices"][0]["message"]["content"] == reference["text"]
    assert body["usage"]["prompt_tokens"] == reference["prompt_tokens"]  # the upstream's usage, passed on
    with httpx.stream("POST", f"{cluster.api.url}/v1/chat/completions", timeout=60, json={
        "model": "proxy-tiny", "messages": reference["messages"], "temperature": 0, "max_tokens": 12, "stream": True,
        "stream_options": {"include_usage": True}}) as response:
        events = sse_events(response)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"]) == reference["text"]
    assert events[-2]["usage"]["completion_tokens"] == reference["stats"].output_tokens
    missing = post(f"{cluster.api.url}/v1/completions", {"model": "proxy-tiny", "prompt": "x" * 3000, "max_tokens": 2})
    assert _error(missing, 400)["code"] == "context_length_exceeded"  # the upstream's error, passed on


# ---------------------------------------------------------------------------------------------
# Errors: the right 4xx in OpenAI's shape, never a 500


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_json_and_wrong_types_are_400(cluster):
    url = f"{cluster.api.url}/v1/chat/completions"
    error = _error(httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"
    error = _error(post(url, {"model": "tiny", "messages": "hello"}), 400)
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    error = _error(post(url, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}), 400)
    assert error["param"] == "max_tokens"
    error = _error(post(url, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400)
    assert error["param"] == "temperature"
    error = _error(post(url, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert error["param"].startswith("messages.0.role")
    error = _error(post(url, {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert "expected" in error["message"] and error["param"] == "messages"
    error = _error(post(f"{cluster.api.url}/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}), 400)
    assert error["param"] == "n"


def test_unknown_model_is_404_and_long_prompt_is_400(cluster):
    error = _error(chat(cluster, model="gpt-17"), 404)
    assert error["code"] == "model_not_found" and "'gpt-17' does not exist" in error["message"]
    assert "tiny" in error["message"]  # it says what is served
    error = _error(post(f"{cluster.api.url}/v1/completions", {"model": "tiny", "prompt": "Hello there " * 200}), 400)
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]
    error = _error(httpx.get(f"{cluster.api.url}/v2/nothing"), 404)
    assert error["code"] == "not_found"


def test_api_keys(cluster):
    url = f"{cluster.locked.url}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert _error(post(url, body), 401)["code"] == "missing_api_key"
    assert _error(post(url, body, headers={"authorization": "Bearer wrong"}), 401)["code"] == "invalid_api_key"
    assert post(url, body, headers={"authorization": "Bearer key-one"}).status_code == 200
    assert post(url, body, headers={"authorization": "Bearer key-from-file"}).status_code == 200
    assert post(url, body, headers={"x-api-key": "key-one"}).status_code == 200
    assert httpx.get(f"{cluster.locked.url}/health").status_code == 200  # open for load balancers
    for path in ("/metrics", "/v1/models", "/openapi.json", "/nowhere"):
        assert httpx.get(f"{cluster.locked.url}{path}").status_code == 401, path
    assert httpx.get(f"{cluster.locked.url}/metrics", headers={"authorization": "Bearer key-one"}).status_code == 200


def test_moderation_refuses_listed_terms(cluster):
    headers = {"authorization": "Bearer key-one"}
    url = f"{cluster.locked.url}/v1/chat/completions"
    refused = post(url, {"model": "tiny", "messages": [{"role": "user", "content": "I like Banana bread"}]}, headers=headers)
    error = _error(refused, 400)
    assert error["code"] == "content_policy_violation"
    assert error["message"] == "the input was refused by moderation (it contains the blocked term 'Banana') and was not sent to the model"
    ok = post(url, {"model": "tiny", "messages": [{"role": "user", "content": "a bandana"}], "max_tokens": 2}, headers=headers)
    assert ok.status_code == 200  # whole words only
    error = _error(post(f"{cluster.locked.url}/v1/completions", {"model": "tiny", "prompt": "the Forbidden \n fruit"}, headers=headers), 400)
    assert error["code"] == "content_policy_violation"


def test_body_limit_is_413(cluster):
    headers = {"authorization": "Bearer key-one"}
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
    error = _error(post(f"{cluster.locked.url}/v1/chat/completions", big, headers=headers), 413)
    assert error["code"] == "request_too_large" and "2048" in error["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()

    response = httpx.post(f"{cluster.locked.url}/v1/chat/completions", content=chunked(),
                          headers={**headers, "content-type": "application/json"}, timeout=30)
    assert _error(response, 413)["code"] == "request_too_large"


def test_cors_off_by_default_and_on_with_origin(cluster):
    preflight = {"origin": "http://page.test", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    open_api = httpx.options(f"{cluster.api.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in open_api.headers
    locked = httpx.options(f"{cluster.locked.url}/v1/chat/completions", headers=preflight)
    assert locked.status_code == 200 and locked.headers["access-control-allow-origin"] == "http://page.test"
    other = httpx.options(f"{cluster.locked.url}/v1/chat/completions", headers={**preflight, "origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------------------------
# Operations: metrics, access logs, status


def _metric(text: str, name: str, model: str) -> float:
    pattern = rf'^{re.escape(name)}\{{[^}}]*model_name="{re.escape(model)}"[^}}]*\}} (\S+)$'
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values)


def test_metrics_count_tokens_and_latencies(cluster):
    before = httpx.get(f"{cluster.api.url}/metrics").text
    body = chat(cluster, max_tokens=7, temperature=0).json()
    after = httpx.get(f"{cluster.api.url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name, delta in [
        ("vicuna:generation_tokens_total", body["usage"]["completion_tokens"]),
        ("vicuna:prompt_tokens_total", body["usage"]["prompt_tokens"]),
        ("vicuna:time_to_first_token_seconds_count", 1),
        ("vicuna:e2e_request_latency_seconds_count", 1),
        ("vicuna:inter_token_latency_seconds_count", body["usage"]["completion_tokens"] - 1),
    ]:
        assert _metric(text, name, "tiny") - _metric(before, name, "tiny") == delta, name
    assert _metric(text, "vicuna:num_workers", "tiny") == 2
    # Running/waiting come from the workers' heartbeats (every 2 s): idle again after the next one.
    wait_until(lambda: _metric(httpx.get(f"{cluster.api.url}/metrics").text, "vicuna:num_requests_running", "tiny") == 0,
               10, "the running gauge to drop to 0", interval=0.5)
    assert "vicuna:num_requests_waiting" in text


def test_access_log_has_one_json_line_per_request(cluster):
    marker = chat(cluster, max_tokens=3, user="log-check")
    assert marker.status_code == 200
    _error(chat(cluster, model="nope"), 404)

    def logged():  # the line is written just after the response went out
        lines = [r for r in cluster.api.log_records() if r.get("path") == "/v1/chat/completions"]
        return lines if any(r.get("model") == "nope" for r in lines) else None

    lines = wait_until(logged, 10, "the access log line")
    ok = [r for r in lines if r["status"] == 200 and r.get("completion_tokens") == 3]
    assert ok and ok[-1]["model"] == "tiny" and ok[-1]["prompt_tokens"] > 0 and ok[-1]["method"] == "POST"
    missing = [r for r in lines if r["status"] == 404]
    assert missing and missing[-1]["model"] == "nope" and missing[-1]["error"] == "model_not_found"
    assert all({"ts", "ms", "client", "role"} <= set(r) for r in lines)


def test_serve_status_lists_workers(cluster):
    run = subprocess.run([sys.executable, "-m", "vicuna_cli", "serve", "status", "--controller", cluster.controller.url, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["models"] == {"chatml": 1, "proxy-tiny": 1, "tiny": 2}
    addresses = sorted(w["address"] for w in status["workers"])
    assert addresses == sorted(p.url for p in cluster.worker_procs)
    assert all(0 <= w["heartbeat_age"] < 6 for w in status["workers"])
    table = subprocess.run([sys.executable, "-m", "vicuna_cli", "serve", "status", "--controller", cluster.controller.url],
                           capture_output=True, text=True, timeout=60, env={**__import__("os").environ, "COLUMNS": "200"})
    assert table.returncode == 0
    for proc in cluster.worker_procs:
        assert proc.url in table.stdout
    assert "heartbeat" in table.stdout and "3 live worker(s)" in table.stderr


def test_dispatch_spreads_load_over_both_workers(cluster):
    before = {p.url: sum(1 for r in p.log_records() if r.get("path") == "/generate") for p in cluster.worker_procs[:2]}
    for _ in range(6):
        assert chat(cluster, max_tokens=2).status_code == 200
    after = {p.url: sum(1 for r in p.log_records() if r.get("path") == "/generate") for p in cluster.worker_procs[:2]}
    served = [after[u] - before[u] for u in after]
    assert sum(served) == 6 and min(served) >= 2, served


def test_a_repeated_prompt_reports_its_prefix_cache_reuse_in_usage(cluster):
    # "chatml" is served by one worker only, so both requests meet the same prefix cache.
    messages = [{"role": "system", "content": "Zebra quartz xylophone: you are the prefix cache test's assistant."},
                {"role": "user", "content": "Say something about caches."}]
    usages = []
    for _ in range(2):
        response = httpx.post(f"{cluster.api.url}/v1/chat/completions", timeout=60,
                              json={"model": "chatml", "messages": messages, "temperature": 0, "max_tokens": 4})
        assert response.status_code == 200, response.text
        usages.append(response.json()["usage"])
    prompt = usages[0]["prompt_tokens"]
    full = (prompt - 1) // 8 * 8  # all but the last prompt token (fed for its logits), in whole 8-token blocks
    # The first time only the template's opening (shared with earlier tests' prompts) can be cached.
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] <= 8 < full
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": full}
    assert usages[1]["prompt_tokens"] == prompt


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.5}, {"presence_penalty": 1.5}])
def test_penalties_change_the_answer_exactly_as_the_engine_applies_them(cluster, reference, sp_native, penalty):
    from vicuna_cli.core.generate import Engine, SamplingParams
    from vicuna_cli.core.templates import template_for_model

    template = template_for_model(sp_native.tokenizer)
    ids = sp_native.tokenizer(template.render(reference["messages"]).text)["input_ids"]
    engine = Engine(sp_native.model, sp_native.tokenizer, sp_native.context_length)
    expected = "".join(engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=12, stop=template.stop, **penalty)))
    assert expected != reference["text"]  # the penalty matters for this prompt (else the test proves nothing)
    response = chat(cluster, temperature=0, max_tokens=12, **penalty)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected
