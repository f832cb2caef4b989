"""Large-bank path: the switch to IVF, its recall against exact search, eviction and reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from memory import MemoryBank, MemoryConfig

DK, DV = 16, 4


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Keys near a few hundred centres: the structure real attention keys have (Gaussian is worst case)."""
    pick = centers[rng.integers(0, centers.shape[0], n)]
    out: np.ndarray = (pick + 0.3 * rng.standard_normal((n, DK))).astype(np.float32)
    return out


def config(storage: str, **kw: object) -> MemoryConfig:
    base: dict[str, object] = {
        "capacity": 6000,
        "ann_threshold": 2048,
        "ivf_nlist": 64,
        "ivf_nprobe": 8,
        "ivf_storage": storage,
    }
    return MemoryConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_ivf_recall_and_values_after_overflows(storage: str) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, DK)).astype(np.float32) * 2
    bank = MemoryBank(DK, DV, config(storage, eviction="importance"))
    exact = MemoryBank(DK, DV, config("fp32", eviction="importance", index="flat"))
    for _ in range(30):  # 15 000 adds into 6 000 entries: the IVF rows are overwritten in place
        keys = clustered(rng, 500, centers)
        values = keys[:, :DV] * 2
        bank.add(keys, values)
        exact.add(keys, values)
    bank.build_index()  # in already, unless the worker is slower than these 30 adds
    assert bank.stats().index == "ivf" and exact.stats().index == "flat"
    np.testing.assert_array_equal(bank.live_ids(), exact.live_ids())
    queries = clustered(rng, 100, centers)
    got, want = bank.search(queries, 32), exact.search(queries, 32)
    recall = np.mean([len(set(g) & set(w)) / 32 for g, w in zip(got.ids, want.ids, strict=True)])
    assert recall >= 0.9, recall
    keys, values = exact.get(got.ids[got.mask])  # exact stores the keys as given
    np.testing.assert_array_equal(got.values[got.mask], keys[:, :DV] * 2)


def test_ivf_bank_reloads_bit_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((50, DK)).astype(np.float32)
    cfg = config("int8", ttl_s=0.0)
    bank = MemoryBank.open(tmp_path / "a", DK, DV, cfg)
    for i in range(8):
        keys = clustered(rng, 500, centers)
        bank.add(keys, keys[:, :DV])
        if i == 3:
            bank.snapshot()  # the switch to IVF happens after this, during the log's adds
    bank.build_index()  # the background build is in (the log says where), whatever its timing
    bank.close()
    live = MemoryBank.open(tmp_path / "a", DK, DV, cfg)  # snapshot + replay through the IVF switch
    assert live.stats().index == "ivf"
    live.snapshot()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    reloaded = MemoryBank.open(tmp_path / "b", DK, DV, cfg)
    q = clustered(rng, 20, centers)
    ra, rb = live.search(q, 16), reloaded.search(q, 16)
    for x, y in zip((ra.ids, ra.scores, ra.values), (rb.ids, rb.scores, rb.values), strict=True):
        np.testing.assert_array_equal(x, y)
    assert ra.mask.all()
    live.close()
    reloaded.close()
