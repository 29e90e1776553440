"""The web chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
Playwright opens the page served by `lmforge serve` on 127.0.0.1 and is used as a person would:
API key, system prompt and sampling controls (checked in the request bodies the page sends),
streamed reply, stop, edit and regenerate, Regenerate, a tool call, RAG citations, local storage.
Every request the page makes is recorded; one to any host but 127.0.0.1 fails the test.

The model is tests/scripted_chat.py's (a tiny real Transformer whose replies are a known function
of the conversation), slowed to ~15 ms a step so that streaming can be watched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from lmforge.data.chat import render_chat
from lmforge.prompting import rag
from lmforge.serve.app import create_app
from lmforge.serve.server import running_server
from scripted_chat import scripted_chat_model, tiny_tokenizer

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LMFORGE_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

KEY = "page-key-42"
SCREENSHOT_DIR = Path(os.environ.get("LMFORGE_SCREENSHOTS", "/tmp/lmforge-screenshots"))

# every DOM change of the last assistant message: [milliseconds, length of its text]
WATCH = """() => {
  window.__growth = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.message[data-role="assistant"] .content');
    const last = all[all.length - 1];
    if (last) window.__growth.push([performance.now(), last.textContent.length]);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    docs = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    records = [{"id": "bees", "title": "Bees", "text": "Bees make honey in hives. A hive has a queen."},
               {"id": "owls", "title": "Owls", "text": "Owls hunt at night."}]
    # more documents, so that BM25 weighs a rare word above the server's default threshold
    records += [{"id": f"d{i}", "title": f"Note {i}", "text": f"Note {i} is filler text number {i}."} for i in range(30)]
    docs.write_text("".join(json.dumps(r) + "\n" for r in records))
    db = docs.with_suffix(".db")
    rag.index(db, [docs])
    app = create_app(scripted_chat_model(tok, delay=0.015), tok, model_name="scripted", api_key=KEY, rag_db=db)
    with running_server(app) as url:
        yield url


@pytest.fixture
def sent():
    """The bodies of the chat requests the page sent, in order."""
    return []


@pytest.fixture
def page(server, sent):
    outside, problems = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        # bypass_csp: the page forbids eval (its Content-Security-Policy), which Playwright's waits use
        context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)

        def route(r):
            if urlparse(r.request.url).hostname == "127.0.0.1":
                if urlparse(r.request.url).path == "/v1/chat/completions":
                    sent.append(json.loads(r.request.post_data))
                r.continue_()
            else:
                outside.append(r.request.url)
                r.abort()
        context.route("**/*", route)
        pg = context.new_page()
        pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        def console(m):  # the one expected failure: /v1/models before the key is entered
            if m.type == "error" and "status of 401" not in m.text:
                problems.append(f"console {m.type}: {m.text}")
        pg.on("console", console)
        pg.goto(server + "/")
        yield pg
        browser.close()
    assert outside == [], f"the page fetched from outside 127.0.0.1: {outside}"
    assert problems == [], problems


def last_assistant(page) -> str:
    return page.locator('.message[data-role="assistant"] .content').last.inner_text()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def wait_idle(page) -> None:
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_selector("#send", state="visible")


def running_requests(server) -> float:
    req = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    return float(re.search(r"^lmforge_requests_running (\S+)$", text, re.M).group(1))


