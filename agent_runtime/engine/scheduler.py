"""Iteration-level (continuous) batching across sessions, sans I/O.

The scheduler owns the queue of waiting requests and the set of running ones. Each engine
iteration asks :meth:`Scheduler.schedule` for a :class:`Batch`: at most one waiting request to
prefill (its prompt is fed and its first token sampled) and every running request for one
batched decode step. :meth:`Scheduler.finish` retires requests. Nothing here touches torch or
sockets, so its behaviour is unit-tested with hand-built requests.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_runtime.errors import ConflictError, OverloadedError

__all__ = ["Batch", "Request", "RequestStatus", "Scheduler"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One response being generated for one session.

    ``session_key`` identifies the session (one active request per session). ``payload`` is
    whatever the runner needs (model state, bank, sampling params); the scheduler never looks in.
    """

    request_id: str
    session_key: str
    payload: Any = None
    status: RequestStatus = RequestStatus.WAITING
    abort_requested: bool = False
    output_tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Batch:
    prefill: Request | None
    decode: list[Request]
    dropped: list[Request] = field(default_factory=list)  # aborted before they ran

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode and not self.dropped


class Scheduler:
    """FIFO admission with a bounded queue and a bounded running batch."""

    def __init__(
        self, max_batch: int, max_queue: int, *, retry_after_ms: Callable[[], int] = lambda: 500
    ) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_session: dict[str, Request] = {}
        self._retry_after_ms = retry_after_ms

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        """Queue a request; one active request per session, and a bounded queue."""
        if request.session_key in self._by_session:
            raise ConflictError(
                "a response is already active on this session", code="response_in_progress"
            )
        if len(self.waiting) >= self.max_queue:
            raise OverloadedError(
                "the server's request queue is full", retry_after_ms=self._retry_after_ms()
            )
        self.waiting.append(request)
        self._by_session[request.session_key] = request

    def abort(self, request_id: str) -> Request | None:
        """Mark a request for abortion; it is retired by the runner at the next step."""
        for req in (*self.waiting, *self.running):
            if req.request_id == request_id:
                req.abort_requested = True
                return req
        return None

    def schedule(self, *, admit: bool = True) -> Batch:
        """The next iteration's work. Aborted waiting requests are dropped here; with ``admit``
        False (a prefill is still in progress) no new request starts."""
        prefill = None
        dropped = [r for r in self.waiting if r.abort_requested]
        for req in dropped:
            self.waiting.remove(req)
            self.finish(req, "cancelled")
        if admit and self.waiting and len(self.running) < self.max_batch:
            prefill = self.waiting.popleft()
        decode = [r for r in self.running if r.status is RequestStatus.RUNNING]
        if prefill is not None:
            prefill.status = RequestStatus.RUNNING
            self.running.append(prefill)
        return Batch(prefill, decode, dropped)

    def finish(self, request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = request.finish_reason or reason
        if request in self.running:
            self.running.remove(request)
        if self._by_session.get(request.session_key) is request:
            del self._by_session[request.session_key]

    def active(self, session_key: str) -> Request | None:
        return self._by_session.get(session_key)
