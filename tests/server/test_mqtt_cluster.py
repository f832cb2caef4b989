"""The MQTT bridge in a cluster: real Mosquitto, a real Redis and ``serve`` nodes started by the
loopback :class:`Cluster` harness, a device with only aiomqtt. Only a session's owner handles its
messages: a create is answered once, each event is handled once, and a session whose owner was
killed goes on at another node after its lease expires."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from agent_runtime.bench.cluster import Cluster
from agent_runtime.bench.launch import Broker, mosquitto_process
from privacy.tenants import TenantRegistry
from tests.conftest import TIMEOUT
from tests.server.test_mqtt import Device, P, device

LEASE_TTL_S = 2.0
KEY_PREFIX = "agent-runtime"  # the nodes' store.key_prefix (the default)
# A message long enough that its tokens leave the bundled model's window: memory entries.
LONG = "My locker code is 4417 and my cat is called Juniper. " * 6


@pytest.fixture
def tenants(tmp_path: Path) -> dict[str, str]:
    registry = TenantRegistry(tmp_path / "cluster" / "data")  # the nodes' shared data root
    return {"acme": registry.add("acme")}


@pytest.fixture
def broker(tmp_path: Path, tenants: dict[str, str]) -> Iterator[Broker]:
    with mosquitto_process(tmp_path / "broker", tenants) as b:
        # The broker's log says who subscribes to what ("<client id> <qos> <topic>").
        b.stop()
        with open(b.directory / "mosquitto.conf", "a") as conf:
            for kind in ("error", "warning", "notice", "subscribe", "unsubscribe"):
                conf.write(f"log_type {kind}\n")
        b.start()
        yield b


def subscribers(broker: Broker, topic: str, *, unsubscribed: bool = False) -> list[str]:
    """The client ids the broker logged subscribing to ``topic`` (or unsubscribing from it)."""
    text = (broker.directory / "mosquitto.log").read_text(errors="replace")
    found = []
    for line in text.splitlines():
        words = line.split(" ")  # "<time>: <client id> [<qos>] <topic>"
        if len(words) == 4 - unsubscribed and words[-1] == topic:
            found.append(words[1])
    return found


async def until_unsubscribed(broker: Broker, topic: str) -> list[str]:
    async with asyncio.timeout(TIMEOUT):
        while not (who := subscribers(broker, topic, unsubscribed=True)):  # noqa: ASYNC110 - a log
            await asyncio.sleep(0.1)
    return who


@contextmanager
def mqtt_cluster(tmp_path: Path, broker: Broker, *extra: str) -> Iterator[Cluster]:
    args = (
        "--mqtt-url", broker.url, "--mqtt-username", broker.bridge_user,
        f"--mqtt-password={broker.bridge_password}",  # it may begin with "-"
        "--mqtt-reconnect-max-s", "0.5", *extra,
    )  # fmt: skip
    with Cluster(tmp_path / "cluster", 2, lease_ttl_s=LEASE_TTL_S, args=args) as c:
        yield c


@pytest.fixture
def cluster(tmp_path: Path, broker: Broker, tenants: dict[str, str]) -> Iterator[Cluster]:
    with mqtt_cluster(tmp_path, broker) as c:
        yield c


async def nodes_online(d: Device, n: int) -> None:
    """Until ``n`` nodes' bridges announced their presence (they are subscribed by then)."""
    await d.client.subscribe(f"{P}/nodes/+/presence", qos=1)
    online: set[str] = set()
    async with asyncio.timeout(TIMEOUT * 3):
        while len(online) < n:
            topic, presence = await d.recv()
            if topic.endswith("/presence") and presence.get("status") == "online":
                online.add(presence["node_id"])
    await d.client.unsubscribe(f"{P}/nodes/+/presence")  # a killed node's will clears it


def owner(c: Cluster, session_id: str) -> str:
    with redis.Redis(port=c.redis.port) as r:
        value = r.get(f"{KEY_PREFIX}:lease:{{{session_id}}}")
    assert value is not None, f"no lease for {session_id}"
    return value.decode().split(" ")[0]


def leased(c: Cluster, session_id: str) -> bool:
    with redis.Redis(port=c.redis.port) as r:
        return bool(r.exists(f"{KEY_PREFIX}:lease:{{{session_id}}}"))


