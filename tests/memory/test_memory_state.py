"""State dicts: exact round trips, precise errors on load, and one-way imports in memory/."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_runtime.errors import BankFormatError, MemoryBankError
from memory import MemoryBank, MemoryConfig
from memory.durable import read_state, write_state

DK, DV = 8, 4
MEMORY = Path(__file__).resolve().parents[2] / "memory"


def bank_with_entries(config: MemoryConfig, n: int = 60) -> MemoryBank:
    rng = np.random.default_rng(0)
    bank = MemoryBank(DK, DV, config)
    for _ in range(n // 10):
        keys = rng.standard_normal((10, DK)).astype(np.float32)
        bank.add(keys, keys[:, :DV] + 1.0)
        bank.search(rng.standard_normal((2, DK)).astype(np.float32), 3)
    bank.remove(bank.live_ids()[:3])
    bank.meta["who"] = {"n": n}
    return bank


def answers(bank: MemoryBank) -> list[np.ndarray]:
    r = bank.search(np.random.default_rng(9).standard_normal((5, DK)).astype(np.float32), 7)
    return [r.ids, r.scores, r.values, r.mask]


@pytest.mark.parametrize(
    "config",
    [
        MemoryConfig(capacity=40, eviction="importance"),
        MemoryConfig(capacity=2000, ann_threshold=1024, ivf_nlist=16, value_storage="fp16"),
    ],
    ids=["flat", "ivf"],
)
def test_state_dict_round_trips_exactly(config: MemoryConfig, tmp_path: Path) -> None:
    ivf = config.ann_threshold == 1024
    bank = bank_with_entries(config, 1200 if ivf else 60)
    bank.build_index()  # an IVF index built in the background comes in now
    assert bank.stats().index == ("ivf" if ivf else "flat")
    state = bank.state_dict()
    assert state["state_version"] == 1
    json.dumps({k: v for k, v in state.items() if k != "arrays"})  # all but arrays is JSON
    twin = MemoryBank(DK, DV, config)
    twin.load_state_dict(state)
    write_state(tmp_path / "s.bank", 1, state, None)
    _, loaded = read_state(tmp_path / "s.bank", None)
    from_file = MemoryBank(DK, DV, config)
    from_file.load_state_dict(loaded)
    for other in (twin, from_file):
        assert other.stats() == bank.stats()
        assert other.meta == bank.meta
        np.testing.assert_array_equal(other.live_ids(), bank.live_ids())
    expected = answers(bank)
    for other in (twin, from_file):
        for x, y in zip(answers(other), expected, strict=True):
            np.testing.assert_array_equal(x, y)


def _other_index(state: dict[str, Any]) -> None:
    other = MemoryBank(DK, DV, MemoryConfig(capacity=40))
    other.add(np.ones((2, DK), np.float32), np.ones((2, DV), np.float32))
    state["arrays"]["index"] = other.state_dict()["arrays"]["index"]


CHANGES: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("version", lambda s: s.update(state_version=2), "state version 2"),
    ("dims", lambda s: s.update(key_dim=DK + 1), "dims"),
    ("encoding", lambda s: s["config"].update(value_storage="fp16"), "value_storage"),
    ("missing", lambda s: s.pop("counters"), "does not have the key `counters`"),
    ("counter", lambda s: s["counters"].update(next_id=-1), "counter `next_id`"),
    ("clock", lambda s: s.update(last_time="soon"), "last_time"),
    ("kind", lambda s: s.update(index_kind="hnsw"), "index_kind"),
    ("array", lambda s: s["arrays"].pop("mass"), "lacks the array `mass`"),
    ("rows", lambda s: s["arrays"].update(mass=s["arrays"]["mass"][:-1]), "array mass"),
    ("free", lambda s: s["arrays"].update(free=s["arrays"]["free"][:1]), "partition"),
    ("index rows", _other_index, "2 rows for"),
    ("index bytes", lambda s: s["arrays"].update(index=s["arrays"]["index"][:9]), "parse"),
    ("ids", lambda s: s["counters"].update(next_id=1), "id counter"),
]


@pytest.mark.parametrize(
    ("change", "message"), [(c, m) for _, c, m in CHANGES], ids=[n for n, _, _ in CHANGES]
)
def test_load_state_dict_names_the_problem_and_changes_nothing(
    change: Callable[[dict[str, Any]], object], message: str
) -> None:
    state = bank_with_entries(MemoryConfig(capacity=40)).state_dict()
    state = {**state, "config": dict(state["config"]), "counters": dict(state["counters"])}
    state["arrays"] = dict(state["arrays"])
    change(state)
    target = bank_with_entries(MemoryConfig(capacity=40), 20)
    before = target.live_ids()
    with pytest.raises(BankFormatError, match=message):
        target.load_state_dict(state)
    np.testing.assert_array_equal(target.live_ids(), before)


def test_index_encoding_must_match_the_stored_config() -> None:
    state = bank_with_entries(MemoryConfig(capacity=40, flat_storage="fp16")).state_dict()
    fp32 = bank_with_entries(MemoryConfig(capacity=40)).state_dict()
    state["arrays"] = {**state["arrays"], "index": fp32["arrays"]["index"]}
    with pytest.raises(BankFormatError, match="bytes per key"):
        MemoryBank(DK, DV, MemoryConfig(capacity=40, flat_storage="fp16")).load_state_dict(state)


def test_load_state_dict_refuses_a_bank_with_a_directory(tmp_path: Path) -> None:
    state = bank_with_entries(MemoryConfig(capacity=40)).state_dict()
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=40))
    with pytest.raises(MemoryBankError, match="directory"):
        bank.load_state_dict(state)
    bank.close()


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """Modules imported by ``path`` (TYPE_CHECKING blocks included) and lines of nested imports."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    nested = [
        n.lineno
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    return names, nested


def test_memory_imports_run_one_way() -> None:
    for path in sorted(MEMORY.glob("*.py")):
        names, nested = _imports(path)
        assert not nested, f"{path.name} imports inside functions at lines {nested}"
        outside = {n for n in names if n.startswith("agent_runtime")}
        assert outside <= {"agent_runtime.errors", "agent_runtime.files"}, path.name
    assert "memory.bank" not in _imports(MEMORY / "durable.py")[0]
    assert "memory.bank" not in _imports(MEMORY / "state.py")[0]
    assert "memory.durable" in _imports(MEMORY / "bank.py")[0]
