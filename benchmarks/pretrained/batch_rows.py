"""Batched decode of a few sessions: float16 matrix-vector products row by row (``VECTOR_ROWS``
rows or fewer, the default) against float32 matrix products for every batch (``VECTOR_ROWS``
= 1, the behaviour before), side by side in one process, their timed rounds alternating.

    python benchmarks/pretrained/batch_rows.py --model smollm2-135m-recall --batches 1,2,3,4,6,8 \\
        --bank-sizes 0,16k --split --json benchmarks/pretrained/batch_rows.json

Prints aggregate tokens/s per batch size for both settings (and the ratio of the new to the
old), and the ratio of each batch's tokens/s to one session's; ``--split`` also prints where a
step's time goes at each batch size (``agent-runtime bench model --profile``'s timers). Random
bank entries and a full window, as ``agent-runtime bench model`` times decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from agent_runtime.bench import model as bench
from agent_runtime.config import EngineConfig, token_counts
from agent_runtime.models.llama import model as llama_model
from agent_runtime.models.llama.registry import default_data_dir
from agent_runtime.models.loader import load_model


def _rates(
    chat: Any, banks: list[Any], settings: list[int], steps: int, repeats: int
) -> list[float]:
    """Aggregate tokens/s of ``len(banks)`` sessions under each ``VECTOR_ROWS`` setting."""
    states = {
        s: [bench._full_window_state(chat, len(b), i) for i, b in enumerate(banks)]
        for s in settings
    }
    tokens = [11] * len(banks)
    rates: dict[int, list[float]] = {s: [] for s in settings}
    saved = llama_model.VECTOR_ROWS
    try:
        for s in settings:  # warm-up
            llama_model.VECTOR_ROWS = s
            chat.decode(states[s], tokens, banks)
        for _ in range(repeats):
            for s in settings:
                llama_model.VECTOR_ROWS = s
                started = time.perf_counter()
                for _ in range(steps):
                    chat.decode(states[s], tokens, banks)
                rates[s].append(len(banks) * steps / (time.perf_counter() - started))
                bench._rewind(states[s], steps)
    finally:
        llama_model.VECTOR_ROWS = saved
    return [statistics.median(rates[s]) for s in settings]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-recall")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--batches", default="1,2,3,4,6,8")
    parser.add_argument("--bank-sizes", default="0,16k")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", action="store_true", help="also time a step's parts")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chat = load_model(EngineConfig(model=args.model), args.data_dir or default_data_dir())
    settings = [llama_model.VECTOR_ROWS, 1]  # the default, then float32 products for any batch
    rows = []
    for size in token_counts(args.bank_sizes):
        base: list[float] | None = None
        for b in [int(x) for x in args.batches.split(",")]:
            banks = [bench._bank(chat, size, "fp32", i) for i in range(b)]
            new, old = _rates(chat, banks, settings, args.steps, args.repeats)
            base = base or [new, old]
            row = {
                "bank_entries": size, "sessions": b, "tokens_per_s": new, "before_tokens_per_s": old,
                "speedup": new / old, "vs_one_session": new / base[0],
                "before_vs_one_session": old / base[1],
            }  # fmt: skip
            if args.split:
                row["step_split_ms"] = {
                    k: round(v, 1)
                    for k, v in bench._split_rates(chat, banks, args.steps, 1).items()
                }
            rows.append(row)
            print(
                f"bank {size:>6}, {b} sessions: {new:6.2f} tok/s (before {old:6.2f}: {new / old:.2f}x);"
                f" vs one session {new / base[0]:.2f}x (before {old / base[1]:.2f}x)",
                flush=True,
            )
            if args.split:
                print(f"  step split, {b} sessions (ms): {row['step_split_ms']}", flush=True)
            del banks
    out = {
        "model": chat.describe(),
        "vector_rows": settings[0],
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
