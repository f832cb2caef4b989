"""The broker's side of tenancy: Mosquitto password-file lines and ACL patterns for tenants.

A tenant's MQTT username is its tenant name and its password is one of its API keys, so one
credential reaches the same tenant over the websocket and over MQTT. The broker checks it
against a ``password_file`` line (Mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, 12-byte salt;
only the salted hash is written) and confines it with ACL patterns to topics under
``{prefix}/{tenant}/``. The bridge connects with its own identity, allowed everything under
``{prefix}/``. ``agent-runtime tenants mqtt-config`` prints these lines (docs/mqtt.md).
"""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = [
    "DEFAULT_PREFIX",
    "acl_lines",
    "broker_config",
    "password_line",
]

DEFAULT_PREFIX = "agent-runtime/v1"
"""The topic prefix (``mqtt.topic_prefix``'s default)."""
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12


def password_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """One ``password_file`` line, as ``mosquitto_passwd -b`` writes it."""
    if not username or ":" in username:
        raise ValueError("an MQTT username must be non-empty and contain no ':'")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, 64)
    encoded = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"{username}:$7${PBKDF2_ITERATIONS}${encoded[0]}${encoded[1]}"


def acl_lines(bridge_user: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The ``acl_file``: the bridge may use every topic under ``prefix``; every other user
    (``%u``, the tenant name) only its own topics, and only in the direction it needs."""
    return [
        "# agent-runtime MQTT bridge ACL (see docs/mqtt.md). %u is the MQTT username = tenant.",
        f"user {bridge_user}",
        f"topic readwrite {prefix}/#",
        "",
        "# every tenant: requests and client events in, its server events and replies out",
        f"pattern write {prefix}/%u/sessions/create",
        f"pattern write {prefix}/%u/sessions/create/msgpack",
        f"pattern write {prefix}/%u/sessions/+/in",
        f"pattern write {prefix}/%u/sessions/+/in/msgpack",
        f"pattern read {prefix}/%u/sessions/+/out",
        f"pattern read {prefix}/%u/sessions/+/out/msgpack",
        f"pattern read {prefix}/%u/replies/#",
        f"pattern read {prefix}/nodes/+/presence",
    ]


def broker_config(port: int, password_file: str, acl_file: str, host: str = "127.0.0.1") -> str:
    """A minimal ``mosquitto.conf`` for the bridge: one authenticated listener, no anonymous
    access, the password file and ACL above."""
    return "\n".join(
        [
            "# agent-runtime: mosquitto.conf (see docs/mqtt.md)",
            "per_listener_settings false",
            f"listener {port} {host}",
            "protocol mqtt",
            "set_tcp_nodelay true",  # one token per message: Nagle's algorithm would add ~40 ms
            "allow_anonymous false",
            f"password_file {password_file}",
            f"acl_file {acl_file}",
            "persistence false",
            "max_queued_messages 1000",
            "",
        ]
    )
