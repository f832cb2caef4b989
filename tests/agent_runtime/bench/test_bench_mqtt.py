"""``agent-runtime bench mqtt --quick``: a real Mosquitto, a real server, both transports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent_runtime.bench.mqtt import main


@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed (.ci/install-mosquitto)",
)
def test_quick_mqtt_benchmark_measures_both_transports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mqtt.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["benchmark"] == "mqtt" and result["meta"]["quick"] is True
    rows = result["rows"]
    assert {(r["sessions"], r["transport"]) for r in rows} == {
        (1, "websocket"),
        (1, "mqtt"),
        (2, "websocket"),
        (2, "mqtt"),
    }
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["output_tokens"] == r["sessions"] * r["max_tokens"]
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert r["itl_p50_ms"] is None or r["itl_p50_ms"] > 0
    assert all(r["itl_p50_ratio"] > 0 for r in rows if r["transport"] == "mqtt")
    table = capsys.readouterr().out
    assert "tokens/s" in table and "mqtt" in table
