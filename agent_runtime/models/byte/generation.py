"""Incremental decoding with memory: per-session generation state, chunked prefill, batched steps.

A :class:`GenerationState` is everything a session needs besides its bank to continue a
conversation: the rolling KV cache of the last W-1 tokens, the next absolute position, and the
memory-layer keys/values of the current (incomplete) block. When the stream enters a new block,
the completed block is written to the bank (see the model docstring for why blocks).

Functions here run on the engine's worker thread, never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from agent_runtime.models.base import add_mass, write_memories
from agent_runtime.models.byte.model import (
    NO_POSITION,
    NO_TOKEN,
    KVCache,
    MemorizingTransformer,
    Retrieval,
)
from memory import MemoryBank, search_banks

__all__ = ["BankRetriever", "GenerationState", "decode_step", "flush_block", "prefill"]


@dataclass
class GenerationState:
    """One session's decoding state (tensors on the model's device)."""

    cache: KVCache
    position: int = 0
    pending_keys: list[Tensor] = field(default_factory=list)  # (n, hs) chunks of the current block
    pending_values: list[Tensor] = field(default_factory=list)
    written: int = 0  # entries written to the bank by this state
    recent_ids: list[np.ndarray] = field(
        default_factory=list
    )  # bank ids written since the engine reset it
    # Applied to every block's keys before they reach the bank (privacy noising); not persisted.
    protect: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    memory_stopped: str | None = None  # why no more memories are written (privacy budget spent)

    def restore(self, checkpoint: GenerationState) -> None:
        """Put this state back to ``checkpoint`` (a copy taken earlier), in place."""
        self.cache = checkpoint.cache
        self.position = checkpoint.position
        self.pending_keys = list(checkpoint.pending_keys)
        self.pending_values = list(checkpoint.pending_values)
        self.written = checkpoint.written
        self.recent_ids = list(checkpoint.recent_ids)
        self.memory_stopped = checkpoint.memory_stopped

    @classmethod
    def new(cls, model: MemorizingTransformer) -> GenerationState:
        return cls(cache=model.empty_cache(1, next(model.parameters()).device))

    def state_dict(self) -> dict[str, object]:
        return {
            "k": [t.cpu() for t in self.cache.k],
            "v": [t.cpu() for t in self.cache.v],
            "pos": self.cache.pos.cpu(),
            "ids": self.cache.ids.cpu(),
            "position": self.position,
            "pending_keys": torch.cat(self.pending_keys).cpu() if self.pending_keys else None,
            "pending_values": torch.cat(self.pending_values).cpu() if self.pending_values else None,
            "written": self.written,
            "memory_stopped": self.memory_stopped,
        }

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, object], device: torch.device | str = "cpu"
    ) -> GenerationState:
        k = [t.to(device) for t in sd["k"]]  # type: ignore[attr-defined]
        v = [t.to(device) for t in sd["v"]]  # type: ignore[attr-defined]
        pos = sd["pos"].to(device)  # type: ignore[attr-defined]
        ids = sd["ids"].to(device)  # type: ignore[attr-defined]
        position, written = int(sd["position"]), int(sd["written"])  # type: ignore[call-overload]
        st = cls(cache=KVCache(k, v, pos, ids), position=position, written=written)
        stopped = sd.get("memory_stopped")
        st.memory_stopped = stopped if isinstance(stopped, str) else None
        if sd["pending_keys"] is not None:
            st.pending_keys = [sd["pending_keys"].to(device)]  # type: ignore[attr-defined]
            st.pending_values = [sd["pending_values"].to(device)]  # type: ignore[attr-defined]
        return st


class BankRetriever:
    """Serves a batch's memory queries from each row's bank (one batched search per step)."""

    def __init__(self, banks: Sequence[MemoryBank | None]) -> None:
        self.banks = banks
        self.retrieved = [0] * len(banks)
        self.seconds = 0.0  # time spent in bank searches
        self.retrievals: list[Retrieval] = []  # this forward's, for attention_mass()

    def __call__(self, queries: Tensor, k: int) -> Retrieval:
        B, H, T, hs = queries.shape
        scores = torch.zeros(B, H, T, k)
        values = torch.zeros(B, H, T, k, hs)
        mask = torch.zeros(B, H, T, k, dtype=torch.bool)
        positions = torch.full((B, H, T, k), -1, dtype=torch.long)
        rows = [b for b, bank in enumerate(self.banks) if bank is not None and len(bank) > 0]
        if rows:
            started = time.perf_counter()
            q = queries.detach().float().cpu().numpy()
            results = search_banks(
                [self.banks[b] for b in rows],  # type: ignore[misc]
                [q[b].reshape(H * T, hs) for b in rows],
                k,
            )
            for b, res in zip(rows, results, strict=True):
                scores[b] = torch.from_numpy(res.scores).view(H, T, k)
                values[b] = torch.from_numpy(res.values).view(H, T, k, hs)
                mask[b] = torch.from_numpy(res.mask).view(H, T, k)
                if res.positions is not None:
                    positions[b] = torch.from_numpy(res.positions).view(H, T, k)
                self.retrieved[b] += int(res.mask.sum())
            self.seconds += time.perf_counter() - started
        dev = queries.device
        retrieval = Retrieval(scores.to(dev), values.to(dev), mask.to(dev), positions)
        self.retrievals.append(retrieval)
        return retrieval

    def attention_mass(self) -> tuple[list[dict[int, float]], list[int]]:
        """Per row: stored position -> attention mass received in this forward, and the number
        of query rows (heads x tokens) that mass is spread over."""
        attended: list[dict[int, float]] = [{} for _ in self.banks]
        queries = [0] * len(self.banks)
        for r in self.retrievals:
            if r.weights is None or r.positions is None:
                continue
            weights = r.weights.float().cpu().numpy()
            positions = r.positions.numpy()
            for b in range(len(self.banks)):
                queries[b] += positions.shape[1] * positions.shape[2]
                add_mass(attended[b], positions[b], weights[b])
        return attended, queries


def _stack_caches(states: Sequence[GenerationState]) -> KVCache:
    """Batch the rolling caches of several sessions, left-padding shorter ones with empty slots."""
    C = max(s.cache.pos.shape[1] for s in states)
    ks: list[Tensor] = []
    vs: list[Tensor] = []
    for layer in range(len(states[0].cache.k)):
        kl, vl = [], []
        for s in states:
            k, v = s.cache.k[layer], s.cache.v[layer]
            pad = C - k.shape[2]
            if pad:
                k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                v = torch.nn.functional.pad(v, (0, 0, pad, 0))
            kl.append(k)
            vl.append(v)
        ks.append(torch.cat(kl))
        vs.append(torch.cat(vl))

    def left_pad(rows: list[Tensor], value: int) -> Tensor:
        return torch.cat(
            [torch.nn.functional.pad(r, (C - r.shape[1], 0), value=value) for r in rows]
        )

    pos = left_pad([s.cache.pos for s in states], NO_POSITION)
    ids = left_pad([s.cache.ids for s in states], NO_TOKEN)
    return KVCache(ks, vs, pos, ids)


def _advance(
    model: MemorizingTransformer,
    state: GenerationState,
    row: int,
    new: KVCache,
    mem_k: Tensor,
    mem_v: Tensor,
    n: int,
    bank: MemoryBank | None,
) -> None:
    """Append row ``row`` of a step's outputs (its last ``n`` tokens) to ``state``; flush a completed block."""
    keep = model.cfg.window - 1
    state.cache = KVCache(
        [
            torch.cat([old, nk[row : row + 1, :, -n:]], 2)[:, :, -keep:]
            for old, nk in zip(state.cache.k, new.k, strict=True)
        ],
        [
            torch.cat([old, nv[row : row + 1, :, -n:]], 2)[:, :, -keep:]
            for old, nv in zip(state.cache.v, new.v, strict=True)
        ],
        torch.cat([state.cache.pos, new.pos[row : row + 1, -n:]], 1)[:, -keep:],
        torch.cat([state.cache.ids, new.ids[row : row + 1, -n:]], 1)[:, -keep:],
    )
    state.pending_keys.append(mem_k[row, -n:])
    state.pending_values.append(mem_v[row, -n:])
    state.position += n
    if state.position % model.cfg.window == 0:
        flush_block(state, bank)


