"""The web chat page (vicuna_cli/serve/static/) in headless Chromium, against a real `vicuna serve`
(single-machine mode: controller, worker and API processes) with the tiny ChatML fixture model.
The browser comes from web_browser.py (skips without chromium unless VICUNA_REQUIRE_BROWSER).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from serve_single import single_server
from web_browser import browser, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # real processes and a real browser

KEY = "web-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory, bpe_model_dir):
    """`vicuna serve -m TINY --api-key KEY` on free loopback ports; yields (proc, model id)."""
    with single_server(tmp_path_factory.mktemp("serve_web"), bpe_model_dir, "--api-key", KEY, "--max-batch-size", "4",
                       headers=AUTH) as proc:
        yield proc, str(bpe_model_dir)


def reference_answer(url: str, model: str, messages: list[dict]) -> dict:
    """What the API answers without streaming, greedy, for the same request the page sends."""
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # `change` fires on blur, as when a person tabs away


def settings(page, temperature: str | None = None, max_tokens: str | None = None) -> None:
    if not page.locator("#settings").evaluate("d => d.open"):
        page.click("#settings summary")
    if temperature is not None:
        page.fill("#temperature", temperature)
    if max_tokens is not None:
        page.fill("#max-tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_page_lists_the_model_and_streams_answers(page, server):
    from playwright.sync_api import expect

    proc, model = server
    page.goto(f"{proc.url}/")
    expect(page).to_have_title("vicuna chat")
    # No key yet: the model list is refused and the page says why.
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#error")).to_contain_text("API key")
    expect(page.locator("#model")).to_be_disabled()

    enter_key(page, KEY)
    expect(page.locator("#model option")).to_have_text([model])
    expect(page.locator("#model")).to_have_value(model)
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('vicuna.apiKey')") == KEY

    settings(page, temperature="0", max_tokens=str(MAX_TOKENS))
    first = "Hello there, how are you?"
    expected = reference_answer(proc.url, model, [{"role": "user", "content": first}])
    answer = expected["choices"][0]["message"]["content"]
    assert answer.strip(), "the fixture model should say something to this prompt"

    # Record every state of the answer while it streams in.
    page.evaluate("""() => {
        window.__states = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.msg.assistant .content');
            if (all.length) window.__states.push(all[all.length - 1].textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    send(page, first)
    expect(page.locator("#stop")).to_be_visible()
    reply = page.locator(".msg.assistant").nth(0)
    expect(reply.locator(".meta")).to_have_text(re.compile(r"done|cut at max tokens"))
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    assert reply.locator(".content").text_content() == answer
    tokens = expected["usage"]["completion_tokens"]
    assert reply.locator(".meta").text_content().startswith(f"{tokens} tokens · first token ")
    states = [s for s in dict.fromkeys(page.evaluate("window.__states")) if s]
    assert len(states) >= 2 and states[-1] == answer, f"the answer did not arrive in pieces: {states}"
    assert all(answer.startswith(s) for s in states)
    assert page.locator(".msg.user .content").nth(0).text_content() == first

    # A second turn carries the conversation so far.
    second = "The capital of France is"
    send(page, second)
    expect(page.locator(".msg.assistant").nth(1).locator(".meta")).to_have_text(re.compile(r"done|cut at max tokens"))
    assert [r["messages"] for r in requests] == [
        [{"role": "user", "content": first}],
        [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
         {"role": "user", "content": second}],
    ]
    assert all(r["stream"] is True and r["model"] == model and r["temperature"] == 0 and r["max_tokens"] == MAX_TOKENS
               and r["stream_options"] == {"include_usage": True} for r in requests)
    expected2 = reference_answer(proc.url, model, requests[1]["messages"])
    assert page.locator(".msg.assistant").nth(1).locator(".content").text_content() == expected2["choices"][0]["message"]["content"]

    page.click("#new-chat")
    expect(page.locator("#log .msg")).to_have_count(0)


def test_a_bad_key_shows_a_clear_error(page, server):
    from playwright.sync_api import expect

    proc, model = server
    # The key saved by an earlier visit is used at once.
    page.add_init_script(f"localStorage.setItem('vicuna.apiKey', {json.dumps(KEY)})")
    page.goto(f"{proc.url}/")
    expect(page.locator("#model")).to_have_value(model)
    expect(page.locator("#api-key")).to_have_value(KEY)

    # The key goes bad between listing and sending: the chat request itself is refused.
    page.evaluate("document.getElementById('api-key').value = 'not-the-key'")
    send(page, "Are you there?")
    expect(page.locator("#error")).to_have_text("HTTP 401: invalid API key (invalid_api_key) — enter a valid API key above")
    expect(page.locator(".msg.user.failed")).to_have_count(1)
    expect(page.locator(".msg.assistant")).to_have_count(0)  # nothing was answered
    expect(page.locator("#prompt")).to_have_value("Are you there?")  # ready to retry
    expect(page.locator("#send")).to_be_visible()

    # Typing a wrong key reloads the model list, which is refused too.
    enter_key(page, "still-wrong")
    expect(page.locator("#error")).to_have_text(
        "listing models failed: HTTP 401: invalid API key (invalid_api_key) — enter a valid API key above")
    expect(page.locator("#model")).to_be_disabled()
    assert page.evaluate("localStorage.getItem('vicuna.apiKey')") == "still-wrong"

    # The right key again: the failed turn is not sent as context.
    enter_key(page, KEY)
    expect(page.locator("#error")).to_be_hidden()
    settings(page, temperature="0", max_tokens=str(MAX_TOKENS))
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.press("#prompt", "Enter")
    assert json.loads(request.value.post_data)["messages"] == [{"role": "user", "content": "Are you there?"}]
    expect(page.locator(".msg.assistant .meta")).to_have_text(re.compile(r"done|cut at max tokens"))


def test_text_is_shown_as_text_never_as_html(page, server):
    from playwright.sync_api import expect

    proc, _ = server
    page.add_init_script(f"localStorage.setItem('vicuna.apiKey', {json.dumps(KEY)})")
    page.goto(f"{proc.url}/")
    expect(page.locator("#model")).to_be_enabled()
    settings(page, max_tokens="4")
    hostile = 'Look: <img src=x onerror="window.__pwned = 1"> <b>bold</b>\n```html\n<script>window.__pwned = 2</script>\n```\nend'
    send(page, hostile)
    expect(page.locator(".msg.assistant .meta")).to_have_text(re.compile(r"done|cut at max tokens"))
    user = page.locator(".msg.user .content")
    assert user.locator("img, b, script").count() == 0
    assert user.locator(".text").all_text_contents() == ['Look: <img src=x onerror="window.__pwned = 1"> <b>bold</b>', "end"]
    assert user.locator("pre code").text_content() == "<script>window.__pwned = 2</script>\n"
    assert user.locator("pre code").get_attribute("data-lang") == "html"
    assert page.evaluate("window.__pwned") is None


def test_no_arena_unless_asked(server):
    proc, _ = server
    for path in ("/arena", "/arena/api/status"):
        response = httpx.get(f"{proc.url}{path}", headers=AUTH, timeout=10)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path
