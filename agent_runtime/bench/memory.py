"""``agent-runtime bench memory``: speed, recall and size of memory banks against baselines.

Each row is one index configuration at one bank size and key dim, built from the same data:

* ``faiss-flat-fp32``: FAISS ``IndexFlatIP`` with fp32 values beside it (the naive bank);
* ``ref-hnsw-m15``: the reference implementation's ``IndexHNSWFlat(M=15)``, default efSearch;
* ``bank-exact-fp32`` / ``bank-exact-fp16``: :class:`MemoryBank` with exact search;
* ``bank-ivf-int8``: :class:`MemoryBank` past its ANN threshold (IVF, int8 keys, fp16 values).

Recall@k is measured against exact fp32 search on the same keys. Exact rows also report their
single-query time as a multiple of the bandwidth bound (bytes scanned / measured bandwidth).
Rows are appended to the JSON file as they are produced, so a long run keeps partial results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from memory.bank import MemoryBank, search_banks
from memory.config import MemoryConfig
from memory.durable import read_state, write_state

faiss: Any = _faiss
K = 32
ADD_BATCH = 512  # the runtime flushes one block of tokens per add


def measure_bandwidth(nbytes: int) -> float:
    """Single-thread read bandwidth in bytes/s (best of 5 sums over ``nbytes``)."""
    a = np.ones(nbytes // 4, np.float32)
    a.sum()
    best = min(_timed(lambda: a.sum()) for _ in range(5))
    return nbytes / best


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_data(
    kind: str, n: int, d: int, nq: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and queries: ``gauss`` (worst case for ANN) or ``clustered`` (keys near 4096 centres)."""
    if kind == "gauss":
        return (
            rng.standard_normal((n, d), dtype=np.float32),
            rng.standard_normal((nq, d), dtype=np.float32),
        )
    centers = rng.standard_normal((4096, d), dtype=np.float32)
    keys = centers[rng.integers(0, 4096, n)] + 0.35 * rng.standard_normal((n, d), dtype=np.float32)
    queries = keys[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, d), dtype=np.float32)
    return keys.astype(np.float32), queries.astype(np.float32)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean(
            [len(set(g[g >= 0]) & set(t)) / truth.shape[1] for g, t in zip(got, truth, strict=True)]
        )
    )


class Baseline:
    """A bare FAISS index plus an fp32 value array (what the naive bank stores)."""

    def __init__(self, index: Any, values: np.ndarray) -> None:
        self.index, self.values = index, values

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        faiss.omp_set_num_threads(1)
        _, rows = self.index.search(q, k)
        return np.asarray(rows)


