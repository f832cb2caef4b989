"""Commits: a bank reopens at exactly its last sync; a write the disk refused leaves no trace."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent_runtime.errors import BankFormatError, StorageError
from memory import MemoryBank, MemoryConfig

DK, DV = 8, 4
REPO = Path(__file__).resolve().parents[2]
LOG = "log-00000000.wal"


def kv(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    keys = rng.standard_normal((n, DK)).astype(np.float32)
    return keys, (3.0 * keys[:, :DV] + 1.0).astype(np.float32)


def test_records_after_the_last_commit_are_dropped_on_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig())
    bank.add(*kv(rng, 10))
    bank.sync()
    committed = (tmp_path / LOG).read_bytes()
    bank.add(*kv(rng, 7))
    bank.sync()
    full = (tmp_path / LOG).read_bytes()
    bank.close()
    batch = full[len(committed) :]
    commit_record = 4 + 4 + 8 + 1  # an empty COMMIT record is its header alone
    # The second batch reached the disk whole except its commit record: unacknowledged.
    (tmp_path / LOG).write_bytes(committed + batch[:-commit_record])
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig()) as reopened:
        assert len(reopened) == 10
        assert reopened.recovered_uncommitted == 1
        reopened.add(*kv(rng, 3))  # the log continues cleanly after the cut
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig()) as again:
        assert len(again) == 13


def test_damage_after_the_last_commit_is_an_unacknowledged_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig()) as bank:
        bank.add(*kv(rng, 10))
        bank.sync()
    committed = (tmp_path / LOG).read_bytes()
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig()) as bank:
        bank.add(*kv(rng, 5))
        bank.add(*kv(rng, 5))
    full = bytearray((tmp_path / LOG).read_bytes())
    full[len(committed) + 30] ^= 0xFF  # inside the uncommitted... then committed batch
    # Flip a byte of the second batch's first record and drop its commit: tolerated.
    tail = len(full) - (4 + 4 + 8 + 1)
    (tmp_path / LOG).write_bytes(bytes(full[:tail]))
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig()) as reopened:
        assert len(reopened) == 10
    # The same damage before a commit is corruption: the bank is refused, not silently cut.
    (tmp_path / LOG).write_bytes(bytes(full))
    with pytest.raises(BankFormatError, match="corrupt"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig())


_FULL_DISK_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from agent_runtime.errors import StorageError
    from memory import MemoryBank, MemoryConfig

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    bank = MemoryBank.open(sys.argv[1], 8, 4, MemoryConfig(capacity=1_000_000))
    limit = int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    rng = np.random.default_rng(0)
    acked, failures = 0, 0
    for turn in range(60):
        if turn == 40:  # space comes back
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        keys = rng.standard_normal((16, 8)).astype(np.float32)
        bank.add(keys, 3.0 * keys[:, :4] + 1.0)
        try:
            bank.sync()
        except StorageError as exc:
            failures += 1
            assert exc.errno is not None
            continue
        acked = len(bank)
        print("acked", acked, flush=True)
    print("failures", failures, flush=True)
    """
)


def test_a_refused_write_truncates_back_and_later_writes_land(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_WRITER, str(tmp_path / "bank"), "20000"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    acked = [int(line.split()[1]) for line in out if line.startswith("acked")]
    failures = int(next(line for line in out if line.startswith("failures")).split()[1])
    assert failures > 0, "the file-size limit never bit"
    assert acked[-1] == 60 * 16  # once space returns, the pending batches land too
    with MemoryBank.open(tmp_path / "bank", DK, DV, MemoryConfig(capacity=1_000_000)) as bank:
        assert len(bank) == acked[-1]
        keys, values = bank.get(bank.live_ids())
        np.testing.assert_array_equal(values, (3.0 * keys[:, :DV] + 1.0).astype(np.float32))


def test_sync_failure_is_a_storage_error_naming_the_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig())
    bank.add(*kv(rng, 4))
    bank.sync()
    (tmp_path / LOG).chmod(0o400)
    bank.add(*kv(rng, 4))
    os.close(os.open(tmp_path / LOG, os.O_RDONLY))
    bank._journal._writer._fd = os.open(tmp_path / LOG, os.O_RDONLY)  # type: ignore[union-attr]
    with pytest.raises(StorageError, match=LOG):
        bank.sync()


def test_a_snapshot_whose_log_cannot_be_created_leaves_the_old_generation_in_charge(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig())
    bank.add(*kv(rng, 3))
    bank.sync()
    (tmp_path / "log-00000001.wal").mkdir()  # the new generation's log cannot be created
    with pytest.raises(StorageError):
        bank.snapshot()
    assert not (tmp_path / "snapshot-00000001.bank").exists()
    (tmp_path / "log-00000001.wal").rmdir()  # the fault passes
    bank.add(*kv(rng, 5))
    bank.sync()  # acknowledged in generation 0's log
    position = bank.durable_position()
    bank.close()
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig(), upto=position) as reopened:
        assert len(reopened) == 8


def test_upto_drops_commits_after_the_acknowledged_position_and_refuses_less(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(5)
    bank = MemoryBank.open(tmp_path, DK, DV, MemoryConfig())
    bank.add(*kv(rng, 4))
    bank.sync()
    acked = bank.durable_position()
    bank.add(*kv(rng, 6))
    bank.sync()  # committed, but its caller never acknowledged it (e.g. its state write failed)
    later = bank.durable_position()
    bank.close()
    with MemoryBank.open(tmp_path, DK, DV, MemoryConfig(), upto=acked) as reopened:
        assert len(reopened) == 4
        assert reopened.recovered_uncommitted > 0
    with pytest.raises(BankFormatError, match="less than was acknowledged"):
        MemoryBank.open(tmp_path, DK, DV, MemoryConfig(), upto=later)
