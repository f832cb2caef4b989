"""Eviction and expiry order: the live entries with the smallest keys, without a scan per pop.

Three orders drive a bank, each a float key per entry (ties broken by the smaller id):

* FIFO eviction: the entry id (ids grow with insertion).
* Importance eviction: ``log2(mass) + retrieved_at / half_life``. Decayed importance at time
  ``t`` is ``mass · 2^(-(t - retrieved_at)/half_life)``, whose log is this key minus ``t /
  half_life``; the order is therefore the same at every ``t`` and only changes when an entry is
  written or retrieved.
* Expiry: the time after which the entry is pruned (TTL or staleness, whichever comes first).

:class:`MinQueue` keeps a sorted buffer of the smallest keys (about 1/32 of the live entries)
and a *horizon*: every live entry whose current key is below the horizon is in the buffer.
Pops take from the buffer after checking the record still describes its slot; a full rescan
happens only when the buffer runs out, so the cost per popped entry does not grow with the bank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from memory.storage import SlotStore

__all__ = ["MinQueue", "expiry_keys", "fifo_keys", "importance_keys"]

KeyFn = Callable[[SlotStore, np.ndarray], np.ndarray]


def fifo_keys(store: SlotStore, slots: np.ndarray) -> np.ndarray:
    out: np.ndarray = store.ids[slots].astype(np.float64)
    return out


def importance_keys(half_life_s: float) -> KeyFn:
    def keys(store: SlotStore, slots: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.log2(store.mass[slots]) + store.retrieved_at[slots] / half_life_s
        return out

    return keys


def expiry_keys(ttl_s: float, staleness_s: float, min_age_s: float) -> KeyFn:
    """Entries whose key is below ``now`` are expired (older than TTL, or stale and old enough)."""

    def keys(store: SlotStore, slots: np.ndarray) -> np.ndarray:
        written = store.written_at[slots]
        out = np.full(slots.shape[0], math.inf)
        if ttl_s > 0:
            out = written + ttl_s
        if staleness_s > 0:
            stale = np.maximum(store.retrieved_at[slots] + staleness_s, written + min_age_s)
            out = np.minimum(out, stale)
        return out

    return keys


class MinQueue:
    """Pops live slots in ascending ``(key, id)`` order; see the module docstring.

    The owner must call :meth:`note` whenever it writes an entry or changes the inputs of its
    key, and must release popped slots before popping again.
    """

    def __init__(self, store: SlotStore, key_fn: KeyFn, min_buffer: int = 1024) -> None:
        self.store = store
        self.key_fn = key_fn
        self.min_buffer = min_buffer
        self.rescans = 0
        self.reset()

    def reset(self) -> None:
        """Forget the buffer (e.g. after the store is replaced); the next pop rescans."""
        self._keys = np.zeros(0, np.float64)
        self._ids = np.zeros(0, np.int64)
        self._slots = np.zeros(0, np.int64)
        self._pos = 0
        self._horizon = -math.inf

    def note(self, slots: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Entries in ``slots`` were written or had their key change (to ``keys``)."""
        if self._horizon == -math.inf or slots.shape[0] == 0:
            return
        if keys is None:
            keys = self.key_fn(self.store, slots)
        below = keys < self._horizon
        if not below.any():
            return
        new_keys, new_slots = keys[below], slots[below]
        new_ids = self.store.ids[new_slots]
        keys_all = np.concatenate([self._keys[self._pos :], new_keys])
        ids_all = np.concatenate([self._ids[self._pos :], new_ids])
        slots_all = np.concatenate([self._slots[self._pos :], new_slots])
        order = np.lexsort((ids_all, keys_all))
        self._keys, self._ids, self._slots = keys_all[order], ids_all[order], slots_all[order]
        self._pos = 0

    def pop_smallest(self, m: int, release: Callable[[np.ndarray], None]) -> int:
        """Release up to ``m`` live slots with the smallest ``(key, id)``; returns how many.

        Fewer than ``m`` only if fewer are live. ``release`` must free the slots it is given
        (it is called before any rescan, so a rescan never sees them again).
        """
        done = 0
        while done < m:
            if self._pos >= self._keys.shape[0] and not self._refill():
                break
            need = m - done
            end = min(self._keys.shape[0], self._pos + max(2 * need, 64))
            ok = np.flatnonzero(self._valid(self._pos, end))[:need]
            slots = self._slots[self._pos + ok]
            self._pos = self._pos + int(ok[-1]) + 1 if ok.shape[0] == need else end
            if slots.shape[0]:
                release(slots)
                done += int(slots.shape[0])
        return done

    def next_key(self) -> float:
        """A lower bound of the smallest key of a live slot (the buffer's next key, else its
        horizon); -inf before the first scan. Keys written since are noted into the buffer."""
        if self._pos < self._keys.shape[0]:
            return float(self._keys[self._pos])
        return self._horizon

    def pop_below(self, threshold: float, release: Callable[[np.ndarray], None]) -> int:
        """Release every live slot whose key is ``< threshold``; returns how many."""
        done = 0
        while True:
            n = self._keys.shape[0]
            if self._pos < n:
                end = self._pos + int(np.searchsorted(self._keys[self._pos :], threshold, "left"))
                slots = self._slots[self._pos + np.flatnonzero(self._valid(self._pos, end))]
                self._pos = end
                if slots.shape[0]:
                    release(slots)
                    done += int(slots.shape[0])
                if end < n:
                    break
            if threshold <= self._horizon or not self._refill():
                break
        return done

    def _valid(self, start: int, end: int) -> np.ndarray:
        slots = self._slots[start:end]
        st = self.store
        ok: np.ndarray = st.alive[slots] & (st.ids[slots] == self._ids[start:end])
        ok &= self.key_fn(st, slots) == self._keys[start:end]
        # A slot can hold two matching records (re-noted with an unchanged key); pop it once.
        idx = np.flatnonzero(ok)
        _, first = np.unique(slots[idx], return_index=True)
        if first.shape[0] < idx.shape[0]:
            ok[:] = False
            ok[idx[first]] = True
        return ok

    def _refill(self) -> bool:
        """Rebuild the buffer from a scan of the live entries; False if none are live."""
        self.rescans += 1
        live = self.store.live_slots()
        if live.shape[0] == 0:
            self.reset()
            return False
        keys = self.key_fn(self.store, live)
        size = max(self.min_buffer, live.shape[0] // 32)
        if live.shape[0] <= size:
            chosen = live
            horizon = float(np.nextafter(keys.max(), math.inf))
        else:
            kth = keys[np.argpartition(keys, size - 1)[size - 1]]
            sel = keys <= kth  # keep every tie with the cut so the horizon is strictly above
            chosen = live[sel]
            rest = keys[~sel]
            horizon = float(rest.min()) if rest.shape[0] else math.inf
            keys = keys[sel]
        ids = self.store.ids[chosen]
        order = np.lexsort((ids, keys))
        self._keys, self._ids, self._slots = keys[order], ids[order], chosen[order]
        self._pos = 0
        self._horizon = horizon
        return True
