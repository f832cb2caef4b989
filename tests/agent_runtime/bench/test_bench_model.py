"""``bench model --quick`` runs on a tiny Llama and reports every figure, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.bench.model import main


def test_quick_run_reports_decode_batching_prefill_and_bytes_per_token(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    argv = ["--quick", "--repeats", "1", "--memory-layers", "all", "0", "--dtype", "float32"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    decode = result["decode"]  # exact (flat) and serving's default (auto), side by side
    assert [(r["index"], r["bank_entries"]) for r in decode] == [
        ("flat", 0), ("flat", 512), ("flat", 2048), ("auto", 0), ("auto", 512), ("auto", 2048)
    ]  # fmt: skip
    assert [r["bank_index"] for r in decode] == ["flat"] * 5 + ["ivf"]  # auto switched at 1K
    assert decode[0]["ratio_to_empty"] == decode[3]["ratio_to_empty"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in decode)
    assert result["ivf_switch_s"] > 0 and result["ivf_build_s"] > 0  # built in the background
    assert [b["index"] for b in result["batching"]] == ["flat", "auto"]
    assert all(b["sessions"] == 8 and b["ratio"] > 0 for b in result["batching"])
    assert [(p["dtype"], p["tokens"]) for p in result["prefill"]] == [("float32", 64)]
    assert result["prefill"][0]["tokens_per_s"] > 0
    assert result["accuracy"] == []  # one dtype: nothing to compare
    sizes = {
        (r["memory_layers"], r["storage"]): r["bytes_per_token"] for r in result["bytes_per_token"]
    }
    # the tiny model: 2 KV heads x 8 dims per layer, a key and a value per part, plus metadata
    assert sizes[("all", "fp32")] > sizes[("all", "fp16")] > sizes[("0", "fp16")]
    assert sizes[("all", "fp32")] >= 2 * 2 * 2 * 8 * 4


def test_dtypes_side_by_side_with_their_cost_in_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "dtypes.json"
    argv = ["--quick", "--repeats", "1", "--index", "flat", "--bank-sizes", "0,512"]
    assert main([*argv, "--dtype", "float32,float16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["dtype"], r["bank_entries"]) for r in result["decode"]] == [
        ("float32", 0),
        ("float16", 0),
        ("float32", 512),
        ("float16", 512),
    ]  # fmt: skip (one bank per size, the dtypes' rounds alternating on it)
    assert [b["dtype"] for b in result["batching"]] == ["float32", "float16"]
    assert [p["dtype"] for p in result["prefill"]] == ["float32", "float16"]
    (row,) = result["accuracy"]
    assert (row["dtype"], row["reference"], row["tokens"]) == ("float16", "float32", 64)
    # the weights really were converted (fp16 rounding moves the logits), and only a little
    assert 0 < row["kl_mean"] < 0.05 and 0 < row["max_abs_logit_diff"] < 1
    assert 0.8 <= row["top1_agreement"] <= 1


def test_memory_plans_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plans.json"
    argv = ["--quick", "--repeats", "1", "--index", "flat", "--bank-sizes", "0,512"]
    plans = ["k=4", "k=2,span=2", "layers=1,k=4", "layers=all"]
    assert main([*argv, "--plans", *plans, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["dtype"], r["bank_entries"]) for r in result["decode"]] == [
        (f"float32 {plan}", size) for size in (0, 512) for plan in plans
    ]
    assert [p["dtype"] for p in result["prefill"]] == [f"float32 {plan}" for plan in plans]
    # each column ran its own plan (the tiny model's is k 4, no neighbours, on both layers)
    assert [(p["k"], p["span"], p["layers"]) for p in result["plans"]] == [
        (4, 0, [0, 1]),
        (2, 2, [0, 1]),
        (4, 0, [1]),
        (4, 0, [0, 1]),
    ]
    assert result["accuracy"] == []
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--plans", "k=4,window=8"])
    assert exc.value.code == 2
    assert "--plans: window=8 in 'k=4,window=8' is not k=N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--plans", "layers=3-1"])
    assert "memory_layers" in capsys.readouterr().err


def test_an_unknown_dtype_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--dtype", "float32,int4"])
    assert exc.value.code == 2
    assert "int4: each dtype must be one of float32, bfloat16, float16" in capsys.readouterr().err


def test_profile_splits_a_decode_step_into_its_parts_and_restores_the_functions(
    tmp_path: Path,
) -> None:
    import agent_runtime.models.llama.memory as llama_memory
    from memory.bank import MemoryBank

    before = (llama_memory._attend_row, MemoryBank.search_parts)
    out = tmp_path / "split.json"
    # 3 rounds of 4 steps: more than a block of the tiny model (8), so only rewinding between
    # rounds keeps the empty bank empty (and bank writes out of the split)
    argv = ["--quick", "--repeats", "3", "--index", "auto", "--dtype", "float32", "--profile"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["step_split_ms"]
    assert [r["bank_entries"] for r in rows] == [0, 512, 2048]
    for row in rows:
        parts = [row[p] for p in ("products", "attention", "faiss", "bank", "shaping", "other")]
        assert row["products"] > 0 and row["attention"] > 0
        assert abs(sum(parts) + row["provenance"] - row["step"]) < 1e-6 * max(1.0, row["step"])
    assert rows[0]["faiss"] == rows[0]["bank"] == 0  # an empty bank is never searched
    assert rows[2]["faiss"] > 0 and rows[2]["bank"] > 0 and rows[2]["shaping"] > 0
    assert (llama_memory._attend_row, MemoryBank.search_parts) == before  # unpatched after
