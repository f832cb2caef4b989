"""Slot storage of a bank: values and per-entry metadata, addressed by slot number.

A slot is a row shared by this store and the key index (row ``s`` of the index holds the key
of the entry in slot ``s``), so a returned value always belongs to its returned key. Freed
slots go on a stack and are reused before the store grows, which keeps the store and the
index dense (at most ``capacity`` rows) without ever moving a live entry.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

import numpy as np

__all__ = ["SlotStore"]

_MIN_ALLOC = 1024  # slots allocated at first use; growth doubles from here (multiple of 8)
RESERVE_MIN_BYTES = 64 << 20  # value arrays that may outgrow this are reserved up front
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11 lacks it


def _reserve(rows: int, value_dim: int, dtype: np.dtype[Any]) -> np.ndarray | None:
    """Zero rows backed by address space only: a private anonymous mapping without swap
    reservation, whose pages exist once written. Growing a value array then never copies it
    (a copy of a 64K-entry pretrained bank's 1.5 GB of values took 4.5 s, every session on the
    node waiting). None where the mapping is refused (strict overcommit, a ulimit, no Linux):
    the store then grows by copying, as before."""
    nbytes = rows * value_dim * dtype.itemsize
    if not sys.platform.startswith("linux") or nbytes < RESERVE_MIN_BYTES:
        return None
    try:
        mapping = mmap.mmap(
            -1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        )
    except (OSError, OverflowError, ValueError):
        return None
    return np.frombuffer(mapping, dtype).reshape(rows, value_dim)  # keeps the mapping alive


class SlotStore:
    """Columnar per-slot arrays; ``alive[s]`` says whether slot ``s`` holds a live entry.

    ``ids[s]`` is -1 for a free slot. ``bitmap`` packs ``alive`` little-endian (bit ``s & 7``
    of byte ``s >> 3``), the layout of ``faiss.IDSelectorBitmap``.
    """

    ARRAYS = ("values", "ids", "positions", "written_at", "retrieved_at", "mass", "alive")

    def __init__(self, value_dim: int, value_dtype: np.dtype[Any], reserve: int = 0) -> None:
        """``reserve``: the most slots the store will hold (the bank's capacity); their values
        are reserved as address space (:func:`_reserve`), so growth never copies them."""
        self.value_dim = value_dim
        self.values = np.zeros((0, value_dim), value_dtype)
        self._reserved = _reserve(reserve, value_dim, np.dtype(value_dtype)) if reserve else None
        self.ids = np.zeros(0, np.int64)
        self.positions = np.zeros(0, np.int64)
        self.written_at = np.zeros(0, np.float64)  # monotone clock at add
        self.retrieved_at = np.zeros(
            0, np.float64
        )  # last retrieval, or written_at if never retrieved
        self.mass = np.zeros(0, np.float64)  # retrieval mass as of retrieved_at (before decay)
        self.alive = np.zeros(0, np.bool_)
        self.bitmap = np.zeros(0, np.uint8)
        self.hwm = 0  # slots [0, hwm) have been used; rows of the key index
        self.free = np.zeros(0, np.int64)  # stack of freed slots below hwm, top at the end
        self.live = 0

    @property
    def allocated(self) -> int:
        return int(self.ids.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the live part of the arrays (slots below ``hwm``)."""
        per_slot = sum(getattr(self, a)[:1].nbytes for a in self.ARRAYS) if self.allocated else 0
        return self.hwm * per_slot + self.bitmap.nbytes + self.free.nbytes

    def allocate(self, n: int) -> tuple[np.ndarray, int]:
        """Reserve ``n`` slots: reused ones first (from the free stack), then new ones.

        Returns ``(slots, n_new)``; the last ``n_new`` slots are new rows at the old ``hwm``.
        Slots are not marked alive here (see :meth:`occupy`).
        """
        reuse = min(n, int(self.free.shape[0]))
        reused = self.free[self.free.shape[0] - reuse :][::-1].copy()
        self.free = self.free[: self.free.shape[0] - reuse]
        n_new = n - reuse
        if self.hwm + n_new > self.allocated:
            self._grow(self.hwm + n_new)
        fresh = np.arange(self.hwm, self.hwm + n_new, dtype=np.int64)
        self.hwm += n_new
        return np.concatenate([reused, fresh]), n_new

    def occupy(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        ids: np.ndarray,
        positions: np.ndarray,
        now: float,
        initial_mass: float,
    ) -> None:
        """Write new entries into allocated ``slots`` and mark them alive."""
        self.values[slots] = values
        self.ids[slots] = ids
        self.positions[slots] = positions
        self.written_at[slots] = now
        self.retrieved_at[slots] = now
        self.mass[slots] = initial_mass
        self.alive[slots] = True
        self.live += int(slots.shape[0])
        self._sync_bits(slots)

    def release(self, slots: np.ndarray) -> None:
        """Free live ``slots`` (evicted or pruned): never returned again, reused by later adds."""
        if slots.shape[0] == 0:
            return
        self.alive[slots] = False
        self.ids[slots] = -1
        self.live -= int(slots.shape[0])
        self.free = np.concatenate([self.free, slots])
        self._sync_bits(slots)

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.alive[: self.hwm])

    def _grow(self, need: int) -> None:
        size = max(_MIN_ALLOC, self.allocated)
        while size < need:
            size *= 2
        for name in self.ARRAYS:
            old = getattr(self, name)
            if name == "values" and self._reserved is not None:
                rows = self._reserved.shape[0]
                if need <= rows:  # the same memory, longer: no copy (never past the capacity)
                    self.values = self._reserved[: min(size, rows)]
                    continue
                self._reserved = None  # the capacity grew past the reservation: copy from now
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: old.shape[0]] = old
            if name == "ids":
                new[old.shape[0] :] = -1
            setattr(self, name, new)
        bitmap = np.zeros(size // 8, np.uint8)
        bitmap[: self.bitmap.shape[0]] = self.bitmap
        self.bitmap = bitmap

    def _sync_bits(self, slots: np.ndarray) -> None:
        # Repack whole bytes from ``alive`` rather than or-ing bits: fancy-index ``|=`` drops
        # updates when two slots share a byte.
        touched = np.unique(slots >> 3)
        rows = self.alive.reshape(-1, 8)[touched]
        self.bitmap[touched] = np.packbits(rows, axis=1, bitorder="little")[:, 0]

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore this store exactly (``from_state``); sliced to ``hwm``."""
        out = {name: getattr(self, name)[: self.hwm] for name in self.ARRAYS}
        out["free"] = self.free
        return out

    @classmethod
    def from_state(
        cls,
        value_dim: int,
        value_dtype: np.dtype[Any],
        arrays: dict[str, np.ndarray],
        reserve: int = 0,
    ) -> SlotStore:
        """Rebuild a store from :meth:`state` (copying the arrays, which may be read-only).

        Raises ``ValueError`` naming the problem: a missing row, dtype or width, a free list
        that does not hold exactly the dead slots, ids on dead slots or negative live ids.
        """
        store = cls(value_dim, value_dtype, reserve)
        hwm = int(arrays["ids"].shape[0])
        for name in cls.ARRAYS:
            arr = arrays[name]
            want = store.values.dtype if name == "values" else getattr(store, name).dtype
            ndim = 2 if name == "values" else 1
            if arr.ndim != ndim or arr.shape[0] != hwm or arr.dtype != want:
                raise ValueError(f"array {name} has shape {arr.shape} / dtype {arr.dtype}")
        if arrays["values"].shape[1:] != (value_dim,):
            raise ValueError("values have the wrong width")
        free = arrays["free"]
        alive = arrays["alive"]
        if free.dtype != np.int64 or free.ndim != 1:
            raise ValueError(f"free list has shape {free.shape} / dtype {free.dtype}")
        if np.any((free < 0) | (free >= hwm)) or np.any(alive[free]):
            raise ValueError("free list names live or out-of-range slots")
        if np.unique(free).shape[0] != free.shape[0]:
            raise ValueError("free list names a slot twice")
        if int(free.shape[0]) + int(alive.sum()) != hwm:
            raise ValueError("free list and live slots do not partition the store")
        ids = arrays["ids"]
        if np.any(ids[alive] < 0) or np.any(ids[~alive] != -1):
            raise ValueError("entry ids do not match the live slots")
        if hwm:
            store._grow(hwm)
        for name in cls.ARRAYS:
            getattr(store, name)[:hwm] = arrays[name]
        store.hwm = hwm
        store.free = free.copy()
        store.live = int(alive.sum())
        store._sync_bits(np.arange(hwm, dtype=np.int64))
        return store
