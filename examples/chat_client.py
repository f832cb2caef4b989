"""Tell the model a fact, then ask about it, with the Python client library.

python examples/chat_client.py [ws://127.0.0.1:8765/v1/realtime] [--max-tokens N]

The fact is stored in the session's memory as the conversation goes on; the second turn's
``response.done`` reports how many memory entries the model retrieved while answering.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from agent_runtime.client import AgentClient, RemoteError


async def main(url: str, max_tokens: int) -> int:
    async with AgentClient(url) as client:
        session_id = await client.create_session(instructions="You are a helpful assistant.")
        print(f"[session {session_id}]", file=sys.stderr)
        for text in (
            "Remember this: my locker code is 7QK2ZP.",
            "What is my locker code?",
        ):
            print(f"> {text}")
            try:
                reply = client.respond(text, max_tokens=max_tokens)
                async for delta in reply:
                    print(delta, end="", flush=True)
            except RemoteError as exc:
                print(f"\nerror {exc.code}: {exc.message}", file=sys.stderr)
                return 1
            print()
            print(
                f"[{reply.status}: {reply.usage['output_tokens']} tokens; memory "
                f"{reply.memory['retrieved']} retrieved, {reply.memory['entries']} entries]",
                file=sys.stderr,
            )
        stats = await client.memory_stats()
        print(f"[bank: {stats.entries} entries, position {stats.position}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/v1/realtime")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.url, args.max_tokens)))
