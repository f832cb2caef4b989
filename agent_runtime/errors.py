"""The one exception tree of agent-runtime.

Every error the runtime raises on purpose derives from :class:`AgentRuntimeError`.
Third-party errors (faiss, redis, websockets, aiomqtt, opacus) are translated into
this tree where each library is imported, with ``raise Ours(...) from exc``.

::

    AgentRuntimeError
    ├── ConfigError                 invalid setting; names the setting and the value (fatal at start)
    ├── CheckpointError             missing, corrupt or incompatible model checkpoint
    ├── MemoryBankError             bank misuse or bank-level failure
    │   ├── BankFormatError         torn, truncated, tampered or incompatible bank file
    │   └── BankCapacityError       a write that can never fit (e.g. batch larger than capacity)
    ├── StoreError                  session metadata store (Redis) unavailable or inconsistent
    ├── StorageError                the data directory cannot take a write (disk full, I/O error)
    ├── DataDirLockedError          another process serves this data directory
    ├── BrokerError                 the MQTT broker refused or dropped a connection
    ├── PrivacyError                privacy configuration or accounting failure
    │   └── BudgetExhaustedError    the session's privacy budget is spent
    └── RequestError                recoverable, per-request; sent to the client as an ``error`` event
        ├── ProtocolError           malformed, oversize or unknown frame
        ├── SessionNotFoundError    no such session *for this tenant* (same error either way)
        ├── ConflictError           e.g. a second active response on one session
        ├── AuthenticationError     missing or invalid credentials
        ├── OverloadedError         a limit was hit; carries ``retry_after_ms``
        ├── UnavailableError        the server cannot do it now (storage full, Redis down, unreadable session)
        └── RemoteError             (client side) the server answered with an ``error`` event
    ClientError                     (client side) a failure on the client's side of the socket
    ├── ClientStateError            the client is used in a state that does not allow the call
    ├── DisconnectedError           the connection could not be opened or was lost
    ├── RejectedError               the server refused the handshake (``status_code``)
    └── EventsLostError             events after ``last_seq`` fell out of the server's buffer

``RequestError`` subclasses carry a stable machine-readable ``code`` and keep the
session open; everything else is an operator-facing failure.
"""

from __future__ import annotations

__all__ = [
    "AgentRuntimeError",
    "AuthenticationError",
    "BankCapacityError",
    "BankFormatError",
    "BrokerError",
    "BudgetExhaustedError",
    "CheckpointError",
    "ClientError",
    "ClientStateError",
    "ConfigError",
    "ConflictError",
    "DataDirLockedError",
    "DisconnectedError",
    "EventsLostError",
    "FencedError",
    "MemoryBankError",
    "OverloadedError",
    "PrivacyError",
    "ProtocolError",
    "RejectedError",
    "RemoteError",
    "RequestError",
    "SessionElsewhereError",
    "SessionNotFoundError",
    "StorageError",
    "StoreError",
    "UnavailableError",
]


class AgentRuntimeError(Exception):
    """Root of every error raised by agent-runtime."""


class ConfigError(AgentRuntimeError):
    """An invalid configuration value. The message names the setting and the value."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        self.setting = setting
        self.value = value
        self.reason = reason
        super().__init__(f"invalid setting {setting}={value!r}: {reason}")

    @classmethod
    def check_positive(cls, setting: str, value: float) -> None:
        if value <= 0:
            raise cls(setting, value, "must be > 0")

    @classmethod
    def check_non_negative(cls, setting: str, value: float) -> None:
        if value < 0:
            raise cls(setting, value, "must be >= 0")


class CheckpointError(AgentRuntimeError):
    """A model checkpoint is missing, corrupt or incompatible with this code."""


class MemoryBankError(AgentRuntimeError):
    """A memory bank operation failed."""


class BankFormatError(MemoryBankError):
    """A bank snapshot or log is torn, truncated, tampered or of another format version."""


class BankCapacityError(MemoryBankError):
    """A write can never fit in the bank as configured."""


class StoreError(AgentRuntimeError):
    """The session metadata store failed."""


class StorageError(AgentRuntimeError):
    """A write to the data directory failed (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO``...).

    Whatever was being written is rolled back to its last complete record; ``errno`` is kept.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class FencedError(AgentRuntimeError):
    """A write was refused because the session's storage has seen a newer fencing token: another
    node owns the session now. Nothing was written; this node stops serving the session."""


