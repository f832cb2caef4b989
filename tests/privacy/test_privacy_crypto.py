"""AES-GCM at rest: session ciphers, wrapped keys, foreign and tampered files, crypto-erasure."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from agent_runtime.errors import BankFormatError, ConfigError, PrivacyError
from memory import MemoryBank, MemoryConfig
from privacy.crypto import MASTER_KEY_ENV, DecryptionError, KeyStore, SessionCipher, tenant_hash

ENV_KEY = {MASTER_KEY_ENV: base64.b64encode(bytes(range(32))).decode()}


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path, env=ENV_KEY)


def test_seal_open_round_trip_with_fresh_nonces(store: KeyStore) -> None:
    cipher = store.session_cipher("acme", "sess_1")
    a, b = cipher.seal(b"payload", b"aad"), cipher.seal(b"payload", b"aad")
    assert a != b and a[:12] != b[:12]
    assert len(a) == 12 + len(b"payload") + 16
    assert cipher.open(a, b"aad") == b"payload"
    assert store.session_cipher("acme", "sess_1").open(b, b"aad") == b"payload"  # key persisted


@pytest.mark.parametrize("position", [0, 11, 12, -1])
def test_any_flipped_byte_fails_authentication(store: KeyStore, position: int) -> None:
    cipher = store.session_cipher("acme", "sess_1")
    sealed = bytearray(cipher.seal(b"some bank record", b"aad"))
    sealed[position] ^= 0x01
    with pytest.raises(DecryptionError, match="authentication"):
        cipher.open(bytes(sealed), b"aad")


def test_other_aad_session_or_tenant_fails_authentication(store: KeyStore) -> None:
    sealed = store.session_cipher("acme", "sess_1").seal(b"x", b"aad")
    with pytest.raises(DecryptionError):
        store.session_cipher("acme", "sess_1").open(sealed, b"other aad")
    with pytest.raises(DecryptionError):
        store.session_cipher("acme", "sess_2").open(sealed, b"aad")
    with pytest.raises(DecryptionError):
        store.session_cipher("globex", "sess_1").open(sealed, b"aad")
    with pytest.raises(DecryptionError, match="truncated"):
        store.session_cipher("acme", "sess_1").open(sealed[:20], b"aad")


def test_same_key_other_identity_still_fails() -> None:
    # Even with an identical data key, tenant and session are bound into the associated data.
    key = os.urandom(32)
    sealed = SessionCipher(key, "acme", "s1").seal(b"x", b"")
    with pytest.raises(DecryptionError):
        SessionCipher(key, "globex", "s1").open(sealed, b"")
    assert "key" not in repr(SessionCipher(key, "a", "b")).replace("<key hidden>", "")


def _bank(directory: Path, cipher: SessionCipher) -> MemoryBank:
    return MemoryBank.open(directory, 8, 4, MemoryConfig(capacity=64), cipher=cipher)


def _fill(bank: MemoryBank, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bank.add(
        rng.standard_normal((n, 8)).astype(np.float32),
        rng.standard_normal((n, 4)).astype(np.float32),
    )


def test_bank_files_of_another_tenant_or_session_are_rejected(
    store: KeyStore, tmp_path: Path
) -> None:
    src = tmp_path / "a" / "bank"
    with _bank(src, store.session_cipher("acme", "s1")) as bank:
        _fill(bank, 10, 0)
        bank.snapshot()
        _fill(bank, 5, 1)
    with _bank(src, store.session_cipher("acme", "s1")) as bank:
        assert len(bank) == 15
    for tenant, session in [("globex", "s1"), ("acme", "s2")]:
        dst = tmp_path / f"{tenant}-{session}" / "bank"
        shutil.copytree(src, dst)
        with pytest.raises(BankFormatError, match="authentication"):
            _bank(dst, store.session_cipher(tenant, session))


def test_tampered_snapshot_with_recomputed_checksum_is_rejected(
    store: KeyStore, tmp_path: Path
) -> None:
    directory = tmp_path / "bank"
    cipher = store.session_cipher("acme", "s1")
    with _bank(directory, cipher) as bank:
        _fill(bank, 10, 0)
        bank.snapshot()
    snap = next(directory.glob("snapshot-*.bank"))
    data = bytearray(snap.read_bytes())
    data[60] ^= 0xFF  # inside the sealed body
    # An attacker can recompute the unkeyed trailer; only the AEAD stops them.
    data[-16:] = hashlib.blake2b(bytes(data[:-16]), digest_size=16).digest()
    snap.write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match="fails authentication"):
        _bank(directory, cipher)


def test_key_files_copied_to_another_identity_fail_to_unwrap(
    store: KeyStore, tmp_path: Path
) -> None:
    store.session_cipher("acme", "s1")
    store.session_cipher("globex", "s1")
    keys = tmp_path / "keys"
    a_session = keys / "sessions" / tenant_hash("acme") / "s1.key"
    b_session = keys / "sessions" / tenant_hash("globex") / "s1.key"
    shutil.copy(a_session, keys / "sessions" / tenant_hash("acme") / "s2.key")
    with pytest.raises(DecryptionError, match="session key file"):
        KeyStore(tmp_path, env=ENV_KEY).session_cipher("acme", "s2")
    shutil.copy(a_session, b_session)
    with pytest.raises(DecryptionError):
        KeyStore(tmp_path, env=ENV_KEY).session_cipher("globex", "s1")
    tenants = keys / "tenants"
    shutil.copy(tenants / f"{tenant_hash('acme')}.key", tenants / f"{tenant_hash('globex')}.key")
    with pytest.raises(DecryptionError, match="tenant key file"):
        KeyStore(tmp_path, env=ENV_KEY).session_cipher("globex", "s9")


def test_tampered_key_file_fails_to_unwrap(store: KeyStore, tmp_path: Path) -> None:
    store.session_cipher("acme", "s1")
    path = tmp_path / "keys" / "sessions" / tenant_hash("acme") / "s1.key"
    path.write_bytes(path.read_bytes().replace(b'"wrapped": "', b'"wrapped": "AAAA'))
    with pytest.raises(DecryptionError):
        KeyStore(tmp_path, env=ENV_KEY).session_cipher("acme", "s1")


def test_another_master_key_cannot_open_tenant_keys(store: KeyStore, tmp_path: Path) -> None:
    store.session_cipher("acme", "s1")
    other = {MASTER_KEY_ENV: base64.b64encode(b"\x01" * 32).decode()}
    with pytest.raises(DecryptionError, match="master key"):
        KeyStore(tmp_path, env=other).session_cipher("acme", "s1")


def test_master_key_file_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    a = KeyStore(tmp_path, env={})
    path = tmp_path / "keys" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    sealed = a.session_cipher("acme", "s1").seal(b"x", b"")
    assert KeyStore(tmp_path, env={}).session_cipher("acme", "s1").open(sealed, b"") == b"x"
    assert KeyStore(tmp_path, env={}).derive_secret("tickets") == a.derive_secret("tickets")
    assert a.derive_secret("tickets") != a.derive_secret("other")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyStore(tmp_path, env={})


def test_bad_master_key_env_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secretish = base64.b64encode(b"short-but-secret").decode()
    with pytest.raises(ConfigError, match=MASTER_KEY_ENV) as info:
        KeyStore(tmp_path, env={MASTER_KEY_ENV: secretish})
    assert secretish not in str(info.value)


def test_destroyed_session_key_makes_the_bank_unreadable(store: KeyStore, tmp_path: Path) -> None:
    directory = tmp_path / "bank"
    with _bank(directory, store.session_cipher("acme", "s1")) as bank:
        _fill(bank, 10, 0)
        bank.snapshot()
    assert store.destroy_session_key("acme", "s1")
    assert not store.has_session_key("acme", "s1")
    assert not store.destroy_session_key("acme", "s1")
    with pytest.raises(PrivacyError, match="no data key"):
        store.session_cipher("acme", "s1", create=False)
    with pytest.raises(BankFormatError):  # a new key cannot open the old ciphertexts
        _bank(directory, store.session_cipher("acme", "s1"))


@pytest.mark.parametrize("session_id", ["../escape", "a/b", "", "x" * 129, "s p"])
def test_unsafe_session_ids_are_refused(store: KeyStore, session_id: str) -> None:
    with pytest.raises(PrivacyError, match="session id"):
        store.session_cipher("acme", session_id)


def test_atomic_create_never_replaces_an_existing_key_file(tmp_path: Path) -> None:
    from agent_runtime.files import atomic_create

    path = tmp_path / "k.key"
    assert atomic_create(path, b"first")
    assert not atomic_create(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporaries left behind
