"""The MQTT bridge: the websocket protocol's events over an MQTT 5 broker (docs/mqtt.md).

The only module that imports ``aiomqtt`` (and ``paho``); their errors are translated here.

Topics, under ``mqtt.topic_prefix`` (``P``, default ``agent-runtime/v1``):

* ``P/{tenant}/sessions/create`` — ``session.create`` requests; the answer goes to the request's
  MQTT 5 Response Topic (under ``P/{tenant}/replies``; that topic itself when none is given)
  with its Correlation Data;
* ``P/{tenant}/sessions/{id}/in`` — every other client event of session ``id``;
* ``P/{tenant}/sessions/{id}/out`` — the session's server events, QoS 1, in ``seq`` order;
* ``P/nodes/{node}/presence`` — this node, retained while it is connected, cleared by its will.

On one node the bridge subscribes to ``P/+/sessions/create`` and ``P/+/sessions/+/in``. In a
cluster (``cluster.enabled``) only a session's owner should see its events, so:

* ``create`` is a shared subscription (``$share/{group}/P/+/sessions/create``): the broker hands
  each request to one node of the group;
* the owner subscribes to the exact ``in`` topics of each session it serves, on any transport (MQTT 5
  subscription identifier :data:`SUB_EXACT`) from when it took the session until the session
  leaves the node (unloaded, dropped when its lease is lost, deleted);
* ``$share/{group}/P/+/sessions/+/in`` (identifier :data:`SUB_SHARED`) reaches sessions no node
  subscribes to exactly (unloaded ones; the owner died): the node it lands on takes the session.
  A copy of it for a session this node serves exactly is ignored (the exact copy is handled),
  and so is any message for a session another node owns (that node has its exact copy).

A ``/msgpack`` suffix on a topic a client publishes to selects msgpack for the message and for
the answers (``.../out/msgpack``, the reply topic as given); JSON otherwise.

Tenancy: the broker's ACL confines each tenant's MQTT identity to its own topics; the bridge,
which cannot see the publishing user, derives the tenant from the topic, refuses tenants that
could not authenticate, resolves sessions only through ``SessionManager.get(tenant, id)``
(another tenant's session is "not found", audited) and publishes replies only under the
requesting tenant's prefix.

Each session attached over MQTT has a :class:`MqttSession` (an :class:`EventHandler`, like a
websocket connection) with a bounded inbox handled in order and a bounded outbox published in
order by its own task, so one slow session never stalls another; an outbox that overflows
detaches the session (its client resumes by ``seq``). When the broker connection is lost every
MQTT session is detached as when a websocket closes; the bridge reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent_runtime import __version__
from agent_runtime import protocol as p
from agent_runtime.config import RuntimeConfig
from agent_runtime.errors import (
    BrokerError,
    OverloadedError,
    ProtocolError,
    RequestError,
    SessionElsewhereError,
    SessionNotFoundError,
)
from agent_runtime.metrics import Registry
from agent_runtime.sessions import Session, SessionManager
from privacy.audit import AuditLog
from privacy.tenants import ANONYMOUS_TENANT as ANONYMOUS
from server.auth import Authenticator
from server.events import EventHandler, Spawn

__all__ = ["MqttBridge", "MqttPeer", "Received"]

log = logging.getLogger(__name__)

MSGPACK_SUFFIX = "msgpack"
CONTENT_TYPES = {
    p.JSON_SUBPROTOCOL: "application/json",
    p.MSGPACK_SUBPROTOCOL: "application/msgpack",
}
INBOX_LIMIT = 256
"""Client events of one session waiting to be handled; past it ``overloaded``."""
LOOSE_LIMIT = 4096
"""Replies not bound to an attached session (create answers, errors) waiting to be published."""
PUBLISH_TIMEOUT_S = 10.0
# One small message per token: without TCP_NODELAY, Nagle's algorithm and delayed ACKs add tens
# of milliseconds (paho does not set it; the broker needs ``set_tcp_nodelay true`` too).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
BACKOFF_START_S = 0.1
SUB_SHARED = 1
"""Subscription identifier of the cluster's shared ``in`` subscription."""
SUB_EXACT = 2
"""Subscription identifier of an owner's exact subscription to one session's ``in`` topics."""
EXACT_BATCH = 64
"""Sessions per SUBSCRIBE when a reconnected node takes its exact subscriptions again."""
RELEASE_EVERY_S = 1.0
"""How often a cluster node looks for sessions that left it (unloaded) to unsubscribe them."""


