"""The chat web page at ``/`` in a real headless Chromium against a real server.

Chromium is Debian's ``chromium`` package (``.ci/install-browser`` installs it); the driver is the
``playwright`` Python package pointed at that executable, so nothing is downloaded at test time.
A missing browser fails these tests with the reason: it is never skipped silently.

``AGENT_RUNTIME_WEB_SCREENSHOT=docs/web-page.png pytest tests/server/test_web.py -k resumes`` also saves a
screenshot of the page after its first exchange; the reply then comes from the model
``agent-runtime serve`` would load (by default ``smollm2-135m-recall``, pulled into
``./agent-runtime-data`` on first use) instead of the tiny test model, so the picture shows a real answer.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from agent_runtime.models import load_model
from tests.conftest import TIMEOUT, make_config, running_server

CHROMIUM = os.environ.get("AGENT_RUNTIME_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = TIMEOUT * 3 * 1000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run .ci/install-browser (apt-get install chromium) "
            "or point AGENT_RUNTIME_CHROMIUM at a Chromium executable"
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, port: int) -> Page:
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"http://127.0.0.1:{port}/")
    return page


async def send(page: Page, text: str) -> None:
    await page.fill("#input", text)
    await page.click("#send")


async def reply_finished(page: Page, n: int) -> None:
    """Wait until the page shows ``n`` assistant bubbles and no response is active."""
    await page.wait_for_function(
        """(n) => document.querySelectorAll('.msg.assistant').length === n
                   && document.getElementById('stop').disabled
                   && !document.getElementById('send').disabled""",
        arg=n,
    )


async def test_page_streams_a_reply_shows_memory_and_resumes_after_reload(
    browser: Browser, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    config.generation.max_tokens = 48
    shot = os.environ.get("AGENT_RUNTIME_WEB_SCREENSHOT")
    model = load_model(config.engine) if shot else None
    async with running_server(config, model) as server:
        page = await open_page(browser, server.port)
        status = page.locator("#status")
        await expect(status).to_have_text(re.compile(r"^session sess_\w+$"))
        session_id = (await status.inner_text()).split()[-1]
        await expect(page.locator("#memory")).to_have_text("memory: 0 entries")

        # Count the assistant bubble's text updates: a streamed reply arrives in many.
        await page.evaluate(
            """() => {
                window.textUpdates = 0;
                new MutationObserver((records) => {
                    for (const r of records)
                        if (r.target.closest && r.target.closest('.assistant') ||
                            r.target.parentElement && r.target.parentElement.closest('.assistant'))
                            window.textUpdates += 1;
                }).observe(document.getElementById('log'),
                           { subtree: true, childList: true, characterData: true });
            }"""
        )
        message = "Remember this: my locker code is 7QK2ZP."
        await send(page, message)
        await expect(page.locator(".msg.user")).to_have_text(message)
        await reply_finished(page, 1)
        assistant = page.locator(".msg.assistant")
        reply = await assistant.text_content()
        assert reply, "the assistant's reply must be shown"
        assert await page.evaluate("window.textUpdates") > 1, "the reply must be streamed"

        # The memory line shows the bank size reported by response.done.
        bank = next(iter(server.sessions.sessions.values())).bank
        entries = (await server.engine.call(bank.stats)).entries
        assert entries > 0
        await expect(page.locator("#memory")).to_have_text(f"memory: {entries} entries")

        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=shot)

        # A reload resumes the same session and restores the transcript.
        await page.reload()
        await expect(status).to_have_text(f"resumed {session_id}")
        await expect(page.locator(".msg.user")).to_have_text(message)
        await expect(assistant).to_have_text(reply)
        await expect(page.locator("#memory")).to_have_text(f"memory: {entries} entries")
        assert len(server.sessions.sessions) == 1


async def test_stop_cancels_a_long_reply(browser: Browser, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.generation.max_tokens = 400  # greedy decoding of the tiny model runs to the limit
    async with running_server(config) as server:
        page = await open_page(browser, server.port)
        await expect(page.locator("#status")).to_have_text(re.compile(r"^session sess_\w+$"))
        await send(page, "Tell me a very long story.")
        assistant = page.locator(".msg.assistant")
        await expect(assistant).not_to_have_text("")  # it is streaming
        await expect(page.locator("#stop")).to_be_enabled()
        await page.click("#stop")
        await expect(assistant).to_have_text(re.compile(r" \[stopped\]$"))
        await reply_finished(page, 1)

        # The session takes the next message after a stop.
        await send(page, "Short one.")
        await reply_finished(page, 2)
        assert not (await assistant.nth(1).text_content() or "").endswith("[stopped]")


async def test_page_sends_security_headers_and_loads_without_errors(
    browser: Browser, tmp_path: Path
) -> None:
    """CSP (its own script and style by hash, connections to its own origin), no framing, no
    sniffing, no referrer; the page still works under that policy and requests nothing missing."""
    async with running_server(make_config(tmp_path)) as server:
        page = await browser.new_page()
        page.set_default_timeout(WAIT_MS)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.on(
            "response",
            lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None,
        )
        resp = await page.goto(f"http://127.0.0.1:{server.port}/")
        assert resp is not None
        headers = await resp.all_headers()
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "connect-src 'self'" in csp and "script-src 'sha256-" in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        # The policy lets the page's own script run and open its websocket.
        await expect(page.locator("#status")).to_have_text(re.compile(r"^session sess_\w+$"))
        await expect(page.locator("#about")).to_contain_text("not a general chatbot")
        assert problems == []


async def test_an_answer_shows_on_click_which_message_its_memories_came_from(
    browser: Browser, tmp_path: Path
) -> None:
    """The bundled model is told a fact, then ~1K tokens of other talk, then asked: under the
    answer, "memories used" opens to name the user's first message and quote the value."""
    import random

    from agent_runtime.models.byte import BUNDLED_CHECKPOINT
    from agent_runtime.models.byte.model import load_checkpoint
    from tests.agent_runtime.test_recall import _filler_messages, _held_out_fact

    config = make_config(tmp_path)
    config.generation.max_tokens = 48
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    fact = _held_out_fact(21)
    rng = random.Random(21)
    async with running_server(config, model) as server:
        page = await open_page(browser, server.port)
        await expect(page.locator("#status")).to_have_text(re.compile(r"^session sess_\w+$"))
        await send(page, fact.statement(rng))
        await reply_finished(page, 1)
        await send(page, " ".join(_filler_messages(21, 1200)))
        await reply_finished(page, 2)
        await send(page, fact.question(rng))
        await reply_finished(page, 3)
        await expect(page.locator(".msg.assistant").nth(2)).to_contain_text(fact.value)
        sources = page.locator(".sources").last
        first = sources.locator("li").first
        await expect(first).not_to_be_visible()  # collapsed until clicked
        await sources.locator("summary").click()
        await expect(first).to_be_visible()
        await expect(first).to_contain_text("from your message 1")
        await expect(first).to_contain_text(fact.value)
        await expect(first).to_contain_text(re.compile(r"\d+ s ago"))
        # and it survives a reload (the transcript keeps ids and provenance)
        await page.reload()
        await expect(page.locator(".sources").last.locator("summary")).to_have_text(
            re.compile(r"^memories used \(\d\)$")
        )


