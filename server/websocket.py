"""The websocket endpoint: one :class:`Connection` per client; frames in, session events out.

A frame is size-checked, decoded by the connection's codec, validated into a typed client event
(``agent_runtime.protocol``) and dispatched to the handler for its type. Errors a client caused
come back as ``error`` events and the connection stays open.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.typing import Subprotocol

from agent_runtime import protocol as p
from agent_runtime.config import RuntimeConfig
from agent_runtime.metrics import Counter
from agent_runtime.sessions import Session, SessionManager
from agent_runtime.sessions.session import supersede
from server.events import EventHandler, Spawn

__all__ = ["Connection", "WebsocketEndpoint", "select_subprotocol"]


class WebsocketEndpoint:
    """The websocket handler: tracks open connections and runs one :class:`Connection` each."""

    def __init__(
        self,
        config: RuntimeConfig,
        sessions: SessionManager,
        tenant_of: dict[ServerConnection, str],
        errors: Counter,
        spawn: Spawn,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.tenant_of = tenant_of  # filled by the HTTP layer when it vets the upgrade
        self.errors = errors
        self.spawn = spawn
        self.connections: set[ServerConnection] = set()
        self.closing = False  # set at shutdown: new events are refused, pings still answered

    def displace(self, session: Session) -> None:
        """Another client takes ``session``: the client attached to it is superseded (a
        websocket is closed with 4000; an MQTT session stops publishing)."""
        supersede(session.client, None)

    async def __call__(self, ws: ServerConnection) -> None:
        codec = p.CODECS[ws.subprotocol or p.JSON_SUBPROTOCOL]
        conn = Connection(self, ws, codec, tenant=self.tenant_of.pop(ws))
        self.connections.add(ws)
        try:
            async for frame in ws:
                await conn.on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)
            conn.on_close()


class Connection(EventHandler):
    """One websocket client: decodes frames, dispatches events, sends its session's events.

    The transport-neutral part (decoding, validation, the handlers) is ``server/events.py``.
    """

    passthrough = (ConnectionClosed,)

    def __init__(
        self, endpoint: WebsocketEndpoint, ws: ServerConnection, codec: p.Codec, tenant: str
    ) -> None:
        super().__init__(endpoint, codec, tenant)
        self.ws = ws
        self.spawn = endpoint.spawn

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(self.codec.encode(event))

    def superseded(self) -> None:
        """The session was resumed on another connection (or transport): close this one (4000)."""
        super().superseded()
        self.spawn(self.ws.close(4000, "session resumed on another connection"))

    def on_close(self) -> None:
        if self.session is not None:
            self.session.detach(self.send)  # a no-op unless this connection is still attached


def select_subprotocol(
    conn: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """The client's first supported subprotocol; JSON when it names none; refuse unknown ones."""
    if not offered:
        return None
    for name in offered:
        if name in p.SUBPROTOCOLS:
            return name
    raise NegotiationError(
        f"unsupported subprotocols {list(offered)}; this server speaks {list(p.SUBPROTOCOLS)}"
    )
