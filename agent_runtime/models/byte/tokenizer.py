"""Byte-level tokenizer with chat role tokens: any text works and nothing is downloaded.

Ids 0..255 are the UTF-8 bytes; the role tokens follow. A conversation is encoded as::

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

and a reply is complete when the model emits ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ASSISTANT",
    "END",
    "ROLES",
    "SYSTEM",
    "USER",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "encode_turn",
]

SYSTEM = 256
USER = 257
ASSISTANT = 258
END = 259
VOCAB_SIZE = 260
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_NAMES = {SYSTEM: "<|system|>", USER: "<|user|>", ASSISTANT: "<|assistant|>", END: "<|end|>"}


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8"))


def encode_turn(role: str, text: str) -> list[int]:
    """One complete conversation item: role token, text, end token."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    return [ROLES[role], *encode(text), END]


def decode(ids: Iterable[int], *, special: bool = False) -> str:
    """Text of byte ids; role tokens are dropped (or rendered, with ``special``)."""
    out = bytearray()
    parts: list[str] = []
    for i in ids:
        if i < 256:
            out.append(i)
        elif special:
            parts.append(out.decode("utf-8", errors="replace"))
            out.clear()
            parts.append(_NAMES.get(i, f"<|{i}|>"))
    parts.append(out.decode("utf-8", errors="replace"))
    return "".join(parts)


class Utf8Stream:
    """Turns a stream of byte ids into text deltas without splitting multi-byte characters."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def push(self, token: int) -> str:
        if token >= 256:
            return ""
        self._buf.append(token)
        try:
            text = self._buf.decode("utf-8")
        except UnicodeDecodeError as exc:
            # An incomplete sequence at the end waits for more bytes; a broken one is replaced.
            if exc.reason == "unexpected end of data" and len(self._buf) < 4:
                return ""
            text = self._buf.decode("utf-8", errors="replace")
        self._buf.clear()
        return text

    def flush(self) -> str:
        text = self._buf.decode("utf-8", errors="replace")
        self._buf.clear()
        return text
