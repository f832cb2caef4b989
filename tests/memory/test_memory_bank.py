"""Behaviour of one bank: adds, exact search, capacity eviction, pruning, batched search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_runtime.errors import BankCapacityError, ConfigError, MemoryBankError
from memory import MemoryBank, MemoryConfig, search_banks

DK, DV = 8, 4


def kv(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    keys = rng.standard_normal((n, DK)).astype(np.float32)
    return keys, value_of(keys)


def value_of(keys: np.ndarray) -> np.ndarray:
    out: np.ndarray = (3.0 * keys[:, :DV] + 1.0).astype(np.float32)
    return out


def assert_values_match_keys(bank: MemoryBank, res: Any) -> None:
    """Every valid result's value is the one stored with its key, and the score is q·key."""
    ids = res.ids[res.mask]
    keys, values = bank.get(ids)
    np.testing.assert_array_equal(res.values[res.mask], value_of(keys))
    np.testing.assert_array_equal(values, value_of(keys))
    assert np.all(res.ids[~res.mask] == -1)
    assert np.all(res.values[~res.mask] == 0)


def test_search_returns_exact_top_k_with_their_values() -> None:
    rng = np.random.default_rng(0)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=1000))
    keys, values = kv(rng, 300)
    ids = bank.add(keys, values)
    np.testing.assert_array_equal(ids, np.arange(300))
    q = rng.standard_normal((5, DK)).astype(np.float32)
    res = bank.search(q, 10)
    expected = np.argsort(-(q @ keys.T), axis=1)[:, :10]
    np.testing.assert_array_equal(res.ids, expected)
    np.testing.assert_allclose(res.scores, np.take_along_axis(q @ keys.T, expected, 1), rtol=1e-5)
    np.testing.assert_array_equal(res.values, values[expected])
    assert res.mask.all()


def test_search_pads_when_fewer_entries_than_k() -> None:
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=10))
    rng = np.random.default_rng(1)
    bank.add(*kv(rng, 3))
    res = bank.search(rng.standard_normal((2, DK)).astype(np.float32), 5)
    assert res.mask.sum(axis=1).tolist() == [3, 3]
    assert_values_match_keys(bank, res)
    empty = MemoryBank(DK, DV).search(np.zeros((1, DK), np.float32), 4)
    assert not empty.mask.any() and empty.values.shape == (1, 4, DV)


@pytest.mark.parametrize("eviction", ["fifo", "importance"])
def test_values_match_keys_across_twelve_overflows(eviction: str) -> None:
    rng = np.random.default_rng(2)
    capacity = 64
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=capacity, eviction=eviction))
    for _ in range(12 * capacity // 16):
        bank.add(*kv(rng, 16))
        res = bank.search(rng.standard_normal((4, DK)).astype(np.float32), 8)
        assert_values_match_keys(bank, res)
        assert len(bank) <= capacity
    stats = bank.stats()
    assert stats.entries == capacity
    assert stats.evicted_total == stats.added_total - capacity == 11 * capacity
    assert stats.slots == capacity  # freed slots are reused: the store never grows past capacity


def test_fifo_evicts_exactly_the_oldest() -> None:
    rng = np.random.default_rng(3)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=10))
    bank.add(*kv(rng, 8))
    bank.add(*kv(rng, 5))
    np.testing.assert_array_equal(bank.live_ids(), np.arange(3, 13))
    bank.add(*kv(rng, 10))
    np.testing.assert_array_equal(bank.live_ids(), np.arange(13, 23))


def test_importance_keeps_retrieved_entries(clock: Any) -> None:
    rng = np.random.default_rng(4)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=10, eviction="importance"), clock=clock)
    keys, values = kv(rng, 10)
    bank.add(keys, values)
    clock.advance(1)
    for _ in range(3):  # entries 0 and 1 are retrieved repeatedly
        bank.search(keys[:2], 1)
    clock.advance(1)
    bank.add(*kv(rng, 4))
    live = set(bank.live_ids().tolist())
    assert {0, 1} <= live
    assert live == {0, 1, 6, 7, 8, 9, 10, 11, 12, 13}  # the oldest unretrieved ones left