@pytest.mark.slow
async def test_a_newcomer_tells_smollm2_a_fact_in_the_page_and_gets_it_back(
    browser: Browser, tmp_path: Path
) -> None:
    """The issue's newcomer, in the page, with the documented model (`serve --model
    smollm2-135m-recall`): a fact, then ~1,500 tokens of other talk (real dialogue, three times
    the 512-token window), then the plain question; the answer has the fact, and its memories
    name the message that told it (beside the long one, which holds most of the attention)."""
    import random

    from agent_runtime.config import EngineConfig
    from agent_runtime.training.chat_eval import chitchat_lines
    from tests.server.test_pretrained_serving import _test_data

    data = _test_data()
    model = load_model(EngineConfig(model="smollm2-135m-recall"), data)
    lines = chitchat_lines(data)
    rng = random.Random(3)
    config = make_config(tmp_path)
    config.generation.max_tokens = 16
    async with running_server(config, model) as server:
        page = await open_page(browser, server.port)
        page.set_default_timeout(WAIT_MS * 20)  # a CPU prefill of ~1,500 tokens per reply
        await expect(page.locator("#status")).to_have_text(re.compile(r"^session sess_\w+$"))
        await send(page, "My sister's name is Quenova.")
        await reply_finished(page, 1)
        filler: list[str] = []
        while len(model.encode_turn("user", " ".join(filler))) < 1500:
            filler.append(rng.choice(lines))
        await send(page, " ".join(filler))
        await reply_finished(page, 2)
        await send(page, "What is my sister called?")
        await reply_finished(page, 3)
        await expect(page.locator(".msg.assistant").nth(2)).to_contain_text("Quenova")
        bank = next(iter(server.sessions.sessions.values())).bank
        assert (await server.engine.call(bank.stats)).entries > 1000  # the fact left the window
        sources = page.locator(".sources").last
        await sources.locator("summary").click()
        told = sources.locator("li", has_text="from your message 1")  # among the sources listed
        await expect(told).to_contain_text("Quenova")
