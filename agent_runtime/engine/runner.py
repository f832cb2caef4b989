"""The engine loop: an asyncio front end, one worker thread running the model.

``Engine.generate`` admits a request (or raises ``OverloadedError``/``ConflictError`` at once);
the caller awaits the request's :class:`~agent_runtime.engine.output.OutputCollector` for text
deltas and the final result. The worker thread loops: drain the inbox (work submitted from the
event loop), ask the scheduler (``scheduler.py``) for a batch, feed one chunk of at most one
prefilling prompt and decode one token for every running request in one batched step of the
model (``ChatModel.decode``: memory searches of all rows batched too), then hand outputs to the
event loop with ``call_soon_threadsafe``. The event loop never runs model or FAISS work.

The engine knows models only through the seam in :mod:`agent_runtime.models.base`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from agent_runtime.engine.output import OutputCollector, ResponseResult
from agent_runtime.engine.sampling import SamplingParams, find_stop, held_back, sample
from agent_runtime.engine.scheduler import Request, RequestStatus, Scheduler
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.metrics import EngineMetrics
from agent_runtime.models.base import ChatModel, SessionState, TextStream
from memory import MemoryBank

__all__ = ["Engine", "Generation"]

log = logging.getLogger(__name__)
T = TypeVar("T")
PROVENANCE_KEEP = 64
"""Memory entries a response keeps attention statistics for (the strongest ones)."""


@dataclass(eq=False)
class Generation:
    """What the runner needs for one response (the scheduler's request payload)."""

    state: SessionState
    bank: MemoryBank | None
    prompt: list[int]
    params: SamplingParams
    collector: OutputCollector
    loop: asyncio.AbstractEventLoop
    stream: TextStream
    commit_on_cancel: bool = False
    generator: torch.Generator | None = None
    last_token: int = -1
    text: str = ""  # generated text, for stop sequences
    emitted: int = 0  # characters of ``text`` already handed to the collector
    retrieved: int = 0
    written_at_start: int = 0
    checkpoint: SessionState | None = None
    prompt_pos: int = 0  # prompt tokens fed so far (prefill is chunked)
    start_position: int = -1  # position of the prompt's first token (known once it is fed)
    admitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    attended: dict[int, float] = field(default_factory=dict)  # position -> attention mass
    queries: int = 0  # the query rows that mass is spread over

    def note_attention(self, attended: dict[int, float], queries: int) -> None:
        """Add one decode step's attention to memory (bounded: the strongest entries stay)."""
        for position, mass in attended.items():
            self.attended[position] = self.attended.get(position, 0.0) + mass
        self.queries += queries
        if len(self.attended) > 4 * PROVENANCE_KEEP:
            top = sorted(self.attended.items(), key=lambda kv: -kv[1])[:PROVENANCE_KEEP]
            self.attended = dict(top)

    def attention_shares(self) -> dict[int, float]:
        """The strongest entries' share of the response's attention (position -> share)."""
        if not self.queries:
            return {}
        top = sorted(self.attended.items(), key=lambda kv: -kv[1])[:PROVENANCE_KEEP]
        return {position: mass / self.queries for position, mass in top}


class Engine:
    """Owns the model, the scheduler and the worker thread. ``async with Engine(...) as engine``."""

    def __init__(
        self,
        model: ChatModel[Any],
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        batching: bool = True,
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
        self.batching = batching
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

    def generation(
        self,
        state: SessionState,
        bank: MemoryBank | None,
        prompt: list[int],
        params: SamplingParams,
        *,
        commit_on_cancel: bool = False,
    ) -> Generation:
        """A response's payload for :meth:`generate` (its collector is ``.collector``)."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        return Generation(
            state,
            bank,
            prompt,
            params,
            OutputCollector(),
            asyncio.get_running_loop(),
            self.model.text_stream(),
            commit_on_cancel=commit_on_cancel,
            generator=generator,
        )

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
            logits, stats = self.model.decode(
                [g.state for g in gens], [g.last_token for g in gens], [g.bank for g in gens]
            )
            if self.metrics is not None:
                self.metrics.step.observe(time.perf_counter() - started)
                self.metrics.retrieval.observe(stats.search_seconds)
            for i, (req, g, row, n) in enumerate(
                zip(group, gens, logits, stats.retrieved, strict=True)
            ):
                g.retrieved += n
                if stats.attended:
                    g.note_attention(stats.attended[i], stats.queries[i])
                self._isolated(req, functools.partial(self._accept_logits, req, row))

    def _accept_logits(self, req: Request, logits: torch.Tensor) -> None:
        self._accept(req, self._sample(logits, req.payload, len(req.output_tokens)))

    def _prefill_chunk(self, req: Request) -> None:
        """Feed the next block-aligned chunk of a prompt; sample the first token after the last."""
        g: Generation = req.payload
        if req.abort_requested and g.checkpoint is None:
            # Cancelled during its prompt: the prompt is kept, the reply never started.
            self._prefilling = None
            end = self.model.end_token
            self.model.prefill(g.state, [*g.prompt[g.prompt_pos :], end], g.bank)
            g.start_position = g.state.position - len(g.prompt) - 1
            self._finish(req, "cancelled")
            return
        W = self.model.block
        chunk = g.prompt[g.prompt_pos : g.prompt_pos + W - g.state.position % W]
        logits = self.model.prefill(g.state, chunk, g.bank)
        g.prompt_pos += len(chunk)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(chunk))
        if g.prompt_pos >= len(g.prompt):
            self._prefilling = None
            g.start_position = g.state.position - len(g.prompt)
            g.state.recent_ids = []  # ids the reply writes, removed again if it is rolled back
            g.checkpoint = self.model.checkpoint(g.state)
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
        logits = logits + self.model.reply_mask
        if produced < g.params.min_tokens:
            logits[self.model.end_token] = float("-inf")
        return sample(logits, g.params, g.generator)

    def _accept(self, req: Request, token: int) -> None:
        """Record a sampled token: stream its text, or close the response."""
        g: Generation = req.payload
        if req.abort_requested:
            # ``token`` is dropped; the previous one was fed by the step that sampled it.
            g.last_token = -1
            self._close(req, cancelled=True)
            return
        if token == self.model.end_token:
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
        stop_at = find_stop(g.text, g.params.stop)
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
        end = len(g.text) if final else len(g.text) - held_back(g.text, g.params.stop)
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
            self.model.restore(g.state, g.checkpoint)
            tail = []
        end = self.model.end_token
        self.model.prefill(g.state, [*tail, end] if tail[-1:] != [end] else tail, g.bank)
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
            output_tokens=len([t for t in req.output_tokens if t != self.model.end_token]),
            memory_retrieved=g.retrieved,
            memory_written=g.state.written - g.written_at_start,
            error=error,
            text=g.text[: g.emitted],
            tokens=[t for t in req.output_tokens if t != self.model.end_token],
            start=g.start_position,
            attended=g.attention_shares(),
        )
        if self.metrics is not None:
            self.metrics.responses.inc()
            self.metrics.memory_written.inc(result.memory_written)
        return result

    def _deliver(self, req: Request, text: str, result: ResponseResult | None) -> None:
        g: Generation = req.payload
        g.loop.call_soon_threadsafe(g.collector.push, text, result)


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
