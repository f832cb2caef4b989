"""The inference engine: an asyncio front end, one worker thread running the model.

``Engine.generate`` admits a request (or raises ``OverloadedError``/``ConflictError`` at once),
and returns an :class:`OutputCollector` the caller awaits for text deltas and the final result.
The worker thread loops: drain the inbox (work submitted from the event loop), ask the
scheduler for a batch, prefill at most one new request and decode one token for every running
request in one batched forward (memory searches of all rows batched too), then hand outputs to
the event loop with ``call_soon_threadsafe``. The event loop never runs model or FAISS work.

A collector holds at most one pending delta: when the consumer falls behind, new text is merged
into it, so a slow client costs memory proportional to its unread text and never stalls a step.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from agent_runtime.errors import AgentRuntimeError
from agent_runtime.generation import GenerationState, SamplingParams, decode_step, prefill, sample
from agent_runtime.metrics import EngineMetrics
from agent_runtime.model import MemorizingTransformer
from agent_runtime.scheduler import Request, RequestStatus, Scheduler
from agent_runtime.tokenizer import END, Utf8Stream
from memory import MemoryBank

__all__ = ["Engine", "Generation", "OutputCollector", "ResponseResult"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ResponseResult:
    status: str  # completed | cancelled | incomplete | failed
    reason: str  # stop | length | end | cancelled | error
    input_tokens: int
    output_tokens: int
    memory_retrieved: int
    memory_written: int
    error: str | None = None


class OutputCollector:
    """Single-slot, coalescing hand-off of one response's output to its consumer (event loop side)."""

    def __init__(self) -> None:
        self._text = ""
        self._result: ResponseResult | None = None
        self._event = asyncio.Event()
        self.first_token_at: float | None = None

    def push(self, text: str, result: ResponseResult | None) -> None:
        if text:
            self._text += text
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if result is not None:
            self._result = result
        self._event.set()

    async def get(self) -> tuple[str, ResponseResult | None]:
        """Wait for output; returns all text since the last call and the result once finished."""
        await self._event.wait()
        self._event.clear()
        text, self._text = self._text, ""
        return text, self._result


@dataclass(eq=False)
class Generation:
    """What the runner needs for one response (the scheduler's request payload)."""

    state: GenerationState
    bank: MemoryBank | None
    prompt: list[int]
    params: SamplingParams
    collector: OutputCollector
    loop: asyncio.AbstractEventLoop
    commit_on_cancel: bool = False
    on_finish: Callable[[ResponseResult], None] | None = None
    generator: torch.Generator | None = None
    last_token: int = -1
    stream: Utf8Stream = field(default_factory=Utf8Stream)
    text: str = ""  # generated text, for stop sequences
    emitted: int = 0  # characters of ``text`` already handed to the collector
    retrieved: int = 0
    written_at_start: int = 0
    checkpoint: GenerationState | None = None
    prompt_pos: int = 0  # prompt tokens fed so far (prefill is chunked)
    admitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None