def test_importance_mass_decays_with_half_life(clock: Any) -> None:
    rng = np.random.default_rng(5)
    config = MemoryConfig(capacity=3, eviction="importance", importance_half_life_s=10.0)
    bank = MemoryBank(DK, DV, config, clock=clock)
    keys, values = kv(rng, 3)
    bank.add(keys, values)
    bank.search(keys[:1], 1)  # entry 0: mass 2 at t0
    clock.advance(30)  # three half-lives: entry 0 has 0.25, entries 1, 2 have 0.125
    bank.search(keys[1:2], 1)  # entry 1: 0.125 + 1
    bank.add(*kv(rng, 1))  # the new entry has mass 1; entry 2 (0.125) is the least important
    assert bank.live_ids().tolist() == [0, 1, 3]
    bank.add(*kv(rng, 1))  # now entry 0 (0.25) goes
    assert bank.live_ids().tolist() == [1, 3, 4]


def test_ttl_entries_are_never_returned_even_without_prune(clock: Any) -> None:
    rng = np.random.default_rng(6)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=100, ttl_s=10.0), clock=clock)
    keys, values = kv(rng, 5)
    bank.add(keys, values)
    clock.advance(6)
    bank.add(*kv(rng, 5))
    clock.advance(5)  # the first five are 11 s old
    res = bank.search(keys, 10)
    assert res.mask.sum(axis=1).tolist() == [5] * 5
    assert set(res.ids[res.mask].tolist()) == set(range(5, 10))
    assert bank.stats().pruned_total == 5
    assert len(bank) == 5


def test_staleness_prunes_unretrieved_old_entries(clock: Any) -> None:
    rng = np.random.default_rng(7)
    config = MemoryConfig(capacity=100, staleness_s=10.0, min_age_s=15.0)
    bank = MemoryBank(DK, DV, config, clock=clock)
    keys, values = kv(rng, 4)
    bank.add(keys, values)
    clock.advance(8)
    bank.search(keys[:1], 1)  # entry 0 retrieved at t=8
    clock.advance(4)  # t=12: others not retrieved for 12 s but younger than min_age
    assert bank.prune() == 0
    clock.advance(4)  # t=16: 1..3 are stale and old enough; 0 was retrieved 8 s ago
    assert bank.prune() == 3
    assert bank.live_ids().tolist() == [0]
    clock.advance(3)  # t=19: entry 0 now 11 s since retrieval
    assert not bank.search(keys[:1], 1).mask.any()


def test_hits_left_pending_across_steps_keep_their_own_retrieval_times(
    clock: Any, tmp_path: Any
) -> None:
    """Searches that find nothing due leave their retrievals coalesced; when they are applied,
    an entry hit at t=0 is as stale as t=0 says, not as fresh as a later hit of another entry
    (found by the state-machine test), and the log replays the same times."""
    rng = np.random.default_rng(9)
    config = MemoryConfig(capacity=100, staleness_s=12.0, min_age_s=5.0)
    bank = MemoryBank.open(tmp_path / "b", DK, DV, config, clock=clock)
    keys, values = kv(rng, 2)
    bank.add(keys, values)
    assert bank.search(keys[:1], 1).ids.tolist() == [[0]]  # t=0
    clock.advance(7)
    assert bank.search(keys[1:], 1).ids.tolist() == [[1]]  # t=7: nothing due, still pending
    clock.advance(7)  # t=14: entry 0 was last retrieved 14 s ago, entry 1 7 s ago
    assert bank.search(keys, 2).mask.sum(axis=1).tolist() == [1, 1]
    assert bank.live_ids().tolist() == [1]
    bank.close()
    clock.advance(3)
    again = MemoryBank.open(tmp_path / "b", DK, DV, config, clock=clock)  # replays the touches
    assert again.live_ids().tolist() == [1]
    clock.advance(3)  # t=20: entry 1 retrieved at 14 (the last search), not stale yet
    assert again.prune() == 0
    clock.advance(7)  # t=27: 13 s since
    assert again.prune() == 1
    again.close()


def test_pruned_slots_are_reused(clock: Any) -> None:
    rng = np.random.default_rng(8)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=100, ttl_s=5.0), clock=clock)
    bank.add(*kv(rng, 50))
    clock.advance(6)
    assert bank.prune() == 50
    bank.add(*kv(rng, 50))
    assert bank.stats().slots == 50
    res = bank.search(rng.standard_normal((3, DK)).astype(np.float32), 60)
    assert res.mask.sum(axis=1).tolist() == [50] * 3
    assert_values_match_keys(bank, res)


