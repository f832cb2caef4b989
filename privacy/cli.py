"""Operator commands: ``agent-runtime tenants ...`` and ``agent-runtime audit ...``.

Both take ``--data-dir`` (default: env ``AGENT_RUNTIME_DATA_DIR`` or
``./agent-runtime-data``) and return a process exit code. Neither prints secrets except the
API key that ``tenants add`` creates, which is printed exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from agent_runtime.errors import AgentRuntimeError, PrivacyError
from privacy.audit import AuditLog, head, verify
from privacy.mqtt import DEFAULT_PREFIX, acl_lines, broker_config, password_line
from privacy.tenants import TenantRegistry

__all__ = ["audit_main", "tenants_main"]

AUDIT_FILE = "audit.log"


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("AGENT_RUNTIME_DATA_DIR", "./agent-runtime-data")),
        help="data directory (env AGENT_RUNTIME_DATA_DIR)",
    )


def tenants_main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``tenants add NAME`` | ``tenants list`` | ``tenants revoke NAME_OR_KEY_ID`` |
    ``tenants mqtt-config NAME``."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="agent-runtime tenants", description="Manage tenants.")
    _data_dir_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser(
        "add", help="create a tenant (or a further key) and print its API key once"
    )
    add.add_argument("name")
    sub.add_parser("list", help="list tenants and key ids (never keys)")
    rev = sub.add_parser("revoke", help="revoke all keys of a tenant, or one key id")
    rev.add_argument("name")
    mq = sub.add_parser(
        "mqtt-config",
        help="print the Mosquitto password-file line, ACL and config for a tenant (docs/mqtt.md)",
    )
    mq.add_argument("name")
    mq.add_argument(
        "--key-file",
        type=Path,
        help="file holding the tenant's API key, its MQTT password (default: read from stdin)",
    )
    mq.add_argument("--bridge-user", default="agent-runtime-bridge", help="the bridge's username")
    mq.add_argument("--topic-prefix", default=DEFAULT_PREFIX, help="mqtt.topic_prefix of serve")
    mq.add_argument("--port", type=int, default=1883, help="the broker's listener port")
    args = parser.parse_args(argv)
    try:
        registry = TenantRegistry(args.data_dir)
        audit = AuditLog(args.data_dir / AUDIT_FILE)
        if args.command == "add":
            existed = args.name in {t.name for t in registry.list()}
            api_key = registry.add(args.name)
            key_id = api_key.split("_")[1]
            audit.append(None, "tenant_add", None, key_id=key_id)
            note = "new key for existing tenant" if existed else "tenant created"
            print(f"{note}: {args.name} (key id {key_id})", file=out)
            print(f"API key (shown once, store it now): {api_key}", file=out)
        elif args.command == "list":
            for t in registry.list():
                active = [k.key_id for k in t.keys if k.revoked_at is None]
                revoked = [k.key_id for k in t.keys if k.revoked_at is not None]
                print(
                    f"{t.name}\tactive={','.join(active) or '-'}\trevoked={','.join(revoked) or '-'}",
                    file=out,
                )
        elif args.command == "mqtt-config":
            _mqtt_config(registry, args, out)
        else:
            count = registry.revoke(args.name)
            audit.append(None, "tenant_revoke", None, keys_revoked=count)
            print(f"revoked {count} key(s)", file=out)
    except AgentRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _mqtt_config(registry: TenantRegistry, args: argparse.Namespace, out: TextIO) -> None:
    """The broker's lines for one tenant: its password is one of its API keys (checked here),
    written only as Mosquitto's salted PBKDF2 hash."""
    if args.key_file is not None:
        key = args.key_file.read_text(encoding="utf-8").strip()
    else:
        key = sys.stdin.readline().strip()
    if registry.authenticate(key) != args.name:
        raise PrivacyError(f"that API key does not belong to tenant {args.name!r}")
    prefix = args.topic_prefix.strip("/")
    print(
        f"# password_file line for tenant {args.name} (its MQTT password is that API key)", file=out
    )
    print(password_line(args.name, key), file=out)
    print("", file=out)
    print("# acl_file (the same for every tenant)", file=out)
    print("\n".join(acl_lines(args.bridge_user, prefix)), file=out)
    print("", file=out)
    print(
        broker_config(
            args.port, "/etc/mosquitto/agent-runtime.passwd", "/etc/mosquitto/agent-runtime.acl"
        ),
        file=out,
        end="",
    )
    print(
        f"# the bridge's identity: mosquitto_passwd /etc/mosquitto/agent-runtime.passwd {args.bridge_user}\n"
        f"# then: agent-runtime serve --mqtt-url mqtt://127.0.0.1:{args.port} "
        f"--mqtt-username {args.bridge_user} --mqtt-password-file FILE",
        file=out,
    )


def _session_reports(data_dir: Path) -> list[dict[str, Any]]:
    registry = TenantRegistry(data_dir)
    reports: list[dict[str, Any]] = []
    root = data_dir / "sessions"
    if not root.is_dir():
        return reports
    from privacy.session import LEDGER_FILE, load_ledger  # Opacus: only for the report

    for path in sorted(root.glob(f"*/*/{LEDGER_FILE}")):
        digest, session_id = path.parent.parent.name, path.parent.name
        entry: dict[str, Any] = {
            "tenant": registry.name_for_hash(digest) or f"<sha256:{digest}>",
            "session": session_id,
        }
        try:
            entry["ledger"] = load_ledger(path).report()
        except AgentRuntimeError as exc:
            entry["error"] = str(exc)
        reports.append(entry)
    return reports


def audit_main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Print each session's privacy ledger; ``--verify`` checks the audit chain (exit 1 if broken)."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="agent-runtime audit", description="Privacy ledgers and audit-log verification."
    )
    _data_dir_arg(parser)
    parser.add_argument("--verify", action="store_true", help="verify the audit log hash chain")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"agent-runtime audit: error: no data directory at {args.data_dir}", file=sys.stderr)
        return 2
    status = 0
    try:
        reports = _session_reports(args.data_dir)
        result: dict[str, Any] = {"sessions": reports}
        if args.verify:
            ok, bad = verify(args.data_dir / AUDIT_FILE)
            result["audit_log"] = {"ok": ok, "first_bad_line": bad}
            if ok:
                result["audit_log"]["head"] = head(args.data_dir / AUDIT_FILE)
            else:
                status = 1
    except AgentRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1), file=out)
        return status
    for r in reports:
        print(f"tenant {r['tenant']}  session {r['session']}", file=out)
        if "error" in r:
            print(f"  ledger unreadable: {r['error']}", file=out)
            status = 1
            continue
        lg = r["ledger"]
        eps = "inf" if lg["epsilon"] is None else f"{lg['epsilon']:.4g}"
        print(
            f"  noising {lg['noising']}; sigma={lg['noise_sigma']} C={lg['clip_norm']} "
            f"unit={lg['unit']} accountant={lg['accountant']}",
            file=out,
        )
        print(
            f"  releases={lg['releases']} unit_releases={lg['unit_releases']} "
            f"epsilon={eps} at delta={lg['delta']:g} budget={lg['budget_epsilon']}",
            file=out,
        )
        print(f"  covered: {'; '.join(lg['covered'])}", file=out)
        print(f"  not covered: {'; '.join(lg['not_covered'])}", file=out)
    if not reports:
        print("no sessions with a privacy ledger", file=out)
    if "audit_log" in result:
        a = result["audit_log"]
        if a["ok"]:
            print(f"audit log OK (head {a['head']})", file=out)
        else:
            print(f"audit log BROKEN at line {a['first_bad_line']}", file=out)
    return status
