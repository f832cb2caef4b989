"""Training and evaluation commands, end to end on a tiny model (the CI smoke run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from agent_runtime.models.byte.model import load_checkpoint
from agent_runtime.training.data import ConversationGenerator, _is_held_out
from tests.conftest import TIMEOUT

TINY_ARGS = [
    "--batch",
    "2",
    "--doc-len",
    "64",
    "--model-n-embd",
    "32",
    "--model-n-head",
    "2",
    "--model-n-layer",
    "2",
    "--model-window",
    "16",
    "--model-mem-layer",
    "1",
    "--model-mem-topk",
    "4",
    "--eval-every",
    "1000",
    "--warmup",
    "2",
]


def run(*argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "agent_runtime", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 12,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_training_resumes_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("train", "--run-dir", str(straight), "--steps", "4", "--checkpoint-every", "1", *TINY_ARGS)
    run(
        "train",
        "--run-dir",
        str(resumed),
        "--steps",
        "4",
        "--checkpoint-every",
        "1",
        "--max-minutes",
        "1e-9",
        *TINY_ARGS,
    )  # stops (checkpointed) after its first step
    first = torch.load(resumed / "last.pt", weights_only=False)
    assert first["step"] == 1
    out = run(
        "train",
        "--run-dir",
        str(resumed),
        "--steps",
        "4",
        "--checkpoint-every",
        "1",
        "--export",
        str(tmp_path / "m.pt"),
        *TINY_ARGS,
    )
    assert "resuming" in out
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    records = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    model, extra = load_checkpoint(tmp_path / "m.pt")
    assert extra["trained_steps"] == 4 and model.cfg.window == 16


def test_eval_commands_write_their_rows(tmp_path: Path) -> None:
    run(
        "train",
        "--run-dir",
        str(tmp_path / "r"),
        "--steps",
        "1",
        "--export",
        str(tmp_path / "m.pt"),
        *TINY_ARGS,
    )
    run(
        "eval",
        "recall",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--distances",
        "40",
        "--n",
        "2",
        "--json",
        str(tmp_path / "recall.json"),
    )
    rows = json.loads((tmp_path / "recall.json").read_text())
    assert [(r["distance_tokens"], r["memory"]) for r in rows] == [(40, True), (40, False)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 for r in rows)
    run(
        "eval",
        "ppl",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--memory-sizes",
        "0,64",
        "--docs",
        "1",
        "--doc-len",
        "96",
        "--json",
        str(tmp_path / "ppl.json"),
    )
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert [r["memory_entries"] for r in ppl] == [0, 64]
    assert all(0 < r["bits_per_byte"] < 16 for r in ppl)
    out = run(
        "bench",
        "privacy",
        "--quick",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--sigmas",
        "0,0.5",
        "--json",
        str(tmp_path / "privacy.json"),
    )
    assert "recall@32" in out
    bench = json.loads((tmp_path / "privacy.json").read_text())
    assert [r["sigma"] for r in bench] == [0.0, 0.5]
    assert bench[0]["recall_at_32"] == 1.0  # no noise: the same neighbours
    assert bench[1]["recall_at_32"] < 1.0 and bench[1]["epsilon"] > 0
    run(
        "eval",
        "capture",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--capture-tokens",
        "100",
        "--out",
        str(tmp_path / "captured.npz"),
    )
    with np.load(tmp_path / "captured.npz") as z:
        # Keys of every completed 16-token block of >= 100 tokens, unit-norm as the bank stores them.
        n, dim = z["keys"].shape
        assert n >= 96 and n % 16 == 0 and dim == 16 and z["queries"].shape[1] == 16
        assert np.allclose(np.linalg.norm(z["keys"], axis=1), 1.0, atol=1e-5)


def test_held_out_values_are_never_drawn_by_the_training_generator() -> None:
    train = ConversationGenerator(1)
    held = ConversationGenerator(1, held_out=True)
    used: set[str] = set()
    for _ in range(300):
        assert not _is_held_out(train.fact(set()).value)
        assert _is_held_out(held.fact(used).value)
        used.clear()


def test_training_documents_are_longer_than_the_window_and_end_with_answers() -> None:
    doc = ConversationGenerator(3).document(512, n_facts=2, n_questions=2)
    assert len(doc.tokens) == 513
    assert max(doc.weights) == 5.0  # answer tokens are weighted up
    assert doc.weights.index(5.0) > 128  # answers come after more than one window
