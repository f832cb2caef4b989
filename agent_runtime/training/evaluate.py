"""``agent-runtime eval recall|ppl``: does the model remember, and does memory help?

* ``recall``: facts with held-out values (the training generator can never draw them) are
  stated, then D tokens of distractor conversation, then a question. The answer is generated
  greedily through the serving path (incremental decoding, FAISS bank) and scored by exact
  match, with memory on and with memory off (the same model with no bank: local window only).
* ``speed``: single-session decoding tokens/s with a bank of N real entries, and without memory.
* ``capture``: the memory-layer keys and queries of the model reading held-out conversation,
  saved for ``bench memory`` (ANN recall on the model's real vectors).
* ``ppl``: bits per byte of long documents (``--files``, or held-out synthetic conversations)
  with the memory capped at each of ``--memory-sizes`` entries (FIFO), as in the paper's
  table 4: more memory should mean fewer bits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agent_runtime import __version__
from agent_runtime.config import EngineConfig, positive_int, token_counts
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.models.byte import BUNDLED_CHECKPOINT
from agent_runtime.models.byte.generation import GenerationState, decode_step, prefill
from agent_runtime.models.byte.model import MemorizingTransformer, Retrieval, load_checkpoint
from agent_runtime.models.byte.segments import TensorMemory, iter_segments
from agent_runtime.models.byte.tokenizer import END, decode, encode
from agent_runtime.training.data import ConversationGenerator, stated_value
from memory import MemoryBank, MemoryConfig

__all__ = ["eval_ppl", "eval_recall", "main"]

EVAL_SEED = 7_000_003  # held-out values are also filtered by hash, whatever the seed


@torch.no_grad()
def answer(
    model: MemorizingTransformer,
    prompt: list[int],
    memory: bool,
    max_tokens: int = 48,
    protect: Callable[[np.ndarray], np.ndarray] | None = None,
) -> str:
    """Greedy reply to ``prompt`` through the serving path (bytes and END only); ``protect``
    transforms keys before they are stored (privacy noise)."""
    bank = MemoryBank(*model.memory_dims, MemoryConfig()) if memory else None
    state = GenerationState.new(model)
    state.protect = protect
    logits = prefill(model, state, prompt, bank)
    out: list[int] = []
    while logits is not None and len(out) < max_tokens:
        allowed = torch.full_like(logits, float("-inf"))
        allowed[:256] = logits[:256]
        allowed[END] = logits[END]  # a reply is bytes, then END
        token = int(torch.argmax(allowed))
        if token == END:
            break
        out.append(token)
        step, _ = decode_step(model, [state], [token], [bank])
        logits = step[0]
    return decode(out)


@torch.no_grad()
def capture_memory_vectors(
    model: MemorizingTransformer, tokens: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The memory-layer keys written and the queries issued while reading ``tokens``
    (for retrieval benchmarks on the model's real vectors): (keys (n, hs), queries (m, hs))."""
    queries: list[np.ndarray] = []

    class Recording(TensorMemory):
        def __call__(self, q: torch.Tensor, k: int) -> Retrieval:
            queries.append(q.reshape(-1, q.shape[-1]).numpy().copy())
            return super().__call__(q, k)

    W = model.cfg.window
    L = len(tokens) // W * W
    mem = Recording(1, model.cfg.head_dim, "cpu")
    for _ in iter_segments(model, torch.tensor([tokens[:L]]), mem):
        pass
    return mem.keys[0].numpy().astype(np.float32), np.concatenate(queries).astype(np.float32)