class DataDirLockedError(AgentRuntimeError):
    """Another agent-runtime process holds the data directory's lock."""


class BrokerError(AgentRuntimeError):
    """The MQTT broker refused or dropped a connection (translated from aiomqtt)."""


class PrivacyError(AgentRuntimeError):
    """Privacy configuration or accounting failed."""


class BudgetExhaustedError(PrivacyError):
    """The privacy budget of a session is spent; no more memories are written."""


class RequestError(AgentRuntimeError):
    """A recoverable, per-request error reported to the client as an ``error`` event.

    Attributes:
        code: stable machine-readable code (``invalid_frame``, ``unknown_event`` ...).
        event_id: the ``event_id`` of the client event that caused it, if known.
    """

    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self, message: str, *, code: str | None = None, event_id: str | None = None
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.event_id = event_id
        self.message = message


class ProtocolError(RequestError):
    """A malformed, oversize or unknown frame."""

    code = "invalid_frame"


class SessionNotFoundError(RequestError):
    """No such session for the authenticated tenant (the same error whether it exists elsewhere or not)."""

    type = "not_found_error"
    code = "session_not_found"


class ConflictError(RequestError):
    """The request conflicts with the session's state (e.g. a response is already active)."""

    type = "conflict_error"
    code = "conflict"


class AuthenticationError(RequestError):
    """Missing or invalid credentials."""

    type = "authentication_error"
    code = "unauthenticated"


class OverloadedError(RequestError):
    """A server or tenant limit was hit; retry after ``retry_after_ms``."""

    type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_ms: int, event_id: str | None = None) -> None:
        super().__init__(message, event_id=event_id)
        self.retry_after_ms = retry_after_ms


class UnavailableError(RequestError):
    """The server cannot serve the request now (its storage is full or failing, Redis is down,
    the session's files cannot be read); the session and connection stay usable."""

    type = "server_error"
    code = "unavailable"


class SessionElsewhereError(RequestError):
    """Another node of the cluster owns the session: the client should go to ``location``
    (the owner's advertised base URL), where the session is served."""

    type = "redirect_error"
    code = "session_elsewhere"

    def __init__(
        self,
        message: str,
        *,
        location: str,
        owner: str,
        retry_after_ms: int | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(message, event_id=event_id)
        self.location = location
        self.owner = owner
        self.retry_after_ms = retry_after_ms
        """How long the owner's lease still runs: should ``location`` not answer (the owner
        died), a node can take the session over after this."""


# -- raised by the client library (agent_runtime.client.agent) ----------------------------------------


class RemoteError(RequestError):
    """The server answered a client event with an ``error`` event.

    Attributes:
        type: error class (``invalid_request_error``, ``conflict_error``, ``overloaded_error``...).
        code: stable machine-readable code (``invalid_value``, ``session_not_found``...).
        message: human-readable explanation from the server.
        event_id: the ``event_id`` of the client event that caused it (None if unknown).
        retry_after_ms: for ``overloaded``, how long to wait before retrying; else None.
        location: for ``session_elsewhere``, the base URL of the node that owns the session.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str = "invalid_request",
        event_id: str | None = None,
        retry_after_ms: int | None = None,
        location: str | None = None,
    ) -> None:
        super().__init__(message, code=code, event_id=event_id)
        self.type = type
        self.retry_after_ms = retry_after_ms
        self.location = location

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ClientError(AgentRuntimeError):
    """A failure on the client's side of the socket."""


class ClientStateError(ClientError):
    """The client is used in a state that does not allow the operation."""


class DisconnectedError(ClientError):
    """The connection could not be opened or was lost; :meth:`agent_runtime.client.agent.AgentClient.reconnect` resumes."""


class RejectedError(ClientError):
    """The server refused the websocket handshake; ``status_code`` says why (401, 403, 503...)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class EventsLostError(ClientError):
    """Events after ``last_seq`` fell out of the server's buffer; the response text has a gap."""