class _Overflow(Exception):
    """A session's outbox is full: the session detaches (its client resumes by seq)."""


class _Refused(aiomqtt.MqttError):
    """The broker refused a subscription (its SUBACK carries a failure code)."""


class _Elsewhere(Exception):
    """Another node owns the session: this copy of the message is not ours to answer."""


def _props(packet: int) -> Properties:
    return Properties(packet)  # type: ignore[no-untyped-call]


def _codec(msgpack: bool) -> p.Codec:
    return p.CODECS[p.MSGPACK_SUBPROTOCOL if msgpack else p.JSON_SUBPROTOCOL]


def _properties(
    codec: p.Codec, correlation: bytes | None = None, *, packet: int = PacketTypes.PUBLISH
) -> Properties:
    props = _props(packet)
    props.ContentType = CONTENT_TYPES[codec.name]
    if correlation is not None:
        props.CorrelationData = correlation
    return props


@dataclass
class _Outgoing:
    topic: str
    payload: str | bytes
    properties: Properties | None
    retain: bool = False


class MqttSession(EventHandler):
    """One session over MQTT: its topic pair is its connection."""

    passthrough = (_Elsewhere,)

    def __init__(self, bridge: MqttBridge, tenant: str, session_id: str, codec: p.Codec) -> None:
        super().__init__(bridge, codec, tenant)
        self.bridge = bridge
        self.session_id = session_id
        self.key = f"{tenant}/{session_id}"
        self.inbox: deque[p.ClientEvent | RequestError] = deque()
        self.outbox: deque[dict[str, Any]] = deque()
        self._replaying = False
        self.last_inbound = time.monotonic()
        self._worker: asyncio.Task[None] | None = None
        self.publisher: asyncio.Task[None] | None = None
        for kind, handler in list(self._handlers.items()):
            if kind is not p.SessionResume:
                self._handlers[kind] = self._attaching(handler)

    def _attaching(
        self, handler: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        async def run(event: p.ClientEvent) -> None:
            await self.handle(event)
            await handler(event)

        return run

    @property
    def out_topic(self) -> str:
        base = f"{self.bridge.prefix}/{self.tenant}/sessions/{self.session_id}/out"
        return f"{base}/{MSGPACK_SUFFIX}" if self.codec.binary else base

    @property
    def attached(self) -> bool:
        return self.session is not None and self.session.client is self

    # -- inbound --------------------------------------------------------------------------------

    def enqueue(self, item: p.ClientEvent | RequestError) -> None:
        self.last_inbound = time.monotonic()
        if len(self.inbox) >= INBOX_LIMIT:
            self.bridge.errors.inc()
            err = OverloadedError("too many events waiting on this session", retry_after_ms=1000)
            self.bridge.publish_loose(self.out_topic, p.stamp(p.error_event(err), 0), self.codec)
            return
        self.inbox.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name=f"mqtt-in-{self.session_id}")

    async def _work(self) -> None:
        while self.inbox:
            item = self.inbox.popleft()
            try:
                await self.on_event(item, _decoded)
            except _Elsewhere as exc:
                log.debug("session %s: owned by node %s; ignoring a copy", self.session_id, exc)
        if not self.attached and not self.inbox:
            self.bridge.forget(self)

    async def _take(self) -> Session:
        """The session, loaded here if need be, with this node's exact subscription to its
        ``in`` topics in place (cluster) before anything is answered."""
        try:
            session = await self.sessions.get(self.tenant, self.session_id)
        except SessionElsewhereError as exc:
            if self.bridge.cluster:  # its owner received this message too: stay silent
                raise _Elsewhere(exc.owner) from exc
            raise
        await self.bridge.hold(self.key, session)
        return session

    async def handle(self, event: p.ClientEvent) -> None:
        """Any event on the ``/in`` topic attaches the session here (resume replays first)."""
        if isinstance(event, p.SessionCreate):
            raise ProtocolError(
                f"session.create goes to {self.bridge.prefix}/{self.tenant}/sessions/create",
                code="invalid_event",
            )
        if not self.attached:
            self.attach(await self._take())

    async def on_session_resume(self, event: p.SessionResume) -> None:
        if event.session_id != self.session_id:
            self.bridge.audit.post(self.tenant, "denied", event.session_id, code="topic_mismatch")
            raise SessionNotFoundError("no such session")
        session = await self._take()
        if self.session is not None:
            self.session.detach(self.send)
            self.session = None
        self.outbox.clear()  # what was not yet published is replayed from the session's buffer
        self._replaying = True
        try:
            await self.replay(session, event.last_seq)
        finally:
            self._replaying = False

    def superseded(self) -> None:
        super().superseded()
        self.outbox.clear()
        # Taken by another client on this node: the exact subscription stays (an MQTT event may
        # take the session back). Dropped from this node (its lease was lost): given up now.
        self.bridge.release_gone()

    async def send_error(self, exc: Exception, event_id: str | None) -> None:
        if self.attached:
            await super().send_error(exc, event_id)
        else:  # never attach for an error: publish it unsequenced
            self.bridge.publish_loose(
                self.out_topic, p.stamp(p.error_event(exc, event_id=event_id), 0), self.codec
            )

    # -- outbound -------------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        if not self._replaying and len(self.outbox) >= self.bridge.config.mqtt.session_queue:
            log.info("session %s: MQTT outbox full; detaching (resume by seq)", self.session_id)
            self.outbox.clear()
            raise _Overflow
        self.outbox.append(event)
        if self.publisher is None or self.publisher.done():
            self.publisher = asyncio.create_task(
                self._publish(), name=f"mqtt-out-{self.session_id}"
            )

    async def _publish(self) -> None:
        while self.outbox:
            event = self.outbox[0]
            ok = await self.bridge.publish(
                _Outgoing(self.out_topic, self.codec.encode(event), None)
            )
            if not ok:  # the broker went away: the bridge detaches every session
                self.outbox.clear()
                return
            if self.outbox and self.outbox[0] is event:
                self.outbox.popleft()

    def disconnected(self) -> None:
        """The bridge lost the broker: behave as a closed websocket."""
        self.outbox.clear()
        if self.session is not None:
            self.session.detach(self.send)
            self.session = None

    def cancel_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [t for t in (self._worker, self.publisher) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        return tasks


def _decoded(item: p.ClientEvent | RequestError) -> p.ClientEvent:
    if isinstance(item, RequestError):
        raise item
    return item


class CreateRequest(EventHandler):
    """One request on ``P/{tenant}/sessions/create``: answered on its reply topic."""

    def __init__(
        self,
        bridge: MqttBridge,
        tenant: str,
        codec: p.Codec,
        reply_topic: str,
        correlation: bytes | None,
    ) -> None:
        super().__init__(bridge, codec, tenant)
        self.bridge = bridge
        self.reply_topic = reply_topic
        self.correlation = correlation

    async def send(self, event: dict[str, Any]) -> None:
        self.bridge.publish_loose(self.reply_topic, event, self.codec, self.correlation)

    async def send_error(self, exc: Exception, event_id: str | None) -> None:
        await self.send(p.stamp(p.error_event(exc, event_id=event_id), 0))

    async def on_session_create(self, event: p.SessionCreate) -> None:
        session = await self.sessions.create(self.tenant, p.new_id("sess"), event.instructions)
        link = self.bridge.link(self.tenant, session.session_id, self.codec)
        await self.bridge.hold(link.key, session)  # before the client learns the id
        link.attach(session)
        await session.emit(p.session_created(session.describe()))  # seq 1, on the /out topic
        created = next((e for e in session.events if e["type"] == "session.created"), None)
        if created is not None:
            await self.send(created)  # and the answer to the request


@dataclass
class _Exact:
    """This node's exact subscription to one session's ``in`` topics (cluster)."""

    topics: list[str]
    session: Session
    ready: asyncio.Task[None] | None = None  # the SUBSCRIBE in flight, or done


def share_group(key_prefix: str) -> str:
    """The shared-subscription group of the nodes that share ``store.key_prefix`` (one Redis
    namespace: one cluster); characters a group name may not hold become ``-``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in key_prefix)
    return f"agent-runtime-{safe}"


@dataclass(frozen=True)
class _Route:
    tenant: str
    kind: str  # "create" or "in"
    session_id: str
    msgpack: bool


class MqttBridge:
    """Connects to the broker, routes messages to sessions, publishes their events."""

    def __init__(
        self,
        config: RuntimeConfig,
        sessions: SessionManager,
        auth: Authenticator,
        audit: AuditLog,
        registry: Registry,
        spawn: Spawn,
        node_id: str,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.auth = auth
        self.audit = audit
        self.spawn = spawn
        self.node_id = node_id
        self.errors = registry.counter(
            "agent_runtime_mqtt_client_errors_total", "Error events sent to MQTT clients."
        )
        self.reconnects = registry.counter(
            "agent_runtime_mqtt_reconnects_total",
            "Times the MQTT bridge reconnected to its broker.",
        )
        self.dropped = registry.counter(
            "agent_runtime_mqtt_replies_dropped_total",
            "Unsequenced MQTT replies dropped (queue full or broker away).",
        )
        registry.gauge(
            "agent_runtime_mqtt_connected",
            "1 while the MQTT bridge is connected to its broker.",
            lambda: float(self.connected),
        )
        cfg = config.mqtt
        self.prefix = cfg.topic_prefix
        self.presence_topic = f"{self.prefix}/nodes/{node_id}/presence"
        self.cluster = config.cluster.enabled
        self.group = share_group(config.store.key_prefix)
        if self.cluster:  # every session this node serves, on any transport, gets its topics
            sessions.on_loaded.append(lambda s: self.spawn(self.hold(s.key, s)))
        self.exact: dict[str, _Exact] = {}  # by "tenant/session_id"
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._releaser: asyncio.Task[None] | None = None
        self.closing = False
        self.connected = False
        self.links: dict[str, MqttSession] = {}
        self._loose: deque[_Outgoing] = deque()
        self._loose_task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connected_event = asyncio.Event()
        self._stop = asyncio.Event()
        self._tls: ssl.SSLContext | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting (in the background: the server serves while the broker is away)."""
        if urlsplit(self.config.mqtt.url).scheme == "mqtts":
            ca = self.config.mqtt.ca_file or None
            self._tls = await asyncio.to_thread(ssl.create_default_context, cafile=ca)
        self._task = asyncio.create_task(self._run(), name="mqtt-bridge")
        self._sweeper = asyncio.create_task(self._sweep(), name="mqtt-idle-sweep")
        if self.cluster:
            self._releaser = asyncio.create_task(self._release_loop(), name="mqtt-release")

    async def wait_connected(self) -> None:
        """Until the bridge is connected (wrap it in a timeout)."""
        await self._connected_event.wait()

    async def aclose(self) -> None:
        """Clear this node's presence, disconnect, stop every task."""
        self.closing = True
        self._stop.set()
        flushing = [link.publisher for link in self.links.values()] + [self._loose_task]
        pending = [t for t in flushing if t is not None and not t.done()]
        if pending and self.connected:  # let queued events reach the broker first
            await asyncio.wait(pending, timeout=2.0)
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(Exception):
                await client.publish(self.presence_topic, b"", qos=1, retain=True, timeout=2.0)
        tasks: list[asyncio.Task[Any]] = []
        for link in list(self.links.values()):
            tasks += link.cancel_tasks()
        tasks += [e.ready for e in self.exact.values() if e.ready is not None]
        tasks += list(self._unsubscribing)
        for task in (self._sweeper, self._releaser, self._loose_task, self._task, *tasks):
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.links.clear()
        self.exact.clear()

    def _client_options(self) -> dict[str, Any]:
        cfg = self.config.mqtt
        url = urlsplit(cfg.url)
        connect = _props(PacketTypes.CONNECT)
        # The broker drops (never delivers) messages past this: as the websocket closes on frames
        # beyond 4x the limit, and answers those in between with frame_too_large.
        connect.MaximumPacketSize = 4 * self.config.server.max_frame_bytes + 65_536
        connect.SessionExpiryInterval = 0
        username = cfg.username or url.username or None
        password = (cfg.broker_password() or None) if username else None
        return {
            "hostname": url.hostname or "127.0.0.1",
            "port": url.port or (8883 if url.scheme == "mqtts" else 1883),
            "username": username,
            "password": password,
            "identifier": cfg.client_id or f"agent-runtime-{self.node_id}",
            "protocol": aiomqtt.ProtocolVersion.V5,
            # The retained presence is cleared by the will (an empty retained payload) when the
            # node vanishes without a goodbye.
            "will": aiomqtt.Will(self.presence_topic, b"", qos=1, retain=True),
            "keepalive": cfg.keepalive_s,
            "max_queued_incoming_messages": cfg.inbound_queue,
            "properties": connect,
            "tls_context": self._tls,
            "timeout": PUBLISH_TIMEOUT_S,
            "logger": logging.getLogger("server.mqtt.client"),
            "socket_options": NODELAY,
        }

    async def _run(self) -> None:
        delay = BACKOFF_START_S
        first = True
        while not self.closing:
            if not first:
                self.reconnects.inc()
            first = False
            try:
                async with aiomqtt.Client(**self._client_options()) as client:
                    self._client = client
                    await self._subscribe(client)
                    await client.publish(
                        self.presence_topic,
                        json.dumps(
                            {
                                "node_id": self.node_id,
                                "status": "online",
                                "version": __version__,
                                "since": time.time(),
                            }
                        ),
                        qos=1,
                        retain=True,
                    )
                    self.connected = True
                    self._connected_event.set()
                    delay = BACKOFF_START_S
                    log.info("MQTT bridge connected to %s", self._where())
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if not self.closing:
                    log.warning(
                        "MQTT bridge: broker %s unavailable (%s); retrying in %.1fs",
                        self._where(),
                        _describe(exc),
                        delay,
                    )
            finally:
                self._lost()
            if self.closing:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            delay = min(delay * 2, self.config.mqtt.reconnect_max_s)

    def _where(self) -> str:
        url = urlsplit(self.config.mqtt.url)
        return f"{url.scheme}://{url.hostname}:{url.port or ''}"

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        base = f"{self.prefix}/+/sessions"
        creates = [f"{base}/create", f"{base}/create/{MSGPACK_SUFFIX}"]
        ins = [f"{base}/+/in", f"{base}/+/in/{MSGPACK_SUFFIX}"]
        if not self.cluster:
            for topic in creates + ins:
                await _subscribed(client, [topic])
            return
        # One node of the group gets each create, and each message for a session that no node
        # subscribes to exactly; the owners' exact subscriptions are taken again below.
        share = f"$share/{self.group}/"
        await _subscribed(client, [share + t for t in creates])
        await _subscribed(client, [share + t for t in ins], SUB_SHARED)
        self.release_gone()
        held = list(self.exact.values())
        for i in range(0, len(held), EXACT_BATCH):
            batch = held[i : i + EXACT_BATCH]
            await _subscribed(client, [t for e in batch for t in e.topics], SUB_EXACT)

    # -- exact subscriptions (cluster) ----------------------------------------------------------

    async def hold(self, key: str, session: Session) -> None:
        """Subscribe this node to the ``in`` topics of ``session`` (which it now owns) unless it
        is already, and wait for the broker's SUBACK: from then on every message for the session
        reaches this node. Nothing outside a cluster (the wildcard subscription sees all)."""
        if not self.cluster:
            return
        entry = self.exact.get(key)
        if entry is None:
            base = f"{self.prefix}/{session.tenant}/sessions/{session.session_id}/in"
            entry = self.exact[key] = _Exact([base, f"{base}/{MSGPACK_SUFFIX}"], session)
            entry.ready = asyncio.create_task(
                self._subscribe_exact(key, entry), name=f"mqtt-sub-{session.session_id}"
            )
        entry.session = session
        if entry.ready is not None and not entry.ready.done():
            await asyncio.shield(entry.ready)

    async def _subscribe_exact(self, key: str, entry: _Exact) -> None:
        client = self._client  # set before _subscribe runs: one of the two subscribes
        if client is None:
            return  # taken when the bridge connects again (_subscribe)
        try:
            await _subscribed(client, entry.topics, SUB_EXACT)
        except aiomqtt.MqttError as exc:
            # A lost connection resubscribes everything held; a refusal leaves the session to
            # the shared subscription (which this node then no longer ignores).
            log.warning("session %s: exact MQTT subscription failed: %s", key, _describe(exc))
            if isinstance(exc, _Refused) and self.exact.get(key) is entry:
                del self.exact[key]

    def release_gone(self) -> None:
        """Unsubscribe from the ``in`` topics of sessions that left this node (unloaded,
        dropped, deleted): their next owner subscribes, or the shared subscription finds one."""
        for key, entry in list(self.exact.items()):
            if not entry.session.closed and self.sessions.sessions.get(key) is entry.session:
                continue
            del self.exact[key]
            client = self._client
            if client is not None:
                task = asyncio.create_task(
                    self._unsubscribe(client, entry), name=f"mqtt-unsub-{key}"
                )
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, client: aiomqtt.Client, entry: _Exact) -> None:
        if entry.ready is not None and not entry.ready.done():
            with contextlib.suppress(Exception):
                await entry.ready  # the broker has the SUBSCRIBE first either way; keep it tidy
        try:
            await client.unsubscribe(entry.topics)
        except aiomqtt.MqttError as exc:  # a reconnect drops every subscription anyway
            log.info("MQTT unsubscribe failed: %s", _describe(exc))

    async def _release_loop(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_EVERY_S)
            self.release_gone()

    def _lost(self) -> None:
        was = self.connected
        self.connected = False
        self._connected_event.clear()
        self._client = None
        self._loose.clear()
        for link in list(self.links.values()):
            link.disconnected()
        if was and not self.closing:
            log.warning("MQTT bridge disconnected from %s", self._where())

    async def _sweep(self) -> None:
        """Detach MQTT sessions whose client has been silent for ``idle_unload_s`` (the idle
        reaper can then unload them; any event on ``/in`` brings them back)."""
        idle = self.config.server.idle_unload_s
        while True:
            await asyncio.sleep(min(30.0, max(0.5, idle / 4)))
            now = time.monotonic()
            for link in list(self.links.values()):
                session = link.session
                if (
                    now - link.last_inbound >= idle
                    and not link.inbox
                    and (session is None or not session.responding)
                ):
                    link.disconnected()
                    self.forget(link)

    # -- routing --------------------------------------------------------------------------------

    def route(self, topic: str) -> _Route | None:
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1 :].split("/")
        msgpack = parts[-1] == MSGPACK_SUFFIX
        if msgpack:
            parts = parts[:-1]
        if len(parts) == 3 and parts[1:] == ["sessions", "create"]:
            return _Route(parts[0], "create", "", msgpack)
        if len(parts) == 4 and parts[1] == "sessions" and parts[3] == "in" and parts[2]:
            return _Route(parts[0], "in", parts[2], msgpack)
        return None

    def tenant_allowed(self, tenant: str) -> bool:
        """Whether ``tenant`` could have authenticated (the broker checked the password)."""
        if self.auth.required():
            return self.auth.tenants.is_active(tenant)
        return tenant == ANONYMOUS

    def _dispatch(self, message: aiomqtt.Message) -> None:
        """Route one message; never awaits, so the receive loop keeps draining the queue."""
        try:
            self._route_message(message)
        except Exception:  # a bug: never let one message stop the bridge
            log.exception("MQTT bridge: routing a message failed")

    def _route_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        route = self.route(topic)
        if route is None:
            return
        payload = message.payload
        frame: str | bytes = payload if isinstance(payload, str | bytes) else b""
        if isinstance(payload, bytearray):
            frame = bytes(payload)
        codec = _codec(route.msgpack)
        props = message.properties
        if route.kind == "create":
            reply = self._reply_topic(route.tenant, props)
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            if reply is None:
                self.audit.post(route.tenant, "denied", None, code="reply_topic_not_allowed")
                reply = f"{self.prefix}/{route.tenant}/replies"
            request = CreateRequest(self, route.tenant, codec, reply, correlation)
            if not self.tenant_allowed(route.tenant):
                self.audit.post(route.tenant, "denied", None, code="tenant_not_found")
                return
            self.spawn(self._create(request, frame))
            return
        key = f"{route.tenant}/{route.session_id}"
        if self.cluster and key in self.exact:
            ids = getattr(props, "SubscriptionIdentifier", None) or ()
            if SUB_EXACT not in ids:  # the shared copy of a message this node gets exactly
                return
        link = self.links.get(key)
        if link is not None and link.codec is not codec and not link.attached:
            link.codec = codec
        try:
            if not self.tenant_allowed(route.tenant):
                self.audit.post(route.tenant, "denied", route.session_id, code="tenant_not_found")
                raise SessionNotFoundError("no such session")
            item: p.ClientEvent | RequestError = _decode(self, codec, frame)
        except RequestError as exc:
            item = exc
        if link is None:
            if isinstance(item, RequestError):
                # No session here: answer unsequenced, create nothing.
                self.errors.inc()
                probe = MqttSession(self, route.tenant, route.session_id, codec)
                self.publish_loose(
                    probe.out_topic, p.stamp(p.error_event(item, event_id=item.event_id), 0), codec
                )
                return
            link = self.link(route.tenant, route.session_id, codec)
        link.enqueue(item)

    def _reply_topic(self, tenant: str, props: Properties | None) -> str | None:
        """The request's Response Topic if it lies under ``P/{tenant}/replies``; the default
        when it names none; None when it names a topic the tenant may not be answered on."""
        default = f"{self.prefix}/{tenant}/replies"
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if not topic:
            return default
        if not isinstance(topic, str) or any(c in topic for c in "+#\0"):
            return None
        if topic == default or topic.startswith(default + "/"):
            return topic
        return None

    async def _create(self, request: CreateRequest, frame: str | bytes) -> None:
        def decode(frame: str | bytes) -> p.ClientEvent:
            event = _decode(self, request.codec, frame)
            if not isinstance(event, p.SessionCreate | p.Ping):
                raise ProtocolError(
                    f"only session.create and ping go to {self.prefix}/{request.tenant}"
                    "/sessions/create; a session's other events go to .../sessions/{id}/in",
                    code="invalid_event",
                    event_id=event.event_id,
                )
            return event

        await request.on_event(frame, decode)

    def link(self, tenant: str, session_id: str, codec: p.Codec) -> MqttSession:
        key = f"{tenant}/{session_id}"
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = MqttSession(self, tenant, session_id, codec)
        return link

    def forget(self, link: MqttSession) -> None:
        if self.links.get(link.key) is link and not link.attached:
            del self.links[link.key]
        if self.cluster:
            self.release_gone()  # a deleted session

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, out: _Outgoing) -> bool:
        """Publish one message at QoS 1 and wait for the broker's PUBACK; False when the broker
        is away (the message is not published)."""
        client = self._client
        if client is None or not self.connected:
            return False
        try:
            await client.publish(
                out.topic, out.payload, qos=1, retain=out.retain, properties=out.properties
            )
        except aiomqtt.MqttError as exc:
            log.info("MQTT publish failed: %s", _describe(exc))
            return False
        return True

    def publish_loose(
        self,
        topic: str,
        event: dict[str, Any],
        codec: p.Codec,
        correlation: bytes | None = None,
    ) -> None:
        """Queue a reply that belongs to no attached session (dropped when the queue is full or
        the broker is away: such replies are answers to requests a client may repeat)."""
        if len(self._loose) >= LOOSE_LIMIT or not self.connected:
            self.dropped.inc()
            return
        self._loose.append(_Outgoing(topic, codec.encode(event), _properties(codec, correlation)))
        if self._loose_task is None or self._loose_task.done():
            self._loose_task = asyncio.create_task(self._drain_loose(), name="mqtt-replies")

    async def _drain_loose(self) -> None:
        while self._loose:
            if not await self.publish(self._loose.popleft()):
                self.dropped.inc()


