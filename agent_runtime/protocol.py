"""The wire protocol, sans I/O: ids, codecs, client-event validation, event builders.

The one place where events are spelled: the server and the sessions build server events with
the functions under "Server events", the Python client builds client events with those under
"Client events", and both encode frames with :data:`CODECS`.

Events are shaped like the OpenAI Realtime API: every event is an object with a ``type`` and an
``event_id``; server events also carry the session's monotonically increasing ``seq``. The
protocol version and codec are chosen by websocket subprotocol:

* ``agent-runtime.v1.json``    — JSON text frames (the default when the client names none)
* ``agent-runtime.v1.msgpack`` — msgpack binary frames

Nothing here touches a socket: :func:`parse_client_event` turns one frame into a typed event or
raises :class:`~agent_runtime.errors.ProtocolError` naming the problem and the ``event_id``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from agent_runtime.errors import (
    OverloadedError,
    ProtocolError,
    RequestError,
    SessionElsewhereError,
)

__all__ = [
    "CLIENT_EVENTS",
    "CODECS",
    "SUBPROTOCOLS",
    "ClientEvent",
    "Codec",
    "ItemCreate",
    "MemoryStats",
    "Ping",
    "ResponseCancel",
    "ResponseCreate",
    "SessionCreate",
    "SessionDelete",
    "SessionResume",
    "new_id",
    "parse_client_event",
]

JSON_SUBPROTOCOL = "agent-runtime.v1.json"
MSGPACK_SUBPROTOCOL = "agent-runtime.v1.msgpack"
SUBPROTOCOLS = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# Bounds on what a decoded frame may contain (besides its byte size, limited by the server).
MAX_DEPTH = 16
"""Deepest nesting of objects/arrays in an event."""
MAX_ITEMS = 4096
"""Most values (scalars and containers) in one event."""
MAX_INT_DIGITS = 20
"""Longest decimal integer accepted in JSON (a signed 64-bit integer has at most 19 digits)."""
INT_RANGE = (-(2**63), 2**64 - 1)


class Codec:
    """Encodes and decodes event objects for one subprotocol.

    Decoding is bounded: nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ITEMS`
    values, integers beyond 64 bits, NaN/Infinity and text that is not valid Unicode (lone
    surrogates) raise :class:`ProtocolError` with code ``invalid_value``, never anything else.
    """

    def __init__(self, name: str) -> None:
        if name not in SUBPROTOCOLS:
            raise ValueError(f"unknown subprotocol {name!r}")
        self.name = name
        self.binary = name == MSGPACK_SUBPROTOCOL

    def encode(self, event: dict[str, Any]) -> str | bytes:
        if self.binary:
            return msgpack.packb(event, use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))

    def decode(self, frame: str | bytes) -> object:
        obj = self._decode_syntax(frame)
        check_value(obj)
        return obj

    def _decode_syntax(self, frame: str | bytes) -> object:
        if self.binary:
            if isinstance(frame, str):
                raise ProtocolError(
                    "this session speaks msgpack: send binary frames", code="invalid_frame"
                )
            try:
                return msgpack.unpackb(
                    frame,
                    raw=False,
                    strict_map_key=True,
                    max_array_len=MAX_ITEMS,
                    max_map_len=MAX_ITEMS,
                    max_ext_len=0,
                )
            except msgpack.StackError:
                raise _invalid(f"frame nests deeper than {MAX_DEPTH} levels") from None
            except Exception as exc:  # msgpack raises several unrelated types
                raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
        if isinstance(frame, bytes):
            try:
                frame = frame.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("this session speaks JSON: frames must be UTF-8 text") from None
        try:
            return json.loads(frame, parse_int=_json_int, parse_constant=_json_constant)
        except json.JSONDecodeError as exc:
            raise ProtocolError(
                f"frame is not valid JSON: {exc.msg} at position {exc.pos}"
            ) from None
        except RecursionError:
            raise _invalid(f"frame nests deeper than {MAX_DEPTH} levels") from None


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(message, code="invalid_value")


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _invalid(f"integer of {len(text)} digits: at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _json_constant(name: str) -> float:
    raise _invalid(f"{name} is not a JSON number")


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800") decode from JSON but are not text
        return False
    return True


def check_value(obj: object) -> None:
    """Raise ProtocolError unless ``obj`` is a bounded tree of valid JSON-like values."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_ITEMS:
            raise _invalid(f"frame holds more than {MAX_ITEMS} values")
        if depth > MAX_DEPTH:
            raise _invalid(f"frame nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if not _valid_text(value):
                raise _invalid("text must be valid Unicode (no lone surrogates)")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not INT_RANGE[0] <= value <= INT_RANGE[1]:
                raise _invalid("integers must fit in 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _invalid("numbers must be finite")
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or not _valid_text(k):
                    raise _invalid("object keys must be valid text")
                stack.append((v, depth + 1))
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)
        elif not isinstance(value, bytes):
            raise _invalid(f"unsupported value of type {type(value).__name__}")


CODECS = {name: Codec(name) for name in SUBPROTOCOLS}


# ---------------------------------------------------------------------------------------------
# Client events


@dataclass
class ClientEvent:
    event_id: str


@dataclass
class SessionCreate(ClientEvent):
    instructions: str = ""


@dataclass
class SessionResume(ClientEvent):
    session_id: str = ""
    last_seq: int = 0


@dataclass
class ItemCreate(ClientEvent):
    role: str = "user"
    text: str = ""


@dataclass
class ResponseCreate(ClientEvent):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    commit_on_cancel: bool = False
    min_tokens: int = 0  # END is suppressed until this many tokens (benchmarks, like vLLM's)
    prefix: str = ""  # the reply starts with this text (assistant prefill); deltas continue it


@dataclass
class ResponseCancel(ClientEvent):
    response_id: str | None = None


@dataclass
class SessionDelete(ClientEvent):
    pass


@dataclass
class MemoryStats(ClientEvent):
    pass


@dataclass
class Ping(ClientEvent):
    data: Any = field(default=None)


class _Fields:
    """Typed access to an event's fields, raising ProtocolError that names the field."""

    def __init__(self, obj: dict[str, Any], where: str, event_id: str) -> None:
        self.obj, self.where, self.event_id = obj, where, event_id

    def fail(self, name: str, reason: str) -> ProtocolError:
        return ProtocolError(
            f"{self.where}.{name} {reason}", code="invalid_value", event_id=self.event_id
        )

    def get(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
    ) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if required:
                raise ProtocolError(
                    f"{self.where}.{name} is required", code="missing_field", event_id=self.event_id
                )
            return default
        value = self.obj[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(name, f"must be {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def number(self, name: str, lo: float, hi: float) -> float | None:
        value = self.get(name, (int, float))
        if value is None:
            return None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self.fail(name, f"must be in [{lo}, {hi}], got {value!r}")
        return float(value)

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        value = self.get(name, int)
        if value is not None and not lo <= value <= hi:
            raise self.fail(name, f"must be in [{lo}, {hi}], got {value!r}")
        return value  # type: ignore[no-any-return]


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
        dict: "an object",
        list: "an array",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


# The client events and their fields (nested objects list their own fields): the schema that
# parse_client_event enforces, docs/asyncapi.yaml documents and the fault suite fuzzes.
CLIENT_EVENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "session.create": {"session": ("instructions",)},
    "session.resume": {"session_id": (), "last_seq": ()},
    "conversation.item.create": {"item": ("type", "role", "content")},
    "response.create": {
        "response": (
            "max_tokens",
            "min_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "commit_on_cancel",
            "prefix",
        )
    },
    "response.cancel": {"response_id": ()},
    "session.delete": {},
    "memory.stats": {},
    "ping": {"data": ()},
}

MAX_STOP_SEQUENCES = 4
MAX_PREFIX_CHARS = 1024
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # as agent_runtime.layout checks it


def valid_session_id(session_id: str) -> bool:
    return bool(_SESSION_ID.fullmatch(session_id))


def parse_client_event(raw: object, *, max_message_chars: int) -> ClientEvent:
    """Validate one decoded frame into a typed client event."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"an event must be an object, got {type(raw).__name__}")
    event_id = raw.get("event_id")
    if event_id is None:
        event_id = new_id("evt")
    elif not isinstance(event_id, str) or not 0 < len(event_id) <= 128:
        raise ProtocolError("event_id must be a string of 1..128 characters", code="invalid_value")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("event has no string 'type'", code="missing_field", event_id=event_id)
    f = _Fields(raw, kind, event_id)
    if kind == "session.create":
        session = _Fields(f.get("session", dict, {}), kind + ".session", event_id)
        instructions = session.get("instructions", str, "")
        if len(instructions) > max_message_chars:
            raise session.fail("instructions", f"is longer than {max_message_chars} characters")
        return SessionCreate(event_id, instructions=instructions)
    if kind == "session.resume":
        session_id = f.get("session_id", str, required=True)
        if not _SESSION_ID.fullmatch(session_id):
            raise f.fail("session_id", "must be 1..128 characters of [A-Za-z0-9_-]")
        last_seq = f.integer("last_seq", 0, 2**62) or 0
        return SessionResume(event_id, session_id=session_id, last_seq=last_seq)
    if kind == "conversation.item.create":
        item = _Fields(f.get("item", dict, required=True), kind + ".item", event_id)
        if item.get("type", str, "message") != "message":
            raise item.fail("type", "must be 'message'")
        role = item.get("role", str, "user")
        if role not in ("user", "system"):
            raise item.fail("role", f"must be 'user' or 'system', got {role!r}")
        text = _item_text(item)
        if len(text) > max_message_chars:
            raise item.fail("content", f"is longer than {max_message_chars} characters")
        return ItemCreate(event_id, role=role, text=text)
    if kind == "response.create":
        resp = _Fields(f.get("response", dict, {}), kind + ".response", event_id)
        stop = resp.get("stop", (list, str), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP_SEQUENCES or not all(
            isinstance(s, str) and 0 < len(s) <= 64 for s in stop
        ):
            raise resp.fail(
                "stop",
                f"must be at most {MAX_STOP_SEQUENCES} non-empty strings of <= 64 characters",
            )
        prefix = resp.get("prefix", str, "")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise resp.fail("prefix", f"is longer than {MAX_PREFIX_CHARS} characters")
        return ResponseCreate(
            event_id,
            prefix=prefix,
            max_tokens=resp.integer("max_tokens", 1, 1_000_000),
            min_tokens=resp.integer("min_tokens", 0, 1_000_000) or 0,
            temperature=resp.number("temperature", 0.0, 10.0),
            top_p=resp.number("top_p", 1e-6, 1.0),
            stop=tuple(stop),
            seed=resp.integer("seed", 0, 2**63 - 1),
            commit_on_cancel=bool(resp.get("commit_on_cancel", bool, False)),
        )
    if kind == "response.cancel":
        response_id = f.get("response_id", str)
        if response_id is not None and not 0 < len(response_id) <= 128:
            raise f.fail("response_id", "must be a string of 1..128 characters")
        return ResponseCancel(event_id, response_id=response_id)
    if kind == "session.delete":
        return SessionDelete(event_id)
    if kind == "memory.stats":
        return MemoryStats(event_id)
    if kind == "ping":
        return Ping(event_id, data=raw.get("data"))
    raise ProtocolError(f"unknown event type {kind!r}", code="unknown_event", event_id=event_id)


def _item_text(item: _Fields) -> str:
    """The text of a message item: ``content`` is a string or a list of ``input_text`` parts."""
    content = item.get("content", (str, list), required=True)
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "text"):
            raise item.fail(f"content[{i}]", "must be an object of type 'input_text'")
        text = part.get("text")
        if not isinstance(text, str):
            raise item.fail(f"content[{i}].text", "must be a string")
        parts.append(text)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Server events. Builders return the event body; a session stamps it (:func:`stamp`) with its
# ``event_id`` and ``seq`` when it emits it.

Event = dict[str, Any]


def stamp(body: Event, seq: int) -> Event:
    """``body`` as sent: with a fresh ``event_id`` and the session's ``seq``."""
    return {"event_id": new_id("evt"), "seq": seq, **body}


def session_created(session: Event) -> Event:
    return {"type": "session.created", "session": session}


def session_resumed(session: Event, *, replayed: int, events_lost: bool) -> Event:
    return {
        "type": "session.resumed",
        "session": session,
        "replayed": replayed,
        "events_lost": events_lost,
    }


def session_deleted(session_id: str) -> Event:
    return {"type": "session.deleted", "session_id": session_id}


def item_created(item_id: str, role: str) -> Event:
    return {
        "type": "conversation.item.created",
        "item": {"id": item_id, "type": "message", "role": role},
    }


def response_created(response_id: str) -> Event:
    return {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}


def output_text_delta(response_id: str, delta: str) -> Event:
    return {"type": "response.output_text.delta", "response_id": response_id, "delta": delta}


def response_done(
    response_id: str,
    *,
    status: str,
    reason: str,
    input_tokens: int,
    output_tokens: int,
    retrieved: int,
    written: int,
    entries: int,
    error: str | None = None,
) -> Event:
    """``response.done``; a failure says what the client can do, never internal details."""
    body: Event = {
        "id": response_id,
        "status": status,
        "status_details": {"reason": reason},
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
        "memory": {"retrieved": retrieved, "written": written, "entries": entries},
    }
    if error:
        body["status_details"]["error"] = error
    return {"type": "response.done", "response": body}


def response_done_failed(response_id: str) -> Event:
    """``response.done`` for a response that failed before it had a result."""
    return response_done(
        response_id,
        status="failed",
        reason="error",
        input_tokens=0,
        output_tokens=0,
        retrieved=0,
        written=0,
        entries=0,
        error="internal error",
    )


def memory_committed(written: int, entries: int) -> Event:
    return {"type": "memory.committed", "written": written, "entries": entries}


def memory_write_stopped(reason: str) -> Event:
    return {"type": "memory.write_stopped", "reason": reason}


def memory_stats(memory: Event, position: int) -> Event:
    return {"type": "memory.stats", "memory": memory, "position": position}


def pong(data: Any) -> Event:
    return {"type": "pong", "data": data}


def server_going_away(reason: str) -> Event:
    return {"type": "server.going_away", "reason": reason}


def error_event(exc: Exception, *, event_id: str | None = None) -> dict[str, Any]:
    """The ``error`` server event for a RequestError (or an internal error, without details)."""
    if isinstance(exc, RequestError):
        err: dict[str, Any] = {
            "type": exc.type,
            "code": exc.code,
            "message": exc.message,
            "event_id": exc.event_id or event_id,
        }
        if isinstance(exc, OverloadedError):
            err["retry_after_ms"] = exc.retry_after_ms
        if isinstance(exc, SessionElsewhereError):
            err["location"] = exc.location  # the owner's base URL (the client goes there)
            if exc.retry_after_ms is not None:  # when the owner's lease runs out unrenewed
                err["retry_after_ms"] = exc.retry_after_ms
    else:
        err = {
            "type": "server_error",
            "code": "internal",
            "message": "internal server error",
            "event_id": event_id,
        }
    return {"type": "error", "error": err}


# ---------------------------------------------------------------------------------------------
# Client events (what the Python client sends; the server validates them above).


def message_item(text: str, role: str = "user") -> Event:
    return {
        "type": "message",
        "role": role,
        "content": [{"type": "input_text", "text": text}],
    }


def session_create(instructions: str = "") -> Event:
    return {
        "type": "session.create",
        "session": {"instructions": instructions} if instructions else {},
    }


def session_resume(session_id: str, last_seq: int) -> Event:
    return {"type": "session.resume", "session_id": session_id, "last_seq": last_seq}


def item_create(text: str, role: str = "user") -> Event:
    return {"type": "conversation.item.create", "item": message_item(text, role)}


def response_create(params: Event) -> Event:
    return {"type": "response.create", "response": params}


def response_cancel() -> Event:
    return {"type": "response.cancel"}


def session_delete() -> Event:
    return {"type": "session.delete"}


def memory_stats_request() -> Event:
    return {"type": "memory.stats"}


def ping(data: Any = None) -> Event:
    return {"type": "ping", "data": data}
