"""``bench model --quick`` runs on a tiny Llama and reports every figure, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from agent_runtime.bench.model import main


def test_quick_run_reports_decode_batching_prefill_and_bytes_per_token(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    assert (
        main(["--quick", "--repeats", "1", "--memory-layers", "all", "0", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    decode = result["decode"]  # exact (flat) and serving's default (auto), side by side
    assert [(r["index"], r["bank_entries"]) for r in decode] == [
        ("flat", 0), ("flat", 512), ("flat", 2048), ("auto", 0), ("auto", 512), ("auto", 2048)
    ]  # fmt: skip
    assert [r["bank_index"] for r in decode] == ["flat"] * 5 + ["ivf"]  # auto switched at 1K
    assert decode[0]["ratio_to_empty"] == decode[3]["ratio_to_empty"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in decode)
    assert result["ivf_switch_s"] > 0
    assert [b["index"] for b in result["batching"]] == ["flat", "auto"]
    assert all(b["sessions"] == 8 and b["ratio"] > 0 for b in result["batching"])
    assert result["prefill_tokens_per_s"] > 0
    sizes = {
        (r["memory_layers"], r["storage"]): r["bytes_per_token"] for r in result["bytes_per_token"]
    }
    # the tiny model: 2 KV heads x 8 dims per layer, a key and a value per part, plus metadata
    assert sizes[("all", "fp32")] > sizes[("all", "fp16")] > sizes[("0", "fp16")]
    assert sizes[("all", "fp32")] >= 2 * 2 * 2 * 8 * 4
