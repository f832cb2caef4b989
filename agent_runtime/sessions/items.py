"""A session's item ledger: which conversation item every token position came from.

The runtime keeps no transcript. For each item (a message, or a reply) the ledger holds its id,
role, where its tokens sit in the session's token stream, how many characters each token
covers, when it was added, and a keyed digest of its text. That is enough to

* **verify a client's history**: an HTTP client sends the whole message list each time; the
  messages the session already holds must match their digests, the rest are appended
  (:meth:`Ledger.held`);
* **explain an answer** (provenance): the memory entries a reply attended to most are mapped
  back to the item, the character span inside it and its age (:meth:`Ledger.provenance`),
  never to the text, which the server does not have.

The digest is an HMAC-SHA256 under a random per-session salt kept with the ledger in the state
file (sealed when encryption at rest is on), so equal messages in two sessions do not match.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent_runtime.errors import BankFormatError, ConflictError
from agent_runtime.models.base import ChatModel

__all__ = ["Item", "Ledger", "char_ends"]

PROVENANCE_ITEMS = 5
"""Items a ``response.done`` names at most, strongest first."""


@dataclass
class Item:
    id: str
    role: str
    digest: str
    chars: int
    created_at: float
    ends: np.ndarray  # (tokens,) uint32: characters of the text covered through each token
    start: int = -1  # position of the first token; -1 until the model has been fed the item

    @property
    def length(self) -> int:
        return int(self.ends.shape[0])

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Characters of the text covered by the item's tokens ``first..last`` (indices)."""
        begin = int(self.ends[first - 1]) if first > 0 else 0
        return begin, int(self.ends[last])

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "digest": self.digest,
            "chars": self.chars,
            "at": self.created_at,
            "start": self.start,
            "ends": base64.b64encode(self.ends.astype("<u4").tobytes()).decode(),
        }

    @classmethod
    def from_json(cls, raw: object) -> Item:
        if not isinstance(raw, dict):
            raise BankFormatError("state file: an item record is not an object")
        try:
            ends = np.frombuffer(base64.b64decode(raw["ends"]), dtype="<u4").astype(np.uint32)
            return cls(
                id=str(raw["id"]),
                role=str(raw["role"]),
                digest=str(raw["digest"]),
                chars=int(raw["chars"]),
                created_at=float(raw["at"]),
                ends=ends,
                start=int(raw["start"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BankFormatError(f"state file: malformed item record: {exc}") from exc


def char_ends(model: ChatModel[Any], tokens: Sequence[int], text: str) -> np.ndarray:
    """For each token of an item, how many characters of ``text`` it and the tokens before it
    cover. Markup tokens (role, end of turn) cover none of them."""
    stream = model.text_stream()
    decoded = ""
    marks: list[int] = []
    for token in tokens:
        decoded += stream.push(token)
        marks.append(len(decoded))
    decoded += stream.flush()
    at = decoded.find(text) if text else 0
    if at < 0:  # the tokenizer normalised the text: spread it evenly (spans stay ordered)
        n = max(len(tokens), 1)
        return np.array([round((i + 1) * len(text) / n) for i in range(len(tokens))], np.uint32)
    return np.clip(np.array(marks, np.int64) - at, 0, len(text)).astype(np.uint32)


@dataclass
class Ledger:
    items: list[Item] = field(default_factory=list)
    salt: bytes = field(default_factory=lambda: os.urandom(16))

    def digest(self, role: str, text: str) -> str:
        mac = hmac.new(self.salt, f"{role}\0{text}".encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def add(self, item_id: str, role: str, text: str, ends: np.ndarray, *, start: int = -1) -> Item:
        item = Item(item_id, role, self.digest(role, text), len(text), time.time(), ends, start)
        self.items.append(item)
        return item

    def place(self, start: int) -> int:
        """Give the items not yet fed their positions, in order from ``start``; returns the
        position after them."""
        for item in self.items:
            if item.start < 0:
                item.start = start
                start += item.length
        return start

    def held(self, messages: Sequence[tuple[str, str]]) -> int:
        """How many of ``messages`` (role, text) the session already holds: they must be exactly
        its items, in order. Otherwise a ConflictError says which one differs."""
        for i, item in enumerate(self.items):
            if i >= len(messages):
                raise ConflictError(
                    f"the session holds {len(self.items)} messages but the request sends"
                    f" {len(messages)}: send the whole conversation (every earlier message and"
                    " reply, unchanged) followed by the new messages",
                    code="session_history_mismatch",
                )
            role, text = messages[i]
            if self.digest(role, text) != item.digest:
                raise ConflictError(
                    f"messages[{i}] ({role}) differs from the session's message {i}"
                    f" ({item.role}): resend the session's messages unchanged (replies"
                    " exactly as they were returned), or start a new session",
                    code="session_history_mismatch",
                )
        return len(self.items)

    def provenance(
        self, attended: dict[int, float], now: float | None = None, limit: int = PROVENANCE_ITEMS
    ) -> list[dict[str, Any]]:
        """The items a reply leaned on most: ``attended`` maps stored positions to their share of
        the reply's attention; entries of one item are summed and their characters joined."""
        now = time.time() if now is None else now
        by_item: dict[str, dict[str, Any]] = {}
        placed = [it for it in self.items if it.start >= 0]
        starts = [it.start for it in placed]
        for position, share in attended.items():
            i = bisect.bisect_right(starts, position) - 1
            if i < 0 or position - placed[i].start >= placed[i].length:
                continue
            item, index = placed[i], position - placed[i].start
            begin, end = item.span(index, index)
            entry = by_item.setdefault(
                item.id,
                {"item": item, "score": 0.0, "entries": 0, "begin": begin, "end": end},
            )
            entry["score"] += share
            entry["entries"] += 1
            entry["begin"] = min(entry["begin"], begin)
            entry["end"] = max(entry["end"], end)
        ranked = sorted(by_item.values(), key=lambda e: -e["score"])[:limit]
        return [
            {
                "item_id": e["item"].id,
                "role": e["item"].role,
                "span": [e["begin"], e["end"]],
                "score": round(e["score"], 6),
                "entries": e["entries"],
                "age_s": round(max(0.0, now - e["item"].created_at), 3),
            }
            for e in ranked
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "salt": base64.b64encode(self.salt).decode(),
            "items": [it.as_json() for it in self.items if it.start >= 0],
        }

    @classmethod
    def from_json(cls, raw: object) -> Ledger:
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
            raise BankFormatError("state file: malformed item ledger")
        try:
            salt = base64.b64decode(raw["salt"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BankFormatError("state file: malformed item ledger salt") from exc
        return cls([Item.from_json(r) for r in raw["items"]], salt)
