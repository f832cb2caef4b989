"""The MQTT bridge against a real Mosquitto (started here on a free loopback port with a generated
config): sessions over MQTT, the same session over the websocket and back, tenancy enforced by
the broker's ACL and by the bridge, a broker restart mid-reply, hostile payloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from websockets.asyncio.client import connect

from agent_runtime.bench.launch import Broker, mosquitto_process
from agent_runtime.config import RuntimeConfig
from privacy.tenants import TenantRegistry
from tests.conftest import TIMEOUT, Client, make_config, running_server

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed (.ci/install-mosquitto)",
)

P = "agent-runtime/v1"


@pytest.fixture
def tenants(tmp_path: Path) -> dict[str, str]:
    registry = TenantRegistry(tmp_path / "data")
    return {"acme": registry.add("acme"), "globex": registry.add("globex")}


@pytest.fixture
def broker(tmp_path: Path, tenants: dict[str, str]) -> Iterator[Broker]:
    with mosquitto_process(tmp_path / "broker", tenants) as b:
        yield b


def mqtt_config(tmp_path: Path, broker: Broker, **server: Any) -> RuntimeConfig:
    cfg = make_config(tmp_path, **server)
    cfg.mqtt.url = broker.url
    cfg.mqtt.username = broker.bridge_user
    cfg.mqtt.password = broker.bridge_password
    cfg.mqtt.reconnect_max_s = 0.5
    return cfg.validate()


@asynccontextmanager
async def mqtt_server(config: RuntimeConfig) -> AsyncIterator[Any]:
    async with running_server(config) as server:
        assert server.mqtt is not None
        async with asyncio.timeout(TIMEOUT):
            await server.mqtt.wait_connected()
        yield server


class Device:
    """A device-style client with only an MQTT library (aiomqtt), speaking JSON or msgpack."""

    def __init__(self, client: aiomqtt.Client, tenant: str, *, binary: bool = False) -> None:
        self.client = client
        self.tenant = tenant
        self.binary = binary
        self.suffix = "/msgpack" if binary else ""
        self.reply = f"{P}/{tenant}/replies/{uuid.uuid4().hex[:8]}"
        self.session_id = ""
        self.last_seq = 0
        self.n = 0
        self.timeout = TIMEOUT

    def encode(self, event: dict[str, Any]) -> bytes:
        return msgpack.packb(event) if self.binary else json.dumps(event).encode()

    def decode(self, payload: Any) -> dict[str, Any]:
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        out: dict[str, Any] = msgpack.unpackb(data) if self.binary else json.loads(data)
        return out

    @property
    def in_topic(self) -> str:
        return f"{P}/{self.tenant}/sessions/{self.session_id}/in{self.suffix}"

    @property
    def out_topic(self) -> str:
        return f"{P}/{self.tenant}/sessions/{self.session_id}/out{self.suffix}"

    async def recv(self) -> tuple[str, dict[str, Any]]:
        async with asyncio.timeout(self.timeout):
            message = await anext(aiter(self.client.messages))
        event = self.decode(message.payload)
        if message.topic.value == self.out_topic:
            self.last_seq = max(self.last_seq, int(event.get("seq", 0)))
        return message.topic.value, event

    async def until(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        while True:
            _topic, event = await self.recv()
            if event["type"] == kind:
                return event, seen
            seen.append(event)

    async def publish(self, topic: str, event: dict[str, Any] | bytes, **props: Any) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in props.items():
            setattr(properties, name, value)
        payload = event if isinstance(event, bytes) else self.encode(event)
        await self.client.publish(topic, payload, qos=1, properties=properties)

    async def send(self, event: dict[str, Any]) -> None:
        self.n += 1
        event.setdefault("event_id", f"d{self.n}")
        await self.publish(self.in_topic, event)

    async def create_session(self, **session: Any) -> dict[str, Any]:
        await self.client.subscribe(self.reply, qos=1)
        await self.publish(
            f"{P}/{self.tenant}/sessions/create{self.suffix}",
            {"type": "session.create", "event_id": "create", "session": session},
            ResponseTopic=self.reply,
            CorrelationData=b"corr-1",
        )
        async with asyncio.timeout(self.timeout):
            message = await anext(aiter(self.client.messages))
        assert message.topic.value == self.reply
        assert message.properties is not None
        assert message.properties.CorrelationData == b"corr-1"
        created = self.decode(message.payload)
        assert created["type"] == "session.created", created
        self.session_id = created["session"]["id"]
        await self.client.subscribe(self.out_topic, qos=1)
        return created

    async def resume(self) -> dict[str, Any]:
        await self.client.subscribe(self.out_topic, qos=1)
        await self.send(
            {"type": "session.resume", "session_id": self.session_id, "last_seq": self.last_seq}
        )
        resumed, _ = await self.until("session.resumed")
        return resumed

    async def turn(
        self, text: str, **response: Any
    ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        await self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        await self.send({"type": "response.create", "response": response})
        done, events = await self.until("response.done")
        out = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        return out, done, events


@asynccontextmanager
async def device(
    broker: Broker, tenant: str, password: str, *, binary: bool = False
) -> AsyncIterator[Device]:
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=tenant,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
        identifier=f"{tenant}-{uuid.uuid4().hex[:8]}",
    ) as c:
        yield Device(c, tenant, binary=binary)


async def drain(client: aiomqtt.Client, seconds: float) -> list[str]:
    """The topics of every message that arrives within ``seconds``."""
    topics: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                topics.append(message.topic.value)
    return topics


def ws_connect(server: Any, key: str):  # type: ignore[no-untyped-def]
    return connect(
        f"ws://127.0.0.1:{server.port}/v1/realtime",
        subprotocols=["agent-runtime.v1.json"],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=TIMEOUT,
    )


async def test_a_device_creates_a_session_and_streams_a_reply(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    async with mqtt_server(mqtt_config(tmp_path, broker)) as server:
        async with device(broker, "acme", tenants["acme"]) as d:
            created = await d.create_session(instructions="be brief")
            assert created["seq"] == 1
            _text, done, events = await d.turn("hello there", max_tokens=6)
            assert done["response"]["status"] in ("completed", "incomplete")
            assert done["response"]["usage"]["output_tokens"] > 0
            assert [e["type"] for e in events][:2] == [
                "conversation.item.created",
                "response.created",
            ]
            seqs = [e["seq"] for e in [*events, done]]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert seqs[0] > 1  # session.created (seq 1) went to the out topic as well
        assert server.sessions.sessions[f"acme/{d.session_id}"].meta.turns == 1


async def test_msgpack_by_topic_suffix(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    async with (
        mqtt_server(mqtt_config(tmp_path, broker)),
        device(broker, "acme", tenants["acme"], binary=True) as d,
    ):
        await d.create_session()
        _text, done, _ = await d.turn("hi", max_tokens=4)
        assert done["type"] == "response.done"


async def test_one_session_over_mqtt_then_the_websocket_and_back(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    async with mqtt_server(mqtt_config(tmp_path, broker)) as server:
        async with device(broker, "acme", tenants["acme"]) as d:
            await d.create_session()
            await d.turn("first over mqtt", max_tokens=4)
            async with ws_connect(server, tenants["acme"]) as ws:
                web = Client(ws)
                await web.send(
                    {"type": "session.resume", "session_id": d.session_id, "last_seq": d.last_seq}
                )
                resumed, _ = await web.until("session.resumed")
                assert resumed["replayed"] == 0 and resumed["session"]["turns"] == 1
                _t, web_done, _ = await web.turn("then over the websocket", max_tokens=4)
                # Back on MQTT: what the websocket saw is replayed, in order, then live events.
                resumed = await d.resume()
                assert resumed["session"]["turns"] == 2 and not resumed["events_lost"]
                replayed: list[dict[str, Any]] = []
                for _ in range(resumed["replayed"]):
                    _topic, event = await d.recv()
                    replayed.append(event)
                assert replayed[-1]["seq"] == web_done["seq"]
                assert [e["seq"] for e in replayed] == list(
                    range(replayed[0]["seq"], web_done["seq"] + 1)
                )
                _t, done, _ = await d.turn("and mqtt again", max_tokens=4)
                assert done["seq"] > web_done["seq"]
                # The websocket was superseded by the MQTT client, as by another connection.
                async with asyncio.timeout(TIMEOUT):
                    await ws.wait_closed()
                assert ws.close_code == 4000
        session = server.sessions.sessions[f"acme/{d.session_id}"]
        assert session.meta.turns == 3


async def test_a_fact_told_over_mqtt_is_recalled_over_the_websocket(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    import random

    from agent_runtime.models.byte import BUNDLED_CHECKPOINT
    from agent_runtime.models.byte.model import load_checkpoint
    from agent_runtime.training.data import stated_value
    from tests.agent_runtime.test_recall import GAP_TOKENS, _filler_messages, _held_out_fact

    seed = 11
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    fact = _held_out_fact(seed)
    rng = random.Random(seed)
    async with running_server(mqtt_config(tmp_path, broker), model) as server:
        assert server.mqtt is not None
        async with asyncio.timeout(TIMEOUT):
            await server.mqtt.wait_connected()
        async with device(broker, "acme", tenants["acme"]) as d:
            d.timeout *= 6
            await d.create_session()
            await d.turn(fact.statement(rng), max_tokens=16, temperature=0)
            for text in _filler_messages(seed, GAP_TOKENS):
                await d.send(
                    {
                        "type": "conversation.item.create",
                        "item": {"type": "message", "role": "user", "content": text},
                    }
                )
                await d.until("conversation.item.created")
        async with ws_connect(server, tenants["acme"]) as ws:
            web = Client(ws)
            web.timeout *= 6
            await web.send(
                {"type": "session.resume", "session_id": d.session_id, "last_seq": d.last_seq}
            )
            await web.until("session.resumed")
            reply, done, _ = await web.turn(fact.question(rng), max_tokens=48, temperature=0)
    assert done["response"]["memory"]["entries"] > GAP_TOKENS, done
    assert done["response"]["memory"]["retrieved"] > 0
    assert stated_value(reply) == fact.value, reply


async def test_the_broker_confines_a_tenant_to_its_own_topics(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    async with (
        mqtt_server(mqtt_config(tmp_path, broker)) as server,
        device(broker, "acme", tenants["acme"]) as a,
        device(broker, "globex", tenants["globex"]) as b,
    ):
        await a.create_session()
        await a.turn("acme's secret plans", max_tokens=3)
        before = len(server.sessions.sessions)
        # Subscribing to acme's topics gets nothing: Mosquitto grants the subscription but
        # checks read access on every delivery.
        for topic in (
            f"{P}/acme/sessions/{a.session_id}/out",
            f"{P}/acme/sessions/+/out",
            f"{P}/acme/replies/#",
            f"{P}/#",
        ):
            await b.client.subscribe(topic, qos=1)
        await a.turn("more of acme's plans", max_tokens=3)  # streamed while globex listens
        seen = await drain(b.client, 1.0)
        assert seen and all("/nodes/" in t for t in seen), seen  # only the presence
        # Publishing into acme's topics never reaches the bridge.
        b.session_id = a.session_id
        await b.publish(
            f"{P}/acme/sessions/{a.session_id}/in",
            {"type": "response.create", "response": {"max_tokens": 3}},
        )
        await b.publish(f"{P}/acme/sessions/create", {"type": "session.create"})
        a.timeout = 1.0
        with pytest.raises(TimeoutError):
            await a.recv()  # acme's session produced nothing
        assert len(server.sessions.sessions) == before
        assert server.sessions.sessions[f"acme/{a.session_id}"].meta.turns == 2
        # Wrong password: the broker refuses the connection.
        with pytest.raises(aiomqtt.MqttError):
            async with device(broker, "acme", tenants["globex"]):
                pass


async def test_the_bridge_confines_a_tenant_to_its_own_sessions(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    config = mqtt_config(tmp_path, broker)
    async with (
        mqtt_server(config) as server,
        device(broker, "acme", tenants["acme"]) as a,
        device(broker, "globex", tenants["globex"]) as b,
    ):
        await a.create_session()
        await a.turn("acme only", max_tokens=3)
        # globex names acme's session on its own topics: the same not-found as no session.
        answers = []
        for sid in (a.session_id, "sess_doesnotexist"):
            b.session_id = sid
            await b.client.subscribe(b.out_topic, qos=1)
            for event in (
                {"type": "session.resume", "session_id": sid, "event_id": "steal"},
                {"type": "response.create", "event_id": "steal2", "response": {}},
            ):
                await b.send(event)
                topic, answer = await b.recv()
                assert topic == b.out_topic and answer["type"] == "error", answer
                answers.append((answer["error"]["code"], answer["error"]["message"]))
        assert {a for a in answers} == {("session_not_found", "no such session")}
        # A resume naming another session than its topic's is not found either.
        b.session_id = "sess_mine"
        await b.client.subscribe(b.out_topic, qos=1)
        await b.send({"type": "session.resume", "session_id": a.session_id})
        _t, answer = await b.recv()
        assert answer["error"]["code"] == "session_not_found"
        # A reply topic under another tenant's prefix is refused (answered on globex's own).
        await b.client.subscribe(f"{P}/globex/replies", qos=1)
        await b.publish(
            f"{P}/globex/sessions/create",
            {"type": "session.create"},
            ResponseTopic=f"{P}/acme/replies/{uuid.uuid4().hex}",
        )
        topic, created = await b.recv()
        assert topic == f"{P}/globex/replies"
        assert created["type"] == "session.created"  # the request itself was fine
        a.timeout = 1.0
        with pytest.raises(TimeoutError):
            await a.recv()
        assert server.sessions.sessions[f"acme/{a.session_id}"].meta.turns == 1
    log = (Path(config.store.data_dir) / "audit.log").read_text()
    denied = [json.loads(line) for line in log.splitlines() if '"denied"' in line]
    assert any(r["actor"] == "globex" and r["session"] == a.session_id for r in denied), denied
    assert any("reply_topic_not_allowed" in json.dumps(r) for r in denied)
    assert "acme only" not in log


def readyz(server: Any) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        with exc:  # closed now, not left to the garbage collector
            return int(exc.code)


async def test_a_broker_restart_mid_reply_loses_nothing_acknowledged(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    config = mqtt_config(tmp_path, broker, disconnect_grace_s=30.0)
    config.generation.max_tokens_limit = 100_000
    async with mqtt_server(config) as server:
        assert server.mqtt is not None
        assert await asyncio.to_thread(readyz, server) == 200
        async with device(broker, "acme", tenants["acme"]) as d:
            await d.create_session()
            await d.turn("warm up", max_tokens=2)
            await d.send(
                {"type": "conversation.item.create", "item": {"role": "user", "content": "go on"}}
            )
            await d.send(
                {"type": "response.create", "response": {"max_tokens": 3000, "min_tokens": 3000}}
            )
            before: list[dict[str, Any]] = []
            while sum(e["type"] == "response.output_text.delta" for e in before) < 5:
                _t, event = await d.recv()
                before.append(event)
            session_id, last_seq = d.session_id, d.last_seq
            await asyncio.to_thread(broker.stop)
            with contextlib.suppress(aiomqtt.MqttError):
                await drain(d.client, 0.5)
        async with asyncio.timeout(TIMEOUT):
            while server.mqtt.connected:  # noqa: ASYNC110 - no event for "lost"
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(readyz, server) == 503  # the bridge is not connected
        await asyncio.to_thread(broker.start)  # same port, fresh broker (no persistence)
        async with asyncio.timeout(TIMEOUT):
            await server.mqtt.wait_connected()
        assert await asyncio.to_thread(readyz, server) == 200
        assert server.mqtt.reconnects.value >= 1
        async with device(broker, "acme", tenants["acme"]) as d:
            d.session_id, d.last_seq = session_id, last_seq
            d.timeout *= 3
            resumed = await d.resume()
            assert not resumed["events_lost"]
            after: list[dict[str, Any]] = []
            while not after or after[-1]["type"] != "response.done":
                _t, event = await d.recv()
                if event["seq"] > last_seq:  # a copy of what was in flight may come again
                    after.append(event)
        seqs = [e["seq"] for e in after]
        assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs))), "a gap: events lost"
        done = after[-1]
        assert done["response"]["status"] in ("completed", "incomplete")
        text = "".join(
            e["delta"] for e in [*before, *after] if e["type"] == "response.output_text.delta"
        )
        assert len(text) > 0 and done["response"]["usage"]["output_tokens"] > 5


def hostile_payloads(n: int, limit: int) -> list[bytes]:
    """``n`` malformed payloads: broken JSON and msgpack, wrong shapes, unknown types, bad
    fields, oversized."""
    import random

    rng = random.Random(7)
    fixed: list[bytes] = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"text"',
        b"\xff\xfe\x00",
        b'{"type": 5}',
        b'{"type": "no.such.event"}',
        b'{"type": "session.resume"}',
        b'{"type": "session.resume", "session_id": 7, "last_seq": -1}',
        b'{"type": "response.create", "response": {"max_tokens": -3}}',
        b'{"type": "response.create", "response": {"max_tokens": 99999999}}',
        b'{"type": "conversation.item.create", "item": {"role": "wizard", "content": "x"}}',
        b'{"type": "ping", "event_id": ' + b"1" * 40 + b"}",
        b"[" * 500 + b"]" * 500,
        b'{"type": "ping", "x": NaN}',
        json.dumps({"type": "conversation.item.create", "item": {"content": "y" * limit}}).encode(),
        b"\x00" * (limit + 1),
    ]
    out = []
    for i in range(n):
        if i < len(fixed):
            out.append(fixed[i])
        else:
            base = rng.choice(fixed[:16])
            cut = rng.randrange(len(base) + 1)
            out.append(base[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
    return out


async def test_a_thousand_malformed_payloads_change_nothing(
    tmp_path: Path, broker: Broker, tenants: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    config = mqtt_config(tmp_path, broker, max_frame_bytes=4096)
    async with (
        mqtt_server(config) as server,
        device(broker, "acme", tenants["acme"]) as canary,
        device(broker, "acme", tenants["acme"]) as victim,
        device(broker, "acme", tenants["acme"]) as reference,
    ):
        canary.timeout = reference.timeout = TIMEOUT * 3
        for d in (canary, victim, reference):
            await d.create_session(instructions="you are a canary")
        victim_topics = [
            victim.in_topic,
            victim.in_topic + "/msgpack",
            f"{P}/acme/sessions/create",
            f"{P}/acme/sessions/create/msgpack",
            f"{P}/acme/sessions/sess_nobody/in",
        ]
        payloads = hostile_payloads(1000, config.server.max_frame_bytes)

        async def flood() -> None:
            for i, payload in enumerate(payloads):
                await victim.client.publish(victim_topics[i % len(victim_topics)], payload, qos=1)

        flooding = asyncio.create_task(flood())
        text, done, events = await canary.turn("tell me about canaries", max_tokens=12)
        await flooding
        # The victim's own session got its errors, in order, and still works.
        errors = 0
        victim.timeout = TIMEOUT * 3
        while errors < 200:  # the victim's /in share of the flood, JSON and msgpack
            _t, event = await victim.recv()
            if event["type"] == "error" and event["seq"] > 0:
                errors += 1
        _vt, vdone, _ = await victim.turn("still there?", max_tokens=3)
        assert vdone["type"] == "response.done"
        # The canary saw no error and answered exactly as an untouched session does.
        assert not [e for e in events if e["type"] == "error"]
        ref_text, ref_done, _ = await reference.turn("tell me about canaries", max_tokens=12)
        assert text == ref_text and done["response"]["status"] == ref_done["response"]["status"]
        assert server.mqtt is not None and server.mqtt.connected
        live = {k for k in server.sessions.sessions if k.startswith("acme/")}
        assert len(live) == 3  # no session made by the flood
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not [r for r in caplog.records if r.exc_info]


async def test_retained_presence_names_the_node_and_is_cleared_at_shutdown(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    async with mqtt_server(mqtt_config(tmp_path, broker)) as server:
        node = server.node_id
        async with device(broker, "globex", tenants["globex"]) as d:
            await d.client.subscribe(f"{P}/nodes/+/presence", qos=1)
            topic, presence = await d.recv()
            assert topic == f"{P}/nodes/{node}/presence"
            assert presence["status"] == "online" and presence["node_id"] == node
    async with device(broker, "globex", tenants["globex"]) as d:
        await d.client.subscribe(f"{P}/nodes/+/presence", qos=1)
        assert await drain(d.client, 0.5) == []  # nothing retained once the node said goodbye


async def test_tenants_mqtt_config_prints_lines_a_real_broker_accepts(
    tmp_path: Path, tenants: dict[str, str]
) -> None:
    import io
    import os
    import socket

    from privacy.cli import tenants_main
    from privacy.mqtt import acl_lines, password_line

    key_file = tmp_path / "acme.key"
    key_file.write_text(tenants["acme"] + "\n")
    out = io.StringIO()
    data = str(tmp_path / "data")
    args = ["--data-dir", data, "mqtt-config", "acme", "--key-file", str(key_file)]
    assert tenants_main(args, out=out) == 0
    text = out.getvalue()
    assert tenants["acme"] not in text  # only its salted hash
    line = next(x for x in text.splitlines() if x.startswith("acme:$7$"))
    assert "\n".join(acl_lines("agent-runtime-bridge")) in text
    # Another tenant's key is refused.
    key_file.write_text(tenants["globex"])
    assert tenants_main(args, out=io.StringIO()) == 1
    # The printed line, in a real broker's password file, lets acme in with its API key.
    broker_dir = tmp_path / "cli-broker"
    broker_dir.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (broker_dir / "passwd").write_text(line + "\n" + password_line("bridge", "pw") + "\n")
    (broker_dir / "acl").write_text("\n".join(acl_lines("bridge")) + "\n")
    conf = text[text.index("# agent-runtime: mosquitto.conf") :].split("# the bridge")[0]
    conf = conf.replace("listener 1883", f"listener {port}")
    conf = conf.replace("/etc/mosquitto/agent-runtime.passwd", str(broker_dir / "passwd"))
    conf = conf.replace("/etc/mosquitto/agent-runtime.acl", str(broker_dir / "acl"))
    if os.geteuid() == 0:
        conf += "user root\n"
    (broker_dir / "passwd").chmod(0o600)
    (broker_dir / "acl").chmod(0o600)
    (broker_dir / "mosquitto.conf").write_text(conf)
    broker = Broker(port, broker_dir, "bridge", "pw")
    broker.start()
    try:
        async with device(broker, "acme", tenants["acme"]) as d:
            await d.client.subscribe(f"{P}/acme/replies/x", qos=1)
        with pytest.raises(aiomqtt.MqttError):
            async with device(broker, "acme", "not-the-key"):
                pass
    finally:
        broker.stop()


def test_mqtt_settings_by_flag_env_and_file_and_bad_urls_fail_clearly(tmp_path: Path) -> None:
    import argparse

    from agent_runtime.config import add_arguments, load_config, redacted
    from agent_runtime.errors import ConfigError

    assert not load_config(env={}).mqtt.enabled  # off by default
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--mqtt-url", "mqtts://broker.example:8883", "--mqtt-username", "br"])
    cfg = load_config(args, env={"AGENT_RUNTIME_MQTT_PASSWORD_FILE": str(pw)})
    assert cfg.mqtt.enabled and cfg.mqtt.broker_password() == "s3cret"
    cfg = load_config(env={"AGENT_RUNTIME_MQTT_URL": "mqtt://u:hunter2@h:1883"})
    assert cfg.mqtt.broker_password() == "hunter2"
    assert "hunter2" not in json.dumps(redacted(cfg))
    for bad in ("http://h:1883", "mqtt://", "mqtt://h:99999", "mqtt://h:1883/path", "h:1883"):
        with pytest.raises(ConfigError, match=r"mqtt\.url"):
            load_config(env={"AGENT_RUNTIME_MQTT_URL": bad})
    with pytest.raises(ConfigError) as info:
        load_config(env={"AGENT_RUNTIME_MQTT_URL": "http://u:hunter2@h"})
    assert "hunter2" not in str(info.value)  # a bad URL is named with its password redacted


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([kind]) + encoded + body


def stalled_subscriber(port: int, user: str, password: str, topic: str) -> Any:
    """An MQTT 3.1.1 client on a raw socket that subscribes to ``topic`` and never reads."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    connect = b"\x00\x04MQTT\x04\xc2\x00\x3c" + _mqtt_string("stalled")
    sock.sendall(_packet(0x10, connect + _mqtt_string(user) + _mqtt_string(password)))
    sock.sendall(_packet(0x82, b"\x00\x01" + _mqtt_string(topic) + b"\x01"))
    return sock


