"""Durability: snapshots and logs round-trip exactly; corrupt files raise BankFormatError; kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent_runtime.errors import BankFormatError
from memory import MemoryBank, MemoryConfig

DK, DV = 8, 4
REPO = Path(__file__).resolve().parents[2]


def kv(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    keys = rng.standard_normal((n, DK)).astype(np.float32)
    return keys, (3.0 * keys[:, :DV] + 1.0).astype(np.float32)


def filled(directory: Path, config: MemoryConfig | None = None, cipher: Any = None) -> MemoryBank:
    rng = np.random.default_rng(0)
    bank = MemoryBank.open(directory, DK, DV, config or MemoryConfig(capacity=50), cipher=cipher)
    for _ in range(8):
        bank.add(*kv(rng, 10))
        bank.search(rng.standard_normal((2, DK)).astype(np.float32), 3)
        bank.sync()  # one committed batch per turn, as the server does
    return bank


def same_answers(a: MemoryBank, b: MemoryBank) -> None:
    q = np.random.default_rng(99).standard_normal((6, DK)).astype(np.float32)
    ra, rb = a.search(q, 7), b.search(q, 7)
    for x, y in zip(
        (ra.ids, ra.scores, ra.values, ra.mask),
        (rb.ids, rb.scores, rb.values, rb.mask),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_snapshot_and_log_reload_bit_identical(tmp_path: Path) -> None:
    bank = filled(tmp_path / "a")
    bank.snapshot()
    bank.add(*kv(np.random.default_rng(5), 7))  # after the snapshot: only in the log
    bank.meta["model"] = "abc"
    bank.close()
    twin = filled(tmp_path / "b")
    twin.snapshot()
    twin.add(*kv(np.random.default_rng(5), 7))
    again = MemoryBank.open(tmp_path / "a", DK, DV, MemoryConfig(capacity=50))
    assert again.meta == {"model": "abc"}
    assert again.stats().generation == 1
    np.testing.assert_array_equal(again.live_ids(), twin.live_ids())
    same_answers(again, twin)
    again.close()
    twin.close()


def test_previous_generation_is_removed_only_after_the_new_one(tmp_path: Path) -> None:
    bank = filled(tmp_path / "a")
    bank.snapshot()
    bank.snapshot()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "log-00000002.wal",
        "snapshot-00000002.bank",
    ]
    # the disk after a crash between renaming snapshot 3 and starting its log
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    bank.snapshot()
    shutil.copy(tmp_path / "a" / "snapshot-00000003.bank", tmp_path / "b")
    (tmp_path / "b" / "snapshot-00000004.bank.tmp").write_bytes(b"half-written")
    bank.close()
    with MemoryBank.open(tmp_path / "b", DK, DV, MemoryConfig(capacity=50)) as reopened:
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
            "log-00000003.wal",
            "snapshot-00000003.bank",
        ]
        assert len(reopened) == 50


def test_meta_changes_are_durable_at_sync(tmp_path: Path) -> None:
    bank = MemoryBank.open(tmp_path / "a", DK, DV)
    bank.meta["ledger"] = {"eps": 1.5}
    bank.sync()
    shutil.copytree(tmp_path / "a", tmp_path / "crashed")  # the disk as a crash would leave it
    bank.close()
    with MemoryBank.open(tmp_path / "crashed", DK, DV) as again:
        assert again.meta == {"ledger": {"eps": 1.5}}


def test_dims_and_layout_mismatch_are_format_errors(tmp_path: Path) -> None:
    filled(tmp_path).close()
    with pytest.raises(BankFormatError, match="dims"):
        MemoryBank.open(tmp_path, DK + 1, DV)
    with pytest.raises(BankFormatError, match="value_storage"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50, value_storage="fp16"))


def test_policy_change_on_reopen_starts_a_new_generation(tmp_path: Path) -> None:
    filled(tmp_path).close()
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=20, eviction="importance"))
    assert bank.stats().generation == 1
    bank.add(*kv(np.random.default_rng(1), 5))
    bank.close()
    with MemoryBank.open(
        tmp_path, DK, DV, MemoryConfig(capacity=20, eviction="importance")
    ) as again:
        assert len(again) == 20


def test_cipher_seals_snapshot_and_log(tmp_path: Path, cipher: Any) -> None:
    bank = filled(tmp_path, cipher=cipher)
    bank.snapshot()
    bank.add(*kv(np.random.default_rng(2), 3))
    bank.close()
    reopened = MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50), cipher=cipher)
    assert len(reopened) == 50 and reopened.stats().added_total == 83
    reopened.close()
    with pytest.raises(BankFormatError, match="encrypted"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50))
    wrong = type(cipher)(b"x" * 32)
    with pytest.raises(BankFormatError, match="authentication"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50), cipher=wrong)


def test_plain_bank_refuses_a_cipher(tmp_path: Path, cipher: Any) -> None:
    filled(tmp_path).close()
    with pytest.raises(BankFormatError, match="not encrypted"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50), cipher=cipher)


def _corruptions(size: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    cuts = [("truncate", c) for c in (0, 1, 7, 31, 40, size // 2, size - 17, size - 1)]
    flips = [("flip", int(p)) for p in rng.choice(size, 40, replace=False)]
    return cuts + flips + [("append", 0)]


def _damage(path: Path, how: str, at: int) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[at:]
    elif how == "flip":
        data[at] ^= 0x5A
    else:
        data += b"\0" * 9
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("sealed", [False, True])
def test_corrupt_snapshot_is_a_format_error_never_a_crash(
    tmp_path: Path, cipher: Any, sealed: bool
) -> None:
    c = cipher if sealed else None
    bank = filled(tmp_path / "src", cipher=c)
    bank.snapshot()
    bank.close()
    snap = tmp_path / "src" / "snapshot-00000001.bank"
    original = snap.read_bytes()
    for how, at in _corruptions(len(original), np.random.default_rng(3)):
        snap.write_bytes(original)
        _damage(snap, how, at)
        with pytest.raises(BankFormatError):
            MemoryBank.open(tmp_path / "src", DK, DV, MemoryConfig(capacity=50), cipher=c)


def test_log_torn_tail_is_cut_and_mid_log_corruption_raises(tmp_path: Path) -> None:
    bank = filled(tmp_path)
    bank.close()
    log = tmp_path / "log-00000000.wal"
    original = log.read_bytes()
    # torn tail: any cut leaves a bank with a prefix of the adds
    for cut in (len(original) - 1, len(original) - 200, len(original) // 2):
        log.write_bytes(original[:cut])
        reopened = MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50))
        assert 0 < reopened.stats().added_total <= 80
        reopened.add(*kv(np.random.default_rng(4), 1))  # appends after the cut
        reopened.close()
        with MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50)) as again:
            assert again.stats().added_total >= 1
    # a flipped byte inside an early record, with valid records after it
    damaged = bytearray(original)
    damaged[300] ^= 0xFF
    log.write_bytes(bytes(damaged))
    with pytest.raises(BankFormatError):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50))
    log.write_bytes(original[:20])  # the header itself is torn
    with pytest.raises(BankFormatError):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(capacity=50))


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from memory import MemoryBank, MemoryConfig

    bank = MemoryBank.open(sys.argv[1], 8, 4, MemoryConfig(capacity=1_000_000))
    rng = np.random.default_rng(0)
    while True:
        keys = rng.standard_normal((16, 8)).astype(np.float32)
        ids = bank.add(keys, 3.0 * keys[:, :4] + 1.0)
        bank.sync()
        print(int(ids[0]), int(ids[-1]), flush=True)
    """
)


