"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (JSON or server-sent events)
and ``GET /v1/models``, on the websocket's port, with the same tenants, limits and sessions.

* **Sessions.** ``X-Session-Id: <id>`` continues a session (the one the websocket API resumes):
  the request's messages must start with exactly the messages the session holds (checked
  against the session's item ledger; a mismatch is 409 ``session_history_mismatch``) and only
  the rest are appended, so the bank keeps growing across calls. ``X-Session-Id: new`` starts a
  session and the reply names it (header ``X-Session-Id``, body ``agent_runtime.session_id``).
  Without the header a request is stateless: a session lives for the one request (its
  messages are still read through the memory path, so a list longer than the window works)
  and is erased after it.
* **Provenance.** The body (or the last chunk of a stream) carries ``agent_runtime``: the session,
  the reply's item id, and ``memory`` with the entries retrieved and written and
  ``provenance``: the items the answer attended to most (item id, character span, share of
  attention, age). Never their text.
* **Errors** are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
  bad or unsupported parameter (named in ``param``), 401, 404 (unknown model; a session that does
  not exist or is another tenant's), 409, 429 with ``Retry-After``, 503.

Described in ``docs/openapi.yaml``; usage in ``docs/tools.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request

from agent_runtime import protocol as p
from agent_runtime.config import RuntimeConfig
from agent_runtime.engine import SamplingParams
from agent_runtime.errors import (
    AuthenticationError,
    ConflictError,
    OverloadedError,
    RequestError,
    SessionElsewhereError,
    SessionNotFoundError,
    StoreError,
    UnavailableError,
)
from agent_runtime.sessions import Session, SessionManager
from privacy.audit import AuditLog
from privacy.tenants import ANONYMOUS_TENANT
from server.auth import Authenticator
from server.front import (
    FORWARDED_HEADER,
    FrontConnection,
    HttpRequest,
    Reply,
    forward,
    json_reply,
)

__all__ = ["ApiError", "ChatRequest", "OpenAIRoutes", "parse_chat_request"]

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Session-Id"
EVENT_QUEUE = 256  # events buffered per HTTP response before the session waits for the client

ACCEPTED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "user",
    "metadata",
    "store",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "overloaded_error": 429,
    "server_error": 503,
}


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def reply(self) -> Reply:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = []
        if self.retry_after_s is not None:
            headers.append(("Retry-After", str(self.retry_after_s)))
        return json_reply(self.status, json.dumps(body).encode(), headers)

    @classmethod
    def of(cls, exc: RequestError) -> ApiError:
        retry = None
        if isinstance(exc, OverloadedError):
            retry = max(1, math.ceil(exc.retry_after_ms / 1000))
        return cls(
            STATUS.get(exc.type, 400),
            exc.message,
            type=exc.type,
            code=exc.code,
            retry_after_s=retry,
        )


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass
class ChatRequest:
    messages: list[tuple[str, str]]  # (role, text), roles normalised
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(raw: object, *, model_id: str, config: RuntimeConfig) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; an ApiError names the first bad parameter."""
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name in raw:
        if name not in ACCEPTED:
            raise _bad(str(name), "is not supported by this server", code="unsupported_parameter")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (GET /v1/models lists the served model)", "missing")
    if model != model_id:
        raise ApiError(
            404,
            f"the model {model!r} is not served here; this server serves {model_id!r}",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    messages = _messages(raw.get("messages"), config.server.max_message_chars)
    gen = config.generation

    def number(name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
        value = raw.get(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _bad(name, "must be a number")
        if value < lo or value > hi or (lo_open and value == lo):
            raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}]")
        return float(value)

    def integer(name: str, lo: int, hi: int) -> int | None:
        value = raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, "must be an integer")
        if not lo <= value <= hi:
            raise _bad(name, f"must be between {lo} and {hi}")
        return value

    limit = gen.max_tokens_limit
    max_tokens = integer("max_completion_tokens", 1, limit)
    if max_tokens is None:
        max_tokens = integer("max_tokens", 1, limit)
    temperature = number("temperature", 0.0, 2.0)
    top_p = number("top_p", 0.0, 1.0, lo_open=True)
    seed = integer("seed", -(2**63), 2**63 - 1)
    n = integer("n", 1, 1_000_000)
    if n is not None and n != 1:
        raise _bad("n", "only n=1 is supported", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if number(name, -2.0, 2.0) not in (None, 0.0):
            raise _bad(name, "only 0 is supported", "unsupported_value")
    if raw.get("logprobs") not in (None, False):
        raise _bad("logprobs", "log probabilities are not returned", "unsupported_value")
    fmt = raw.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", "only {'type': 'text'} is supported", "unsupported_value")
    for name, kind in (("user", str), ("metadata", dict), ("store", bool)):
        if raw.get(name) is not None and not isinstance(raw[name], kind):
            raise _bad(name, f"must be {'a string' if kind is str else kind.__name__}")
    stream = raw.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    options = raw.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "only {'include_usage': bool} is supported")
        include_usage = bool(options.get("include_usage", False))
    params = SamplingParams(
        max_tokens=max_tokens or gen.max_tokens,
        temperature=gen.temperature if temperature is None else temperature,
        top_p=gen.top_p if top_p is None else top_p,
        stop=_stop(raw.get("stop")),
        seed=seed,
    )
    return ChatRequest(messages, params, stream, include_usage)


def _messages(raw: object, max_chars: int) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty array of messages", "missing")
    if len(raw) > p.MAX_ITEMS:
        raise _bad("messages", f"at most {p.MAX_ITEMS} messages per request")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role",
                f"must be one of {sorted(ROLES)} (tools and functions are not supported)",
            )
        for extra in ("tool_calls", "function_call", "audio"):
            if m.get(extra) is not None:
                raise _bad(f"{where}.{extra}", "is not supported", "unsupported_parameter")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") not in ("text", "input_text")
                    or not isinstance(part.get("text"), str)
                ):
                    raise _bad(f"{where}.content[{j}]", "must be a text part {type: 'text', text}")
                parts.append(part["text"])
            text = "".join(parts)
        else:
            raise _bad(f"{where}.content", "must be a string or an array of text parts")
        if len(text) > max_chars:
            raise _bad(f"{where}.content", f"longer than {max_chars} characters")
        if "\x00" in text:
            raise _bad(f"{where}.content", "must not contain NUL characters")
        out.append((ROLES[role], text))
    return out


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > p.MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad("stop", f"must be a string or up to {p.MAX_STOP_SEQUENCES} non-empty strings")
    return tuple(stops)


class _HttpClient:
    """The session's client while one HTTP request is answered: events go to a bounded queue
    (a slow reader makes the session wait, and the engine coalesces text meanwhile)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(EVENT_QUEUE)
        self.taken = False  # another client (a websocket resume, MQTT) took the session over

    async def send(self, event: dict[str, Any]) -> None:
        await self.queue.put(event)

    def gone(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    def superseded(self) -> None:
        """The session was resumed elsewhere: this request's stream ends; the response goes on
        for the client that took it (it replays what it missed)."""
        self.taken = True
        self.gone()


class OpenAIRoutes:
    def __init__(
        self,
        config: RuntimeConfig,
        sessions: SessionManager,
        auth: Authenticator,
        audit: AuditLog,
        model_id: str,
        displace: Callable[[Session], None],
        closing: Callable[[], bool],
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.auth = auth
        self.audit = audit
        self.model_id = model_id
        self.displace = displace
        self.closing = closing
        self.created = int(time.time())

    async def __call__(self, request: HttpRequest, conn: FrontConnection) -> Reply:
        try:
            return await self._route(request, conn)
        except ApiError as exc:
            return exc.reply()
        except RequestError as exc:
            return ApiError.of(exc).reply()
        except StoreError as exc:
            log.error("session store error: %s", exc)
            return ApiError(
                503,
                "the session store (Redis) is not answering; retry later",
                type="server_error",
                code="store_unavailable",
            ).reply()

    async def _route(self, request: HttpRequest, conn: FrontConnection) -> Reply:
        path = request.path.split("?", 1)[0]
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if request.method not in ("GET", "HEAD"):
                raise ApiError(405, "use GET", code="method_not_allowed")
            await self._tenant(request)
            return self._models(path)
        if request.method != "POST":
            raise ApiError(405, "use POST", code="method_not_allowed")
        tenant = await self._tenant(request)
        if self.closing():
            raise ApiError(
                503, "the server is shutting down", type="server_error", code="server_going_away"
            )
        if "json" not in request.header("content-type").lower():
            raise ApiError(
                415, "Content-Type must be application/json", code="unsupported_media_type"
            )
        try:
            raw = p.CODECS[p.JSON_SUBPROTOCOL].decode(request.body)
        except RequestError as exc:
            raise ApiError(400, f"the request body: {exc.message}", code="invalid_json") from None
        chat = parse_chat_request(raw, model_id=self.model_id, config=self.config)
        try:
            return await self._complete(tenant, chat, request.header(SESSION_HEADER.lower()), conn)
        except SessionElsewhereError as exc:
            return await self._forward(request, exc)

    async def _forward(self, request: HttpRequest, elsewhere: SessionElsewhereError) -> Reply:
        """Another node owns the session: relay the request to it (OpenAI SDKs follow no
        redirects, and httpx drops the API key on a cross-origin one). Never twice."""
        if request.header(FORWARDED_HEADER.lower()):
            raise ApiError(
                503,
                "the session moved while this request was being forwarded; retry",
                type="server_error",
                code="session_elsewhere",
            )
        leases = self.sessions.leases
        target = leases.forward_url(elsewhere.owner, elsewhere.location) if leases else None
        try:
            return await forward(request, target or elsewhere.location)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot forward to node %s: %s", elsewhere.owner, exc)
            raise ApiError(
                503,
                "the node that owns this session does not answer; retry after its lease"
                " expires (a few seconds)",
                type="server_error",
                code="owner_unreachable",
                retry_after_s=(  # when the dead owner's lease runs out (openai SDKs honour it)
                    math.ceil(elsewhere.retry_after_ms / 1000)
                    if elsewhere.retry_after_ms is not None
                    else None
                ),
            ) from None

    async def _tenant(self, request: HttpRequest) -> str:
        ws_request = Request(request.path, Headers(request.headers))
        if not self.auth.origin_allowed(ws_request):
            self.audit.post("-", "denied", None, code="origin_not_allowed")
            raise ApiError(
                403, "origin not allowed", type="permission_error", code="origin_not_allowed"
            )
        try:
            return await self.auth.tenant_of(ws_request)
        except AuthenticationError as exc:
            if not self.auth.required():
                # OpenAI clients always send a key; with authentication off any key is the
                # anonymous tenant's (as llama.cpp's server and vLLM without --api-key do)
                return ANONYMOUS_TENANT
            self.audit.post("-", "denied", None, code=exc.code)
            raise ApiError(
                401, exc.message, type="authentication_error", code="invalid_api_key"
            ) from None

    def _models(self, path: str) -> Reply:
        card = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "agent-runtime",
        }
        if path == "/v1/models":
            body: dict[str, Any] = {"object": "list", "data": [card]}
        elif path == f"/v1/models/{self.model_id}":
            body = card
        else:
            raise ApiError(
                404,
                f"the model {path[len('/v1/models/') :]!r} is not served here",
                type="not_found_error",
                code="model_not_found",
            )
        return json_reply(200, json.dumps(body).encode())

    # -- a completion -------------------------------------------------------------------------

    async def _complete(
        self, tenant: str, chat: ChatRequest, session_id: str, conn: FrontConnection
    ) -> Reply:
        ephemeral = not session_id
        if not session_id or session_id == "new":
            session = await self.sessions.create(tenant, p.new_id("sess"))
        else:
            if not p.valid_session_id(session_id):
                raise SessionNotFoundError("no such session")
            session = await self.sessions.get(tenant, session_id)
        run = _Completion(self, session, chat, ephemeral, conn)
        ledger_size, pending = len(session.ledger.items), list(session.pending)
        try:
            held = session.ledger.held(chat.messages) if not ephemeral else 0
            new = chat.messages[held:]
            if not new:
                raise _bad(
                    "messages", "holds nothing the session does not already have", "nothing_new"
                )
            if session.responding:
                raise ConflictError(
                    "a response is already active on this session", code="response_in_progress"
                )
            self.displace(session)
            session.attach(run.client.send, run.client)
            for role, text in new:
                run.item_ids.append(await self.sessions.add_item(session, role, text))
            await self.sessions.start_response(session, run.response_id, chat.params)
        except BaseException:
            if not session.responding:  # nothing of a refused request stays in the session
                session.ledger.items = session.ledger.items[:ledger_size]
                session.pending = pending
            await run.release()
            raise
        headers = [(SESSION_HEADER, session.session_id)] if not ephemeral else []
        if chat.stream:
            return Reply(
                200,
                [("Content-Type", "text/event-stream; charset=utf-8"), *headers],
                stream=run.events(),
                close=run.release,
            )
        try:
            return await run.collect(headers)
        finally:
            await run.release()


class _Completion:
    """One chat completion on a session: its SSE chunks, and its release (always called)."""

    def __init__(
        self,
        routes: OpenAIRoutes,
        session: Session,
        chat: ChatRequest,
        ephemeral: bool,
        conn: FrontConnection,
    ) -> None:
        self.routes = routes
        self.conn = conn
        self.session = session
        self.chat = chat
        self.ephemeral = ephemeral
        self.client = _HttpClient()
        self.response_id = p.new_id("resp")
        self.cid = "chatcmpl-" + self.response_id.removeprefix("resp_")
        self.created = int(time.time())
        self.done: dict[str, Any] | None = None
        self.released = False
        self.item_ids: list[str] = []  # of the messages this request appended, in order
        conn.on_lost.append(self.client.gone)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.routes.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return _sse(body)

    async def _until_done(self) -> AsyncIterator[str]:
        """The reply's text deltas; sets ``done`` when ``response.done`` arrives."""
        while True:
            event = await self.client.queue.get()
            if event is None:
                return  # the client went away
            kind = event.get("type")
            if (
                kind == "response.output_text.delta"
                and event.get("response_id") == self.response_id
            ):
                yield str(event["delta"])
            elif kind == "response.done" and event["response"]["id"] == self.response_id:
                self.done = event["response"]
                return

    async def events(self) -> AsyncIterator[bytes]:
        """SSE chunks of the response, ending with ``data: [DONE]``."""
        yield self._chunk({"role": "assistant", "content": ""})
        async for delta in self._until_done():
            yield self._chunk({"content": delta})
        done = self.done
        if done is None:
            return
        ext = self.extension(done)
        finish = _finish_reason(done)
        if finish is None:  # failed mid-stream: OpenAI streams report it as an error object
            yield _sse({"error": _failure(done), "agent_runtime": ext})
        else:
            yield self._chunk({}, finish, agent_runtime=ext)
            if self.chat.include_usage:
                yield _sse(
                    {
                        "id": self.cid,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.routes.model_id,
                        "choices": [],
                        "usage": _usage(done),
                    }
                )
        yield b"data: [DONE]\n\n"

    async def collect(self, headers: list[tuple[str, str]]) -> Reply:
        """A non-streamed completion."""
        text = [delta async for delta in self._until_done()]
        done = self.done
        if done is None:
            raise UnavailableError("the response ended without a result")
        finish = _finish_reason(done)
        if finish is None:
            return json_reply(500, json.dumps({"error": _failure(done)}).encode(), headers)
        body = {
            "id": self.cid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.routes.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": _usage(done),
            "agent_runtime": self.extension(done),
        }
        return json_reply(200, json.dumps(body).encode(), headers)

    def extension(self, done: dict[str, Any]) -> dict[str, Any]:
        return {
            "session_id": None if self.ephemeral else self.session.session_id,
            "item_id": None if self.ephemeral else done.get("item_id"),
            "message_item_ids": [] if self.ephemeral else self.item_ids,
            "status": done["status"],
            "memory": done["memory"],
        }

    async def release(self) -> None:
        """Detach from the session; a response the client left is cancelled; a stateless
        session is erased. Idempotent."""
        if self.released:
            return
        self.released = True
        with contextlib.suppress(ValueError):
            self.conn.on_lost.remove(self.client.gone)
        session, sessions = self.session, self.routes.sessions
        if self.done is None and session.response_id == self.response_id and not self.client.taken:
            sessions.cancel(session)
        session.detach(self.client.send)
        if not self.ephemeral:
            return
        try:
            task = session.response_task
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=self.routes.config.server.shutdown_timeout_s)
            await sessions.delete(session)
        except Exception:
            log.exception("could not erase the stateless session %s", session.session_id)


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage(done: dict[str, Any]) -> dict[str, int]:
    u = done["usage"]
    return {
        "prompt_tokens": u["input_tokens"],
        "completion_tokens": u["output_tokens"],
        "total_tokens": u["total_tokens"],
    }


def _finish_reason(done: dict[str, Any]) -> str | None:
    if done["status"] == "completed":
        return "stop"
    if done["status"] == "incomplete":
        return "length"
    if done["status"] == "cancelled":
        return "stop"
    return None


def _failure(done: dict[str, Any]) -> dict[str, Any]:
    details = done["status_details"]
    return {
        "message": str(details.get("error") or "the response failed"),
        "type": "server_error",
        "param": None,
        "code": details.get("reason", "error"),
    }


def is_api_path(path: str) -> bool:
    path = path.split("?", 1)[0]
    return path in ("/v1/chat/completions", "/v1/models") or path.startswith("/v1/models/")
