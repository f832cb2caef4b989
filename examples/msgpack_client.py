"""The protocol by hand over msgpack: binary frames, subprotocol ``agent-runtime.v1.msgpack``.

python examples/msgpack_client.py "Hello!" [ws://127.0.0.1:8765/v1/realtime]

Uses only ``websockets`` and ``msgpack``: what a client in any language does.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import msgpack
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol


def pack(event: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(event, use_bin_type=True)
    return data


async def main(text: str, url: str) -> int:
    async with connect(url, subprotocols=[Subprotocol("agent-runtime.v1.msgpack")]) as ws:
        assert ws.subprotocol == "agent-runtime.v1.msgpack", "the server must speak msgpack"
        await ws.send(pack({"type": "session.create", "event_id": "c1"}))
        await ws.send(
            pack(
                {
                    "type": "conversation.item.create",
                    "event_id": "c2",
                    "item": {"type": "message", "role": "user", "content": text},
                }
            )
        )
        await ws.send(
            pack({"type": "response.create", "event_id": "c3", "response": {"max_tokens": 64}})
        )
        async for frame in ws:
            event = msgpack.unpackb(frame, raw=False)  # every server frame is binary
            kind = event["type"]
            if kind == "session.created":
                print(f"[session {event['session']['id']}]", file=sys.stderr)
            elif kind == "response.output_text.delta":
                print(event["delta"], end="", flush=True)
            elif kind == "response.done":
                response = event["response"]
                print(f"\n[{response['status']}: {response['usage']}]", file=sys.stderr)
                return 0
            elif kind == "error":
                print(f"error: {event['error']}", file=sys.stderr)
                return 1
    return 1


if __name__ == "__main__":
    raise SystemExit(
        asyncio.run(
            main(
                sys.argv[1] if len(sys.argv) > 1 else "Hello!",
                sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8765/v1/realtime",
            )
        )
    )
