"""``agent-runtime tenants`` and ``agent-runtime audit`` as functions (argv in, exit code out)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from privacy.audit import verify
from privacy.cli import audit_main, tenants_main
from privacy.config import PrivacyConfig
from privacy.erasure import session_directory
from privacy.session import SessionPrivacy
from privacy.tenants import TenantRegistry


def _run(main: object, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)  # type: ignore[operator]
    return code, out.getvalue()


def test_tenants_add_list_revoke(tmp_path: Path) -> None:
    d = str(tmp_path)
    code, text = _run(tenants_main, "--data-dir", d, "add", "acme")
    assert code == 0 and "tenant created" in text
    api_key = text.rsplit(": ", 1)[1].strip()
    assert TenantRegistry(tmp_path).authenticate(api_key) == "acme"
    code, text = _run(tenants_main, "--data-dir", d, "list")
    assert code == 0 and text.startswith("acme\tactive=") and api_key not in text
    code, text = _run(tenants_main, "--data-dir", d, "revoke", "acme")
    assert code == 0 and "revoked 1 key" in text
    assert _run(tenants_main, "--data-dir", d, "revoke", "nobody")[0] == 1
    assert _run(tenants_main, "--data-dir", d, "add", "bad name")[0] == 1
    log = (tmp_path / "audit.log").read_bytes()
    assert b"tenant_add" in log and b"tenant_revoke" in log and api_key.encode() not in log
    assert verify(tmp_path / "audit.log") == (True, None)


def test_audit_prints_each_sessions_ledger_and_verifies_the_chain(tmp_path: Path) -> None:
    TenantRegistry(tmp_path).add("acme")
    sp = SessionPrivacy.open(
        session_directory(tmp_path, "acme", "sess_1"),
        PrivacyConfig(noise_sigma=2.0),
        unit="message",
    )
    sp.protect(np.ones((3, 4), np.float32), "m1")
    SessionPrivacy.open(session_directory(tmp_path, "unknown", "sess_2"), PrivacyConfig())
    _run(tenants_main, "--data-dir", str(tmp_path), "add", "globex")  # writes an audit record

    code, text = _run(audit_main, "--data-dir", str(tmp_path), "--verify")
    assert code == 0
    assert "tenant acme  session sess_1" in text and "unit=message" in text
    assert "releases=3 unit_releases=3" in text and "not covered:" in text
    assert "session sess_2" in text and "noising off" in text and "epsilon=inf" in text
    assert "audit log OK" in text

    code, text = _run(audit_main, "--data-dir", str(tmp_path), "--json")
    doc = json.loads(text)
    assert code == 0 and {s["session"] for s in doc["sessions"]} == {"sess_1", "sess_2"}

    log = tmp_path / "audit.log"
    log.write_bytes(log.read_bytes().replace(b"tenant_add", b"tenant_revoke", 1))
    code, text = _run(audit_main, "--data-dir", str(tmp_path), "--verify")
    assert code == 1 and "BROKEN at line 1" in text
