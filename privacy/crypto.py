"""Encryption at rest: AES-GCM session ciphers and a three-level key hierarchy on disk.

::

    master key (32 B)  env AGENT_RUNTIME_MASTER_KEY (base64), else <data>/keys/master.key (0600)
      └── tenant key (32 B, random)    <data>/keys/tenants/<th>.key           wrapped by master
            └── session data key (32 B) <data>/keys/sessions/<th>/<sid>.key   wrapped by tenant

``th`` is ``sha256(tenant)[:24]``, as in the session directories. Every wrap is AES-GCM with
the key's identity (kind, tenant, session) in the associated data, so a key file copied to
another tenant's or session's name fails to unwrap. A :class:`SessionCipher` binds tenant
and session into the associated data of every seal as well, so bank files copied between
sessions fail authentication.

Crypto-erasure: :meth:`KeyStore.destroy_session_key` deletes the only wrapped copy of the
session's data key; every ciphertext of that session is then unreadable, including copies
the file deletion cannot reach (unless a backup also kept the key file; see docs/privacy.md).

Failures raise :class:`DecryptionError` (a PrivacyError); key files are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent_runtime.errors import ConfigError, PrivacyError
from agent_runtime.files import atomic_create, ensure_private_dir, fsync_dir
from agent_runtime.layout import check_session_id, tenant_hash

__all__ = [
    "MASTER_KEY_ENV",
    "DecryptionError",
    "KeyStore",
    "SessionCipher",
    "check_session_id",
    "tenant_hash",
]

MASTER_KEY_ENV = "AGENT_RUNTIME_MASTER_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_VERSION = 1


class DecryptionError(PrivacyError):
    """Encrypted data or a wrapped key fails authentication: tampered, foreign or wrong key.

    Proposed home: ``agent_runtime.errors`` under ``PrivacyError``.
    """


def _identity(*parts: str) -> bytes:
    """Unambiguous encoding of identity strings (length-prefixed) for associated data."""
    out = [b"agent-runtime/v1"]
    for p in parts:
        raw = p.encode()
        out.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(out)


class SessionCipher:
    """AES-256-GCM for one session; implements ``memory.persist.Cipher``.

    ``seal`` output is ``nonce (12 B) || ciphertext || tag (16 B)`` with a fresh random
    96-bit nonce; the associated data is (tenant, session, caller's aad). ``open`` raises
    DecryptionError when any byte, the aad, the tenant, the session or the key differs.
    Random nonces are safe for well over 2**32 seals per key in practice; a session that
    wrote more records than that should be re-keyed (not needed at our record rates).
    """

    def __init__(self, data_key: bytes, tenant: str, session_id: str) -> None:
        if len(data_key) != KEY_BYTES:
            raise PrivacyError(f"data key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(data_key)
        self._prefix = _identity("session-data", tenant, session_id)
        self.tenant = tenant
        self.session_id = session_id

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, self._prefix + aad)

    def open(self, ciphertext: bytes, aad: bytes) -> bytes:
        if len(ciphertext) < NONCE_BYTES + 16:
            raise DecryptionError("ciphertext is truncated")
        try:
            return self._aead.decrypt(
                ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], self._prefix + aad
            )
        except InvalidTag as exc:
            raise DecryptionError(
                "ciphertext fails authentication (tampered, or another tenant's or session's)"
            ) from exc

    def __repr__(self) -> str:  # never show key material
        return "SessionCipher(<key hidden>)"


def _wrap(kek: bytes, key: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    body = {
        "format_version": KEY_FILE_VERSION,
        "alg": "AES-256-GCM",
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped": base64.b64encode(AESGCM(kek).encrypt(nonce, key, aad)).decode(),
    }
    return (json.dumps(body) + "\n").encode()


def _unwrap(kek: bytes, raw: bytes, aad: bytes, what: str) -> bytes:
    try:
        body = json.loads(raw)
        if body["format_version"] != KEY_FILE_VERSION:
            raise DecryptionError(f"{what}: key file format {body['format_version']} unsupported")
        nonce = base64.b64decode(body["nonce"], validate=True)
        wrapped = base64.b64decode(body["wrapped"], validate=True)
        key = AESGCM(kek).decrypt(nonce, wrapped, aad)
    except DecryptionError:
        raise
    except (InvalidTag, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DecryptionError(
            f"{what} fails authentication (tampered, foreign, or another master key)"
        ) from exc
    if len(key) != KEY_BYTES:
        raise DecryptionError(f"{what} has the wrong length")
    return key


class KeyStore:
    """Creates, loads and destroys wrapped keys under ``<data_dir>/keys``.

    The master key comes from ``env[AGENT_RUNTIME_MASTER_KEY]`` (base64 of 32 bytes) when
    set; otherwise from ``<data_dir>/keys/master.key``, created 0600 on first use. The file
    is convenient but sits next to the data it protects: anyone who copies the whole data
    directory can decrypt it. Supplying the key from a secret manager through the env var
    keeps a stolen disk or backup unreadable.

    Key files are created with an atomic create-if-absent (:func:`atomic_create`) and read
    back, so concurrent creators (threads, processes, nodes on shared storage with POSIX
    ``link``) always agree on one key.
    """

    def __init__(self, data_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.root = Path(data_dir) / "keys"
        self._master = self._load_master(os.environ if env is None else env)
        self._tenant_keys: dict[str, bytes] = {}

    # -- master and tenant keys --------------------------------------------------------------

    def _load_master(self, env: Mapping[str, str]) -> bytes:
        supplied = env.get(MASTER_KEY_ENV)
        if supplied:
            try:
                key = base64.b64decode(supplied.strip(), validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != KEY_BYTES:  # the value is secret: never echo it
                raise ConfigError(MASTER_KEY_ENV, "<redacted>", "must be base64 of 32 bytes")
            return key
        ensure_private_dir(self.root)
        path = self.root / "master.key"
        if not path.exists():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process created it first: use theirs
            else:
                try:
                    os.write(fd, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self.root)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                str(path),
                oct(mode),
                "master key file must not be group/world accessible (chmod 600)",
            )
        try:
            key = base64.b64decode(path.read_bytes().strip(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ConfigError(str(path), "<redacted>", "must hold base64 of 32 bytes")
        return key

    def _tenant_key(self, tenant: str) -> bytes:
        cached = self._tenant_keys.get(tenant)
        if cached is not None:
            return cached
        path = ensure_private_dir(self.root / "tenants") / f"{tenant_hash(tenant)}.key"
        aad = _identity("tenant-key", tenant)
        if not path.exists():
            atomic_create(path, _wrap(self._master, os.urandom(KEY_BYTES), aad))
        key = _unwrap(self._master, path.read_bytes(), aad, "tenant key file")
        self._tenant_keys[tenant] = key
        return key

    def derive_secret(self, label: str) -> bytes:
        """A 32-byte secret derived from the master key (HKDF-SHA256), stable across nodes.

        Use it for server-wide MACs, e.g. ``TicketIssuer(keystore.derive_secret("tickets"))``.
        """
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_identity("derive", label)
        )
        return hkdf.derive(self._master)

    # -- session data keys -------------------------------------------------------------------

    def _session_path(self, tenant: str, session_id: str) -> Path:
        return self.root / "sessions" / tenant_hash(tenant) / f"{check_session_id(session_id)}.key"

    def has_session_key(self, tenant: str, session_id: str) -> bool:
        return self._session_path(tenant, session_id).exists()

    def session_cipher(self, tenant: str, session_id: str, *, create: bool = True) -> SessionCipher:
        """The session's cipher, creating its data key on first use when ``create``.

        Raises:
            DecryptionError: a key file fails to unwrap (tampered or foreign).
            PrivacyError: no key and ``create`` is false (e.g. the session was erased).
        """
        path = self._session_path(tenant, session_id)
        aad = _identity("session-key", tenant, session_id)
        if not path.exists():
            if not create:
                raise PrivacyError("no data key for this session (erased or never created)")
            tenant_key = self._tenant_key(tenant)
            ensure_private_dir(path.parent)
            atomic_create(path, _wrap(tenant_key, os.urandom(KEY_BYTES), aad))
        data_key = _unwrap(self._tenant_key(tenant), path.read_bytes(), aad, "session key file")
        return SessionCipher(data_key, tenant, session_id)

    def destroy_session_key(self, tenant: str, session_id: str) -> bool:
        """Crypto-erase a session: delete its wrapped data key durably. True if one existed.

        Live :class:`SessionCipher` objects keep working until dropped; close the session's
        bank before calling this.
        """
        path = self._session_path(tenant, session_id)
        try:
            # Overwrite first: cheap for a ~200-byte file, and it removes the wrapped key from
            # the block even where unlink alone would leave it (best effort on SSDs/CoW).
            with open(path, "r+b") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.write(b"\0" * size)
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True
