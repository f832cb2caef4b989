"""The benchmark's smoke mode runs and writes every column the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

from agent_runtime.bench.memory import main

COLUMNS = {
    "n_entries",
    "dim",
    "index",
    "add_us_per_entry",
    "search_1q_p50_ms",
    "search_1q_p99_ms",
    "search_256q_ms_per_query",
    "recall_at_32",
    "bytes_per_entry",
}
BANK_COLUMNS = {"evict_us_per_entry", "snapshot_write_mb_s", "snapshot_load_mb_s"}


def test_bench_smoke_writes_all_columns(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--sizes", "2048", "--dims", "16", "--data", "gauss", "--json", str(out)]
    assert main([*args, "--captured", str(tmp_path / "missing.npz")]) == 0
    result = json.loads(out.read_text())
    names = {row["index"] for row in result["rows"]}
    assert names == {
        "faiss-flat-fp32",
        "ref-hnsw-m15",
        "bank-exact-fp32",
        "bank-exact-fp16",
        "bank-ivf-int8",
    }
    for row in result["rows"]:
        assert row.keys() >= COLUMNS, row
        if row["index"].startswith("bank-"):
            assert row.keys() >= BANK_COLUMNS, row
        if row["index"] in ("faiss-flat-fp32", "bank-exact-fp32"):
            assert row["recall_at_32"] == 1.0
            assert row["x_bandwidth_bound"] > 0
    assert {m["threads"] for m in result["multi_session"]} == {1, 2}
    switch = result["ivf_switch"]  # the move to IVF, inline and in the background, alternating
    assert [r["build"] for r in switch] == ["inline", "background"] * 2
    assert all(r["crossing_add_s"] > 0 and r["build_index_wait_s"] >= 0 for r in switch)
    assert result["machine"]["bandwidth_gb_s"] > 0
    assert any("captured keys not found" in note for note in result["notes"])
