"""The scheduler, with hand-built requests (no model, no sockets)."""

from __future__ import annotations

import pytest

from agent_runtime.engine.scheduler import Request, RequestStatus, Scheduler
from agent_runtime.errors import ConflictError, OverloadedError


def test_one_prefill_per_step_and_all_running_decode_together() -> None:
    s = Scheduler(max_batch=3, max_queue=10)
    reqs = [Request(f"r{i}", f"s{i}") for i in range(5)]
    for r in reqs:
        s.add(r)
    b1 = s.schedule()
    assert b1.prefill is reqs[0] and b1.decode == []
    b2 = s.schedule()
    assert b2.prefill is reqs[1] and b2.decode == [reqs[0]]
    b3 = s.schedule()
    assert b3.prefill is reqs[2] and b3.decode == [reqs[0], reqs[1]]
    b4 = s.schedule()  # batch full: nobody new is admitted
    assert b4.prefill is None and b4.decode == reqs[:3]
    s.finish(reqs[1], "end")
    b5 = s.schedule()
    assert b5.prefill is reqs[3] and b5.decode == [reqs[0], reqs[2]]
    assert reqs[1].status is RequestStatus.FINISHED and reqs[1].finish_reason == "end"


def test_one_active_request_per_session_and_a_bounded_queue() -> None:
    s = Scheduler(max_batch=1, max_queue=2)
    s.add(Request("a", "s1"))
    with pytest.raises(ConflictError):
        s.add(Request("b", "s1"))
    s.add(Request("c", "s2"))
    with pytest.raises(OverloadedError) as info:
        s.add(Request("d", "s3"))
    assert info.value.retry_after_ms > 0


def test_aborted_waiting_requests_are_dropped_and_free_their_session() -> None:
    s = Scheduler(max_batch=1, max_queue=5)
    a, b = Request("a", "s1"), Request("b", "s2")
    s.add(a)
    s.add(b)
    s.schedule()  # a runs
    assert s.abort("b") is b
    batch = s.schedule()
    assert batch.dropped == [b] and b.finish_reason == "cancelled"
    assert s.active("s2") is None
    s.add(Request("b2", "s2"))  # the session may start a new response
    assert s.abort("zzz") is None
