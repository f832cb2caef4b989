"""The slot store's value array grows inside an address-space reservation: no copy, ever."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from memory import MemoryBank, MemoryConfig
from memory.storage import RESERVE_MIN_BYTES, SlotStore

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap flags of Linux")


def _fill(store: SlotStore, n: int, dim: int, start: int) -> np.ndarray:
    slots, _ = store.allocate(n)
    values = np.random.default_rng(start).standard_normal((n, dim)).astype(np.float32)
    store.occupy(slots, values, np.arange(start, start + n), np.arange(n), 0.0, 1.0)
    return values


@linux
def test_values_grow_in_place_up_to_the_reservation_then_by_copying() -> None:
    dim = 4096  # 16 KiB per slot: 8K slots reserve 128 MiB, past RESERVE_MIN_BYTES
    store = SlotStore(dim, np.dtype(np.float32), reserve=8192)
    assert store._reserved is not None and 8192 * dim * 4 >= RESERVE_MIN_BYTES
    first = _fill(store, 1000, dim, 0)
    before = store.values
    second = _fill(store, 3000, dim, 1000)  # 1024 -> 4096 slots: longer, the same memory
    assert store.values.shape[0] == 4096 and np.shares_memory(before, store.values)
    np.testing.assert_array_equal(store.values[:1000], first)
    np.testing.assert_array_equal(store.values[1000:4000], second)
    assert not store.values[4000:].any()  # fresh rows read as zeros
    _fill(store, 5000, dim, 4000)  # past the reservation (a capacity raised later): a copy
    assert store.values.shape[0] == 16384 and store._reserved is None
    np.testing.assert_array_equal(store.values[:1000], first)
    restored = SlotStore.from_state(dim, np.dtype(np.float32), store.state(), reserve=16384)
    np.testing.assert_array_equal(restored.values[: store.hwm], store.values[: store.hwm])


@linux
def test_a_capacity_that_is_not_a_power_of_two_is_filled_without_a_copy() -> None:
    dim = 4096
    store = SlotStore(dim, np.dtype(np.float32), reserve=5000)
    first = _fill(store, 1000, dim, 0)
    before = store.values
    _fill(store, 4000, dim, 1000)  # doubling would ask for 8192 rows; the capacity is 5000
    assert store.values.shape[0] == 5000 and store._reserved is not None
    assert np.shares_memory(before, store.values)
    np.testing.assert_array_equal(store.values[:1000], first)


def test_small_stores_and_refused_reservations_grow_by_copying() -> None:
    store = SlotStore(8, np.dtype(np.float32), reserve=1 << 20)  # 32 MiB: not worth a mapping
    assert store._reserved is None
    values = _fill(store, 3000, 8, 0)
    np.testing.assert_array_equal(store.values[:3000], values)
    huge = SlotStore(1 << 20, np.dtype(np.float32), reserve=1 << 40)  # 4 EiB: refused, no error
    assert huge._reserved is None


@linux
def test_a_bank_reserves_its_capacity_and_keeps_every_entry_across_growth() -> None:
    dim = 2048
    bank = MemoryBank(16, dim, MemoryConfig(capacity=65536))
    assert bank._store._reserved is not None
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5000, 16)).astype(np.float32)
    values = rng.standard_normal((5000, dim)).astype(np.float32)
    for start in range(0, 5000, 1000):
        bank.add(keys[start : start + 1000], values[start : start + 1000])
    got_keys, got_values = bank.get(np.arange(5000))
    np.testing.assert_array_equal(got_values, values)
    np.testing.assert_array_equal(got_keys, keys)
