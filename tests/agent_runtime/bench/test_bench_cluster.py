"""``agent-runtime bench cluster --quick``: a real Redis, three real nodes, real kills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.bench.cluster_bench import main


def test_quick_cluster_benchmark_reports_failover_throughput_and_costs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench" / "cluster.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["benchmark"] == "cluster" and result["meta"]["quick"] is True
    assert result["meta"]["lease_ttl_s"] == 2.0

    rows = result["rows"]
    assert [r["nodes"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["turns"] == r["sessions"] * r["turns_per_session"] == r["turns_acknowledged"]
        assert r["tokens_per_s"] > 0 and r["turns_per_s"] > 0
        assert r["tokens_per_s_vs_1_node"] > 0 and r["turns_per_s_vs_1_node"] > 0
        assert r["output_tokens"] == r["turns"] * r["max_tokens"]  # fixed-length turns
        assert r["costs"]["tokens_processed"] > r["output_tokens"]  # prompts count too
    assert rows[0]["tokens_per_s_vs_1_node"] == 1.0

    costs = result["costs"]
    # Every turn updates the session's metadata in Redis (at least one command) and writes
    # its bank log and state file to the shared storage.
    assert costs["redis_commands_per_turn_without_renewals"] >= 1
    assert costs["redis_commands_per_turn"] >= costs["redis_commands_per_turn_without_renewals"]
    assert costs["renewals_per_s_per_session"] > 0
    assert costs["renewals_per_s_per_session_expected"] == pytest.approx(1.5)
    assert costs["storage_bytes_per_token"] > 0

    failover = result["failover"]
    assert failover["rounds"] == 2 and failover["lease_ttl_s"] == 2.0
    assert failover["lost_acknowledged_turns"] == 0
    for r in failover["each"]:
        assert r["lost_acknowledged_turn"] is False
        assert r["turns_after"] >= r["acknowledged_turns"] == 2
        assert r["memory_entries_after"] >= r["memory_entries_before"]
        assert r["kill_to_first_token_ms"] >= r["kill_to_resumed_ms"] > 0
        assert r["new_turn_status"] in ("completed", "incomplete")
    assert {r["victim"] for r in failover["each"]} == {"node0", "node1"}  # rotated

    table = capsys.readouterr().out
    assert "tokens/s" in table and "failover" in table and "redis:" in table
