"""A session with memory through the official ``openai`` package (the OpenAI-compatible API).

python examples/openai_client.py [http://127.0.0.1:8765/v1] [--api-key KEY]

The first call starts a session (``X-Session-Id: new``); later calls name it and send the whole
conversation, as any OpenAI client does; the server appends only what is new. Each answer says
which earlier messages its memories came from (``agent_runtime.memory.provenance``).
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url", nargs="?", default="http://127.0.0.1:8765/v1")
    parser.add_argument("--api-key", default=os.environ.get("AGENT_RUNTIME_API_KEY", "none"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    api = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = api.models.list().data[0].id
    history: list[dict[str, str]] = []
    session = "new"
    ids: dict[str, int] = {}  # item id -> index of the message in history
    for text in ("Remember this: my locker code is 7QK2ZP.", "What was my locker code again?"):
        history.append({"role": "user", "content": text})
        raw = api.chat.completions.with_raw_response.create(
            model=model,
            messages=history,  # type: ignore[arg-type]
            max_tokens=args.max_tokens,
            temperature=0,
            extra_headers={"X-Session-Id": session},
        )
        session = raw.headers["x-session-id"]
        reply = raw.parse()
        ext = (reply.model_extra or {})["agent_runtime"]
        for item_id in ext["message_item_ids"]:
            ids[item_id] = len(history) - 1
        answer = reply.choices[0].message.content or ""
        history.append({"role": "assistant", "content": answer})
        ids[ext["item_id"]] = len(history) - 1
        print(f"> {text}\n{answer}")
        for p in ext["memory"]["provenance"]:
            where = ids.get(p["item_id"])
            if where is not None:
                quoted = history[where]["content"][p["span"][0] : p["span"][1]]
                print(f"  [memory from message {where + 1}: {quoted!r}, score {p['score']:.2f}]")
    print(f"[session {session}] [{reply.choices[0].finish_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
