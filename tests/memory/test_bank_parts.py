"""A bank with parts: one entry per token for several heads, each head searched on its own."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_runtime.errors import BankFormatError, ConfigError, MemoryBankError
from memory import MemoryBank, MemoryConfig
from tests.conftest import TIMEOUT

P, D, DV = 3, 8, 4


def _entries(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, P * D)).astype(np.float32),
        rng.standard_normal((n, P * DV)).astype(np.float32),
    )


def test_each_part_answers_like_its_own_bank() -> None:
    keys, values = _entries(200)
    bank = MemoryBank(P * D, P * DV, parts=P)
    bank.add(keys, values, np.arange(1000, 1200))
    queries = np.random.default_rng(1).standard_normal((P, 5, D)).astype(np.float32)
    got = bank.search_parts(queries, 7)
    assert got.values.shape == (P, 5, 7, DV) and got.keys is not None and got.positions is not None
    for p in range(P):
        alone = MemoryBank(D, DV)
        alone.add(keys[:, p * D : (p + 1) * D], values[:, p * DV : (p + 1) * DV])
        want = alone.search(queries[p], 7)
        np.testing.assert_array_equal(got.ids[p], want.ids)
        np.testing.assert_allclose(got.scores[p], want.scores, rtol=1e-6)
        np.testing.assert_array_equal(got.values[p], want.values)
        np.testing.assert_array_equal(got.keys[p], keys[got.ids[p], p * D : (p + 1) * D])
        np.testing.assert_array_equal(got.positions[p], 1000 + got.ids[p])
    # a slice of the parts (one memory layer's heads) searches exactly those parts
    tail = bank.search_parts(queries[1:], 7, first=1)
    np.testing.assert_array_equal(tail.ids, got.ids[1:])


def test_evicted_entries_leave_every_part() -> None:
    keys, values = _entries(50)
    bank = MemoryBank(P * D, P * DV, MemoryConfig(capacity=30), parts=P)
    bank.add(keys[:30], values[:30])
    bank.add(keys[30:], values[30:])  # evicts the 20 oldest (fifo)
    res = bank.search_parts(np.ones((P, 2, D), np.float32), 30)
    assert res.mask.all() and res.ids.min() >= 20


def test_parts_survive_snapshot_log_and_state_dict(tmp_path: Path) -> None:
    keys, values = _entries(64)
    bank = MemoryBank.open(tmp_path / "b", P * D, P * DV, parts=P)
    bank.add(keys[:40], values[:40])
    bank.snapshot()
    bank.add(keys[40:], values[40:])
    queries = np.random.default_rng(2).standard_normal((P, 3, D)).astype(np.float32)
    want = bank.search_parts(queries, 5)
    bank.close()
    again = MemoryBank.open(tmp_path / "b", P * D, P * DV, parts=P)
    got = again.search_parts(queries, 5)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.values, want.values)
    copy = MemoryBank(P * D, P * DV, parts=P)
    copy.load_state_dict(again.state_dict())
    np.testing.assert_array_equal(copy.search_parts(queries, 5).ids, want.ids)
    again.close()
    with pytest.raises(BankFormatError, match="parts"):
        MemoryBank(P * D, P * DV).load_state_dict(copy.state_dict())


def test_bad_shapes_are_refused_by_name() -> None:
    with pytest.raises(MemoryBankError, match="parts must divide"):
        MemoryBank(10, 4, parts=3)
    bank = MemoryBank(P * D, P * DV, parts=P)
    with pytest.raises(MemoryBankError, match="search_parts"):
        bank.search(np.zeros((1, P * D), np.float32), 1)
    with pytest.raises(MemoryBankError, match="exceed"):
        bank.search_parts(np.zeros((2, 1, D), np.float32), 1, first=2)
    with pytest.raises(MemoryBankError, match="shape"):
        bank.search_parts(np.zeros((1, 1, D + 1), np.float32), 1)


@pytest.mark.parametrize(
    "expiry",
    [{}, {"ttl_s": 3600.0}, {"staleness_s": 3600.0}],
    ids=["no-expiry", "ttl", "staleness"],
)
def test_retrievals_between_writes_are_logged_as_one_touch_and_replay_exactly(
    expiry: dict[str, float], tmp_path: Path
) -> None:
    """Also with TTL or staleness pruning on: a search that finds nothing due does not flush
    the retrievals (each would be its own log record, thirty per decoded token)."""
    keys, values = _entries(64)
    config = MemoryConfig(eviction="importance", importance_half_life_s=5.0, capacity=80, **expiry)
    sizes = {}
    for searches in (1, 30):
        bank = MemoryBank.open(tmp_path / f"b{searches}", P * D, P * DV, config, parts=P)
        bank.add(keys, values)
        bank.sync()
        base = bank.stats().log_bytes
        queries = np.random.default_rng(3).standard_normal((P, 4, D)).astype(np.float32)
        for _ in range(searches):  # e.g. thirty memory layers in one decode step
            bank.search_parts(queries, 8)
        bank.sync()
        sizes[searches] = bank.stats().log_bytes - base
        bank.add(*_entries(40, seed=9))  # importance eviction reads the coalesced masses
        want = bank.live_ids()
        bank.close()
        again = MemoryBank.open(tmp_path / f"b{searches}", P * D, P * DV, config, parts=P)
        np.testing.assert_array_equal(again.live_ids(), want)
        again.close()
    assert sizes[30] == sizes[1]  # one record either way (weights differ, not the size)


def test_a_span_brings_each_hit_back_with_its_neighbours_once() -> None:
    keys, values = _entries(100)
    bank = MemoryBank(P * D, P * DV, MemoryConfig(capacity=90), parts=P)
    bank.add(keys[:50], values[:50], np.arange(50))
    bank.add(keys[50:], values[50:], np.arange(50, 100))  # evicts ids 0..9
    bank.remove(np.array([60]))
    queries = np.random.default_rng(4).standard_normal((P, 3, D)).astype(np.float32)
    hits = bank.search_parts(queries, 4)
    near = bank.search_parts(queries, 4, span=2)
    assert near.ids.shape == (P, 3, 20) and near.keys is not None and near.positions is not None
    for p in range(P):
        for r in range(3):
            got = near.ids[p, r][near.mask[p, r]]
            want = {i + o for i in hits.ids[p, r] for o in range(-2, 3)}
            want = {i for i in want if 10 <= i < 100 and i != 60}
            assert sorted(got.tolist()) == sorted(want)  # each live neighbour exactly once
            np.testing.assert_array_equal(near.positions[p, r][near.mask[p, r]], got)
            ok = near.mask[p, r]
            np.testing.assert_array_equal(
                near.keys[p, r][ok], keys[near.ids[p, r][ok], p * D : (p + 1) * D]
            )


def _clustered_parts(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Keys of every part near a few dozen centres (the structure attention keys have)."""
    pick = centers[rng.integers(0, centers.shape[0], (n, P))]  # (n, P, D)
    return (pick + 0.3 * rng.standard_normal((n, P, D))).reshape(n, P * D).astype(np.float32)


