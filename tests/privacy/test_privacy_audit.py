"""The audit log: hash chain, tamper detection, no free text, durable appends across writers."""

from __future__ import annotations

import itertools
import json
import stat
from pathlib import Path

import pytest

from agent_runtime.errors import PrivacyError
from privacy.audit import AuditLog, head, verify


def _log(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    actions = ["create", "privacy_params", "resume", "export", "erase"]
    for i in range(n):
        log.append("acme", actions[i % len(actions)], f"sess_{i}", entries=i, unit="key")
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_records_chain_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path)
    assert verify(path) == (True, None)
    records = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert head(path) == records[-1]["hash"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_edited_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"entries":2', b'"entries":3')
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert verify(path) == (False, 3)
    with pytest.raises(PrivacyError, match="broken"):
        head(path)


def test_an_edited_line_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    from privacy.audit import _record_hash

    path = tmp_path / "audit.log"
    _log(path)
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["actor"] = "mallory"
    rec["hash"] = _record_hash(rec)
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert verify(path) == (False, 3)


@pytest.mark.parametrize(
    ("edit", "bad_line"),
    [
        (lambda ls: ls[:1] + ls[2:], 2),  # deleted line
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2),  # reordered
        (lambda ls: [*ls[:3], b"not json", *ls[3:]], 4),  # inserted garbage
    ],
)
def test_deleted_reordered_or_inserted_lines_are_found(
    tmp_path: Path, edit: object, bad_line: int
) -> None:
    path = tmp_path / "audit.log"
    _log(path)
    path.write_bytes(b"\n".join(edit(_lines(path))) + b"\n")  # type: ignore[operator]
    assert verify(path) == (False, bad_line)


@pytest.mark.parametrize(
    ("action", "details"),
    [
        ("chat", {}),  # unknown action
        ("create", {"text": "hello"}),  # not a whitelisted field
        ("denied", {"reason": "user said my password is hunter2"}),  # free text
        ("denied", {"reason": "x" * 129}),
        ("create", {"entries": [1, 2]}),  # not a scalar
        ("create", {"epsilon": float("inf")}),
    ],
)
def test_content_cannot_enter_the_log(
    tmp_path: Path, action: str, details: dict[str, object]
) -> None:
    path = tmp_path / "audit.log"
    with pytest.raises(PrivacyError):
        AuditLog(path).append("acme", action, "sess_1", **details)  # type: ignore[arg-type]
    assert not path.exists() or path.read_bytes() == b""


def test_torn_tail_is_dropped_and_the_chain_continues(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _log(path, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":3,"act')  # an append that died before fsync returned
    assert verify(path) == (False, 4)
    record = AuditLog(path).append("acme", "denied", "sess_9", code="session_not_found")
    assert record["seq"] == 3
    assert verify(path) == (True, None)
    assert len(_lines(path)) == 4


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    server, cli = AuditLog(path), AuditLog(path)
    for i in range(6):
        (server if i % 2 else cli).append(None if i % 2 else "acme", "create", f"s{i}")
    assert verify(path) == (True, None)
    assert [json.loads(line)["seq"] for line in _lines(path)] == list(range(6))


def test_long_records_are_read_back_across_buffer_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(40):
        log.append("t" * 100, "budget_exhausted", "s" * 120, reason="r" * 128, epsilon=float(i))
    assert verify(path) == (True, None)


def test_missing_log_is_empty_and_valid(tmp_path: Path) -> None:
    assert verify(tmp_path / "none.log") == (True, None)
