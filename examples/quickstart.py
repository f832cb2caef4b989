"""Minimal client: open a session, send one message, print the streamed reply.

python examples/quickstart.py "Remember this: my locker code is 7QK2ZP." [ws://127.0.0.1:8765/v1/realtime]
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def main(text: str, url: str) -> None:
    async with connect(url, subprotocols=["agent-runtime.v1.json"]) as ws:
        await ws.send(json.dumps({"type": "session.create"}))
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": text}],
                    },
                }
            )
        )
        await ws.send(json.dumps({"type": "response.create", "response": {"max_tokens": 64}}))
        async for frame in ws:
            event = json.loads(frame)
            if event["type"] == "session.created":
                print(f"[session {event['session']['id']}]", file=sys.stderr)
            elif event["type"] == "response.output_text.delta":
                print(event["delta"], end="", flush=True)
            elif event["type"] == "response.done":
                print(
                    f"\n[{event['response']['status']}: {event['response']['usage']}]",
                    file=sys.stderr,
                )
                break
            elif event["type"] == "error":
                raise SystemExit(f"error: {event['error']}")


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1] if len(sys.argv) > 1 else "Hello!",
            sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8765/v1/realtime",
        )
    )
