"""Erasure reaches every store; noised keys never leave raw key bytes on disk."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from memory import MemoryBank, MemoryConfig
from privacy.audit import AuditLog, verify
from privacy.config import PrivacyConfig
from privacy.crypto import MASTER_KEY_ENV, KeyStore, SessionCipher
from privacy.erasure import erase_session, session_directory
from privacy.session import SessionPrivacy
from tests.conftest import external_redis_available

ENV = {MASTER_KEY_ENV: base64.b64encode(b"k" * 32).decode()}
KEY_DIM, VALUE_DIM = 16, 12  # 48 value bytes hold a whole sentinel


def _scan(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _sentinel_vector(sentinel: bytes) -> np.ndarray:
    """Values whose float32 bytes spell the sentinel (so a plaintext bank would leak it)."""
    padded = sentinel.ljust(VALUE_DIM * 4, b"\0")[: VALUE_DIM * 4]
    return np.frombuffer(padded, np.float32).reshape(1, VALUE_DIM).copy()


def _make_session(
    data_dir: Path, keystore: KeyStore, tenant: str, sid: str, sentinel: bytes
) -> Path:
    directory = session_directory(data_dir, tenant, sid)
    cipher = keystore.session_cipher(tenant, sid)
    values = np.repeat(_sentinel_vector(sentinel), 4, axis=0)  # ASCII bytes: finite floats
    keys = np.random.default_rng(0).standard_normal((4, KEY_DIM)).astype(np.float32)
    privacy = SessionPrivacy.open(directory, PrivacyConfig(noise_sigma=1.0), seed=0)
    with MemoryBank.open(
        directory / "bank", KEY_DIM, VALUE_DIM, MemoryConfig(capacity=64), cipher=cipher
    ) as bank:
        bank.add(privacy.protect(keys), values)
        bank.snapshot()  # a generation on disk, and a log after it
        bank.add(privacy.protect(keys), values)
    # Plaintext per-session files the server keeps (generation state, transcript-like data).
    (directory / "state.pt").write_bytes(b"state:" + sentinel)
    (directory / "nested").mkdir()
    (directory / "nested" / "turns.jsonl").write_bytes(b'{"text":"' + sentinel + b'"}\n')
    return directory


@pytest.fixture
async def redis() -> AsyncIterator[object]:
    if not external_redis_available():
        pytest.skip("needs a Redis on 127.0.0.1:6379")
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=6379)
    prefix = f"privacy-test-{uuid.uuid4().hex}"
    client.test_prefix = prefix  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_erasure_leaves_no_trace_and_spares_other_tenants(
    tmp_path: Path, redis: object
) -> None:
    import redis.asyncio as aioredis

    assert isinstance(redis, aioredis.Redis)
    prefix: str = redis.test_prefix  # type: ignore[attr-defined]
    data_dir = tmp_path / "data"
    keystore = KeyStore(data_dir, env=ENV)
    audit = AuditLog(data_dir / "audit.log")
    secret_a = f"SENTINEL-{uuid.uuid4().hex}".encode()
    secret_b = f"SENTINEL-{uuid.uuid4().hex}".encode()
    victim = _make_session(data_dir, keystore, "acme", "sess_a", secret_a)
    _make_session(data_dir, keystore, "acme", "sess_keep", secret_b)
    other = _make_session(data_dir, keystore, "globex", "sess_a", secret_b)
    redis_keys = [f"{prefix}:session:sess_a", f"{prefix}:tenant:acme:sessions"]
    await redis.hset(redis_keys[0], mapping={"tenant": "acme", "note": secret_a})
    await redis.sadd(redis_keys[1], "sess_a")
    await redis.set(f"{prefix}:session:other", secret_b)
    audit.append("acme", "create", "sess_a")

    # The test is meaningful: the sentinel is on disk in plaintext files, and only there
    # (the bank holds it in its values too, but sealed).
    assert {p.name for p in _scan(data_dir, secret_a)} == {"state.pt", "turns.jsonl"}
    before_other = _digests(data_dir / "sessions" / other.parent.name)
    before_keep = _digests(victim.parent / "sess_keep")

    async def delete_keys(keys: list[str]) -> None:
        await redis.delete(*keys)

    report = await erase_session(
        data_dir, "acme", "sess_a", keystore, delete_keys, redis_keys, audit=audit
    )

    assert report.key_destroyed and report.files >= 5 and report.redis_keys == 2
    assert _scan(data_dir, secret_a) == []
    assert not victim.exists()
    assert not keystore.has_session_key("acme", "sess_a")
    assert _digests(data_dir / "sessions" / other.parent.name) == before_other
    assert _digests(victim.parent / "sess_keep") == before_keep
    assert keystore.has_session_key("globex", "sess_a")
    cipher = keystore.session_cipher("globex", "sess_a")
    with MemoryBank.open(
        other / "bank", KEY_DIM, VALUE_DIM, MemoryConfig(capacity=64), cipher=cipher
    ) as bank:
        assert len(bank) == 8
    remaining = [k async for k in redis.scan_iter(f"{prefix}:*")]
    assert remaining == [f"{prefix}:session:other".encode()]
    for key in remaining:
        assert secret_a not in (await redis.dump(key) or b"")
    ok, _ = verify(data_dir / "audit.log")
    assert ok
    last = (data_dir / "audit.log").read_bytes().splitlines()[-1]
    assert b'"action":"erase"' in last and b'"ok":true' in last

    again = await erase_session(data_dir, "acme", "sess_a", keystore, delete_keys, redis_keys)
    assert (again.key_destroyed, again.files) == (False, 0)


async def test_failed_step_is_audited_and_raised(tmp_path: Path) -> None:
    from agent_runtime.errors import PrivacyError

    data_dir = tmp_path / "data"
    keystore = KeyStore(data_dir, env=ENV)
    _make_session(data_dir, keystore, "acme", "sess_a", b"SENTINEL-x")
    audit = AuditLog(data_dir / "audit.log")

    async def broken(keys: list[str]) -> None:
        raise ConnectionError("redis is down")

    with pytest.raises(PrivacyError, match="incomplete"):
        await erase_session(data_dir, "acme", "sess_a", keystore, broken, ["k"], audit=audit)
    assert not keystore.has_session_key("acme", "sess_a")  # the key went first
    assert b'"ok":false' in (data_dir / "audit.log").read_bytes()


def _raw_rows(keys: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in keys.astype(np.float32)] + [
        row[:2].tobytes() for row in keys.astype(np.float32)
    ]


def _write_bank(directory: Path, keys: np.ndarray, cipher: SessionCipher | None) -> None:
    values = np.zeros((keys.shape[0], VALUE_DIM), np.float32)
    with MemoryBank.open(
        directory, KEY_DIM, VALUE_DIM, MemoryConfig(capacity=256), cipher=cipher
    ) as bank:
        bank.add(keys[:32], values[:32])
        bank.snapshot()
        bank.add(keys[32:], values[32:])


@pytest.mark.parametrize("encrypted", [False, True])
def test_noised_banks_hold_no_raw_key_bytes(tmp_path: Path, encrypted: bool) -> None:
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((64, KEY_DIM)).astype(np.float32)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)  # unit keys, as the model writes them
    cipher = KeyStore(tmp_path, env=ENV).session_cipher("acme", "s1") if encrypted else None

    # Control: without noise, a plaintext bank does contain the raw rows (the scan works).
    if not encrypted:
        _write_bank(tmp_path / "plain", raw, None)
        assert all(_scan(tmp_path / "plain", row) for row in _raw_rows(raw)[:64])

    privacy = SessionPrivacy.open(tmp_path / "s1", PrivacyConfig(noise_sigma=0.5, clip_norm=1.0))
    noised = privacy.protect(raw)
    _write_bank(tmp_path / "s1" / "bank", noised, cipher)
    for row in _raw_rows(raw):
        assert _scan(tmp_path / "s1", row) == []
    if encrypted:  # encryption also hides the stored (noised) keys
        for row in _raw_rows(noised)[:64]:
            assert _scan(tmp_path / "s1", row) == []