def eval_recall(
    model: MemorizingTransformer, distances: list[int], n: int, seed: int = EVAL_SEED
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for distance in distances:
        gen = ConversationGenerator(seed + distance, held_out=True)
        probes = [gen.probe(distance) for _ in range(n)]
        for memory in (True, False):
            started = time.perf_counter()
            correct = sum(
                stated_value(answer(model, prompt, memory)) == value for prompt, _, value in probes
            )
            rows.append(
                {
                    "distance_tokens": distance,
                    "memory": memory,
                    "n": n,
                    "accuracy": correct / n,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def eval_ppl(
    model: MemorizingTransformer,
    docs: list[list[int]],
    memory_sizes: list[int],
    answer_masks: list[list[bool]] | None = None,
) -> list[dict[str, Any]]:
    """Bits per byte of each document scored segment by segment, memory capped at each size.

    ``answer_masks`` (synthetic conversations) marks the targets that are fact values; their
    bits per byte and the rest's are then reported apart, since only they depend on distant text.
    """
    rows: list[dict[str, Any]] = []
    W = model.cfg.window
    for size in memory_sizes:
        bits = {"all": 0.0, "answer": 0.0}
        count = {"all": 0, "answer": 0}
        started = time.perf_counter()
        for d, doc in enumerate(docs):
            L = (len(doc) - 1) // W * W
            if L < W:
                continue
            tokens = torch.tensor([doc[: L + 1]])
            mem = TensorMemory(1, model.cfg.head_dim, "cpu", capacity=size) if size > 0 else None
            for seg in iter_segments(model, tokens, mem, with_targets=True):
                assert seg.targets is not None
                nll = F.cross_entropy(seg.output.logits[0], seg.targets[0], reduction="none")
                bits["all"] += float(nll.sum()) / math.log(2)
                count["all"] += int(nll.numel())
                if answer_masks is not None:
                    start = seg.index * W
                    mask = torch.tensor(answer_masks[d][start : start + nll.numel()])
                    bits["answer"] += float(nll[mask].sum()) / math.log(2)
                    count["answer"] += int(mask.sum())
        row: dict[str, Any] = {
            "memory_entries": size,
            "bits_per_byte": round(bits["all"] / max(1, count["all"]), 4),
            "bytes": count["all"],
        }
        if answer_masks is not None:
            other = count["all"] - count["answer"]
            row["answer_bits_per_byte"] = round(bits["answer"] / max(1, count["answer"]), 4)
            row["answer_bytes"] = count["answer"]
            row["other_bits_per_byte"] = round((bits["all"] - bits["answer"]) / max(1, other), 4)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def eval_speed(
    model: MemorizingTransformer, bank_entries: int, tokens: int
) -> list[dict[str, Any]]:
    """Single-session decoding speed with a bank of ``bank_entries`` real entries (the session's
    own history, prefilled) against the same model with no memory."""
    gen = ConversationGenerator(EVAL_SEED + 2, held_out=True)
    history = gen.filler_turns(bank_entries + model.cfg.window)
    rows = []
    for memory in (True, False):
        bank = MemoryBank(*model.memory_dims, MemoryConfig()) if memory else None
        state = GenerationState.new(model)
        started = time.perf_counter()
        logits = prefill(model, state, history, bank)
        prefill_s = time.perf_counter() - started
        assert logits is not None
        token = int(torch.argmax(logits[:256]))
        started = time.perf_counter()
        for _ in range(tokens):
            step, _ = decode_step(model, [state], [token], [bank])
            token = int(torch.argmax(step[0, :256]))
        seconds = time.perf_counter() - started
        rows.append(
            {
                "memory": memory,
                "bank_entries": len(bank) if bank is not None else 0,
                "tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1),
                "prefill_tokens_per_s": round(len(history) / prefill_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def load_eval_model(checkpoint: str) -> MemorizingTransformer:
    """The checkpoint at ``checkpoint``, or the bundled one when it is empty."""
    model, _ = load_checkpoint(checkpoint or BUNDLED_CHECKPOINT)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-runtime eval", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["recall", "ppl", "speed", "capture"])
    parser.add_argument(
        "--checkpoint", default="", help="model checkpoint (default: the bundled one)"
    )
    parser.add_argument(
        "--distances",
        type=token_counts,
        default="1k,4k,16k,64k",
        help="recall: filler tokens between fact and question",
    )
    parser.add_argument("--n", type=positive_int, default=20, help="recall: probes per distance")
    parser.add_argument(
        "--files", type=Path, nargs="*", default=[], help="ppl: text files (default: synthetic)"
    )
    parser.add_argument(
        "--memory-sizes",
        type=token_counts,
        default="0,512,2k,8k",
        help="ppl: memory capacities to compare",
    )
    parser.add_argument(
        "--docs", type=int, default=4, help="ppl: synthetic documents when no --files"
    )
    parser.add_argument(
        "--document",
        default="",
        help="ppl with --model: a long real document fetched by name from a Debian package"
        " (rcu-requirements, alsa-driver, kvm-api: the kernel's documentation)",
    )
    parser.add_argument(
        "--doc-len",
        type=int,
        default=8192,
        help="ppl: document length in tokens (a --document or --model --files text is cut to it)",
    )
    parser.add_argument(
        "--bank-entries", type=int, default=65536, help="speed: memory entries in the bank"
    )
    parser.add_argument("--tokens", type=int, default=200, help="speed: tokens decoded")
    parser.add_argument(
        "--capture-tokens", type=int, default=65_664, help="capture: tokens of conversation read"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/memory/captured_keys.npz"),
        help="capture: where to write the keys and 2,048 sampled queries (for bench memory)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--threads", type=int, default=0)
    pretrained = parser.add_argument_group(
        "pretrained decoders (recall and ppl; see agent_runtime.training.chat_eval)"
    )
    pretrained.add_argument(
        "--model", default="", help="registry name, GGUF file or model directory to evaluate"
    )
    pretrained.add_argument(
        "--data-dir", type=Path, default=None, help="model and corpus cache (default: serve's)"
    )
    served = EngineConfig()
    pretrained.add_argument(
        "--memory-layers",
        default=served.memory_layers,
        help="as serve's --engine-memory-layers (default: serve's)",
    )
    pretrained.add_argument(
        "--memory-k", type=int, default=served.memory_k, help="as --engine-memory-k"
    )
    pretrained.add_argument(
        "--memory-sink", type=int, default=served.memory_sink, help="as --engine-memory-sink"
    )
    pretrained.add_argument(
        "--memory-span", type=int, default=served.memory_span, help="as --engine-memory-span"
    )
    pretrained.add_argument(
        "--memory-window", type=int, default=served.memory_window, help="as --engine-memory-window"
    )
    pretrained.add_argument(
        "--modes", default="memory,window,full", help="memory, window (no memory), full (ceiling)"
    )
    pretrained.add_argument("--forms", default="prefix,chat", help="question forms: prefix, chat")
    pretrained.add_argument(
        "--corrections", action="store_true", help="restate each fact with a new value halfway"
    )
    pretrained.add_argument(
        "--memory-index", default="auto", help="as --memory-index: flat (exact) or auto (IVF)"
    )
    pretrained.add_argument(
        "--part-ann-threshold",
        type=int,
        default=MemoryConfig().part_ann_threshold,
        help="as --memory-part-ann-threshold: bank entries at which each part moves to IVF",
    )
    pretrained.add_argument("--seed", type=int, default=0, help="probe seed")
    pretrained.add_argument(
        "--scored", type=int, default=1024, help="ppl: score the document's last N tokens"
    )
    args = parser.parse_args(argv)
    if args.document:
        from agent_runtime.training.documents import DOCUMENTS

        if not args.model:
            parser.error("--document needs --model (the byte model reads --files)")
        if args.document not in DOCUMENTS:
            parser.error(f"--document: unknown {args.document!r}; known: {', '.join(DOCUMENTS)}")
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"--files: no such file: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return _pretrained_recall(args)
    model = load_eval_model(args.checkpoint)
    if args.task == "recall":
        rows = eval_recall(model, args.distances, args.n)
    elif args.task == "speed":
        rows = eval_speed(model, args.bank_entries, args.tokens)
    elif args.task == "capture":
        gen = ConversationGenerator(EVAL_SEED + 3, held_out=True)
        keys, queries = capture_memory_vectors(model, gen.filler_turns(args.capture_tokens))
        pick = np.random.default_rng(0).choice(len(queries), min(2048, len(queries)), replace=False)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, keys=keys, queries=queries[np.sort(pick)])
        rows = [{"keys": len(keys), "queries": len(pick), "out": str(args.out)}]
        print(json.dumps(rows[-1]), flush=True)
    else:
        masks: list[list[bool]] | None = None
        if args.files:
            docs = [encode(p.read_text(encoding="utf-8", errors="replace")) for p in args.files]
        else:
            gen = ConversationGenerator(EVAL_SEED, held_out=True)
            synthetic = [
                gen.document(args.doc_len, n_facts=4, n_questions=2) for _ in range(args.docs)
            ]
            docs = [d.tokens for d in synthetic]
            masks = [[w > 1.0 for w in d.weights] for d in synthetic]
        rows = eval_ppl(model, docs, args.memory_sizes, masks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _pretrained_recall(args: argparse.Namespace) -> int:
    from agent_runtime.models.llama.registry import default_data_dir
    from agent_runtime.models.loader import load_model
    from agent_runtime.training.chat_eval import chitchat_lines, run_recall

    if args.task not in ("recall", "ppl"):
        raise AgentRuntimeError("--model evaluates recall and ppl (eval recall --model NAME)")
    engine = EngineConfig(
        model=args.model,
        memory_layers=args.memory_layers,
        memory_k=args.memory_k,
        memory_window=args.memory_window,
        memory_sink=args.memory_sink,
        memory_span=args.memory_span,
    )
    engine.validate()
    data_dir = args.data_dir or default_data_dir()
    chat = load_model(engine, data_dir)
    if args.task == "ppl":
        from agent_runtime.training.chat_eval import dialogue_document, run_ppl

        if args.document or args.files:
            from agent_runtime.training.documents import fetch_document

            paths = (
                [fetch_document(args.document, Path(data_dir) / "corpora")] if args.document else []
            )
            text = "\n\n".join(
                p.read_text(encoding="utf-8", errors="replace") for p in [*paths, *args.files]
            )
            document = chat.encode_text(text)[: args.doc_len]
            if len(document) <= args.scored:
                raise AgentRuntimeError(
                    f"the document has {len(document)} tokens: not more than --scored {args.scored}"
                )
        else:
            document = dialogue_document(chat, data_dir, args.doc_len)  # type: ignore[arg-type]
        rows = run_ppl(chat, document, args.memory_sizes, args.scored)  # type: ignore[arg-type]
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    lines = chitchat_lines(data_dir)
    # with --json, every probe is journalled beside it until the run completes: a rerun of a
    # stopped evaluation resumes (a finished one starts afresh: its journal is gone)
    journal = args.json.with_name(args.json.name + ".probes.jsonl") if args.json else None
    rows = run_recall(
        chat,  # type: ignore[arg-type]
        lines,
        args.distances,
        args.n,
        modes=[m.strip() for m in args.modes.split(",")],
        forms=[f.strip() for f in args.forms.split(",")],
        corrections=args.corrections,
        seed=args.seed,
        out=sys.stdout,
        memory=MemoryConfig(
            index=args.memory_index, part_ann_threshold=args.part_ann_threshold
        ).validate(),
        journal=journal,
        settings={
            "version": __version__,
            "weights": getattr(chat, "weights_id", ""),
            "engine": [args.memory_layers, args.memory_k, args.memory_window],
            "sink_span": [args.memory_sink, args.memory_span],
            "index": [args.memory_index, args.part_ann_threshold],
        },
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        if journal is not None:
            journal.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