def test_batched_search_matches_single_queries() -> None:
    rng = np.random.default_rng(9)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=40_000, eviction="importance"))
    bank.add(*kv(rng, 40_000))
    bank.add(*kv(rng, 5_000))  # importance eviction leaves holes across the store
    queries = rng.standard_normal((64, DK)).astype(np.float32)
    single = [bank.search(q[None], 16) for q in queries]
    batched = bank.search(queries, 16)  # 64 queries: FAISS's GEMM path
    for i, res in enumerate(single):
        np.testing.assert_array_equal(batched.ids[i], res.ids[0])
        np.testing.assert_allclose(batched.scores[i], res.scores[0], rtol=1e-5, atol=1e-5)
    assert_values_match_keys(bank, batched)


def test_search_banks_equals_per_bank_search() -> None:
    rng = np.random.default_rng(10)
    cfgs = [MemoryConfig(capacity=200, threads=2), MemoryConfig(capacity=200, threads=1)]
    for cfg in cfgs:
        banks_a = [MemoryBank(DK, DV, cfg) for _ in range(5)]
        banks_b = [MemoryBank(DK, DV, cfg) for _ in range(5)]
        for a, b in zip(banks_a, banks_b, strict=True):
            keys, values = kv(rng, int(rng.integers(1, 150)))
            a.add(keys, values)
            b.add(keys, values)
        queries = [
            rng.standard_normal((int(rng.integers(1, 8)), DK)).astype(np.float32) for _ in banks_a
        ]
        got = search_banks(banks_a, queries, 6)
        want = [b.search(q, 6) for b, q in zip(banks_b, queries, strict=True)]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.ids, w.ids)
            np.testing.assert_array_equal(g.values, w.values)


def test_fp16_values_and_keys_round_to_half_precision() -> None:
    rng = np.random.default_rng(11)
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=100, value_storage="fp16", flat_storage="fp16"))
    keys, values = kv(rng, 50)
    bank.add(keys, values)
    got_keys, got_values = bank.get(np.arange(50))
    np.testing.assert_array_equal(got_keys, keys.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got_values, values.astype(np.float16).astype(np.float32))
    full = MemoryBank(DK, DV, MemoryConfig(capacity=100))
    full.add(keys, values)
    assert full.stats().bytes - bank.stats().bytes == 50 * (DK + DV) * 2  # half the key+value bytes


def test_misuse_raises_memory_bank_errors() -> None:
    bank = MemoryBank(DK, DV, MemoryConfig(capacity=4))
    with pytest.raises(MemoryBankError, match="keys must have shape"):
        bank.add(np.zeros((2, DK + 1), np.float32), np.zeros((2, DV), np.float32))
    with pytest.raises(BankCapacityError):
        bank.add(np.zeros((5, DK), np.float32), np.zeros((5, DV), np.float32))
    with pytest.raises(MemoryBankError, match="finite"):
        bank.add(np.full((1, DK), np.nan, np.float32), np.zeros((1, DV), np.float32))
    with pytest.raises(MemoryBankError, match="unknown or evicted"):
        bank.get(np.array([7]))
    bank.close()
    bank.close()  # idempotent
    with pytest.raises(MemoryBankError, match="closed"):
        bank.search(np.zeros((1, DK), np.float32), 1)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"memory\.ivf_storage"):
        MemoryConfig(ivf_storage="int4").validate()
    with pytest.raises(ConfigError, match=r"memory\.capacity"):
        MemoryBank(DK, DV, MemoryConfig(capacity=0))


def test_remove_by_id_is_durable_and_never_returns_the_entries(tmp_path: Path) -> None:
    """Removing a cancelled reply's memories: gone from search, and a reload does not resurrect them."""
    from memory import MemoryBank

    rng = np.random.default_rng(5)
    keys = rng.standard_normal((40, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)  # unit keys: each is its own best match
    values = rng.standard_normal((40, 4)).astype(np.float32)
    bank = MemoryBank.open(tmp_path / "b", 8, 4)
    ids = bank.add(keys, values)
    assert bank.remove(ids[10:20]) == 10
    with pytest.raises(MemoryBankError):
        bank.remove(ids[10:11])  # already removed
    bank.sync()
    res = bank.search(keys[10:20], 5)
    assert not np.isin(res.ids, ids[10:20]).any()
    assert len(bank) == 30
    bank.close()
    again = MemoryBank.open(tmp_path / "b", 8, 4)
    assert len(again) == 30
    np.testing.assert_array_equal(again.live_ids(), np.concatenate([ids[:10], ids[20:]]))
    again.add(keys[10:15], values[10:15])  # freed slots are reused without mixing values
    _, stored = again.get(again.live_ids())
    res = again.search(again.get(again.live_ids())[0], 1)
    np.testing.assert_array_equal(res.values[:, 0], stored)
    again.close()