def out_events(d: Device, received: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [e for topic, e in received if topic == d.out_topic]


async def collect(d: Device, seconds: float) -> list[tuple[str, dict[str, Any]]]:
    """Every message that arrives within ``seconds`` (topic, event)."""
    got: list[tuple[str, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in d.client.messages:
                got.append((message.topic.value, d.decode(message.payload)))
    except TimeoutError:
        pass
    return got


async def test_each_create_is_answered_once_and_each_event_handled_once(
    cluster: Cluster, broker: Broker, tenants: dict[str, str]
) -> None:
    async with device(broker, "acme", tenants["acme"]) as d:
        d.timeout = TIMEOUT * 3
        await nodes_online(d, cluster.size)
        # Every session's out topic: a second answer or a non-owner's error would show here.
        await d.client.subscribe(f"{P}/acme/sessions/+/out", qos=1)
        await d.client.subscribe(d.reply, qos=1)
        ids: list[str] = []
        for i in range(4):  # the shared subscription hands creates out among the nodes
            await d.publish(
                f"{P}/acme/sessions/create",
                {"type": "session.create", "event_id": f"c{i}"},
                ResponseTopic=d.reply,
                CorrelationData=f"corr-{i}".encode(),
            )
            async with asyncio.timeout(d.timeout):
                while True:
                    message = await anext(aiter(d.client.messages))
                    if message.topic.value == d.reply:
                        break
            assert message.properties is not None
            assert message.properties.CorrelationData == f"corr-{i}".encode()
            ids.append(d.decode(message.payload)["session"]["id"])
        owners = {sid: owner(cluster, sid) for sid in ids}
        # Each session on its owner: one turn each, every event exactly once.
        for sid in ids:
            d.session_id, d.last_seq = sid, 0
            _text, done, events = await d.turn("hello", max_tokens=6)
            assert done["response"]["status"] in ("completed", "incomplete"), done
            seqs = [e["seq"] for e in events if "seq" in e]
            assert not [e for e in events if e["type"] == "error"], events
            assert len(seqs) == len(set(seqs)), f"an event twice on {sid}: {seqs}"
        # Only the owner subscribed to a session's in topics, and only once.
        for sid in ids:
            topic = f"{P}/acme/sessions/{sid}/in"
            assert subscribers(broker, topic) == [f"agent-runtime-{owners[sid]}"], sid
            assert subscribers(broker, topic + "/msgpack") == [f"agent-runtime-{owners[sid]}"]
        # A deleted session's owner unsubscribes.
        d.session_id = ids[0]
        await d.send({"type": "session.delete"})
        await d.until("session.deleted")
        gone = f"{P}/acme/sessions/{ids[0]}/in"
        assert await until_unsubscribed(broker, gone) == [f"agent-runtime-{owners[ids[0]]}"]
        rest = await collect(d, 1.0)
    answers = [e for topic, e in rest if topic == d.reply]
    assert answers == [], f"a create answered twice: {answers}"
    created = Counter(e["session"]["id"] for _t, e in rest if e.get("type") == "session.created")
    assert not created, "session.created arrives before each turn, never again"
    assert not [e for _t, e in rest if e.get("type") in ("error", "response.done")], rest
    assert set(owners.values()) <= {f"node{i}" for i in range(cluster.size)}
    assert "Traceback" not in cluster.log_text()


async def test_a_conversation_goes_on_at_another_node_after_its_owner_is_killed(
    cluster: Cluster, broker: Broker, tenants: dict[str, str]
) -> None:
    async with device(broker, "acme", tenants["acme"]) as d:
        d.timeout = TIMEOUT * 3
        await nodes_online(d, cluster.size)
        await d.create_session()
        _t, first, _ = await d.turn(LONG, max_tokens=8, temperature=0)
        _t, second, _ = await d.turn("And what is my cat called?", max_tokens=8, temperature=0)
        entries = second["response"]["memory"]["entries"]
        assert entries > 0, second
        dead = owner(cluster, d.session_id)
        cluster.kill(int(dead.removeprefix("node")))
        # The survivor sees each resume through the shared subscription, ignores it while the
        # dead node's lease lasts, then takes the session over and answers.
        resumed: dict[str, Any] | None = None
        async with asyncio.timeout(TIMEOUT * 3 + LEASE_TTL_S):
            while resumed is None:
                await d.send(
                    {
                        "type": "session.resume",
                        "session_id": d.session_id,
                        "last_seq": d.last_seq,
                    }
                )
                for _topic, event in await collect(d, 1.0):
                    assert event["type"] != "error", event
                    if event["type"] == "session.resumed":
                        resumed = event
        assert resumed["session"]["turns"] == 2, resumed
        assert resumed["session"]["memory_entries"] >= entries, resumed
        survivor = owner(cluster, d.session_id)
        assert survivor != dead
        topic = f"{P}/acme/sessions/{d.session_id}/in"
        assert subscribers(broker, topic) == [f"agent-runtime-{dead}", f"agent-runtime-{survivor}"]
        _t, third, events = await d.turn("Thanks!", max_tokens=6, temperature=0)
        assert third["response"]["status"] in ("completed", "incomplete"), third
        assert third["response"]["memory"]["entries"] >= entries
        seqs = [e["seq"] for e in [*events, third]]
        assert len(seqs) == len(set(seqs)) and seqs[0] > d.last_seq - len(seqs) - 1
        assert not [e for e in events if e["type"] == "error"], events
    assert first["response"]["status"] in ("completed", "incomplete")
    assert "Traceback" not in cluster.log_text()


async def test_an_unloaded_session_is_unsubscribed_and_a_resume_finds_a_node(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    with mqtt_cluster(tmp_path, broker, "--idle-unload-s", "1") as cluster:
        async with device(broker, "acme", tenants["acme"]) as d:
            d.timeout = TIMEOUT * 3
            await nodes_online(d, cluster.size)
            await d.create_session()
            _t, done, _ = await d.turn(LONG, max_tokens=8, temperature=0)
            entries = done["response"]["memory"]["entries"]
            first = owner(cluster, d.session_id)
            # Silent for idle_unload_s: detached, unloaded, lease released, unsubscribed.
            topic = f"{P}/acme/sessions/{d.session_id}/in"
            assert await until_unsubscribed(broker, topic) == [f"agent-runtime-{first}"]
            assert not leased(cluster, d.session_id)
            # No node subscribes to it now: the shared subscription hands the resume to one.
            resumed = await d.resume()
            assert resumed["session"]["turns"] == 1
            assert resumed["session"]["memory_entries"] >= entries
            _t, again, events = await d.turn("What is my cat called?", max_tokens=6)
            assert again["response"]["status"] in ("completed", "incomplete"), again
            assert not [e for e in events if e["type"] in ("error", "session.resumed")], events
            now = owner(cluster, d.session_id)
            assert subscribers(broker, topic) == [f"agent-runtime-{first}", f"agent-runtime-{now}"]
        assert "Traceback" not in cluster.log_text()


def test_the_share_group_is_a_legal_mqtt_group_name() -> None:
    from server.mqtt import share_group

    assert share_group("agent-runtime") == "agent-runtime-agent-runtime"
    assert not set(share_group("a/b+c#d e:f")) & set("/+# ")
    assert json.dumps(share_group("x"))  # a plain string


async def test_a_session_served_over_the_websocket_is_reached_over_mqtt(
    cluster: Cluster, broker: Broker, tenants: dict[str, str]
) -> None:
    from agent_runtime.client.agent import AgentClient

    async with device(broker, "acme", tenants["acme"]) as d:
        d.timeout = TIMEOUT * 3
        await nodes_online(d, cluster.size)
        async with AgentClient(cluster.node(0).url, api_key=tenants["acme"]) as ws:
            sid = await ws.create_session()
            response = ws.respond(LONG, max_tokens=8, temperature=0)
            async for _ in response:
                pass
            assert response.status in ("completed", "incomplete"), response.done
        # Never served over MQTT, yet its owner subscribed to its in topics when it created it,
        # so an MQTT event reaches it wherever the shared subscription would have sent it.
        topic = f"{P}/acme/sessions/{sid}/in"
        async with asyncio.timeout(TIMEOUT):
            while not subscribers(broker, topic):  # noqa: ASYNC110 - polling the broker's log
                await asyncio.sleep(0.1)
        assert subscribers(broker, topic) == ["agent-runtime-node0"]
        d.session_id, d.last_seq = sid, 0
        for _ in range(4):  # each would land on either node through the shared subscription
            resumed = await d.resume()
            assert resumed["session"]["turns"] == 1, resumed
            d.last_seq = resumed["seq"]
        _t, done, events = await d.turn("And what is my cat called?", max_tokens=6)
        assert done["response"]["status"] in ("completed", "incomplete"), done
        assert not [e for e in events if e["type"] == "error"], events
        assert owner(cluster, sid) == "node0"
    assert "Traceback" not in cluster.log_text()
