"""Fixtures for the memory bank tests: a fake clock and a test-only cipher (no imports from here)."""

from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np
import pytest


class FakeClock:
    """A settable clock (seconds); banks under test never read the real time."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class XorHmacCipher:
    """Test-only AEAD stand-in: XOR with a key-derived pad, then an HMAC over aad + ciphertext.

    Not secure (the pad repeats); it only has the contract of ``memory.Cipher``: ``open``
    raises when the ciphertext, the aad or the key differs.
    """

    def __init__(self, key: bytes = b"k" * 32) -> None:
        self.key = key

    def _pad(self, nonce: bytes, n: int) -> np.ndarray:
        block = np.frombuffer(hashlib.sha512(self.key + nonce).digest() * 64, np.uint8)
        return np.resize(block, n)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(16)
        ct = (np.frombuffer(plaintext, np.uint8) ^ self._pad(nonce, len(plaintext))).tobytes()
        tag = hmac.new(self.key, aad + nonce + ct, hashlib.sha256).digest()
        return nonce + ct + tag

    def open(self, ciphertext: bytes, aad: bytes) -> bytes:
        nonce, ct, tag = ciphertext[:16], ciphertext[16:-32], ciphertext[-32:]
        if not hmac.compare_digest(
            tag, hmac.new(self.key, aad + nonce + ct, hashlib.sha256).digest()
        ):
            raise ValueError("authentication failed")
        return (np.frombuffer(ct, np.uint8) ^ self._pad(nonce, len(ct))).tobytes()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cipher() -> XorHmacCipher:
    return XorHmacCipher()
