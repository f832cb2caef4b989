"""Shared fixtures: a real server on loopback port 0 with a tiny model, and a real websocket client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect

from agent_runtime.config import RuntimeConfig, StoreConfig
from agent_runtime.models import ChatModel
from agent_runtime.models.byte.family import ByteChatModel
from agent_runtime.models.byte.model import MemorizingTransformer, ModelConfig
from server.app import Server

# Scale every timeout on slow machines, as the websockets test-suite does.
TIMEOUT = 10.0 * float(os.environ.get("AGENT_RUNTIME_TEST_TIMEOUT_FACTOR", "1"))

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, window=16, mem_layer=1, mem_topk=4)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> MemorizingTransformer:
    torch.manual_seed(seed)
    model = MemorizingTransformer(cfg).eval()
    with torch.no_grad():  # make the memory path matter in an untrained model
        model.blocks[cfg.mem_layer].attn.gate_bias.fill_(1.0)  # type: ignore[union-attr]
    return model


def external_redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def offline_pip_env(*drop: str) -> dict[str, str]:
    """This process's environment (less variables starting with ``drop``) with pip pointed at
    an index that does not answer: a machine with no network, for first-start errors."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", *drop))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no find-links or extra index from the machine's config
        PIP_INDEX_URL="http://127.0.0.1:9/",  # nothing listens on the discard port
        PIP_NO_CACHE_DIR="1",
        PIP_RETRIES="0",
        PIP_TIMEOUT="5",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def make_config(tmp_path: Path, redis_url: str = "", **server: Any) -> RuntimeConfig:
    cfg = RuntimeConfig(
        store=StoreConfig(
            data_dir=str(tmp_path / "data"),
            redis_url=redis_url,
            key_prefix=f"test-{os.getpid()}-{id(tmp_path)}",
        )
    )
    cfg.server.port = 0
    for k, v in server.items():
        setattr(cfg.server, k, v)
    cfg.generation.max_tokens = 24
    return cfg.validate()


@asynccontextmanager
async def running_server(
    config: RuntimeConfig, model: MemorizingTransformer | ChatModel[Any] | None = None
) -> AsyncIterator[Server]:
    model = model or tiny_model()
    if isinstance(model, MemorizingTransformer):
        model = ByteChatModel(model)
    async with asyncio.timeout(TIMEOUT * 3):
        server = Server(config, model)
        await server.start()
    try:
        yield server
    finally:
        async with asyncio.timeout(TIMEOUT * 3):
            await server.aclose()


class Client:
    """A real websocket client speaking the JSON protocol, with helpers that wait for events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.n = 0
        self.last_seq = 0
        self.timeout = TIMEOUT  # per received event

    async def send(self, event: dict[str, Any]) -> str:
        self.n += 1
        event.setdefault("event_id", f"c{self.n}")
        await self.ws.send(json.dumps(event))
        return str(event["event_id"])

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(self.timeout):
            event: dict[str, Any] = json.loads(await self.ws.recv())
        self.last_seq = max(self.last_seq, int(event.get("seq", 0)))
        return event

    async def until(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Receive until an event of type ``kind``; returns it and everything before it."""
        seen: list[dict[str, Any]] = []
        while True:
            event = await self.recv()
            if event["type"] == kind:
                return event, seen
            seen.append(event)

    async def create_session(self, **session: Any) -> str:
        await self.send({"type": "session.create", "session": session})
        created, _ = await self.until("session.created")
        return str(created["session"]["id"])

    async def add_message(self, text: str) -> str:
        """Append a user message to the conversation (no reply is requested)."""
        return await self.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )

    async def turn(
        self, text: str, **response: Any
    ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        """Send a user message and a response.create; returns (streamed text, response.done, events)."""
        await self.add_message(text)
        await self.send({"type": "response.create", "response": response})
        done, events = await self.until("response.done")
        text_out = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        return text_out, done, events


@asynccontextmanager
async def client(
    server: Server, subprotocol: str = "agent-runtime.v1.json", api_key: str | None = None
) -> AsyncIterator[Client]:
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with connect(
        url,
        subprotocols=[subprotocol],  # type: ignore[list-item]
        open_timeout=TIMEOUT,
        additional_headers=headers,
    ) as ws:
        yield Client(ws)


@pytest.fixture
def config(tmp_path: Path) -> RuntimeConfig:
    return make_config(tmp_path)


def tiny_llama_chat(seed: int = 0, **plan: Any) -> Any:
    """A random 2-layer Llama behind the model seam, its memory on both layers."""
    from agent_runtime.models.llama.family import tiny_random

    return tiny_random(seed, **plan)
