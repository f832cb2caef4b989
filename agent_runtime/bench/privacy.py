"""``agent-runtime bench privacy``: what DP key noising costs in recall, at which epsilon.

For each sigma, on the same model and the same probes:

* ``epsilon``: epsilon per protected unit at ``delta`` (one Gaussian release per stored key at
  sample rate 1, sensitivity C, Opacus RDP accountant);
* ``recall_accuracy``: the model's ``eval recall`` exact-match accuracy at a fixed distance,
  with the session's bank holding noised keys (clip to C, add N(0, (sigma*C)^2));
* ``recall_at_32``: overlap of the top-32 retrieved from noised keys with the top-32 from the
  clean keys, for the model's real memory-layer queries and keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from privacy.ledger import gaussian_epsilon
from privacy.noise import KeyNoiser

__all__ = ["main"]

SIGMAS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def topk_overlap(keys: np.ndarray, noised: np.ndarray, queries: np.ndarray, k: int = 32) -> float:
    """Mean |top-k(noised) ∩ top-k(clean)| / k over the queries (exact inner-product search)."""
    k = min(k, len(keys))
    clean = np.argpartition(-(queries @ keys.T), k - 1, axis=1)[:, :k]
    noisy = np.argpartition(-(queries @ noised.T), k - 1, axis=1)[:, :k]
    hits = [
        len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(clean, noisy, strict=True)
    ]
    return float(np.mean(hits)) / k


def main(argv: list[str] | None = None) -> int:
    from agent_runtime.training.data import ConversationGenerator, stated_value
    from agent_runtime.training.evaluate import (
        EVAL_SEED,
        answer,
        capture_memory_vectors,
        load_eval_model,
    )

    parser = argparse.ArgumentParser(
        prog="agent-runtime bench privacy", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--checkpoint", default="", help="model checkpoint (default: the bundled one)"
    )
    parser.add_argument("--sigmas", default=",".join(str(s) for s in SIGMAS))
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.0,
        help="C; memory keys are unit-norm, so 1 clips nothing",
    )
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument(
        "--distance", type=int, default=1024, help="filler tokens between fact and question"
    )
    parser.add_argument("--n", type=int, default=20, help="recall probes per sigma")
    parser.add_argument(
        "--capture-tokens", type=int, default=8192, help="tokens read to capture keys and queries"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.distance, args.capture_tokens = 2, 256, 1024
    sigmas = [float(s) for s in args.sigmas.split(",")]
    model = load_eval_model(args.checkpoint)
    gen = ConversationGenerator(EVAL_SEED + 1, held_out=True)
    keys, queries = capture_memory_vectors(model, gen.filler_turns(args.capture_tokens))
    queries = queries[:: max(1, len(queries) // 2000)]  # a sample keeps the exact search cheap
    probes = [
        ConversationGenerator(EVAL_SEED + args.distance, held_out=True).probe(args.distance)
        for _ in range(args.n)
    ]
    rows: list[dict[str, Any]] = []
    print(
        f"{'sigma':>6} {'epsilon':>10} {'recall_acc':>10} {'recall@32':>9}  ({len(keys)} keys, {len(queries)} queries)"
    )
    for sigma in sigmas:
        started = time.perf_counter()
        noiser = KeyNoiser(args.clip_norm, sigma, seed=1234)
        protect = noiser if noiser.enabled else None
        correct = sum(
            stated_value(answer(model, p, True, protect=protect)) == v for p, _, v in probes
        )
        noised = noiser(keys) if noiser.enabled else keys
        row = {
            "sigma": sigma,
            "epsilon": gaussian_epsilon(sigma, 1, args.delta) if sigma > 0 else float("inf"),
            "delta": args.delta,
            "unit": "key",
            "clip_norm": args.clip_norm,
            "recall_accuracy": correct / len(probes),
            "recall_at_32": round(topk_overlap(keys, noised, queries), 4),
            "distance_tokens": args.distance,
            "n": len(probes),
            "seconds": round(time.perf_counter() - started, 2),
        }
        rows.append(row)
        print(
            f"{sigma:>6} {row['epsilon']:>10.3g} {row['recall_accuracy']:>10.2f} {row['recall_at_32']:>9.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2, allow_nan=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
