"""Runtime configuration: one documented dataclass per component, composed into :class:`RuntimeConfig`.

Every field is settable four ways, with precedence CLI > environment > TOML file > default:

* CLI flag ``--<section>-<field>`` (``--host``/``--port``/``--data-dir``... for the server and
  store sections, which have no prefix), dashes for underscores;
* env var ``AGENT_RUNTIME_<SECTION>_<FIELD>`` (``AGENT_RUNTIME_<FIELD>`` without prefix);
* a TOML file (``--config PATH`` or ``AGENT_RUNTIME_CONFIG``) with one table per section;
* the dataclass default, documented by the string literal under each field.

Invalid values fail at start with :class:`~agent_runtime.errors.ConfigError` naming the setting
and the value. Fields marked secret are redacted by :func:`redacted`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import os
import textwrap
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from agent_runtime.errors import ConfigError
from memory.config import MemoryConfig
from privacy.config import PrivacyConfig

__all__ = [
    "ClusterConfig",
    "EngineConfig",
    "GenerationConfig",
    "MqttConfig",
    "PrivacyConfig",
    "RedisTarget",
    "RuntimeConfig",
    "ServerConfig",
    "StoreConfig",
    "add_arguments",
    "field_docs",
    "load_config",
    "parse_redis_url",
    "redacted",
]

ENV_PREFIX = "AGENT_RUNTIME_"
DEFAULT_MODEL = "smollm2-135m-recall"
"""What ``serve`` serves when no model is named (docs/models.md, "The default")."""
BUNDLED_MODEL = "bundled"
"""``--model`` value for the byte model bundled with the package (``engine.checkpoint``'s when set)."""
AUTO_MEMORY_FROM = 0.2
"""``engine.memory_layers = auto``: memory on the layers from this fraction of the depth up."""


@dataclass
class ServerConfig:
    """The websocket/HTTP server."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; binding elsewhere requires tenant authentication."""
    port: int = 8765
    """TCP port (0 picks a free one)."""
    max_frame_bytes: int = 1_048_576
    """Largest accepted websocket frame; bigger frames get an ``invalid_frame`` error."""
    max_message_chars: int = 32_768
    """Largest accepted text of one conversation item."""
    max_sessions: int = 1024
    """Live sessions per server; past it ``session.create`` gets ``overloaded``."""
    max_sessions_per_tenant: int = 256
    """Live sessions per tenant on this server; past it ``session.create`` gets ``overloaded``."""
    disconnect_grace_s: float = 10.0
    """After a client disconnects mid-response, generation continues this long for a resume; then it is cancelled."""
    idle_unload_s: float = 300.0
    """A session with no client and no response for this long is snapshotted and unloaded (resumable)."""
    event_buffer: int = 4096
    """Server events kept per session for ``session.resume`` with ``last_seq``."""
    shutdown_timeout_s: float = 10.0
    """On SIGTERM/SIGINT, how long active responses may drain before they are cut."""
    auth: str = "auto"
    """Tenant authentication: ``required``, ``none`` (loopback only), or ``auto`` (required once a tenant exists)."""
    allowed_origins: str = ""
    """Comma-separated public origins of pages allowed to connect (``https://chat.example.com``); the server's own bind address always is."""

    def validate(self) -> None:
        if not self.host:
            raise ConfigError("server.host", self.host, "must not be empty")
        if self.auth not in ("auto", "required", "none"):
            raise ConfigError("server.auth", self.auth, "must be auto, required or none")
        if self.auth != "required" and not is_loopback(self.host):
            raise ConfigError(
                "server.host",
                self.host,
                "binding beyond loopback requires --auth required (tenant API keys)",
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError("server.port", self.port, "must be in 0..65535")
        ConfigError.check_positive("server.max_frame_bytes", self.max_frame_bytes)
        ConfigError.check_positive("server.max_message_chars", self.max_message_chars)
        ConfigError.check_positive("server.max_sessions", self.max_sessions)
        ConfigError.check_positive("server.max_sessions_per_tenant", self.max_sessions_per_tenant)
        ConfigError.check_non_negative("server.disconnect_grace_s", self.disconnect_grace_s)
        ConfigError.check_positive("server.idle_unload_s", self.idle_unload_s)
        ConfigError.check_positive("server.event_buffer", self.event_buffer)
        ConfigError.check_non_negative("server.shutdown_timeout_s", self.shutdown_timeout_s)


@dataclass
class StoreConfig:
    """Where data lives: the data directory and the session metadata store (Redis)."""

    data_dir: str = "./agent-runtime-data"
    """Directory holding bank snapshots, logs and the embedded Redis database."""
    redis_url: str = field(default="", metadata={"secret": True})
    """External Redis: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS, ``unix://``), a Sentinel group ``redis+sentinel://[:password@]host:port[,host:port...]/<service>[/db]`` or a Redis Cluster ``redis+cluster://[:password@]host:port[,host:port...]`` (``rediss+...`` for TLS); empty starts an embedded Redis in the data dir."""
    session_ttl_s: float = 7 * 24 * 3600.0
    """Sliding TTL of a session's metadata in Redis, refreshed on every activity."""
    key_prefix: str = "agent-runtime"
    """Prefix of every Redis key, so several deployments can share one Redis."""

    def validate(self) -> None:
        if not self.data_dir:
            raise ConfigError("store.data_dir", self.data_dir, "must not be empty")
        if self.redis_url:
            parse_redis_url(self.redis_url)
        ConfigError.check_positive("store.session_ttl_s", self.session_ttl_s)
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(
                "store.key_prefix", self.key_prefix, "must be non-empty without whitespace"
            )


@dataclass
class EngineConfig:
    """The inference engine: model checkpoint, device, batching."""

    checkpoint: str = ""
    """Byte-model checkpoint to serve (with ``engine.model`` empty or ``bundled``); empty: the one bundled with the package."""
    model: str = field(default="", metadata={"alias": "--model"})
    """Model to serve: a registry name (``agent-runtime models list``; fetched on first use), a GGUF file, a model directory, or ``bundled`` (the bundled byte model). Empty: ``smollm2-135m-recall``, or the byte model when ``engine.checkpoint`` is set."""
    dtype: str = "float32"
    """Weights and activations of a pretrained decoder: ``float32``, ``bfloat16`` or ``float16``."""
    vector_dtype: str = "auto"
    """A second copy of a pretrained decoder's weights for steps of at most 4 rows (up to 4 sessions decoding, short prefill chunks), read row by row, where half precision is faster on a CPU: ``auto`` (``float16`` on a CPU with ``dtype`` float32, else none), ``none``, ``float16`` or ``bfloat16`` (these two on a CPU only)."""
    memory_layers: str = "auto"
    """Layers of a pretrained decoder that read and write the kNN memory: ``auto`` (the upper 80 %: 6-29 of SmolLM2's 30), ``all``, ``none``, or indices and ranges (``4,8,12``, ``15-29``)."""
    memory_window: int = 512
    """Tokens of local attention a pretrained decoder always keeps (a multiple of ``memory_block``)."""
    memory_block: int = 64
    """Tokens a pretrained decoder moves from its window to the bank at once."""
    memory_k: int = 4
    """Memories each query head of a pretrained decoder retrieves per token (each with ``memory_span`` neighbours on each side)."""
    memory_span: int = 16
    """Neighbours on each side that come back with every memory a pretrained decoder retrieves: a fact comes back with the words around it (InfLLM-style blocks; ``memory_k`` x (2 x span + 1) entries per head)."""
    memory_sink: int = 0
    """A pretrained decoder's first tokens kept in attention for the whole conversation (attention sinks)."""
    memory_exact: bool = False
    """Retrieved memories at their true positions (verification: with all layers and a large k it equals full attention)."""
    device: str = "cpu"
    """Torch device for the model (``cpu``, ``cuda``, ``cuda:1``)."""
    max_batch: int = 32
    """Most sessions decoded together in one model step (continuous batching)."""
    max_queue: int = 256
    """Most responses waiting for a batch slot; past it ``response.create`` gets ``overloaded``."""
    batching: bool = True
    """Decode all running sessions in one batched step (off: one forward per session, for comparison)."""
    torch_threads: int = 0
    """Intra-op threads for torch (0 keeps torch's default)."""
    seed: int = 0
    """Seed for weight initialisation when no checkpoint exists and for default sampling."""

    def validate(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("engine.device", self.device, "must be cpu or cuda[:N]")
        ConfigError.check_positive("engine.max_batch", self.max_batch)
        ConfigError.check_positive("engine.max_queue", self.max_queue)
        ConfigError.check_non_negative("engine.torch_threads", self.torch_threads)
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ConfigError("engine.checkpoint", self.checkpoint, "no such file")
        if self.checkpoint and self.model and not self._bundled():
            raise ConfigError(
                "engine.model",
                self.model,
                f"engine.checkpoint is a byte model: give --model {BUNDLED_MODEL} or no model with it",
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("engine.dtype", self.dtype, "must be float32, bfloat16 or float16")
        if self.vector_dtype not in ("auto", "none", "float16", "bfloat16"):
            raise ConfigError(
                "engine.vector_dtype", self.vector_dtype, "must be auto, none, float16 or bfloat16"
            )
        if self.device != "cpu" and self.vector_dtype not in ("auto", "none", self.dtype):
            raise ConfigError(
                "engine.vector_dtype",
                self.vector_dtype,
                f"is for a CPU only (on {self.device}, set engine.dtype instead: a second copy of"
                " the weights there costs memory and gains nothing)",
            )
        self.memory_layer_indices(None)
        ConfigError.check_positive("engine.memory_block", self.memory_block)
        if self.memory_window < self.memory_block or self.memory_window % self.memory_block:
            raise ConfigError(
                "engine.memory_window",
                self.memory_window,
                "must be a multiple of engine.memory_block",
            )
        ConfigError.check_non_negative("engine.memory_k", self.memory_k)
        ConfigError.check_non_negative("engine.memory_sink", self.memory_sink)
        ConfigError.check_non_negative("engine.memory_span", self.memory_span)

    def vector_weights(self) -> str | None:
        """The dtype of the one-token weight copies ``vector_dtype`` asks for (None: none)."""
        if self.vector_dtype == "auto":
            return "float16" if self.device == "cpu" and self.dtype == "float32" else None
        if self.vector_dtype == "none" or self.vector_dtype == self.dtype:
            return None
        return self.vector_dtype

    def pretrained(self) -> str:
        """The pretrained decoder to serve (a registry name, file or directory), or ``""`` for
        the byte model (``engine.checkpoint``'s, else the bundled one)."""
        if self._bundled() or (not self.model and self.checkpoint):
            return ""
        return self.model or DEFAULT_MODEL

    def _bundled(self) -> bool:
        return self.model.strip().lower() == BUNDLED_MODEL

    def memory_layer_indices(self, num_layers: int | None) -> tuple[int, ...]:
        """``memory_layers`` as indices (``num_layers`` None: syntax check only)."""
        text = self.memory_layers.strip().lower()
        if text == "all":
            return tuple(range(num_layers or 0))
        if text == "auto":  # the lowest layers barely attend to memory (docs/models.md)
            return tuple(range(round(AUTO_MEMORY_FROM * (num_layers or 0)), num_layers or 0))
        if text in ("none", ""):
            return ()
        indices: tuple[int, ...] = ()
        try:
            for part in text.split(","):
                first, dash, last = part.strip().partition("-")
                if dash and (not first.strip() or int(last) < int(first)):
                    raise ValueError(part)
                indices += tuple(range(int(first), int(last) + 1)) if dash else (int(first),)
        except ValueError:
            raise ConfigError(
                "engine.memory_layers",
                self.memory_layers,
                "must be all, none or layer indices and ranges like 4,8,12 or 15-29",
            ) from None
        if any(i < 0 or (num_layers is not None and i >= num_layers) for i in indices) or len(
            set(indices)
        ) != len(indices):
            bound = f" below {num_layers}" if num_layers is not None else ""
            raise ConfigError(
                "engine.memory_layers", self.memory_layers, f"must be distinct indices >= 0{bound}"
            )
        return indices


@dataclass
class GenerationConfig:
    """Default sampling parameters of a response (a ``response.create`` may override them)."""

    max_tokens: int = 256
    """Default most tokens generated in one response."""
    max_tokens_limit: int = 8192
    """Ceiling on ``max_tokens`` a client may ask for; larger requests get ``invalid_value``."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""

    def validate(self) -> None:
        ConfigError.check_positive("generation.max_tokens", self.max_tokens)
        if self.max_tokens > self.max_tokens_limit:
            raise ConfigError(
                "generation.max_tokens", self.max_tokens, "must be <= generation.max_tokens_limit"
            )
        ConfigError.check_non_negative("generation.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("generation.top_p", self.top_p, "must be in (0, 1]")


MQTT_SCHEMES = ("mqtt", "mqtts")


@dataclass
class MqttConfig:
    """The MQTT bridge inside ``serve`` (off unless ``url`` is set); see docs/mqtt.md."""

    url: str = field(default="", metadata={"secret": True})
    """Broker URL (``mqtt://host:1883``, TLS with ``mqtts://host:8883``); empty turns the bridge off."""
    username: str = ""
    """The bridge's own (privileged) broker identity; may also be given in the URL."""
    password: str = field(default="", metadata={"secret": True})
    """Password of the bridge's broker identity (prefer ``password_file`` or the env var)."""
    password_file: str = ""
    """File holding the bridge's broker password (first line), instead of ``password``."""
    ca_file: str = ""
    """PEM file of the CA that signed the broker's certificate (``mqtts://``; default: the system's)."""
    topic_prefix: str = "agent-runtime/v1"
    """Root of every topic the bridge uses (``{prefix}/{tenant}/sessions/...``)."""
    client_id: str = ""
    """MQTT client id of the bridge; empty uses ``agent-runtime-<node id>``."""
    keepalive_s: int = 30
    """MQTT keep-alive; a broker that stays silent twice as long is taken as lost."""
    inbound_queue: int = 1024
    """Bound of the bridge's received-message queue (aiomqtt's is unbounded by default); past it messages are dropped and logged."""
    session_queue: int = 1024
    """Most server events waiting to be published per session; past it the session is detached (resume by seq)."""
    reconnect_max_s: float = 30.0
    """Longest wait between reconnection attempts (exponential backoff from 0.1 s)."""

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def validate(self) -> None:
        if self.url:
            parts = urlsplit(self.url)
            shown = redact_url(self.url)
            if parts.scheme not in MQTT_SCHEMES:
                raise ConfigError("mqtt.url", shown, "scheme must be mqtt:// or mqtts://")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ConfigError("mqtt.url", shown, "port must be in 0..65535") from None
            if not parts.hostname:
                raise ConfigError("mqtt.url", shown, "must name a host (mqtt://host:1883)")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ConfigError(
                    "mqtt.url", shown, "must be just mqtt[s]://[user[:pass]@]host[:port]"
                )
        if self.password and self.password_file:
            raise ConfigError(
                "mqtt.password_file", self.password_file, "give either a password or a file"
            )
        if self.password_file and not Path(self.password_file).is_file():
            raise ConfigError("mqtt.password_file", self.password_file, "no such file")
        if self.ca_file and not Path(self.ca_file).is_file():
            raise ConfigError("mqtt.ca_file", self.ca_file, "no such file")
        prefix = self.topic_prefix
        if (
            not prefix
            or prefix.startswith("/")
            or prefix.endswith("/")
            or any(c in prefix for c in "+#\0")
        ):
            raise ConfigError(
                "mqtt.topic_prefix",
                prefix,
                "must be a topic without wildcards or leading/trailing '/' (agent-runtime/v1)",
            )
        if any(c in self.client_id for c in "+#/"):
            raise ConfigError("mqtt.client_id", self.client_id, "must not contain + # or /")
        ConfigError.check_positive("mqtt.keepalive_s", self.keepalive_s)
        ConfigError.check_positive("mqtt.inbound_queue", self.inbound_queue)
        ConfigError.check_positive("mqtt.session_queue", self.session_queue)
        ConfigError.check_positive("mqtt.reconnect_max_s", self.reconnect_max_s)

    def broker_password(self) -> str:
        """The bridge's password: from the file, the setting or the URL (in that order)."""
        if self.password_file:
            try:
                lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError("mqtt.password_file", self.password_file, str(exc)) from None
            return lines[0].strip() if lines else ""
        return self.password or (urlsplit(self.url).password or "")


@dataclass
class ClusterConfig:
    """Several nodes sharing one Redis and one data root (off by default); see docs/scaling.md."""

    enabled: bool = False
    """Run as one node of a cluster: sessions are owned through Redis leases with fencing tokens; needs ``--redis-url`` and a ``--data-dir`` every node reaches."""
    node_id: str = ""
    """This node's name in leases and logs (letters, digits, ``.``, ``_``, ``-``); empty: a random one per start."""
    advertise_url: str = ""
    """Base URL at which clients and other nodes reach this node (``http://10.0.0.5:8765``); empty: ``http://HOST:PORT``. Redirects name it; HTTP requests are proxied to it."""
    internal_url: str = ""
    """Base URL at which the other nodes reach this node to forward HTTP requests (a private address when clients come through a load balancer); empty: ``advertise_url``."""
    lease_ttl_s: float = 10.0
    """How long a session's lease lives without renewal; a dead node's sessions move after it."""
    renew_interval_s: float = 0.0
    """How often leases are renewed; 0 picks a third of ``lease_ttl_s``."""

    @property
    def renew_every_s(self) -> float:
        return self.renew_interval_s or self.lease_ttl_s / 3

    def validate(self) -> None:
        ConfigError.check_positive("cluster.lease_ttl_s", self.lease_ttl_s)
        ConfigError.check_non_negative("cluster.renew_interval_s", self.renew_interval_s)
        if self.lease_ttl_s < 0.5:
            raise ConfigError("cluster.lease_ttl_s", self.lease_ttl_s, "must be at least 0.5")
        if self.renew_every_s > self.lease_ttl_s / 2:
            raise ConfigError(
                "cluster.renew_interval_s",
                self.renew_interval_s,
                "must be at most half of cluster.lease_ttl_s (a renewal must land well inside the TTL)",
            )
        if self.node_id and not all(c.isalnum() or c in "._-" for c in self.node_id):
            raise ConfigError(
                "cluster.node_id", self.node_id, "may hold only letters, digits, '.', '_' and '-'"
            )
        if len(self.node_id) > 64:
            raise ConfigError("cluster.node_id", self.node_id, "must be at most 64 characters")
        for name in ("advertise_url", "internal_url"):
            if value := getattr(self, name):
                _check_base_url(f"cluster.{name}", value)


def _check_base_url(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, url, "must be http[s]://host[:port] (the node's base URL)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(name, url, "port must be in 0..65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(name, url, "must be just http[s]://host[:port]")


@dataclass
class RuntimeConfig:
    """The whole runtime's configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> RuntimeConfig:
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.cluster.enabled and not self.store.redis_url:
            raise ConfigError(
                "store.redis_url",
                "",
                "a cluster node needs the Redis every node shares (--redis-url); the embedded"
                " Redis is private to one process",
            )
        return self


SECTIONS = ("server", "store", "engine", "generation", "memory", "privacy", "mqtt", "cluster")
# Sections whose flags and env vars carry no prefix (``--port``, ``AGENT_RUNTIME_PORT``).
UNPREFIXED = ("server", "store")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a clear usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def token_counts(text: str) -> list[int]:
    """An argparse type: comma-separated token counts, ``k``/``m`` suffixes allowed (``1k,16k``)."""
    out = []
    for part in text.split(","):
        raw = part.strip().lower()
        scale = 1_000_000 if raw.endswith("m") else 1000 if raw.endswith("k") else 1
        try:
            value = int(raw.rstrip("km")) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a token count (use e.g. 1k,4k,16k)"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"token counts must be >= 0, got {value}")
        out.append(value)
    return out


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _sections() -> list[tuple[str, type]]:
    hints = get_type_hints(RuntimeConfig)
    return [(name, hints[name]) for name in SECTIONS]


def _scalar_type(cls: type, name: str) -> type:
    hint = get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional fields today
        hint = next(t for t in hint.__args__ if t is not type(None))
    if hint not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{name}: unsupported config type {hint}")
    return hint  # type: ignore[no-any-return]


def setting_names(section: str, name: str) -> tuple[str, str]:
    """The CLI flag and env var of one setting."""
    stem = name if section in UNPREFIXED else f"{section}_{name}"
    return "--" + stem.replace("_", "-"), ENV_PREFIX + stem.upper()


def _coerce(setting: str, kind: type, raw: object) -> object:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(setting, raw, "must be a boolean (true/false)")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(setting, raw, "must be an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise ConfigError(setting, raw, "must be an integer") from None
    if kind is float:
        if isinstance(raw, bool):
            raise ConfigError(setting, raw, "must be a number")
        if isinstance(raw, int | float):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(setting, raw, "must be a number") from None
    if not isinstance(raw, str):
        raise ConfigError(setting, raw, "must be a string")
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting to ``parser`` (defaults stay unset: None)."""
    parser.add_argument(
        "--config", metavar="PATH", default=None, help="TOML config file (env AGENT_RUNTIME_CONFIG)"
    )
    for section, cls in _sections():
        group = parser.add_argument_group(f"{section} settings")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag, env = setting_names(section, f.name)
            kind = _scalar_type(cls, f.name)
            default = "(secret)" if f.metadata.get("secret") else repr(f.default)
            alias = f.metadata.get("alias")
            group.add_argument(
                *((alias,) if alias else ()),
                flag,
                dest=f"{section}.{f.name}",
                default=None,
                metavar=kind.__name__.upper(),
                # argparse formats help with %: a literal one in a docstring must be doubled
                help=f"{docs.get(f.name, '')} [env {env}; default {default}]".replace("%", "%%"),
            )


def load_config(
    args: argparse.Namespace | None = None,
    env: dict[str, str] | None = None,
    config_file: str | None = None,
) -> RuntimeConfig:
    """Build and validate the runtime config with precedence CLI > env > file > defaults."""
    env = dict(os.environ) if env is None else env
    cli = vars(args) if args is not None else {}
    path = cli.get("config") or config_file or env.get(ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config", path, "no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", path, f"invalid TOML: {exc}") from None
        unknown = set(file_values) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                "config", path, f"unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}"
            )

    sections: dict[str, Any] = {}
    for section, cls in _sections():
        table = file_values.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, table, "must be a TOML table")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in names:
                raise ConfigError(
                    f"{section}.{key}", table[key], f"unknown setting (known: {sorted(names)})"
                )
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            _flag, env_name = setting_names(section, f.name)
            kind = _scalar_type(cls, f.name)
            setting = f"{section}.{f.name}"
            if cli.get(setting) is not None:
                values[f.name] = _coerce(setting, kind, cli[setting])
            elif env_name in env:
                values[f.name] = _coerce(setting, kind, env[env_name])
            elif f.name in table:
                values[f.name] = _coerce(setting, kind, table[f.name])
        sections[section] = cls(**values)
    return RuntimeConfig(**sections).validate()


def redact_url(url: str) -> str:
    """``url`` with any password (in its user part or a ``*password=`` query) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.query:
        query = [
            (k, "***" if k.endswith("password") else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:" if parts.username else ":"
        parts = parts._replace(netloc=f"{user}***@{netloc}")
    return urlunsplit(parts)


REDIS_SCHEMES = (
    "redis", "rediss", "unix",
    "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster",
)  # fmt: skip


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``store.redis_url``: how to reach the Redis deployment behind it."""

    kind: str
    """``single`` (one server: redis://, rediss://, unix://), ``sentinel`` or ``cluster``."""
    url: str
    """The URL itself (a single server's is handed to redis-py's ``from_url`` as it is)."""
    hosts: tuple[tuple[str, int], ...] = ()
    """Sentinels (``sentinel``) or cluster seed nodes (``cluster``)."""
    service: str = ""
    """The Sentinel service (master group) name."""
    db: int = 0
    username: str | None = None
    password: str | None = None
    """For the data nodes; Sentinels take ``sentinel_password``/``sentinel_username``."""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and check ``store.redis_url``; :class:`ConfigError` names what is wrong."""

    def bad(why: str) -> ConfigError:
        return ConfigError("store.redis_url", redact_url(url), why)

    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in REDIS_SCHEMES:
        raise bad("scheme must be one of " + ", ".join(f"{s}://" for s in REDIS_SCHEMES))
    if "+" not in scheme:
        return RedisTarget("single", url)
    kind = scheme.split("+", 1)[1]
    where = parts.netloc.rsplit("@", 1)[-1]
    hosts = []
    for item in where.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad(f"{item.strip() or 'an empty entry'!r} is not host:port")
        hosts.append((host, int(port)))
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    known = {"sentinel_password", "sentinel_username"} if kind == "sentinel" else set()
    if unknown := sorted(set(query) - known):
        raise bad(f"unknown query parameter {unknown[0]!r}")
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise bad("a Sentinel URL names its service: redis+sentinel://host:port/<service>[/db]")
        service = path[0]
        if len(path) == 2:
            if not path[1].isdigit():
                raise bad(f"database {path[1]!r} is not a number")
            db = int(path[1])
    elif path:
        raise bad("a Redis Cluster has only database 0: no path after the hosts")
    return RedisTarget(
        kind, url, tuple(hosts), service, db,
        username=parts.username or None, password=parts.password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
        tls=scheme.startswith("rediss"),
    )  # fmt: skip


def redacted(config: RuntimeConfig) -> dict[str, dict[str, object]]:
    """The effective config as plain dicts, secrets redacted (safe to log)."""
    out: dict[str, dict[str, object]] = {}
    for section, cls in _sections():
        obj = getattr(config, section)
        table: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if f.metadata.get("secret") and value:
                value = redact_url(value) if isinstance(value, str) and "://" in value else "***"
            table[f.name] = value
        out[section] = table
    return out


def markdown_table() -> str:
    """The configuration reference as a Markdown table (used for the README)."""
    rows = ["| setting | CLI flag | env var | default | meaning |", "|---|---|---|---|---|"]
    for section, cls in _sections():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag, env = setting_names(section, f.name)
            default = "" if f.metadata.get("secret") else f.default
            rows.append(
                f"| `{section}.{f.name}` | `{flag}` | `{env}` | `{default!r}` | {docs.get(f.name, '')} |"
            )
    return "\n".join(rows)
