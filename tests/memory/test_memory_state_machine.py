"""Property test: a persistent bank against a brute-force reference model.

Random sequences of add / search / prune / clock advance / snapshot / reopen / replica check
run against both; after every step the live entries, their keys and values agree, and every
search result is a correct top-k whose values belong to their keys.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memory import MemoryBank, MemoryConfig

DK, DV = 4, 3


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Reference:
    """The bank's contract, brute force: dicts of entries, full scans for every decision."""

    def __init__(self, config: MemoryConfig) -> None:
        self.c = config
        self.entries: dict[int, dict[str, object]] = {}
        self.next_id = 0

    def expire(self, now: float) -> int:
        c = self.c
        gone = []
        for i, e in self.entries.items():
            w, r = float(e["written"]), float(e["retrieved"])  # type: ignore[arg-type]
            if (c.ttl_s > 0 and now > w + c.ttl_s) or (
                c.staleness_s > 0 and now > max(r + c.staleness_s, w + c.min_age_s)
            ):
                gone.append(i)
        for i in gone:
            del self.entries[i]
        return len(gone)

    def add(self, keys: np.ndarray, values: np.ndarray, now: float) -> list[int]:
        overflow = len(self.entries) + len(keys) - self.c.capacity
        if overflow > 0:
            overflow -= self.expire(now)
        if overflow > 0:
            if self.c.eviction == "fifo":
                order = sorted(self.entries)
            else:
                h = self.c.importance_half_life_s

                def rank(i: int) -> tuple[float, int]:
                    e = self.entries[i]
                    return (float(np.log2(e["mass"]) + float(e["retrieved"]) / h), i)  # type: ignore[call-overload,arg-type]

                order = sorted(self.entries, key=rank)
            for i in order[:overflow]:
                del self.entries[i]
        ids = list(range(self.next_id, self.next_id + len(keys)))
        self.next_id += len(keys)
        for i, key, value in zip(ids, keys, values, strict=True):
            self.entries[i] = {
                "key": key,
                "value": value,
                "written": now,
                "retrieved": now,
                "mass": np.float64(self.c.importance_initial_mass),
            }
        return ids

    def touch(self, ids: np.ndarray, now: float) -> None:
        h = self.c.importance_half_life_s
        uniq, counts = np.unique(ids, return_counts=True)
        for i, n in zip(uniq.tolist(), counts.tolist(), strict=True):
            e = self.entries[i]
            decay = np.exp2(-(now - float(e["retrieved"])) / h)  # type: ignore[arg-type]
            e["mass"] = e["mass"] * decay + np.float64(n)  # type: ignore[operator]
            e["retrieved"] = now


@settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class BankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="bank-sm-"))
        self.clock = Clock()
        self.rng = np.random.default_rng(0)

    @initialize(
        capacity=st.integers(4, 24),
        eviction=st.sampled_from(["fifo", "importance"]),
        ttl=st.sampled_from([0.0, 30.0]),
        staleness=st.sampled_from([0.0, 12.0]),
        seed=st.integers(0, 2**16),
    )
    def setup(self, capacity: int, eviction: str, ttl: float, staleness: float, seed: int) -> None:
        self.config = MemoryConfig(
            capacity=capacity,
            eviction=eviction,
            ttl_s=ttl,
            staleness_s=staleness,
            min_age_s=5.0,
            importance_half_life_s=10.0,
        )
        self.rng = np.random.default_rng(seed)
        self.bank = MemoryBank.open(self.tmp / "bank", DK, DV, self.config, clock=self.clock)
        self.ref = Reference(self.config)

    def teardown(self) -> None:
        if hasattr(self, "bank"):
            self.bank.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(n=st.integers(1, 10))
    def add(self, n: int) -> None:
        n = min(n, self.config.capacity)
        keys = self.rng.standard_normal((n, DK)).astype(np.float32)
        values = self.rng.standard_normal((n, DV)).astype(np.float32)
        ids = self.bank.add(keys, values)
        assert ids.tolist() == self.ref.add(keys, values, self.clock.now)

    @rule(q=st.integers(1, 4), k=st.integers(1, 8))
    def search(self, q: int, k: int) -> None:
        queries = self.rng.standard_normal((q, DK)).astype(np.float32)
        res = self.bank.search(queries, k)
        self.ref.expire(self.clock.now)
        live = sorted(self.ref.entries)
        n_valid = min(k, len(live))
        assert res.mask.sum(axis=1).tolist() == [n_valid] * q
        if live:
            keys = np.stack([self.ref.entries[i]["key"] for i in live])  # type: ignore[misc]
            scores = queries.astype(np.float64) @ keys.astype(np.float64).T
            kth = -np.sort(-scores, axis=1)[:, n_valid - 1]
            for row in range(q):
                got = res.ids[row, :n_valid]
                assert len(set(got.tolist())) == n_valid
                for col, i in enumerate(got.tolist()):
                    e = self.ref.entries[i]  # a live entry
                    np.testing.assert_array_equal(res.values[row, col], e["value"])
                    want = float(queries[row].astype(np.float64) @ e["key"].astype(np.float64))  # type: ignore[union-attr]
                    assert abs(float(res.scores[row, col]) - want) < 1e-4
                    assert want >= kth[row] - 1e-4  # a correct top-k (up to float ties)
        self.ref.touch(res.ids[res.mask], self.clock.now)

    @rule(dt=st.sampled_from([0.5, 3.0, 7.0, 20.0]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def prune(self) -> None:
        assert self.bank.prune() == self.ref.expire(self.clock.now)

    @rule()
    def snapshot(self) -> None:
        self.bank.snapshot()

    @rule()
    def reopen(self) -> None:
        self.bank.close()
        self.bank = MemoryBank.open(self.tmp / "bank", DK, DV, self.config, clock=self.clock)

    @precondition(lambda self: hasattr(self, "bank"))
    @rule(k=st.integers(1, 6))
    def replica_is_bit_identical(self, k: int) -> None:
        """A copy of the synced directory, reopened, answers exactly like the live bank."""
        self.bank.sync()
        copy = self.tmp / f"copy{self.rng.integers(1 << 30)}"
        shutil.copytree(self.tmp / "bank", copy)
        replica = MemoryBank.open(copy, DK, DV, self.config, clock=self.clock)
        queries = self.rng.standard_normal((3, DK)).astype(np.float32)
        a, b = self.bank.search(queries, k), replica.search(queries, k)
        replica.close()
        shutil.rmtree(copy)
        for x, y in zip(
            (a.ids, a.scores, a.values, a.mask), (b.ids, b.scores, b.values, b.mask), strict=True
        ):
            np.testing.assert_array_equal(x, y)
        self.ref.expire(self.clock.now)
        self.ref.touch(a.ids[a.mask], self.clock.now)

    @invariant()
    def same_entries(self) -> None:
        if not hasattr(self, "bank"):
            return
        live = sorted(self.ref.entries)
        assert self.bank.live_ids().tolist() == live
        assert len(self.bank) == len(live) <= self.config.capacity
        if live:
            keys, values = self.bank.get(np.array(live))
            np.testing.assert_array_equal(
                keys, np.stack([self.ref.entries[i]["key"] for i in live])
            )  # type: ignore[misc]
            np.testing.assert_array_equal(
                values, np.stack([self.ref.entries[i]["value"] for i in live])
            )  # type: ignore[misc]


TestBankMachine = BankMachine.TestCase
