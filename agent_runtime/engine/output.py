"""A response's output on its way to the event loop: the single-slot collector and the result.

A collector holds at most one pending delta: when the consumer falls behind, new text is merged
into it, so a slow client costs memory proportional to its unread text and never stalls a step
(vLLM v1's output collector does the same).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

__all__ = ["OutputCollector", "ResponseResult"]


@dataclass
class ResponseResult:
    status: str  # completed | cancelled | incomplete | failed
    reason: str  # stop | length | end | cancelled | error
    input_tokens: int
    output_tokens: int
    memory_retrieved: int
    memory_written: int
    error: str | None = None
    text: str = ""  # the reply as delivered (stop sequences cut)
    tokens: list[int] = field(default_factory=list)  # the reply's tokens (END excluded)
    start: int = -1  # position of the prompt's first token; the reply follows the prompt
    attended: dict[int, float] = field(default_factory=dict)
    """Stored position -> share of the reply's attention that memory entry received (top ones)."""


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
