"""Several nodes, one owner per session (issue #15): real ``serve`` processes on loopback sharing
a real ``redis-server`` (started by the test) and one data root.

* leases and fencing at the library level (a real Redis, real files);
* sessions spread over three nodes and reached through any of them (websocket redirects,
  HTTP forwarding with the real ``openai`` client);
* ``kill -9`` of an owner mid-reply: the conversation goes on elsewhere, nothing acknowledged lost;
* split brain: an owner SIGSTOPped past its lease wakes up and its writes are refused;
* Redis restarted under load; a rolling restart of all three nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from agent_runtime.bench.cluster import Cluster, RedisServer
from agent_runtime.client.agent import AgentClient, SessionInfo
from agent_runtime.config import StoreConfig
from agent_runtime.errors import FencedError, RemoteError
from agent_runtime.layout import session_directory
from agent_runtime.sessions.ownership import (
    Lease,
    Leases,
    Owner,
    check_fence,
    claim_fence,
    read_fence,
)
from agent_runtime.sessions.store import SessionStore
from privacy.tenants import ANONYMOUS_TENANT
from tests.server.test_web import WAIT_MS, browser, reply_finished, send

__all__ = ["browser"]  # the fixture, shared with test_web

TTL = 2.0


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def turn(client: AgentClient, text: str, max_tokens: int = 16) -> dict[str, object]:
    response = client.respond(text, max_tokens=max_tokens)
    async for _ in response:
        pass
    assert response.status in ("completed", "incomplete"), response.done
    return response.memory


async def resumed(
    urls: list[str], session_id: str, last_seq: int = 0
) -> tuple[AgentClient, SessionInfo]:
    client = AgentClient(urls, timeout=20.0)
    try:
        await client.connect()
        info = await client.resume(session_id, last_seq)
    except BaseException:
        await client.aclose()
        raise
    return client, info


def wait_for_text(path: Path, text: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# -- leases and fences, library level ---------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_leases_take_renew_release_and_hand_out_increasing_tokens(
    redis_server: RedisServer,
) -> None:
    async def body() -> None:
        async with SessionStore(
            StoreConfig(data_dir="/nonexistent", redis_url=redis_server.url)
        ) as store:
            a = Leases(store, "a", "http://a:1", ttl_s=1.0)
            b = Leases(store, "b", "http://b:2", ttl_s=1.0)
            first = await a.acquire("sess_x")
            assert isinstance(first, Lease) and first.token == 1 and first.valid
            held = await b.acquire("sess_x")
            assert held == Owner("a", 1, "http://a:1")  # b is told where the session is
            assert await a.renew([first]) == [1]
            await a.release(first)
            assert await a.owner("sess_x") is None
            second = await b.acquire("sess_x")  # released: taken at once
            assert isinstance(second, Lease) and second.token == 2
            assert await a.renew([first]) == [0]  # a's old lease is gone for good
            await asyncio.sleep(1.3)  # b's lease expires unrenewed
            third = await a.acquire("sess_x", floor=7)  # the storage has seen token 7
            assert isinstance(third, Lease) and third.token == 8
            # Redis forgets everything (restart without persistence): the owner re-establishes
            await store.redis.flushall()
            assert await a.renew([third]) == [2]
            assert await b.acquire("sess_x") == Owner("a", 8, "http://a:1")
            assert await b.renew([second]) == [0]

    run(body())


def test_fence_file_refuses_older_tokens(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    assert read_fence(directory) == 0
    claim_fence(directory, 3)
    check_fence(directory, 3)
    claim_fence(directory, 5)  # a new owner
    with pytest.raises(FencedError, match="5"):
        check_fence(directory, 3)  # the old owner's write
    with pytest.raises(FencedError):
        claim_fence(directory, 4)  # and its late claim
    (directory / "fence").write_text("garbage")
    with pytest.raises(Exception, match="fence: not a number"):
        read_fence(directory)


# -- three nodes -------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path):
    with Cluster(tmp_path, 3, lease_ttl_s=TTL) as c:
        try:
            yield c
        except BaseException:
            print(c.log_text()[-6000:])
            raise


def test_sessions_spread_over_nodes_are_reached_through_any_node(cluster: Cluster) -> None:
    async def body() -> None:
        ids = []
        for i in range(3):
            async with AgentClient(cluster.node(i).url) as client:
                ids.append(await client.create_session())
                await turn(client, f"My locker number is {i}{i}{i}.")
        for i, sid in enumerate(ids):
            other = cluster.node((i + 1) % 3).url
            client = AgentClient(other)
            await client.connect()
            info = await client.resume(sid)
            assert info.turns == 1
            assert client.url == cluster.node(i).url  # redirected to the owner
            await turn(client, "And my name is Ada.")
            await client.aclose()
        # a non-following client sees the redirect event itself
        from websockets.asyncio.client import connect

        from agent_runtime import protocol as p

        async with connect(cluster.node(1).url) as ws:
            await ws.send(json.dumps(p.session_resume(ids[0], 0)))
            err = json.loads(await ws.recv())
        assert err["type"] == "error"
        assert err["error"]["code"] == "session_elsewhere"
        assert err["error"]["location"] == f"http://127.0.0.1:{port_of(cluster.node(0).url)}"

    run(body())


def test_http_api_is_forwarded_to_the_owner(cluster: Cluster) -> None:
    import openai

    def client(i: int) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{cluster.node(i).http}/v1", api_key="k", max_retries=0)

    with client(0) as owner, client(2) as other:
        first = owner.chat.completions.with_raw_response.create(
            model="agent-runtime-bundled",
            messages=[{"role": "user", "content": "My dentist is on Friday."}],
            max_tokens=8,
            extra_headers={"X-Session-Id": "new"},
        )
        sid = first.headers["x-session-id"]
        said = first.parse().choices[0].message.content
        history = [
            {"role": "user", "content": "My dentist is on Friday."},
            {"role": "assistant", "content": said},
            {"role": "user", "content": "When is it?"},
        ]
        stream = other.chat.completions.create(
            model="agent-runtime-bundled",
            messages=history,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
            extra_headers={"X-Session-Id": sid},
        )
        chunks = list(stream)
        assert chunks and chunks[-1].choices[0].finish_reason is not None

    # the turn landed in the owner's session (node 0), once
    async def turns() -> int:
        c, info = await resumed([cluster.node(0).url], sid)
        await c.aclose()
        return info.turns

    assert run(turns()) == 2


def test_kill_9_of_the_owner_mid_reply_loses_no_acknowledged_turn(cluster: Cluster) -> None:
    async def body() -> None:
        owner = AgentClient(cluster.node(0).url)
        await owner.connect()
        sid = await owner.create_session()
        await turn(owner, "My locker code is 4417.")
        memory = await turn(owner, "I park on level three.")
        acked = await owner.memory_stats()
        seen_seq = owner.last_seq
        response = owner.respond("Tell me a long story.", max_tokens=400)
        async for _ in response:
            break  # the reply is streaming
        cluster.kill(0)
        killed_at = time.monotonic()
        await owner.aclose()
        # a surviving node names the dead owner and how long its lease still runs
        from websockets.asyncio.client import connect

        from agent_runtime import protocol as p

        async with connect(cluster.node(1).url) as ws:
            await ws.send(json.dumps(p.session_resume(sid, 0)))
            err = json.loads(await ws.recv())["error"]
        assert err["code"] == "session_elsewhere", err
        assert 0 < err["retry_after_ms"] <= TTL * 1000
        client, info = await resumed(cluster.urls, sid, seen_seq)
        assert client.url != owner.url
        assert time.monotonic() - killed_at < TTL + 10
        assert info.turns == 2  # both acknowledged turns; the unacknowledged one is absent
        assert info.memory_entries == acked.entries == memory["entries"]
        assert info.position == acked.position
        before = client.last_seq
        await turn(client, "Where do I park?")
        assert client.last_seq > before > 0  # seq goes on above what the client had seen
        stats = await client.memory_stats()
        assert stats.entries >= acked.entries
        await client.aclose()
        # the dead owner's node comes back and the session stays where it is now
        cluster.start(0)
        again, info2 = await resumed([cluster.node(0).url], sid)
        assert info2.turns == 3 and again.url != cluster.node(0).url
        await again.aclose()

    run(body())


def test_split_brain_the_stale_owner_is_fenced(cluster: Cluster, tmp_path: Path) -> None:
    async def body() -> None:
        owner = AgentClient(cluster.node(0).url)
        await owner.connect()
        sid = await owner.create_session()
        await turn(owner, "My locker code is 4417.")
        directory = session_directory(cluster.data_dir, ANONYMOUS_TENANT, sid)
        assert read_fence(directory) == 1
        response = owner.respond("Tell me a long story.", max_tokens=400)
        async for _ in response:
            break
        stale = cluster.node(0).proc
        os.kill(stale.pid, signal.SIGSTOP)  # paused mid-reply, past its lease
        try:
            await asyncio.sleep(TTL + 0.5)
            client, info = await resumed([cluster.node(1).url], sid)
            assert info.turns == 1
            assert read_fence(directory) == 2  # the new owner claimed the storage
            await turn(client, "I park on level three.")
            after = await client.memory_stats()
        finally:
            os.kill(stale.pid, signal.SIGCONT)
        # the old owner wakes up, finishes or abandons its reply, and tries to write it
        log = cluster.root / "node0.log"
        assert await asyncio.to_thread(wait_for_text, log, "fencing token"), log.read_text()[-3000:]
        await asyncio.sleep(1.0)
        # the bank is intact: what the new owner wrote, nothing of the stale reply
        stats = await client.memory_stats()
        assert stats.entries == after.entries and stats.position == after.position
        await client.aclose()
        assert cluster.stop(1) == 0  # hand off (snapshot), then load it as the next owner will
        again, info2 = await resumed(cluster.urls, sid)
        assert info2.turns == 2 and info2.memory_entries == after.entries
        assert info2.position == after.position
        await again.aclose()
        assert read_fence(directory) == 3  # a third owner, after a handoff
        await owner.aclose()

    run(body())


def test_redis_restart_under_load_degrades_then_recovers(tmp_path: Path) -> None:
    with Cluster(tmp_path, 2, lease_ttl_s=6.0) as cluster:

        async def body() -> None:
            client = AgentClient(cluster.node(0).url)
            await client.connect()
            sid = await client.create_session()
            await turn(client, "My locker code is 4417.")
            cluster.redis.stop(signal.SIGKILL)
            # new sessions are refused with a clear error; the owned one is still served
            async with AgentClient(cluster.node(1).url) as fresh:
                with pytest.raises(RemoteError) as refused:
                    await fresh.create_session()
            assert refused.value.code == "store_unavailable"
            await turn(client, "I park on level three.")
            cluster.redis.start()  # empty: every lease and metadata key is gone
            await asyncio.sleep(3.0)  # a renewal round re-establishes the lease
            await turn(client, "Where do I park?")
            async with AgentClient(cluster.node(1).url) as fresh:
                await fresh.create_session()
            await client.aclose()
            other, info = await resumed([cluster.node(1).url], sid)
            assert info.turns == 3 and other.url == cluster.node(0).url
            await other.aclose()

        try:
            run(body())
        except BaseException:
            print(cluster.log_text()[-6000:])
            raise


def test_rolling_restart_of_every_node_drops_no_session(tmp_path: Path) -> None:
    # A lease TTL far longer than the client's patience: only a handoff lets clients move.
    with Cluster(tmp_path, 3, lease_ttl_s=60.0) as cluster:

        async def body() -> None:
            sessions: dict[str, int] = {}
            for i in range(3):
                async with AgentClient(cluster.node(i).url) as c:
                    sid = await c.create_session()
                    await turn(c, f"My locker code is {i}417.")
                    sessions[sid] = 1
            for i in range(3):
                assert cluster.stop(i) == 0  # SIGTERM: snapshot and release what it owns
                for sid in sessions:
                    c = AgentClient(cluster.urls, timeout=10.0)
                    await c.connect()
                    info = await c.resume(sid)
                    assert info.turns == sessions[sid]
                    await turn(c, "Still there?")
                    sessions[sid] += 1
                    await c.aclose()
                cluster.start(i)
            assert all(n == 4 for n in sessions.values())

        try:
            run(body())
        except BaseException:
            print(cluster.log_text()[-6000:])
            raise


async def test_web_page_follows_its_session_to_the_owning_node(
    browser: Browser, cluster: Cluster
) -> None:
    async with AgentClient(cluster.node(0).url) as client:
        sid = await client.create_session()
        await turn(client, "My locker code is 4417.")
    await asyncio.sleep(TTL)  # every node has announced itself (origins of the cluster's pages)
    # The page remembers the session (as after an earlier visit) before its script runs.
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.add_init_script(f"localStorage.setItem('agent-runtime.session', '{sid}');")
    await page.goto(f"http://127.0.0.1:{port_of(cluster.node(1).url)}/")
    status = page.locator("#status")
    await expect(status).to_contain_text(sid, timeout=WAIT_MS)  # resumed on node 0
    await send(page, "Where do I park?")
    await reply_finished(page, 2)  # the first turn's reply (replayed on resume), then this one
    await page.close()
    # the turn landed on the owner (node 0), which the page reached from node 1's origin
    again, info = await resumed([cluster.node(0).url], sid)
    assert info.turns == 2 and again.url == cluster.node(0).url
    await again.aclose()


def test_http_forwarding_uses_the_internal_url_and_a_dead_owner_says_when_to_retry(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import urllib.error
    import urllib.request

    from agent_runtime.bench.cluster import free_port
    from agent_runtime.bench.launch import start_server

    port0 = free_port()
    common = ("--cluster-enabled", "true", "--redis-url", redis_server.url,
              "--cluster-lease-ttl-s", str(TTL))  # fmt: skip
    # node 0 is advertised at a public address that does not answer from here (a load
    # balancer's, say); the nodes reach each other at its internal one
    node0 = start_server(
        tmp_path / "data", *common, "--cluster-node-id", "node0", "--port", str(port0),
        "--cluster-advertise-url", f"http://127.0.0.1:{free_port()}",
        "--cluster-internal-url", f"http://127.0.0.1:{port0}",
        log_path=tmp_path / "node0.log",
    )  # fmt: skip
    node1 = start_server(
        tmp_path / "data", *common, "--cluster-node-id", "node1", log_path=tmp_path / "node1.log"
    )

    history: list[dict[str, str]] = []

    def chat(node_http: str, sid: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        """One turn of the conversation (the whole history, then a new message)."""
        messages = [*history, {"role": "user", "content": f"Message {len(history) // 2}."}]
        body = {"model": "agent-runtime-bundled", "messages": messages, "max_tokens": 4}
        request = urllib.request.Request(
            f"{node_http}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"X-Session-Id": sid, "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                answer = json.loads(reply.read())
                history[:] = [*messages, answer["choices"][0]["message"]]
                return reply.status, {k.lower(): v for k, v in reply.headers.items()}, answer
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())

    try:
        status, headers, _ = chat(node0.http, "new")
        assert status == 200
        sid = headers["x-session-id"]
        time.sleep(TTL)  # node 1 has read node 0's internal URL from the node list
        status, headers, reply = chat(node1.http, sid)
        assert status == 200, reply  # forwarded to node 0's internal URL
        assert headers["x-session-id"] == sid
        node0.proc.kill()
        node0.proc.wait()
        status, headers, reply = chat(node1.http, sid)
        assert status == 503, reply
        assert reply["error"]["code"] == "owner_unreachable"
        retry = int(headers["retry-after"])  # what is left of node 0's lease
        assert 1 <= retry <= TTL
        time.sleep(retry)
        status, headers, reply = chat(node1.http, sid)
        assert status == 200, reply  # node 1 took the session over
        assert "Traceback" not in (tmp_path / "node1.log").read_text()
    finally:
        node0.close()
        node1.close()