def test_acknowledged_adds_survive_kill_9(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "bank")],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
    )
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:  # read acknowledgements until enough writes happened
        acked.append(tuple(map(int, line.split())))
        if len(acked) >= 200:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    last = max(hi for _, hi in acked)
    bank = MemoryBank.open(tmp_path / "bank", DK, DV, MemoryConfig(capacity=1_000_000))
    ids = np.arange(last + 1)
    keys, values = bank.get(ids)  # raises if any acknowledged entry is missing
    np.testing.assert_array_equal(values, (3.0 * keys[:, :DV] + 1.0).astype(np.float32))
    assert json.dumps(bank.meta) == "{}"
    bank.close()


def _with_log_version(log: Path, version: int) -> None:
    """Rewrite the log header's version field, with a matching header digest."""
    from memory import persist

    data = bytearray(log.read_bytes())
    head = persist._LOG_HEAD
    magic, _, flags, generation, head_len = head.unpack_from(data)
    end = head.size + head_len
    data[: head.size] = head.pack(magic, version, flags, generation, head_len)
    data[end : end + persist._DIGEST] = persist._digest(bytes(data[:end]))
    log.write_bytes(bytes(data))


def test_version_1_logs_still_replay_and_an_unknown_version_is_named(tmp_path: Path) -> None:
    """Logs are written as version 2 (TOUCH_AT and SWITCH records); a version 1 log, which
    holds none of them, replays as before; a version the code does not know is one clear
    error, and a version 2 record inside a version 1 log is corruption."""
    rng = np.random.default_rng(3)
    bank = MemoryBank.open(tmp_path / "b", DK, DV, MemoryConfig(capacity=50))
    for _ in range(3):
        bank.add(*kv(rng, 10))
        bank.search(rng.standard_normal((2, DK)).astype(np.float32), 3)  # one time: TOUCH
        bank.sync()
    want = bank.live_ids()
    bank.close()
    (log,) = (tmp_path / "b").glob("log-*.wal")
    assert int.from_bytes(log.read_bytes()[8:12], "little") == 2  # written as version 2
    shutil.copytree(tmp_path / "b", tmp_path / "v1")
    _with_log_version(next((tmp_path / "v1").glob("log-*.wal")), 1)
    old = MemoryBank.open(tmp_path / "v1", DK, DV, MemoryConfig(capacity=50))
    np.testing.assert_array_equal(old.live_ids(), want)
    old.close()
    shutil.copytree(tmp_path / "b", tmp_path / "v3")
    _with_log_version(next((tmp_path / "v3").glob("log-*.wal")), 3)
    with pytest.raises(BankFormatError, match=r"log format version 3, this code reads \[1, 2\]"):
        MemoryBank.open(tmp_path / "v3", DK, DV, MemoryConfig(capacity=50))

    clock = [1000.0]
    spread = MemoryBank.open(
        tmp_path / "t", DK, DV, MemoryConfig(capacity=50), clock=lambda: clock[0]
    )
    keys, values = kv(rng, 4)
    spread.add(keys, values)
    spread.search(keys[:1], 1)
    clock[0] += 5
    spread.search(keys[1:2], 1)  # two times pending: a TOUCH_AT record at the sync
    spread.sync()
    spread.add(*kv(rng, 2))
    spread.sync()  # committed records after it
    spread.close()
    _with_log_version(next((tmp_path / "t").glob("log-*.wal")), 1)
    with pytest.raises(BankFormatError, match="is corrupt, and committed records follow it"):
        MemoryBank.open(tmp_path / "t", DK, DV, MemoryConfig(capacity=50))