def bench_row(
    name: str,
    keys: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    bandwidth: float,
    single: int,
    quick: bool,
) -> dict[str, Any]:
    n, d = keys.shape
    values = np.ascontiguousarray(keys[:, ::-1])  # values differ from keys but are tied to them
    row: dict[str, Any] = {"index": name, "n_entries": n, "dim": d}
    bank: MemoryBank | None = None
    if name.startswith("bank-"):
        cfg = bank_config(name, n)
        bank = MemoryBank(d, d, cfg)
        t = _timed(
            lambda: [
                bank.add(keys[i : i + ADD_BATCH], values[i : i + ADD_BATCH])
                for i in range(0, n, ADD_BATCH)
            ]
        )
        row["add_us_per_entry"] = t / n * 1e6
        bank.build_index()  # measure the final index, not the flat one answering meanwhile
        row["index_kind"] = bank.stats().index
        search: Callable[[np.ndarray, int], np.ndarray] = _bank_search(bank)
    else:
        if name == "faiss-flat-fp32":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexHNSWFlat(d, 15, faiss.METRIC_INNER_PRODUCT)
        faiss.omp_set_num_threads(1)
        t = _timed(lambda: [index.add(keys[i : i + ADD_BATCH]) for i in range(0, n, ADD_BATCH)])
        row["add_us_per_entry"] = t / n * 1e6
        base = Baseline(index, values)
        search = base.search
    # single queries (after one warm-up)
    search(queries[:1], K)
    lat = (
        np.array([_timed(partial(search, q1, K)) for q1 in np.split(queries[:single], single)])
        * 1e3
    )
    row["search_1q_p50_ms"] = float(np.percentile(lat, 50))
    row["search_1q_p99_ms"] = float(np.percentile(lat, 99))
    t = min(_timed(lambda: search(queries, K)) for _ in range(1 if quick else 2))
    row["search_256q_ms_per_query"] = t * 1e3 / queries.shape[0]
    row["batched_vs_single"] = row["search_256q_ms_per_query"] / row["search_1q_p50_ms"]
    row["recall_at_32"] = recall(search(queries, K), truth)
    fp32_bytes = n * d * 4 * 2
    if bank is not None:
        row["bytes_per_entry"] = bank.stats().bytes / n
        scanned = n * d * (2 if bank_config(name, n).flat_storage == "fp16" else 4)
        row.update(snapshot_speeds(bank))
    else:
        code = d * 4
        row["bytes_per_entry"] = (
            (code + d * 4 + (15 * 2 * 4 * 1.07 if "hnsw" in name else 0)) / n * n
        )
        scanned = n * d * 4
    row["bytes_vs_fp32"] = row["bytes_per_entry"] * n / fp32_bytes
    if row.get("index_kind", "flat") == "flat" and "hnsw" not in name:
        row["bandwidth_bound_ms"] = scanned / bandwidth * 1e3
        row["x_bandwidth_bound"] = row["search_1q_p50_ms"] / row["bandwidth_bound_ms"]
    if bank is not None:
        m = min(n // 4, 65536)
        extra = np.ascontiguousarray(keys[:m][:, ::-1] * 0.5)
        add_full = _timed(
            lambda: [
                bank.add(extra[i : i + ADD_BATCH], extra[i : i + ADD_BATCH])
                for i in range(0, m, ADD_BATCH)
            ]
        )
        evict = bank._evict_q  # direct cost of the policy: pop + release, no add
        t = _timed(lambda: evict.pop_smallest(m, bank._store.release))
        row["add_at_capacity_us_per_entry"] = add_full / m * 1e6
        row["evict_us_per_entry"] = t / m * 1e6
        row["evicted_total"] = bank.stats().evicted_total
    return row


def _bank_search(bank: MemoryBank) -> Callable[[np.ndarray, int], np.ndarray]:
    def search(q: np.ndarray, k: int) -> np.ndarray:
        return bank.search(q, k).ids

    return search


def bank_config(name: str, n: int) -> MemoryConfig:
    if name == "bank-exact-fp32":
        return MemoryConfig(capacity=n, index="flat")
    if name == "bank-exact-fp16":
        return MemoryConfig(capacity=n, index="flat", flat_storage="fp16", value_storage="fp16")
    threshold = max(1024, min(262_144, n // 2))
    return MemoryConfig(
        capacity=n, index="ivf", ann_threshold=threshold, ivf_storage="int8", value_storage="fp16"
    )


def snapshot_speeds(bank: MemoryBank) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot-00000001.bank"
        state = bank.state_dict()
        t0 = time.perf_counter()
        size = write_state(path, 1, state, None)
        t_write = time.perf_counter() - t0
        twin = MemoryBank(bank.key_dim, bank.value_dim, bank.config)
        t0 = time.perf_counter()
        _, loaded = read_state(path, None)
        twin.load_state_dict(loaded)
        t_load = time.perf_counter() - t0
    mb = size / 1e6
    return {
        "snapshot_mb": mb,
        "snapshot_write_mb_s": mb / t_write,
        "snapshot_load_mb_s": mb / t_load,
    }


def multi_session(d: int, per_bank: int, threads: int, rng: np.random.Generator) -> float:
    """ms for one decoding step: 64 banks, one query each, through ``search_banks``."""
    cfg = MemoryConfig(capacity=per_bank, index="flat", threads=threads)
    banks = []
    for _ in range(64):
        b = MemoryBank(d, d, cfg)
        keys = rng.standard_normal((per_bank, d), dtype=np.float32)
        b.add(keys, keys)
        banks.append(b)
    qs = [rng.standard_normal((1, d), dtype=np.float32) for _ in banks]
    search_banks(banks, qs, K)
    return float(np.median([_timed(lambda: search_banks(banks, qs, K)) for _ in range(5)])) * 1e3


TABLE = [
    ("data", "data", "{}"),
    ("n", "n_entries", "{}"),
    ("dim", "dim", "{}"),
    ("index", "index", "{}"),
    ("add µs", "add_us_per_entry", "{:.2f}"),
    ("add@cap µs", "add_at_capacity_us_per_entry", "{:.2f}"),
    ("evict µs", "evict_us_per_entry", "{:.2f}"),
    ("1q p50 ms", "search_1q_p50_ms", "{:.3f}"),
    ("1q p99 ms", "search_1q_p99_ms", "{:.3f}"),
    ("256q ms/q", "search_256q_ms_per_query", "{:.3f}"),
    ("256q/1q", "batched_vs_single", "{:.2f}"),
    ("recall@32", "recall_at_32", "{:.3f}"),
    ("B/entry", "bytes_per_entry", "{:.0f}"),
    ("vs fp32", "bytes_vs_fp32", "{:.2f}"),
    ("× bw bound", "x_bandwidth_bound", "{:.2f}"),
    ("snap w MB/s", "snapshot_write_mb_s", "{:.0f}"),
    ("snap r MB/s", "snapshot_load_mb_s", "{:.0f}"),
]


def markdown(result: dict[str, Any]) -> str:
    """The rows of a results file as a Markdown table (for docs/memory.md)."""
    lines = [
        f"Machine: {result['machine']['cpus']} CPUs, single-thread read bandwidth "
        f"{result['machine']['bandwidth_gb_s']:.1f} GB/s; faiss {result['faiss']}; k = {result['k']}.",
        "",
        "| " + " | ".join(h for h, _, _ in TABLE) + " |",
        "|" + "---|" * len(TABLE),
    ]
    for row in result["rows"]:
        cells = [fmt.format(row[key]) if key in row else "" for _, key, fmt in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| dim | banks × entries | threads | multi_session_ms |", "|---|---|---|---|"]
    for m in result["multi_session"]:
        lines.append(
            f"| {m['dim']} | 64 × {m['entries_per_bank']} | {m['threads']} | {m['multi_session_ms']:.1f} |"
        )
    lines += [f"\nNote: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def ivf_switch(
    parts: int, part_dim: int, threshold: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """What the move to IVF costs the engine thread: a bank with ``parts`` parts (a pretrained
    decoder's) filled in four adds to ``threshold`` entries, with the build ``inline`` and in
    the ``background``, alternating (twice each): the add that crosses, a plain add before
    it, and the wait of ``build_index()`` right after (the background's whole build)."""
    rows = []
    block = threshold // 4
    for mode in ("inline", "background") * 2:
        cfg = MemoryConfig(part_ann_threshold=threshold, ivf_build=mode, value_storage="fp16")
        bank = MemoryBank(parts * part_dim, parts * part_dim, cfg, parts=parts)
        times = []
        for _ in range(4):
            keys = rng.standard_normal((block, parts * part_dim), dtype=np.float32)
            started = time.perf_counter()
            bank.add(keys, keys * 0.1)
            times.append(time.perf_counter() - started)
        wait = _timed(bank.build_index)
        assert bank.stats().index == "ivf"
        rows.append(
            {
                "build": mode, "parts": parts, "part_dim": part_dim, "entries": threshold,
                "crossing_add_s": times[-1], "plain_add_s": times[-2], "build_index_wait_s": wait,
            }
        )  # fmt: skip
        bank.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="agent-runtime bench memory", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="small sizes for CI (well under 60 s)")
    p.add_argument("--json", metavar="PATH", help="write rows here (rewritten after every row)")
    p.add_argument(
        "--sizes", help="comma-separated bank sizes (default 16384,65536,262144,1048576)"
    )
    p.add_argument("--dims", help="comma-separated key dims (default 64,128)")
    p.add_argument("--data", default="gauss,clustered", help="synthetic key sets: gauss, clustered")
    p.add_argument("--captured", metavar="PATH.npz", default="benchmarks/memory/captured_keys.npz")
    p.add_argument(
        "--table", metavar="PATH.json", help="print a results file as Markdown tables and exit"
    )
    p.add_argument(
        "--ivf-switch",
        default=None,
        metavar="PARTSxDIMxENTRIES",
        help="the move-to-IVF pause of a bank with parts (default 90x64x16384, SmolLM2's"
        " memory at serving's threshold; quick: 6x16x1024; 'none' skips it)",
    )
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    sizes = [
        int(s)
        for s in (
            args.sizes or ("4096,16384" if args.quick else "16384,65536,262144,1048576")
        ).split(",")
    ]
    dims = [int(s) for s in (args.dims or ("64" if args.quick else "64,128")).split(",")]
    kinds = args.data.split(",")
    rng = np.random.default_rng(0)
    bandwidth = measure_bandwidth(64 << 20 if args.quick else 256 << 20)
    out: dict[str, Any] = {
        "command": " ".join(
            ["agent-runtime bench memory", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "bandwidth_gb_s": bandwidth / 1e9,
        },
        "faiss": faiss.__version__,
        "k": K,
        "rows": [],
        "multi_session": [],
        "ivf_switch": [],
        "notes": [],
    }
    print(f"measured single-thread read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    spec = args.ivf_switch or ("6x16x1024" if args.quick else "90x64x16384")
    if spec != "none":
        try:
            parts, part_dim, entries = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            p.error(f"--ivf-switch {spec!r}: expected PARTSxDIMxENTRIES, e.g. 90x64x16384")
        for row in ivf_switch(parts, part_dim, entries, rng):
            out["ivf_switch"].append(row)
            print(
                f"ivf switch ({row['build']}, {parts} parts x {part_dim}, {entries} entries):"
                f" crossing add {row['crossing_add_s']:.2f} s (a plain add"
                f" {row['plain_add_s']:.2f} s), then build_index() waited"
                f" {row['build_index_wait_s']:.2f} s",
                flush=True,
            )

    def emit(row: dict[str, Any]) -> None:
        out["rows"].append(row)
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))

    names = [
        "faiss-flat-fp32",
        "ref-hnsw-m15",
        "bank-exact-fp32",
        "bank-exact-fp16",
        "bank-ivf-int8",
    ]
    single = 30 if args.quick else 200
    for d in dims:
        per_bank = min(max(sizes), 16384 if args.quick else 65536)
        for threads in (1, 2):
            ms = multi_session(d, per_bank, threads, rng)
            out["multi_session"].append(
                {"dim": d, "entries_per_bank": per_bank, "threads": threads, "multi_session_ms": ms}
            )
            print(
                f"multi_session dim={d} banks=64x{per_bank} threads={threads}: {ms:.2f} ms",
                flush=True,
            )
        for kind in kinds:
            for n in sizes:
                keys, queries = make_data(kind, n, d, 256, rng)
                flat = faiss.IndexFlatIP(d)
                flat.add(keys)
                _, truth = flat.search(queries, K)
                del flat
                for name in names:
                    if kind != "gauss" and name.startswith("bank-exact"):
                        continue  # exact rows do not depend on the data
                    row = bench_row(name, keys, queries, truth, bandwidth, single, args.quick)
                    row["data"] = kind
                    emit(row)
    captured = Path(args.captured)
    if captured.exists():
        with np.load(captured) as z:
            keys, queries = (
                np.ascontiguousarray(z["keys"], np.float32),
                np.ascontiguousarray(z["queries"], np.float32),
            )
        flat = faiss.IndexFlatIP(keys.shape[1])
        flat.add(keys)
        _, truth = flat.search(queries, K)
        for name in ("faiss-flat-fp32", "ref-hnsw-m15", "bank-ivf-int8"):
            row = bench_row(name, keys, queries, truth, bandwidth, single, args.quick)
            row["data"] = "captured"
            emit(row)
    else:
        note = f"captured keys not found at {captured}: recall on model keys not measured"
        out["notes"].append(note)
        print(note)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