async def _subscribed(
    client: aiomqtt.Client, topics: list[str], identifier: int | None = None
) -> None:
    """Subscribe to ``topics`` at QoS 1 in one SUBSCRIBE (tagged with the MQTT 5 subscription
    ``identifier``, which the broker returns on every message it delivers through them)."""
    props = None
    if identifier is not None:
        props = _props(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = identifier
    codes = await client.subscribe([(t, 1) for t in topics], properties=props)
    if any(getattr(c, "is_failure", False) for c in codes):
        raise _Refused(f"subscription to {', '.join(topics)} refused: {codes}")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except aiomqtt.MqttError as exc:
        raise BrokerError(f"MQTT: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _decode(handler: MqttBridge, codec: p.Codec, frame: str | bytes) -> p.ClientEvent:
    limits = handler.config.server
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(
            f"message of {len(frame)} bytes exceeds the limit of {limits.max_frame_bytes}",
            code="frame_too_large",
        )
    raw = codec.decode(frame)
    try:
        return p.parse_client_event(raw, max_message_chars=limits.max_message_chars)
    except RequestError as exc:
        if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
            exc.event_id = exc.event_id or raw["event_id"]
        raise


class Received:
    """One message an :class:`MqttPeer` received."""

    def __init__(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.topic = topic
        self.payload = payload
        self.correlation = correlation


class MqttPeer:
    """A small MQTT 5 client for tools (``agent-runtime bench mqtt``): connect, subscribe,
    publish with a Response Topic and Correlation Data, receive. aiomqtt stays in this module."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, host: str, port: int, username: str | None = None, password: str | None = None
    ) -> AsyncIterator[MqttPeer]:
        try:
            async with aiomqtt.Client(
                host,
                port,
                username=username,
                password=password,
                protocol=aiomqtt.ProtocolVersion.V5,
                max_queued_incoming_messages=65_536,
                socket_options=NODELAY,
            ) as client:
                yield cls(client)
        except aiomqtt.MqttError as exc:
            raise BrokerError(f"MQTT broker {host}:{port}: {_describe(exc)}") from exc

    async def subscribe(self, topic: str) -> None:
        with _translated():
            await self._client.subscribe(topic, qos=1)

    async def publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        props = _props(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        with _translated():
            await self._client.publish(topic, payload, qos=1, properties=props)

    async def receive(self) -> Received:
        with _translated():
            return await self._receive()

    async def _receive(self) -> Received:
        async for message in self._client.messages:
            props = message.properties
            payload = message.payload
            data = payload.encode() if isinstance(payload, str) else bytes(payload or b"")
            return Received(
                message.topic.value,
                data,
                getattr(props, "CorrelationData", None) if props else None,
            )
        raise BrokerError("MQTT connection closed")
