"""Protocol parsing, sans I/O."""

from __future__ import annotations

import msgpack
import pytest

from agent_runtime.errors import ProtocolError
from agent_runtime.protocol import (
    CODECS,
    ItemCreate,
    ResponseCreate,
    SessionResume,
    parse_client_event,
)


def parse(raw: object) -> object:
    return parse_client_event(raw, max_message_chars=100)


def test_valid_events_become_typed_events() -> None:
    ev = parse(
        {
            "type": "conversation.item.create",
            "event_id": "a",
            "item": {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hi "},
                    {"type": "input_text", "text": "there"},
                ],
            },
        }
    )
    assert ev == ItemCreate("a", role="user", text="hi there")
    ev = parse(
        {"type": "response.create", "response": {"max_tokens": 5, "temperature": 0.7, "stop": "\n"}}
    )
    assert isinstance(ev, ResponseCreate) and ev.max_tokens == 5 and ev.stop == ("\n",)
    assert ev.event_id.startswith("evt_")  # generated when the client sends none
    assert parse(
        {"type": "session.resume", "event_id": "r", "session_id": "s", "last_seq": 3}
    ) == SessionResume("r", session_id="s", last_seq=3)


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ({"type": "nope", "event_id": "x"}, "unknown_event", "nope"),
        ({"event_id": "x"}, "missing_field", "type"),
        (
            {"type": "conversation.item.create", "event_id": "x", "item": {"content": 5}},
            "invalid_value",
            "content",
        ),
        (
            {
                "type": "conversation.item.create",
                "event_id": "x",
                "item": {"role": "assistant", "content": "a"},
            },
            "invalid_value",
            "role",
        ),
        (
            {"type": "conversation.item.create", "event_id": "x", "item": {"content": "a" * 101}},
            "invalid_value",
            "longer than 100",
        ),
        (
            {"type": "response.create", "event_id": "x", "response": {"max_tokens": 0}},
            "invalid_value",
            "max_tokens",
        ),
        (
            {"type": "response.create", "event_id": "x", "response": {"max_tokens": True}},
            "invalid_value",
            "boolean",
        ),
        (
            {"type": "response.create", "event_id": "x", "response": {"temperature": float("nan")}},
            "invalid_value",
            "temperature",
        ),
        (
            {"type": "response.create", "event_id": "x", "response": {"stop": ["a"] * 5}},
            "invalid_value",
            "stop",
        ),
        ({"type": "session.resume", "event_id": "x"}, "missing_field", "session_id"),
        (
            {"type": "session.resume", "event_id": "x", "session_id": "s", "last_seq": -1},
            "invalid_value",
            "last_seq",
        ),
    ],
)
def test_invalid_events_name_the_problem_and_the_event_id(
    raw: dict[str, object], code: str, fragment: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(raw)
    assert info.value.code == code
    assert info.value.event_id == "x"
    assert fragment in info.value.message


def test_codecs_round_trip_and_reject_the_wrong_frame_kind() -> None:
    event = {"type": "response.output_text.delta", "delta": "héllo ✓", "seq": 3}
    for codec in CODECS.values():
        assert codec.decode(codec.encode(event)) == event
    js, mp = CODECS["agent-runtime.v1.json"], CODECS["agent-runtime.v1.msgpack"]
    with pytest.raises(ProtocolError, match="binary"):
        mp.decode('{"type": "ping"}')
    with pytest.raises(ProtocolError, match="msgpack"):
        mp.decode(b"\xc1")
    with pytest.raises(ProtocolError, match="UTF-8"):
        js.decode(b"\xff\xfe")
    assert mp.decode(msgpack.packb({"type": "ping"})) == {"type": "ping"}