class Engine:
    """Owns the model, the scheduler and the worker thread. ``async with Engine(...) as engine``."""

    def __init__(
        self,
        model: MemorizingTransformer,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self._prefilling: Request | None = None
        self.scheduler = Scheduler(max_batch, max_queue)
        self._lock = threading.Lock()  # guards the scheduler between loop and worker threads
        self._cv = threading.Condition(self._lock)
        self._inbox: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batching = True
        self._reply_mask = torch.full(
            (model.cfg.vocab_size,), float("-inf"), device=next(model.parameters()).device
        )
        self._reply_mask[:256] = 0.0
        self._reply_mask[END] = 0.0
        self.steps = 0
        self.tokens_generated = 0

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="agent-runtime-engine", daemon=True
            )
            self._thread.start()

    async def aclose(self) -> None:
        """Stop the worker after its current step (idempotent); unfinished requests fail."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join)

    # -- event-loop side ------------------------------------------------------------------------

    def generate(self, request_id: str, session_key: str, gen: Generation) -> None:
        """Admit a response; raises OverloadedError/ConflictError synchronously."""
        req = Request(request_id, session_key, gen)
        with self._cv:
            if self._stopping:
                raise AgentRuntimeError("engine is shutting down")
            self.scheduler.add(req)
            self._cv.notify()

    def abort(self, request_id: str) -> bool:
        with self._cv:
            found = self.scheduler.abort(request_id) is not None
            self._cv.notify()
        return found

    def active(self, session_key: str) -> Request | None:
        with self._lock:
            return self.scheduler.active(session_key)

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._lock:
            return len(self.scheduler.running), len(self.scheduler.waiting)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between steps (for anything touching banks or states)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        with self._cv:
            if self._thread is None:
                raise AgentRuntimeError("engine is not running")
            self._inbox.append(job)
            self._cv.notify()
        return await fut

    # -- worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._inbox and not len(self.scheduler) and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    pending = [*self.scheduler.waiting, *self.scheduler.running]
                    break
                inbox, self._inbox = self._inbox, []
            for job in inbox:
                job()
            with self._lock:
                batch = self.scheduler.schedule(admit=self._prefilling is None)
            for req in batch.dropped:
                self._deliver(req, "", self._result(req, "cancelled"))
            if batch.prefill is not None:
                self._prefilling = batch.prefill
                g: Generation = batch.prefill.payload
                g.written_at_start = g.state.written
                if self.metrics is not None:
                    self.metrics.queue.observe(time.perf_counter() - g.admitted_at)
            try:
                self._step(batch.decode)
            except Exception as exc:  # a bug or a bank failure: fail these requests, keep serving
                log.exception("engine step failed")
                failed = [self._prefilling] if self._prefilling is not None else []
                self._prefilling = None
                for req in failed + batch.decode:
                    if req.status is not RequestStatus.FINISHED:
                        self._finish(req, "error", error=str(exc))
        for req in pending:
            self._finish(req, "error", error="server shutting down")
        for job in self._inbox:
            job()

    def _step(self, running: list[Request]) -> None:
        """One iteration: a chunk of the prefilling request's prompt, and one decode step for
        every running request whose prompt is done. Long prompts are fed one memory block per
        iteration so that they never stall the other sessions' decoding for long."""
        rows: list[Request] = []
        for req in running:
            if req is self._prefilling:
                continue
            if req.abort_requested:
                self._isolated(req, functools.partial(self._close, req, cancelled=True))
            else:
                rows.append(req)
        new = self._prefilling
        if new is not None:
            self._isolated(new, lambda: self._prefill_chunk(new))
            if new.status is RequestStatus.FINISHED:
                self._prefilling = None
        if not rows:
            return
        groups = [rows] if self.batching else [[r] for r in rows]
        for group in groups:
            gens: list[Generation] = [r.payload for r in group]
            started = time.perf_counter()
            logits, retriever = decode_step(
                self.model,
                [g.state for g in gens],
                [g.last_token for g in gens],
                [g.bank for g in gens],
            )
            self.steps += 1
            if self.metrics is not None:
                self.metrics.step.observe(time.perf_counter() - started)
                self.metrics.retrieval.observe(retriever.seconds)
            for req, g, row, n in zip(group, gens, logits, retriever.retrieved, strict=True):
                g.retrieved += n
                self._isolated(req, functools.partial(self._accept_logits, req, row))

    def _accept_logits(self, req: Request, logits: torch.Tensor) -> None:
        self._accept(req, self._sample(logits, req.payload, len(req.output_tokens)))

    def _prefill_chunk(self, req: Request) -> None:
        """Feed the next block-aligned chunk of a prompt; sample the first token after the last."""
        g: Generation = req.payload
        if req.abort_requested and g.checkpoint is None:
            # Cancelled during its prompt: the prompt is kept, the reply never started.
            self._prefilling = None
            prefill(self.model, g.state, [*g.prompt[g.prompt_pos :], END], g.bank)
            self._finish(req, "cancelled")
            return
        W = self.model.cfg.window
        chunk = g.prompt[g.prompt_pos : g.prompt_pos + W - g.state.position % W]
        logits = prefill(self.model, g.state, chunk, g.bank)
        g.prompt_pos += len(chunk)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(chunk))
        if g.prompt_pos >= len(g.prompt):
            self._prefilling = None
            g.state.recent_ids = []  # ids the reply writes, removed again if it is rolled back
            g.checkpoint = _clone_state(g.state)
            assert logits is not None
            self._accept(req, self._sample(logits, g))

    def _isolated(self, req: Request, work: Callable[[], None]) -> None:
        """Run one request's share of a step; a failure fails that request only."""
        try:
            work()
        except Exception as exc:
            log.exception("request %s failed", req.request_id)
            if req is self._prefilling:
                self._prefilling = None
            if req.status is not RequestStatus.FINISHED:
                self._finish(req, "error", error=str(exc))

    def _sample(self, logits: torch.Tensor, g: Generation, produced: int = 0) -> int:
        # A reply may contain bytes and END, never another role token.
        logits = logits + self._reply_mask
        if produced < g.params.min_tokens:
            logits[END] = float("-inf")
        return sample(logits, g.params, g.generator)

    def _accept(self, req: Request, token: int) -> None:
        """Record a sampled token: stream its text, or close the response."""
        g: Generation = req.payload
        if req.abort_requested:
            # ``token`` is dropped; the previous one was fed by the step that sampled it.
            g.last_token = -1
            self._close(req, cancelled=True)
            return
        if token == END:
            req.output_tokens.append(token)
            g.last_token = token
            self._close(req, reason="end")
            return
        req.output_tokens.append(token)
        self.tokens_generated += 1
        g.last_token = token
        now = time.perf_counter()
        if self.metrics is not None:
            if g.last_token_at is None:
                self.metrics.ttft.observe(now - g.admitted_at)
            else:
                self.metrics.itl.observe(now - g.last_token_at)
            self.metrics.tokens.inc()
        g.last_token_at = now
        g.text += g.stream.push(token)
        stop_at = _find_stop(g.text, g.params.stop)
        if stop_at is not None:
            g.text = g.text[:stop_at]
            self._flush_text(req, final=True)
            self._close(req, reason="stop")
        elif len(req.output_tokens) >= g.params.max_tokens:
            g.text += g.stream.flush()
            self._flush_text(req, final=True)
            self._close(req, reason="length")
        else:
            self._flush_text(req, final=False)

    def _flush_text(self, req: Request, *, final: bool) -> None:
        g: Generation = req.payload
        end = len(g.text) if final else len(g.text) - _held_back(g.text, g.params.stop)
        if end > g.emitted:
            self._deliver(req, g.text[g.emitted : end], None)
            g.emitted = end

    def _close(self, req: Request, *, reason: str = "cancelled", cancelled: bool = False) -> None:
        """Feed the response's last token and END into the session so the next turn is well-formed.

        A cancelled response is rolled back to the end of its prompt (memory entries written by it
        are removed) unless the client asked to commit it.
        """
        g: Generation = req.payload
        tail = [g.last_token] if g.last_token >= 0 else []
        if cancelled and not g.commit_on_cancel and g.checkpoint is not None:
            if g.bank is not None and g.state.recent_ids:
                g.bank.remove(np.concatenate(g.state.recent_ids))
            g.state.__dict__.update(g.checkpoint.__dict__)
            tail = []
        prefill(self.model, g.state, [*tail, END] if tail[-1:] != [END] else tail, g.bank)
        self._finish(req, "cancelled" if cancelled else reason)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        with self._lock:
            self.scheduler.finish(req, reason)
        self._deliver(req, "", self._result(req, reason, error))

    def _result(self, req: Request, reason: str, error: str | None = None) -> ResponseResult:
        g: Generation = req.payload
        status = {
            "end": "completed",
            "stop": "completed",
            "length": "incomplete",
            "cancelled": "cancelled",
        }.get(reason, "failed")
        result = ResponseResult(
            status=status,
            reason=reason,
            input_tokens=len(g.prompt),
            output_tokens=len([t for t in req.output_tokens if t != END]),
            memory_retrieved=g.retrieved,
            memory_written=g.state.written - g.written_at_start,
            error=error,
        )
        if g.on_finish is not None:
            g.on_finish(result)
        if self.metrics is not None:
            self.metrics.responses.inc()
            self.metrics.memory_written.inc(result.memory_written)
        return result

    def _deliver(self, req: Request, text: str, result: ResponseResult | None) -> None:
        g: Generation = req.payload
        g.loop.call_soon_threadsafe(g.collector.push, text, result)


def _clone_state(state: GenerationState) -> GenerationState:
    # Cache tensors are never mutated in place (each step concatenates new ones), so a shallow
    # copy with fresh pending lists is a full checkpoint.
    clone = copy.copy(state)
    clone.pending_keys = list(state.pending_keys)
    clone.pending_values = list(state.pending_values)
    clone.recent_ids = list(state.recent_ids)
    return clone


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop sequence (not streamed yet)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
