"""``agent-runtime bench serve --quick``: real servers, real clients; the JSON has sane rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.bench.serve import main


def test_quick_serving_benchmark_writes_rows_for_both_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench" / "serve.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["benchmark"] == "serve" and result["meta"]["quick"] is True

    rows = result["rows"]
    assert {(r["clients"], r["batching"]) for r in rows} == {
        (1, True),
        (1, False),
        (4, True),
        (4, False),
    }
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["output_tokens"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert r["wall_s"] > 0 and r["deltas_per_token"] > 0
        assert r["output_tokens"] <= r["clients"] * r["max_tokens"]
        assert r["scaling_vs_1_client"] > 0
        for key in ("itl_p50_ms", "itl_p99_ms"):
            # A response that ended after one token has no inter-token gap.
            assert r[key] is None or r[key] > 0
    assert all(r["batched_over_unbatched"] > 0 for r in rows if r["batching"])

    slow = result["slow_reader"]
    assert slow["others"] == 3
    for key in ("alone", "beside_reader", "with_slow_reader"):
        assert slow[f"itl_p99_ms_{key}"] > 0 and slow[f"tokens_per_s_{key}"] > 0
    assert slow["slow_reader_status"] in ("cancelled", "incomplete", "completed")

    table = capsys.readouterr().out
    assert "tokens/s" in table and "slow reader" in table