def test_chat_page_in_a_real_browser(server, page, sent, tok):
    # the server wants a key: the page says so, and connects once it is given
    page.wait_for_function("document.getElementById('server-status').textContent.includes('needs an API key')")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').value === 'scripted'")
    for field, value in (("#max_tokens", "40"), ("#system", "Answer in French."), ("#temperature", "0.3"), ("#top_p", "0.8"),
                         ("#seed", "7")):
        page.fill(field, value)
        page.dispatch_event(field, "change")

    # 1. streamed token by token: the text grows over many observations spread in time
    page.evaluate(WATCH)
    send(page, "long: one two three")
    wait_idle(page)
    growth = page.evaluate("window.__growth")
    lengths = [n for _, n in growth]
    assert lengths == sorted(lengths) and len(set(lengths)) >= 10, lengths
    assert growth[-1][0] - growth[0][0] > 200  # ms: arrived over time, not in one piece
    text = last_assistant(page)
    assert text.startswith("one two three one two three")
    # the system prompt box and the sampling controls are what the request carried
    body = sent[-1]
    system = {"role": "system", "content": "Answer in French."}
    assert body["messages"] == [system, {"role": "user", "content": "long: one two three"}]
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (0.3, 0.8, 7, 40)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    n_prompt = len(render_chat(tok, body["messages"], add_generation_prompt=True)[0])  # the system turn reached the model
    assert page.locator(".message .meta").last.inner_text() == f"{n_prompt} prompt + 40 completion tokens"
    # the answer said the server has a RAG index (nothing in it matched): the switch appears; off for now
    assert page.is_visible("#rag-row")
    page.uncheck("#rag")
    page.dispatch_event("#rag", "change")

    # 2. stop mid-way: the reply ends where it was, is marked stopped, and the server frees the row
    page.fill("#max_tokens", "900")
    page.dispatch_event("#max_tokens", "change")
    send(page, "long: stop me")
    page.wait_for_function("""() => { const c = document.querySelectorAll('.message[data-role="assistant"] .content');
                                      return c[c.length - 1].textContent.length > 30; }""")
    page.click("#stop")
    wait_idle(page)
    stopped = last_assistant(page)
    assert stopped.startswith("stop me stop me") and len(stopped) < 900 * 2
    assert page.locator(".message .meta").last.inner_text() == "stopped"
    page.wait_for_timeout(300)
    assert last_assistant(page) == stopped  # nothing arrives after Stop
    for _ in range(50):
        if running_requests(server) == 0:
            break
        page.wait_for_timeout(100)
    assert running_requests(server) == 0

    # 3. edit a past user message and regenerate from it: later messages go, the reply follows the edit
    page.click("#new-chat")
    send(page, "hello world")
    wait_idle(page)
    send(page, "owls")
    wait_idle(page)
    assert page.locator(".message").count() == 4
    page.locator('.message[data-role="user"] button.edit').first.click()
    page.fill(".message textarea.editor", "goodbye world")
    page.click(".message button.save")
    wait_idle(page)
    assert page.locator(".message").count() == 2
    assert page.locator('.message[data-role="user"] .content').inner_text() == "goodbye world"
    assert last_assistant(page) == "goodbye world"  # the echo of the edited message
    assert sent[-1]["messages"] == [system, {"role": "user", "content": "goodbye world"}]  # later messages dropped
    page.locator('.message[data-role="assistant"] button.regenerate').click()  # the last reply again, from its user turn
    wait_idle(page)
    assert page.locator(".message").count() == 2 and last_assistant(page) == "goodbye world"
    assert sent[-1]["messages"] == sent[-2]["messages"]  # the old reply was not sent back

    # 4. a tool call and its result are shown; the page runs the calculator and the reply continues
    page.check("#calculator")
    page.dispatch_event("#calculator", "change")
    send(page, "calc: 4821 * 37")
    page.wait_for_selector('.message[data-role="tool"]')
    wait_idle(page)
    roles = page.locator(".message").evaluate_all("ms => ms.map(m => m.dataset.role)")
    assert roles[-4:] == ["user", "assistant", "tool", "assistant"]
    assert page.locator(".tool-call code").last.inner_text() == 'calculator({"expression": "4821 * 37"})'
    assert page.locator('.message[data-role="tool"] .content').last.inner_text() == "178377"
    assert last_assistant(page) == "The answer is 178377"
    page.uncheck("#calculator")
    page.dispatch_event("#calculator", "change")

    # 5. RAG: the server's index answers, the citations link to their sources
    page.click("#new-chat")
    page.check("#rag")
    page.dispatch_event("#rag", "change")
    send(page, "Where do bees make honey?")
    wait_idle(page)
    assert last_assistant(page).startswith("[1] Bees: Bees make honey in hives.")  # the grounded prompt, echoed
    link = page.locator(".citations a").first
    assert link.inner_text() == "Bees (bees)"
    href = link.get_attribute("href")
    assert re.fullmatch(r"/v1/rag/chunks/\d+", href)
    chunk = json.load(urllib.request.urlopen(urllib.request.Request(server + href, headers={"Authorization": f"Bearer {KEY}"})))
    assert chunk["id"] == "bees" and chunk["text"].startswith("Bees make honey")
    link.click()
    assert page.locator(".citations blockquote").first.inner_text().startswith("Bees make honey in hives.")

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # 6. conversations are kept in local storage: a reload shows them again
    page.reload()
    page.wait_for_function("document.getElementById('model').value === 'scripted'")  # the key was kept too
    assert [page.input_value(f) for f in ("#system", "#temperature", "#top_p", "#max_tokens", "#seed")] == \
        ["Answer in French.", "0.3", "0.8", "900", "7"]  # and the settings
    assert page.locator("#conversations li").count() == 3
    assert last_assistant(page).startswith("[1] Bees: Bees make honey in hives.")
    page.locator("#conversations li").nth(1).click()
    assert last_assistant(page) == "The answer is 178377"
