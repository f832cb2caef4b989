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
    assert [row["bank_entries"] for row in result["decode"]] == [0, 512, 2048]
    assert result["decode"][0]["ratio_to_empty"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in result["decode"])
    assert result["batching"]["sessions"] == 8 and result["batching"]["ratio"] > 0
    assert result["prefill_tokens_per_s"] > 0
    sizes = {
        (r["memory_layers"], r["storage"]): r["bytes_per_token"] for r in result["bytes_per_token"]
    }
    # the tiny model: 2 KV heads x 8 dims per layer, a key and a value per part, plus metadata
    assert sizes[("all", "fp32")] > sizes[("all", "fp16")] > sizes[("0", "fp16")]
    assert sizes[("all", "fp32")] >= 2 * 2 * 2 * 8 * 4
