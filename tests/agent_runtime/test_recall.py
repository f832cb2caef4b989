"""The product's claim, end to end: over the websocket API, the bundled model recalls a fact told
more than 4K tokens earlier (far beyond its 128-token window), and only through its memory; and
the answer's provenance names the message that stated it."""

from __future__ import annotations

import random

import pytest

from agent_runtime.config import RuntimeConfig
from agent_runtime.models.byte import BUNDLED_CHECKPOINT
from agent_runtime.models.byte.model import load_checkpoint
from agent_runtime.training.data import ConversationGenerator, Fact, stated_value
from tests.conftest import client, running_server

GAP_TOKENS = 4_500


def _held_out_fact(seed: int) -> Fact:
    return ConversationGenerator(seed, held_out=True).fact(set())


def _filler_messages(seed: int, tokens: int) -> list[str]:
    """Distractor user messages of about ``tokens`` bytes in all (~500 bytes each)."""
    gen = ConversationGenerator(seed, held_out=True)
    out: list[str] = []
    while sum(map(len, out)) < tokens:
        text = bytes(t for t in gen.filler_turns(500) if t < 256).decode()
        out.append(" ".join(text.split()))
    return out


@pytest.mark.parametrize("seed", [11, 12])
async def test_bundled_model_recalls_a_fact_told_4k_tokens_earlier(
    config: RuntimeConfig, seed: int
) -> None:
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    fact = _held_out_fact(seed)
    rng = random.Random(seed)
    async with running_server(config, model) as server, client(server) as c:
        c.timeout *= 6  # the question's turn first reads the ~4.5K queued tokens
        await c.create_session()
        statement = fact.statement(rng)
        _, _, told = await c.turn(statement, max_tokens=16, temperature=0)
        (stated_in,) = [e["item"]["id"] for e in told if e["type"] == "conversation.item.created"]
        for text in _filler_messages(seed, GAP_TOKENS):
            await c.add_message(text)
            await c.until("conversation.item.created")
        reply, done, _ = await c.turn(fact.question(rng), max_tokens=48, temperature=0)
    # The fact is now > 4K tokens back: only the bank (not the 128-token window) holds it.
    assert done["response"]["memory"]["entries"] > GAP_TOKENS
    assert done["response"]["memory"]["retrieved"] > 0
    assert stated_value(reply) == fact.value, reply
    # Provenance: the answer leaned most on the message that stated the fact, on the value.
    top = done["response"]["memory"]["provenance"][0]
    assert top["item_id"] == stated_in, done["response"]["memory"]["provenance"]
    begin, end = top["span"]
    assert fact.value in statement[begin:end], (statement, top)
    assert top["role"] == "user" and 0 < top["score"] <= 1 and top["age_s"] >= 0
