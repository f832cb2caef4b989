"""The model seam: what the engine, the sessions and the server need from a model family.

Everything above this module (``agent_runtime.engine``, ``agent_runtime.sessions``, ``server``)
drives a model only through :class:`ChatModel`; nothing there imports a model class. A family
(``agent_runtime.models.byte`` today) implements it over its own tensors and tokenizer.

What crosses the seam:

* **per-session state** (:class:`SessionState`): opaque to callers except a few counters; the
  family saves it to bytes and restores it (``save_state`` / ``load_state``), and takes and
  restores in-memory checkpoints (for rolling back a cancelled reply);
* **prefill and decode a batch**: the caller passes each session's state and its memory bank; the
  family searches the banks with the queries of its memory layers (one batched
  :func:`memory.search_banks` call per step) and writes the key/values that leave its window
  into them (through ``state.protect`` first: privacy noising);
* **the chat format**: how a turn is tokenised, the tokens that open a reply, the token that
  ends one, which tokens a reply may contain, and an incremental detokenizer.

Nothing here imports torch at run time: the seam is types only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from agent_runtime.errors import BudgetExhaustedError

if TYPE_CHECKING:
    from torch import Tensor

    from memory import MemoryBank

__all__ = [
    "ChatModel",
    "SessionState",
    "StepStats",
    "TextStream",
    "add_mass",
    "write_memories",
]

S = TypeVar("S", bound="SessionState")


class SessionState(Protocol):
    """One session's decoding state (owned by the engine's worker thread)."""

    position: int
    """Tokens fed to the model so far (the next token's absolute position)."""
    written: int
    """Memory entries this state has written to its bank."""
    recent_ids: list[np.ndarray]
    """Bank ids written since the engine last reset it (removed again on a rollback)."""
    protect: Callable[[np.ndarray], np.ndarray] | None
    """Applied to every batch of keys before it reaches the bank (privacy noising); not saved."""
    memory_stopped: str | None
    """Why no more memories are written (the privacy budget is spent), or None."""


def write_memories(
    state: SessionState, bank: MemoryBank | None, keys: np.ndarray, values: np.ndarray, first: int
) -> None:
    """Write entries for positions ``first ..`` to ``bank`` the way every family must: keys go
    through ``state.protect`` (privacy noising, whose ledger is charged durably first), a spent
    budget stops memory writes for good (``state.memory_stopped``), and the new ids are kept
    in ``state.recent_ids`` so a rolled-back reply can remove them."""
    if bank is None or state.memory_stopped is not None:
        return
    if state.protect is not None:
        try:
            keys = state.protect(keys)
        except BudgetExhaustedError as exc:
            state.memory_stopped = str(exc)
            return
    positions = np.arange(first, first + keys.shape[0], dtype=np.int64)
    state.recent_ids.append(bank.add(keys, values, positions))
    state.written += keys.shape[0]


class TextStream(Protocol):
    """Incremental detokenizer: text is released only once it is complete."""

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class StepStats:
    """What one batched step retrieved (per row) and how long its bank searches took.

    ``attended[b]`` maps the stored position of each memory entry row ``b`` attended to the
    attention mass it received, summed over the step's ``queries[b]`` query rows (heads x tokens
    x memory layers; each row's memory weights sum to at most 1): what provenance reports.
    """

    retrieved: list[int] = field(default_factory=list)
    search_seconds: float = 0.0
    attended: list[dict[int, float]] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)


def add_mass(into: dict[int, float], positions: np.ndarray, weights: np.ndarray) -> None:
    """Add attention ``weights`` to ``into[position]`` (entries with position < 0 are empty)."""
    pos = positions.reshape(-1)
    w = weights.reshape(-1)
    keep = (pos >= 0) & (w > 0)
    if not keep.any():
        return
    uniq, inverse = np.unique(pos[keep], return_inverse=True)
    sums = np.bincount(inverse, weights=w[keep].astype(np.float64))
    for position, mass in zip(uniq.tolist(), sums.tolist(), strict=True):
        into[position] = into.get(position, 0.0) + mass


class ChatModel(Protocol[S]):
    """A chat model with a kNN memory, as the engine drives it (see the module docstring)."""

    fingerprint: str
    """Hash of everything that shapes bank contents; a bank written by another model is refused."""
    memory_dims: tuple[int, int]
    """(key_dim, value_dim) of one memory entry."""
    memory_parts: int
    """Heads an entry holds side by side (1: one key per token; see ``MemoryBank(parts=)``)."""
    family: str
    """``byte`` (the bundled byte model's family) or ``llama`` (pretrained decoders)."""
    card: str
    """What the model can and cannot do, in a sentence or two (shown on the web page)."""
    block: int
    """Prefill granularity: a prompt is fed in chunks that never cross a multiple of ``block``."""
    end_token: int
    """The token that ends a reply."""
    reply_prefix: tuple[int, ...]
    """Tokens appended to the pending items to open an assistant reply."""
    reply_mask: Tensor
    """(vocab,) additive logit mask: 0 for tokens a reply may contain, -inf for the others."""

    def describe(self) -> str:
        """One line for the log: family, size, source."""
        ...

    def encode_turn(self, role: str, text: str) -> list[int]:
        """Tokens of one conversation item (``role`` is system, user or assistant)."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Tokens of plain text inside a turn (a reply's ``prefix``): no turn markup."""
        ...

    def text_stream(self) -> TextStream: ...

    def new_state(self) -> S: ...

    def save_state(self, state: S) -> bytes:
        """Serialise a state (no pickle on load: safe to read back from disk)."""
        ...

    def load_state(self, blob: bytes) -> S:
        """Inverse of :meth:`save_state`; raises a ``CheckpointError`` for a foreign or corrupt blob."""
        ...

    def checkpoint(self, state: S) -> S:
        """An in-memory copy of ``state`` that later steps do not change."""
        ...

    def restore(self, state: S, checkpoint: S) -> None:
        """Put ``state`` back to ``checkpoint`` (in place: callers hold ``state``)."""
        ...

    def prefill(self, state: S, tokens: Sequence[int], bank: MemoryBank | None) -> Tensor | None:
        """Feed ``tokens`` into the session; the logits (vocab,) after the last one."""
        ...

    def decode(
        self,
        states: Sequence[S],
        tokens: Sequence[int],
        banks: Sequence[MemoryBank | None],
    ) -> tuple[Tensor, StepStats]:
        """One token for each of B sessions in one batched step: logits (B, vocab) and stats."""
        ...
