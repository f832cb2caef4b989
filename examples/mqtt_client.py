"""A device-style client with only an MQTT library (aiomqtt): create a session, stream a reply,
disconnect, reconnect and resume without losing an event (docs/mqtt.md).

    python examples/mqtt_client.py --host 127.0.0.1 --port 1883 --tenant acme \\
        --password "$ACME_API_KEY" "Remember this: my locker code is 7QK2ZP."

The tenant's MQTT password is one of its API keys (``agent-runtime tenants mqtt-config``).
The session id and the last seq seen are kept in ``--state`` (JSON), so a second run continues
the same session and replays whatever it missed; the same session also works from the web page
(``session.resume`` with its id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PREFIX = "agent-runtime/v1"


class Device:
    def __init__(self, client: aiomqtt.Client, tenant: str, state: dict[str, Any]) -> None:
        self.client = client
        self.tenant = tenant
        self.state = state  # {"session_id": ..., "last_seq": ...}

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/{self.tenant}/sessions/{self.state['session_id']}/{leaf}"

    async def publish(self, topic: str, event: dict[str, Any], **props: Any) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        for name, value in props.items():
            setattr(properties, name, value)
        await self.client.publish(topic, json.dumps(event), qos=1, properties=properties)

    async def events(self) -> Any:
        """Server events in order, each once: a copy at or below the last seq is dropped
        (``session.resumed`` carries the session's current seq: it is never a copy)."""
        async for message in self.client.messages:
            event = json.loads(message.payload)
            seq = event.get("seq", 0)
            copy = 0 < seq <= self.state["last_seq"] and event["type"] != "session.resumed"
            if message.topic.matches(self.topic("out")) and copy:
                continue
            if seq:
                self.state["last_seq"] = max(self.state["last_seq"], seq)
            yield event

    async def create(self) -> None:
        reply = f"{PREFIX}/{self.tenant}/replies/{uuid.uuid4().hex[:12]}"
        correlation = uuid.uuid4().bytes
        await self.client.subscribe(reply, qos=1)
        await self.publish(
            f"{PREFIX}/{self.tenant}/sessions/create",
            {"type": "session.create"},
            ResponseTopic=reply,
            CorrelationData=correlation,
        )
        async for message in self.client.messages:
            if message.topic.matches(reply):
                event = json.loads(message.payload)
                if event["type"] == "error":
                    raise SystemExit(f"error: {event['error']['message']}")
                self.state.update(session_id=event["session"]["id"], last_seq=event["seq"])
                break
        await self.client.subscribe(self.topic("out"), qos=1)
        print(f"[session {self.state['session_id']} created]", file=sys.stderr)

    async def resume(self) -> None:
        await self.client.subscribe(self.topic("out"), qos=1)
        await self.publish(
            self.topic("in"),
            {
                "type": "session.resume",
                "session_id": self.state["session_id"],
                "last_seq": self.state["last_seq"],
            },
        )
        async for event in self.events():
            if event["type"] == "session.resumed":
                lost = " (some events were no longer buffered)" if event["events_lost"] else ""
                print(f"[resumed; {event['replayed']} events replayed{lost}]", file=sys.stderr)
                break
            if event["type"] == "error":
                raise SystemExit(f"error: {event['error']['message']}")

    async def ask(self, text: str) -> None:
        item = {"type": "message", "role": "user", "content": text}
        await self.publish(self.topic("in"), {"type": "conversation.item.create", "item": item})
        await self.publish(self.topic("in"), {"type": "response.create", "response": {}})
        async for event in self.events():
            if event["type"] == "response.output_text.delta":
                print(event["delta"], end="", flush=True)
            elif event["type"] == "response.done":
                print(f"\n[{event['response']['status']}]", file=sys.stderr)
                return
            elif event["type"] == "error":
                print(f"\n[error: {event['error']['message']}]", file=sys.stderr)
                return


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--password", help="the tenant's API key")
    parser.add_argument("--state", type=Path, default=Path("mqtt-session.json"))
    args = parser.parse_args()
    state = json.loads(args.state.read_text()) if args.state.exists() else {}
    async with aiomqtt.Client(
        args.host,
        args.port,
        username=args.tenant,
        password=args.password,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        device = Device(client, args.tenant, state)
        if state.get("session_id"):
            await device.resume()  # replays anything missed since last_seq, then live events
        else:
            await device.create()
        await device.ask(args.text)
    args.state.write_text(json.dumps(state))


if __name__ == "__main__":
    asyncio.run(main())
