"""Real clients against a real multi-process deployment of the embedded model (SmolLM2-135M):
controller + 2 workers + API on loopback ports. The official `openai` client (streaming and
not) and `vicuna chat --api-base`; then the worker faults that need a model slow enough to be
caught mid-answer: SIGKILL during a stream (an error event within the expiry interval, later
requests go to the survivor), a silent (SIGSTOPped) worker that comes back and registers again,
and a SIGTERM that lets the in-flight answer finish while the worker deregisters at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from serve_cluster import Cluster, get_json, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
EXPIRY = 3.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, embedded_model_home):
    cluster = Cluster(tmp_path_factory.mktemp("serve_clients"), {"VICUNA_HOME": str(embedded_model_home)})
    try:
        cluster.start_controller(expiry=EXPIRY)
        # A long --shutdown-timeout: on a busy 2-core machine the in-flight answer of the SIGTERM
        # test may take a while, and it must finish rather than be cancelled.
        cluster.pool = [cluster.start_worker([MODEL], "--shutdown-timeout", "120", heartbeat=1.0) for _ in range(2)]
        cluster.wait_workers(2, cluster.pool)
        cluster.api = cluster.start_api(worker_timeout=EXPIRY)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.api.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def answer(client):
    return client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)


def test_openai_client_non_streaming(client, answer):
    assert [m.id for m in client.models.list()] == [MODEL]
    text = answer.choices[0].message.content
    assert "Paris" in text
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 16
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert done.choices[0].text.strip() and done.usage.completion_tokens <= 5


def test_openai_client_streaming_matches(client, answer):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert "".join(pieces) == answer.choices[0].message.content
    assert reasons == [answer.choices[0].finish_reason]
    assert usage.completion_tokens == answer.usage.completion_tokens and usage.prompt_tokens == answer.usage.prompt_tokens


def test_vicuna_chat_against_the_api(cluster, answer):
    run = subprocess.run(
        [sys.executable, "-m", "vicuna_cli", "chat", "--api-base", f"{cluster.api.url}/v1", "-m", MODEL, "--temperature", "0",
         "--max-new-tokens", "16", "--json", "-p", QUESTION[0]["content"]],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["model"] == MODEL
    assert record["answer"] == answer.choices[0].message.content
    assert record["stats"]["output_tokens"] == answer.usage.completion_tokens


def test_client_gone_mid_stream_frees_the_workers_and_keeps_them(cluster):
    """A client that stops reading a multi-prompt stream: the API closes its worker streams, the
    workers cancel those generations, and no worker is reported as lost (closing a stream ourselves
    once surfaced as a ReadError that made the controller drop a healthy worker)."""
    prompts = ["Once upon a time", "The dragon said", "In the kitchen"]
    with httpx.stream("POST", f"{cluster.api.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": prompts, "max_tokens": 300, "temperature": 0.7, "seed": 1, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one event, then hang up
    idle = lambda: all((get_json(f"{p.url}/health") or {}).get("running", 1) == 0 for p in cluster.pool)  # noqa: E731
    wait_until(idle, 15, "the workers to cancel the abandoned generations", cluster.pool)
    assert sorted(w["address"] for w in cluster.workers()) == sorted(p.url for p in cluster.pool)
    assert not [r for r in cluster.controller.log_records() if r.get("event") == "worker_removed"]
    assert not [r for r in cluster.api.log_records() if r.get("path") == "/v1/completions" and (r.get("status") or 0) >= 500]


def _open_story(cluster, max_tokens: int = 300):
    """A streaming request, read up to its first content chunk; returns (stream ctx, response, lines)."""
    ctx = httpx.stream("POST", f"{cluster.api.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": STORY, "max_tokens": max_tokens, "temperature": 0.7, "seed": 1, "stream": True})
    response = ctx.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return ctx, lines
    raise AssertionError("the stream ended before any content")


def _busy_worker(cluster):
    def find():
        busy = [p for p in cluster.pool if p.alive() and (get_json(f"{p.url}/health") or {}).get("running")]
        return busy[0] if len(busy) == 1 else None

    return wait_until(find, 10, "the worker that serves the stream")


def _rest(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_worker_killed_mid_stream_ends_with_an_error_event(cluster, client):
    ctx, lines = _open_story(cluster)
    try:
        victim = _busy_worker(cluster)
        victim.kill()
        events = _rest(lines)
    finally:
        ctx.__exit__(None, None, None)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    error = events[-2]["error"]
    # Seen as the broken connection at once, not as the --worker-timeout silence (which would say
    # "stopped answering for 3 s"): which path fired is in the message, no clock needed.
    assert error["code"] == "worker_lost" and error["message"].startswith(f"worker {victim.url} ")
    assert "went away in the middle of the answer" in error["message"] or "ended the answer early" in error["message"]
    # Later requests go to the survivor, at once.
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens > 0
    assert [w["address"] for w in cluster.workers()] == [p.url for p in cluster.pool if p is not victim]


def test_silent_worker_times_out_then_registers_again(cluster, client):
    ctx, lines = _open_story(cluster)
    try:
        worker = _busy_worker(cluster)
        worker.signal(signal.SIGSTOP)
        try:
            events = _rest(lines)
        finally:
            worker.signal(signal.SIGCONT)
    finally:
        ctx.__exit__(None, None, None)
    # Ended by the API's --worker-timeout (EXPIRY s of silence), named in the message; a timed
    # window around it flaked on a loaded machine.
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "worker_lost"
    assert f"worker {worker.url} stopped answering for {EXPIRY:g} s in the middle of the answer" in events[-2]["error"]["message"]
    # Dropped by the controller, it hears "unknown worker" on its next heartbeat and registers again.
    wait_until(lambda: [w for w in cluster.workers() if w["address"] == worker.url], 15, "the worker to register again", [worker])
    assert any(r.get("event") == "unknown_to_controller" for r in worker.log_records())
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4).usage.completion_tokens > 0


def test_sigterm_finishes_the_answer_and_deregisters_at_once(cluster):
    ctx, lines = _open_story(cluster, max_tokens=12)
    try:
        worker = _busy_worker(cluster)
        worker.signal(signal.SIGTERM)
        wait_until(lambda: not cluster.workers(), 3, "the worker to deregister")  # while it still streams
        events = _rest(lines)
    finally:
        ctx.__exit__(None, None, None)
    assert events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] in (["length"], ["stop"])
    assert worker.process.wait(timeout=30) == 0  # a requested, completed stop is a normal exit
    assert [r["event"] for r in worker.log_records() if "event" in r][-2:] == ["deregistered", "stopped"]
    response = httpx.post(f"{cluster.api.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_worker"