async def test_a_subscriber_that_stops_reading_never_stalls_other_sessions(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    config = mqtt_config(tmp_path, broker)
    config.generation.max_tokens_limit = 100_000
    async with (
        mqtt_server(config) as server,
        device(broker, "acme", tenants["acme"]) as slow,
        device(broker, "acme", tenants["acme"]) as other,
    ):
        await slow.create_session()
        await other.create_session()
        sock = stalled_subscriber(broker.port, "acme", tenants["acme"], slow.out_topic)
        try:
            await slow.client.unsubscribe(slow.out_topic)  # only the stalled reader listens
            await slow.send(
                {"type": "response.create", "response": {"max_tokens": 3000, "min_tokens": 3000}}
            )
            session = server.sessions.sessions[f"acme/{slow.session_id}"]
            async with asyncio.timeout(TIMEOUT):
                while session.seq < 500:  # noqa: ASYNC110 - the stream is well under way
                    await asyncio.sleep(0.05)
            # The other session streams a whole reply meanwhile.
            _t, done, _ = await other.turn("are you stalled?", max_tokens=16)
            assert done["response"]["status"] in ("completed", "incomplete")
            assert session.responding or session.meta.turns == 1
        finally:
            sock.close()


async def test_an_outbox_that_overflows_detaches_and_a_resume_loses_nothing(
    tmp_path: Path, broker: Broker, tenants: dict[str, str]
) -> None:
    import signal

    config = mqtt_config(tmp_path, broker, disconnect_grace_s=60.0)
    config.mqtt.session_queue = 16
    config.generation.max_tokens_limit = 100_000
    async with mqtt_server(config) as server, device(broker, "acme", tenants["acme"]) as d:
        d.timeout *= 3
        await d.create_session()
        session = server.sessions.sessions[f"acme/{d.session_id}"]
        assert broker.proc is not None
        await d.send(
            {"type": "response.create", "response": {"max_tokens": 400, "min_tokens": 400}}
        )
        async with asyncio.timeout(TIMEOUT):
            while session.seq < 4:  # noqa: ASYNC110 - streaming
                await asyncio.sleep(0.01)
        broker.proc.send_signal(signal.SIGSTOP)  # the broker stops acknowledging
        try:
            async with asyncio.timeout(TIMEOUT):
                while session.sender is not None:  # noqa: ASYNC110 - the outbox overflows
                    await asyncio.sleep(0.01)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(TIMEOUT * 3):
            while session.responding:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # Detached by the overflow; the reply finished meanwhile. A resume replays the rest.
        events: dict[int, dict[str, Any]] = {1: {"type": "session.created"}}  # on the reply topic
        with contextlib.suppress(TimeoutError):
            d.timeout = 1.0
            while True:
                _t, e = await d.recv()
                events[e["seq"]] = e
        d.timeout = TIMEOUT * 3
        d.last_seq = 1
        while d.last_seq + 1 in events:  # the contiguous prefix received before the overflow
            d.last_seq += 1
        assert d.last_seq < 400  # the overflow lost live events (they are replayed below)
        resumed = await d.resume()
        assert not resumed["events_lost"]
        while events.get(max(events, default=0), {}).get("type") != "response.done":
            _t, e = await d.recv()
            events.setdefault(e["seq"], e)
        assert sorted(events) == list(range(1, max(events) + 1))


def test_aiomqtt_and_paho_are_imported_by_the_bridge_alone() -> None:
    import ast

    root = Path(__file__).resolve().parents[2]
    importers = set()
    for package in ("agent_runtime", "memory", "privacy", "server"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n.split(".")[0] in ("aiomqtt", "paho") for n in names):
                    importers.add(str(path.relative_to(root)))
    assert importers == {"server/mqtt.py"}