def flush_block(state: GenerationState, bank: MemoryBank | None) -> None:
    """Write the pending block's memory keys/values to the bank (or drop them without one)."""
    if not state.pending_keys:
        return
    keys = torch.cat(state.pending_keys).float().cpu().numpy()
    values = torch.cat(state.pending_values).float().cpu().numpy()
    state.pending_keys.clear()
    state.pending_values.clear()
    write_memories(state, bank, keys, values, state.position - len(keys))


@torch.no_grad()
def prefill(
    model: MemorizingTransformer,
    state: GenerationState,
    tokens: Sequence[int],
    bank: MemoryBank | None,
) -> Tensor | None:
    """Feed ``tokens`` into the session; returns the logits after the last one (vocab,)."""
    W = model.cfg.window
    device = state.cache.pos.device
    logits: Tensor | None = None
    i = 0
    while i < len(tokens):
        n = min(len(tokens) - i, W - state.position % W)  # stay within one memory block
        idx = torch.tensor([tokens[i : i + n]], dtype=torch.long, device=device)
        pos = torch.arange(state.position, state.position + n, device=device)[None]
        out = model(idx, pos, state.cache, BankRetriever([bank]))
        _advance(model, state, 0, out.cache, out.mem_keys, out.mem_values, n, bank)
        logits = out.logits[0, -1]
        i += n
    return logits


@torch.no_grad()
def decode_step(
    model: MemorizingTransformer,
    states: Sequence[GenerationState],
    tokens: Sequence[int],
    banks: Sequence[MemoryBank | None],
) -> tuple[Tensor, BankRetriever]:
    """One token for each of B sessions in one batched forward; returns logits (B, vocab) and the
    retriever (entries retrieved per session, search time)."""
    device = states[0].cache.pos.device
    idx = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
    pos = torch.tensor([s.position for s in states], dtype=torch.long, device=device)[:, None]
    retriever = BankRetriever(banks)
    out = model(idx, pos, _stack_caches(states), retriever)
    for b, (state, bank) in enumerate(zip(states, banks, strict=True)):
        _advance(model, state, b, out.cache, out.mem_keys, out.mem_values, 1, bank)
    return out.logits[:, -1], retriever