@pytest.mark.parametrize("storage", ["fp32", "int8"])
def test_a_grown_bank_moves_every_part_to_ivf_and_keeps_finding_the_top_k(
    storage: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((40, D)).astype(np.float32) * 2
    cfg = MemoryConfig(part_ann_threshold=2048, ivf_nprobe=8, ivf_storage=storage, ttl_s=0.0)
    bank = MemoryBank.open(tmp_path / "ivf", P * D, P * DV, cfg, parts=P)
    exact = MemoryBank(P * D, P * DV, MemoryConfig(index="flat"), parts=P)
    for i in range(6):  # 3000 entries: the switch happens during the adds after the snapshot
        keys = _clustered_parts(rng, 500, centers)
        values = rng.standard_normal((500, P * DV)).astype(np.float32)
        bank.add(keys, values, np.arange(i * 500, (i + 1) * 500))
        exact.add(keys, values, np.arange(i * 500, (i + 1) * 500))
        if i == 2:
            bank.snapshot()
        # built in the background from the add that crosses 2048; the first add after it has
        # finished brings it in (when depends on the worker; the log records where)
        assert bank.stats().index == "flat" or (i + 1) * 500 > 2048
    bank.build_index()
    assert bank.stats().index == "ivf"
    queries = np.stack([centers[rng.integers(0, 40, 20)] for _ in range(P)])  # (P, 20, D)
    got, want = bank.search_parts(queries, 16), exact.search_parts(queries, 16)
    overlap = np.mean(
        [
            len(set(g) & set(w)) / 16
            for g, w in zip(got.ids.reshape(-1, 16), want.ids.reshape(-1, 16), strict=True)
        ]
    )
    assert overlap >= 0.9, overlap
    assert got.mask.all() and got.keys is not None and got.positions is not None
    stored = exact.get(got.ids.reshape(-1))[0].reshape(P, 20, 16, P, D)
    for p in range(P):  # each part's hits come back with their own key slice and position
        tol = 1e-6 if storage == "fp32" else 0.03 * float(np.ptp(stored))  # int8: 256 levels
        np.testing.assert_allclose(got.keys[p], stored[p, :, :, p], atol=tol)
        np.testing.assert_array_equal(got.positions[p], got.ids[p])
    bank.close()
    again = MemoryBank.open(tmp_path / "ivf", P * D, P * DV, cfg, parts=P)  # snapshot + replay
    assert again.stats().index == "ivf"
    np.testing.assert_array_equal(again.search_parts(queries, 16).ids, got.ids)
    again.snapshot()
    again.close()
    third = MemoryBank.open(tmp_path / "ivf", P * D, P * DV, cfg, parts=P)  # the IVF snapshot
    np.testing.assert_array_equal(third.search_parts(queries, 16).ids, got.ids)
    third.close()


@pytest.mark.parametrize("storage", ["fp32", "int8"])
def test_an_ivf_bank_with_holes_never_returns_the_dead_and_keys_follow_their_rows(
    storage: str,
) -> None:
    """Searches reuse their selector while the liveness bitmap and the row count are unchanged;
    removals (holes), reuse of the holes and growth must each be seen by the next search."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20, D)).astype(np.float32) * 2
    cfg = MemoryConfig(part_ann_threshold=1024, ivf_nprobe=64, ivf_storage=storage, ttl_s=0.0)
    bank = MemoryBank(P * D, P * DV, cfg, parts=P)
    keys = _clustered_parts(rng, 1200, centers)
    bank.add(keys, rng.standard_normal((1200, P * DV)).astype(np.float32), np.arange(1200))
    bank.build_index()  # the IVF index built in the background, brought in now
    assert bank.stats().index == "ivf"
    queries = np.stack([centers[rng.integers(0, 20, 6)] for _ in range(P)])
    stored = {i: keys[i] for i in range(1200)}
    next_id = 1200
    for round_ in range(4):
        res = bank.search_parts(queries, 200)
        live = res.ids[res.mask]
        assert set(live.tolist()) <= set(stored), round_
        for p in range(P):
            ok = res.mask[p]
            want = np.stack([stored[i][p * D : (p + 1) * D] for i in res.ids[p][ok]])
            tol = 1e-6 if storage == "fp32" else 0.03 * float(np.ptp(keys))
            np.testing.assert_allclose(res.keys[p][ok], want, atol=tol)  # type: ignore[index]
        # the rows found last time die; then some of their slots are reused by new entries
        dead = np.unique(live)[:150]
        bank.remove(dead)
        for i in dead.tolist():
            del stored[i]
        fresh = _clustered_parts(rng, 100, centers)
        ids = np.arange(next_id, next_id + 100)
        bank.add(fresh, rng.standard_normal((100, P * DV)).astype(np.float32), ids)
        stored.update({int(i): fresh[j] for j, i in enumerate(ids)})
        next_id += 100
        after = bank.search_parts(queries, 200)
        assert not set(after.ids[after.mask].tolist()) & set(dead.tolist()), round_


def test_the_move_to_ivf_is_built_off_the_add_and_equals_the_inline_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ivf_build = background``: the add that crosses the threshold leaves the flat index
    answering (exactly) while the IVF index trains on the worker thread, and later adds do not
    wait for it; the first add after it has finished brings it in with what changed meanwhile
    (new rows, rows reused after removals and evictions) and logs the switch. The result
    answers exactly as the inline build of the same operations does, and a replay of the log
    switches at the same point."""
    import memory.bank as bank_module

    gate = threading.Event()  # holds the worker's build until the test lets it go
    real = bank_module.build_ivf

    def held(*args: Any) -> Any:
        gate.wait(TIMEOUT)
        return real(*args)

    monkeypatch.setattr(bank_module, "build_ivf", held)
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((20, D)).astype(np.float32) * 2
    common = dict(part_ann_threshold=1024, ivf_nprobe=4, ttl_s=0.0, capacity=1300)
    inline = MemoryBank(P * D, P * DV, MemoryConfig(ivf_build="inline", **common), parts=P)  # type: ignore[arg-type]
    config = MemoryConfig(**common)  # type: ignore[arg-type]
    assert config.ivf_build == "background"
    bank = MemoryBank.open(tmp_path / "bg", P * D, P * DV, config, parts=P)
    exact = MemoryBank(P * D, P * DV, MemoryConfig(index="flat", capacity=1300), parts=P)
    queries = np.stack([centers[rng.integers(0, 20, 6)] for _ in range(P)])

    def both(op: str, *args: object) -> None:
        for b in (inline, bank, exact):
            getattr(b, op)(*args)

    def add(n: int, start: int) -> None:
        keys = _clustered_parts(rng, n, centers)
        values = rng.standard_normal((n, P * DV)).astype(np.float32)
        both("add", keys, values, np.arange(start, start + n))

    add(1100, 0)  # crosses 1024
    assert inline.stats().index == "ivf" and bank.stats().index == "flat" and bank.index_building
    # while it builds, the flat index answers: exactly the exact bank's answers
    got, want = bank.search_parts(queries, 8), exact.search_parts(queries, 8)
    np.testing.assert_array_equal(got.ids, want.ids)
    both("remove", np.arange(0, 1100, 7))  # holes, reused by the next add
    add(150, 1100)  # the build is still held: this add does not wait for it
    assert bank.stats().index == "flat" and bank.index_building
    gate.set()
    bank._ivf_build.future.result()  # type: ignore[union-attr]  # (finished, not yet in)
    add(200, 1250)  # brings it in first, then adds to it; 50 evicted
    assert bank.stats().index == "ivf" and not bank.index_building
    got, want = bank.search_parts(queries, 16), inline.search_parts(queries, 16)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    np.testing.assert_array_equal(got.keys, want.keys)  # type: ignore[arg-type]
    assert set(got.ids[got.mask].tolist()) <= set(bank.live_ids().tolist())
    bank.close()
    again = MemoryBank.open(tmp_path / "bg", P * D, P * DV, config, parts=P)  # log replay
    assert again.stats().index == "ivf"
    np.testing.assert_array_equal(again.search_parts(queries, 16).ids, got.ids)
    again.close()


def test_a_pending_build_comes_in_at_a_snapshot_is_redone_if_it_failed_and_is_cancelled_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memory.bank as bank_module

    rng = np.random.default_rng(12)
    config = MemoryConfig(part_ann_threshold=1024, ttl_s=0.0)
    keys, values = _entries(1100, seed=4)
    snap = MemoryBank.open(tmp_path / "snap", P * D, P * DV, config, parts=P)
    snap.add(keys, values)
    assert snap.index_building
    snap.snapshot()  # waits for the build and brings it in: a snapshot never holds a build
    assert snap.stats().index == "ivf" and not snap.index_building
    queries = rng.standard_normal((P, 4, D)).astype(np.float32)
    want = snap.search_parts(queries, 8).ids
    snap.close()
    reopened = MemoryBank.open(tmp_path / "snap", P * D, P * DV, config, parts=P)
    assert reopened.stats().index == "ivf"
    np.testing.assert_array_equal(reopened.search_parts(queries, 8).ids, want)
    reopened.close()

    real, calls = bank_module.build_ivf, []

    def fails_on_the_worker(*args: Any) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("out of memory on the worker")
        return real(*args)

    monkeypatch.setattr(bank_module, "build_ivf", fails_on_the_worker)
    retried = MemoryBank(P * D, P * DV, config, parts=P)
    retried.add(keys, values)
    retried.build_index()  # the worker's build failed: redone here, from the same copy
    assert retried.stats().index == "ivf" and calls[0].startswith("memory-ivf")
    assert calls[1] == threading.current_thread().name
    np.testing.assert_array_equal(retried.search_parts(queries, 8).ids, want)
    retried.close()

    gate = threading.Event()

    def held(*args: Any) -> Any:
        gate.wait(TIMEOUT)
        return real(*args)

    monkeypatch.setattr(bank_module, "build_ivf", held)
    dropped = MemoryBank(P * D, P * DV, config, parts=P)
    dropped.add(keys, values)
    build = dropped._ivf_build
    assert build is not None
    dropped.close()  # cancels it: it stops at its next part instead of training 90 of them
    gate.set()
    with pytest.raises(CancelledError):
        build.future.result(TIMEOUT)


def test_banks_written_before_the_background_build_replay_inline() -> None:
    """A stored config without ``ivf_build`` (older banks) reads as ``inline``: their logs
    replay with the switch where it happened when they were written."""
    stored = MemoryConfig().to_dict()
    del stored["ivf_build"]
    assert MemoryConfig.from_dict(stored).ivf_build == "inline"
    assert MemoryConfig.from_dict(MemoryConfig().to_dict()).ivf_build == "background"
    with pytest.raises(ConfigError, match=r"memory\.ivf_build"):
        MemoryConfig(ivf_build="later").validate()
