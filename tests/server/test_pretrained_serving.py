"""The pretrained (Llama-family) models served end to end: a tiny random one for every path,
and the real SmolLM2-135M-Instruct recalling a fact through its kNN memory."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from agent_runtime.config import EngineConfig, RuntimeConfig
from agent_runtime.models.loader import load_model
from tests.conftest import TIMEOUT, client, make_config, running_server, tiny_llama_chat


async def test_a_reply_prefix_is_fed_and_not_repeated(config: RuntimeConfig) -> None:
    model = tiny_llama_chat(4)
    async with running_server(config, model) as server, client(server) as c:
        await c.create_session()
        _, plain, _ = await c.turn("hello there", max_tokens=4)
        _, prefixed, events = await c.turn("hello there", max_tokens=4, prefix="my name is")
    usage = lambda done: done["response"]["usage"]["input_tokens"]  # noqa: E731
    assert usage(prefixed) - usage(plain) == len(model.encode_text("my name is"))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert not text.startswith("my name is")


async def test_several_sessions_decode_together_and_write_their_memories(
    config: RuntimeConfig,
) -> None:
    async def converse(server: Any, n: int) -> dict[str, Any]:
        async with client(server) as c:
            await c.create_session()
            for i in range(3):
                _, done, _ = await c.turn(
                    f"turn {i} of session {n}: hello there " * 3, max_tokens=12
                )
                assert done["response"]["status"] in ("completed", "incomplete")
            await c.send({"type": "memory.stats"})
            stats, _ = await c.until("memory.stats")
            return stats

    async with running_server(config, tiny_llama_chat(5)) as server:
        results = await asyncio.wait_for(
            asyncio.gather(*(converse(server, n) for n in range(3))), TIMEOUT * 3
        )
    for stats in results:
        assert stats["memory"]["entries"] > 0


async def test_a_cancelled_reply_is_rolled_back_with_its_memories(config: RuntimeConfig) -> None:
    async with running_server(config, tiny_llama_chat(6)) as server, client(server) as c:
        await c.create_session()
        await c.turn("hello there " * 4, max_tokens=4)
        (session,) = server.sessions.sessions.values()
        start = session.state.position
        await c.add_message("go on")
        await c.send(
            {"type": "response.create", "response": {"max_tokens": 200, "min_tokens": 200}}
        )
        await c.until("response.output_text.delta")
        await c.send({"type": "response.cancel"})
        done, _ = await c.until("response.done")
        assert done["response"]["status"] == "cancelled"
        await c.send({"type": "memory.stats"})
        stats, _ = await c.until("memory.stats")
    state = session.state
    # the prompt is kept and closed (its end token and the text after it), the reply is gone
    assert state.position == start + done["response"]["usage"]["input_tokens"] + 2
    # and so are its memories: the bank holds exactly what left the window before the reply
    assert stats["memory"]["entries"] == state.written == state.position - state.cached


# -- the real model -----------------------------------------------------------------------------


def _test_data() -> Path:
    return Path(
        os.environ.get("AGENT_RUNTIME_TEST_DATA") or Path.home() / ".cache" / "agent-runtime-test"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("smollm2-135m-instruct", "Your locker code is"),  # the base needs an answer prefix
        ("smollm2-135m-recall", None),  # the shipped fine-tune answers the plain question
    ],
)
async def test_smollm2_recalls_a_fact_from_beyond_its_window_through_memory(
    tmp_path: Path, name: str, prefix: str | None
) -> None:
    """Told a held-out fact, then ~1,500 tokens of real dialogue (the chitchat corpus, three
    times the 512-token window), SmolLM2 answers with the fact: only the kNN memory holds it.
    The fine-tune is pulled as a user pulls it (the base's conversion plus the adapter shipped
    in the package)."""
    from agent_runtime.training.chat_eval import chitchat_lines

    data = _test_data()
    model = load_model(EngineConfig(model=name), data)
    lines = chitchat_lines(data)
    rng = random.Random(7)
    config = make_config(tmp_path)
    config.generation.max_tokens = 16
    async with running_server(config, model) as server, client(server) as c:
        c.timeout = TIMEOUT * 30  # the first delta follows a prefill of ~1,700 tokens on CPU
        sid = await c.create_session()
        await c.add_message("The code for my locker is 7316.")
        filler = 0
        while filler < 1500:
            text = " ".join(rng.choice(lines) for _ in range(6))
            filler += len(model.encode_turn("user", text))
            await c.add_message(text)
        await c.send({"type": "memory.stats"})
        stats, before = await c.until("memory.stats")
        assert stats["memory"]["entries"] == 0  # nothing is fed before a response is asked for
        told = next(e["item"]["id"] for e in before if e["type"] == "conversation.item.created")
        asked = {"prefix": prefix} if prefix else {}
        reply, done, _ = await c.turn("Can you remind me of my locker code?", **asked)
        await c.send({"type": "memory.stats"})
        stats, _ = await c.until("memory.stats")
    assert stats["memory"]["entries"] > 1000, "the fact left the window long ago"
    assert "7316" in reply, (sid, reply, done["response"]["status"])
    # provenance names the message that told it, and the attended span holds the code
    named = {p["item_id"]: p for p in done["response"]["memory"]["provenance"]}
    assert told in named, done["response"]["memory"]["provenance"]
    begin, end = named[told]["span"]
    assert "7316" in "The code for my locker is 7316."[begin:end], named[told]


async def test_the_web_page_describes_the_model_it_serves(config: RuntimeConfig) -> None:
    import urllib.request

    async with running_server(config, tiny_llama_chat(7)) as server:
        url = f"http://127.0.0.1:{server.port}/"
        html = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=TIMEOUT).read())
    about = html.decode().split('<p id="about">', 1)[1].split("</p>", 1)[0]
    assert "pretrained chat model" in about and "window" in about
    assert "bundled" not in about
