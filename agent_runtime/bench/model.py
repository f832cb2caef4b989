"""``agent-runtime bench model``: a pretrained decoder's speed with its kNN memory, side by side.

In-process, through the model seam (what the engine calls), one run compares:

* **decode** tokens/s of one session with a bank of 0, 16K and 64K entries (``--bank-sizes``),
  and the ratio to the empty bank: what the memory costs per token as it grows, for each
  ``--index`` side by side: ``flat`` (exact search) and ``auto`` (serving's default: each part
  of the bank moves to its own IVF index past ``memory.part_ann_threshold``, 16K entries), with
  the one-time pause of that move;
* **batching**: tokens/s of B sessions decoded together vs one (``--batch``), each with its
  own bank of ``--batch-bank`` entries: batched matrix products must pay off;
* **prefill** tokens/s of a prompt fed in block-aligned chunks (one memory write per block);
* **bytes per stored token** of the bank for each ``--memory-layers`` choice and key/value
  storage (fp32, fp16), the figure that decides how long a conversation fits in RAM;
* with ``--profile``, **where a decode step's time goes** at each bank size (the model's own
  products, the FAISS searches, the bank's bookkeeping around them, shaping the retrieved
  entries, the attention, provenance), measured by timing wrappers around those functions;
* each **``--dtype``** of the weights and activations side by side (``float32,float16``, say;
  ``float32+float16`` is float32 with float16 copies for one-token steps, serving's default
  on a CPU: ``engine.vector_dtype``): the speeds above for each, and what the cheaper types
  cost in accuracy against the first, on the same text (mean KL divergence of the next-token
  distributions, how often the most likely next token is the same, the largest logit
  difference), computed one token at a time as a decoding session computes them.

Banks are filled with random entries of the model's dims (a search costs the same whatever
the keys hold); the window is full, as in a long conversation. ``--quick`` runs a random
tiny Llama (CI); a real run takes ``--model`` (default ``smollm2-135m-instruct``, pulled once).
Speeds are medians of ``--repeats`` timed rounds after one warm-up, the dtypes' rounds
alternating on the same banks; compare ratios, not absolute figures, on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_runtime.config import EngineConfig, token_counts
from agent_runtime.errors import ConfigError

__all__ = ["main"]


SWITCHES: list[float] = []  # the add that crossed the IVF threshold (the engine's pause)
BUILDS: list[float] = []  # the IVF build that add started, off the engine thread, waited for
"""Seconds of each add that moved a bank's parts to IVF (the one-time pause a session sees)."""


def _bank(
    chat: Any, entries: int, storage: str, seed: int, index: str = "flat", threshold: int = 0
) -> Any:
    from memory import MemoryBank, MemoryConfig

    config = MemoryConfig(flat_storage=storage, value_storage=storage, index=index)
    if threshold:
        config.part_ann_threshold = threshold
    key_dim, value_dim = chat.memory_dims
    bank = MemoryBank(key_dim, value_dim, config, parts=chat.memory_parts)
    rng = np.random.default_rng(seed)
    for start in range(0, entries, 4096):
        n = min(4096, entries - start)
        keys = rng.standard_normal((n, key_dim), dtype=np.float32)
        values = rng.standard_normal((n, value_dim), dtype=np.float32) * 0.1
        was = bank.stats().index, bank.index_building
        started = time.perf_counter()
        bank.add(keys, values, np.arange(start, start + n))
        if (bank.stats().index, bank.index_building) != was and not was[1]:
            SWITCHES.append(time.perf_counter() - started)
    if bank.index_building:  # measure the final index, not the flat one answering meanwhile
        started = time.perf_counter()
        bank.build_index()
        BUILDS.append(time.perf_counter() - started)
    return bank


def _full_window_state(chat: Any, position: int, seed: int) -> Any:
    cfg, plan = chat.model.cfg, chat.plan
    gen = torch.Generator().manual_seed(seed)
    state = chat.new_state()
    shape = (plan.window, cfg.num_kv_heads, cfg.head_dim)
    dtype = chat.model.dtype
    state.k = [torch.randn(shape, generator=gen).to(dtype) for _ in range(cfg.num_layers)]
    state.v = [torch.randn(shape, generator=gen).to(dtype) for _ in range(cfg.num_layers)]
    state.position = position + plan.window
    return state


def _decode_rates(chats: list[Any], banks: list[Any], steps: int, repeats: int) -> list[float]:
    """Tokens/s of ``len(banks)`` sessions decoded together by each of ``chats`` (median of
    ``repeats`` rounds). The chats' rounds alternate, so a slow moment of a shared machine
    falls on all of them alike and their ratios hold."""
    states = [[_full_window_state(c, len(b), i) for i, b in enumerate(banks)] for c in chats]
    tokens = [11] * len(banks)
    for chat, st in zip(chats, states, strict=True):
        chat.decode(st, tokens, banks)  # warm-up
    rates: list[list[float]] = [[] for _ in chats]
    for _ in range(repeats):
        for chat, st, out in zip(chats, states, rates, strict=True):
            started = time.perf_counter()
            for _ in range(steps):
                chat.decode(st, tokens, banks)
            out.append(len(banks) * steps / (time.perf_counter() - started))
            _rewind(st, steps)
    return [statistics.median(r) for r in rates]


def _rewind(states: list[Any], steps: int) -> None:
    """Take the last ``steps`` tokens back out of each window, so that timed rounds stay
    below the next block boundary: no bank writes in the timing."""
    for s in states:
        s.position -= steps
        s.k = [t[:-steps] for t in s.k]
        s.v = [t[:-steps] for t in s.v]


# (label, module, class name or "", function): the parts of a decode step --profile times.
_SPLIT = (
    ("products", "agent_runtime.models.llama.model", "DecoderLayer", "attention_inputs"),
    ("products", "agent_runtime.models.llama.model", "DecoderLayer", "finish"),
    ("products", "agent_runtime.models.llama.model", "LlamaModel", "head"),
    ("attention", "agent_runtime.models.llama.memory", "", "_attend_row"),
    ("shaping", "agent_runtime.models.llama.memory", "", "_search"),
    ("bank", "memory.bank", "MemoryBank", "search_parts"),
    ("faiss", "memory.index", "FlatKeys", "search"),
    ("faiss", "memory.index", "IVFKeys", "search"),
    ("faiss", "memory.index", "IVFKeys", "search_with_keys"),
    ("faiss", "memory.index", "KeyIndex", "part_keys"),
    ("provenance", "agent_runtime.models.llama.memory", "", "add_mass"),
)
SPLIT_PARTS = ("products", "attention", "faiss", "bank", "shaping", "provenance", "other")


@contextlib.contextmanager
def _step_split() -> Iterator[defaultdict[str, float]]:
    """Seconds spent in each part of :data:`_SPLIT` while the block runs, each part's own time
    (a part called inside another is taken out of the outer one). The wrappers are removed
    after; they cost ~1 us per call, which lands in the parts."""
    import importlib

    spent: defaultdict[str, float] = defaultdict(float)
    stack: list[list[float]] = []  # per active wrapper: [time spent in wrapped callees]
    undo = []

    def timed(label: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack.append([0.0])
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - began
                inner = stack.pop()[0]
                spent[label] += took - inner
                if stack:
                    stack[-1][0] += took

        return wrapper

    for label, module_name, cls_name, name in _SPLIT:
        module = importlib.import_module(module_name)
        owner = getattr(module, cls_name) if cls_name else module
        original = owner.__dict__[name]
        setattr(owner, name, timed(label, original))
        undo.append((owner, name, original))
    try:
        yield spent
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def _split_rates(chat: Any, banks: list[Any], steps: int, rounds: int) -> dict[str, float]:
    """Milliseconds per decode step of ``len(banks)`` sessions decoded together in each part
    (``other``: the rest), over ``rounds`` rounds of ``steps`` steps (rewound after each, as
    the timed rounds are)."""
    states = [_full_window_state(chat, len(bank), i) for i, bank in enumerate(banks)]
    tokens = [11] * len(banks)
    chat.decode(states, tokens, banks)  # warm-up
    total = 0.0
    with _step_split() as spent:
        for _ in range(rounds):
            began = time.perf_counter()
            for _ in range(steps):
                chat.decode(states, tokens, banks)
            total += time.perf_counter() - began
            _rewind(states, steps)
    steps *= rounds
    split = {part: 1e3 * spent[part] / steps for part in SPLIT_PARTS[:-1]}
    split["other"] = 1e3 * total / steps - sum(split.values())
    split["step"] = 1e3 * total / steps
    return split


def _prefill_rate(chat: Any, tokens: int, repeats: int) -> float:
    rates = []
    for r in range(repeats + 1):
        bank = _bank(chat, 0, "fp32", r)
        state = chat.new_state()
        prompt = [11 + (i % 200) for i in range(tokens)]
        started = time.perf_counter()
        chat.prefill(state, prompt, bank)
        if r:  # the first round warms up
            rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


DTYPES = ("float32", "bfloat16", "float16", "float32+float16", "float32+bfloat16")

# The text the dtypes are compared on: plain English prose, the same in every run.
_AGREEMENT_TEXT = (
    "The library was quiet in the early morning. A few students sat near the windows, reading "
    "or writing in their notebooks, while the librarian sorted a cart of returned books. Outside"
    ", the rain had stopped and the streets were beginning to dry. My name is Priya, and I come "
    "here most days before work. Last week I told the librarian that my dentist appointment is "
    "on March 3rd, and she reminded me of it yesterday. The code for my locker at the gym is "
    "4711, which I keep forgetting. When people ask me why I like this place, I tell them it is "
    "the only room in the city where nobody is in a hurry. Conversations here are slow and "
    "careful; a question can wait for its answer. Memory works the same way: what we are told "
    "long ago comes back when something today reminds us of it, and a good assistant should do "
    "the same, recalling a name, a date or a number from the start of a long conversation "
    "without being told it again."
)


def _agreement(chat: Any, tokens: list[int], reference: torch.Tensor | None) -> dict[str, Any]:
    """Logits of ``tokens`` fed one at a time (one-token steps: what decoding computes) in
    ``chat``'s dtype, compared with ``reference`` (the first dtype's; none for the first)."""
    state, bank = chat.new_state(), _bank(chat, 0, "fp32", 0)
    with torch.no_grad():
        rows = [chat.decode([state], [t], [bank])[0][0].float().cpu() for t in tokens]
    logits = torch.stack(rows)
    if reference is None:
        return {"logits": logits}
    ref_logp = torch.log_softmax(reference, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return {
        "logits": logits,
        "tokens": len(tokens),
        "kl_mean": float(kl.mean()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "max_abs_logit_diff": float((logits - reference).abs().max()),
    }


def _load(args: argparse.Namespace, dtype: str) -> Any:
    if args.quick and not args.model:
        from agent_runtime.models.llama.family import LlamaChatModel, tiny_random

        tiny = tiny_random(0)
        model = tiny.model.to(getattr(torch, dtype.split("+")[0]))
        model.use_vector_weights(getattr(torch, dtype.split("+")[1]) if "+" in dtype else None)
        return LlamaChatModel(model, tiny.tokenizer, tiny.plan)
    from agent_runtime.models.llama.registry import default_data_dir
    from agent_runtime.models.loader import load_model

    engine = EngineConfig(
        model=args.model or "smollm2-135m-instruct",
        memory_layers=args.memory_layers[0],
        memory_k=args.memory_k,
        memory_span=args.memory_span,
        memory_window=args.memory_window,
        device=args.device,
        dtype=dtype.split("+")[0],
        vector_dtype=dtype.split("+")[1] if "+" in dtype else "none",
    )
    engine.validate()
    return load_model(engine, args.data_dir or default_data_dir())


def _plan_changes(text: str) -> dict[str, Any]:
    """The plan fields a --plans item sets: ``k=N[,span=S][,sink=T][,layers=L]``, ``L`` as
    ``engine.memory_layers`` (``15-29``, ``4,9,14``: a piece without ``=`` goes on the layers)."""
    items: list[list[str]] = []
    for piece in text.split(","):
        if "=" not in piece and items and items[-1][0] == "layers":
            items[-1][1] += "," + piece
        else:
            key, _, value = piece.partition("=")
            items.append([key.strip(), value.strip()])
    changes: dict[str, Any] = {}
    for key, value in items:
        if key == "layers":
            try:  # resolved against the model's layers once it is loaded ("all")
                EngineConfig(memory_layers=value).memory_layer_indices(None)
            except ConfigError as exc:
                build_parser().error(f"--plans: {text!r}: {exc}")
            changes[key] = value
        elif key in ("k", "span", "sink") and value.isdigit():
            changes[key] = int(value)
        else:
            build_parser().error(
                f"--plans: {key}={value} in {text!r} is not k=N, span=N, sink=N or layers=L"
            )
    return changes


def _planned(chat: Any, changes: dict[str, Any]) -> Any:
    """``chat``'s plan with a --plans item's changes (its layers resolved for this model)."""
    num_layers = chat.model.cfg.num_layers
    if "layers" in changes:
        spec = changes["layers"]
        changes = {
            **changes,
            "layers": EngineConfig(memory_layers=spec).memory_layer_indices(num_layers),
        }
    return replace(chat.plan, **changes).validate(num_layers)


def _dtypes(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(bad) or repr(text)}: each dtype must be one of {', '.join(DTYPES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime bench model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="", help="registry name, GGUF file or model directory")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="model cache (default: serve's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random model, small sizes (CI)"
    )
    parser.add_argument(
        "--bank-sizes",
        type=token_counts,
        default=None,
        help="default 0,16384,65536 (16k means 16,000: below memory.part_ann_threshold, exact)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where a decode step's time goes at each bank size (first dtype)",
    )
    parser.add_argument("--batch", type=int, default=8, help="sessions decoded together")
    parser.add_argument(
        "--batch-bank", type=token_counts, default=None, help="entries per batched bank"
    )
    parser.add_argument(
        "--memory-layers",
        nargs="+",
        default=[EngineConfig().memory_layers],
        help="layer choices to compare for bytes per token (the first is timed; default: serve's)",
    )
    parser.add_argument(
        "--index",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=["flat", "auto"],
        help="bank indexes to compare: flat (exact) and auto (serving's default: each part "
        "moves to IVF past memory.part_ann_threshold); default flat,auto",
    )
    parser.add_argument(
        "--dtype",
        type=_dtypes,
        default=["float32", "float32+float16"],
        help="weight/activation dtypes to compare, comma-separated: float32, bfloat16, "
        "float16, or float32+float16 (float32 with float16 copies for one-token steps: "
        "engine.vector_dtype); the first is the accuracy reference; default "
        "float32,float32+float16",
    )
    served = EngineConfig()
    parser.add_argument("--memory-k", type=int, default=served.memory_k)
    parser.add_argument("--memory-span", type=int, default=served.memory_span)
    parser.add_argument(
        "--plans",
        nargs="+",
        default=[],
        help="memory plans to compare side by side instead of dtypes (the first dtype): "
        "k=N[,span=S][,sink=T][,layers=L] each, applied to serve's plan, e.g. --plans k=32,span=0 "
        "k=4,span=16",
    )
    parser.add_argument("--memory-window", type=int, default=served.memory_window)
    parser.add_argument("--steps", type=int, default=0, help="decode steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: default)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plans = [_plan_changes(text) for text in args.plans]  # refused before any model loads
    if plans:  # one dtype (the first), several plans: the same timing, a plan per column
        first = _load(args, args.dtype[0])
        chats = [first.with_plan(_planned(first, c)) for c in plans]
        args.dtype = [f"{args.dtype[0]} {text}" for text in args.plans]
    else:
        chats = [_load(args, dtype) for dtype in args.dtype]
    out: dict[str, Any] = {
        "model": chats[0].describe(),
        "torch_threads": torch.get_num_threads(),
        "dtypes": args.dtype,
    }
    if plans:
        out["plans"] = [
            {
                "label": label,
                "k": c.plan.k,
                "span": c.plan.span,
                "sink": c.plan.sink,
                "layers": list(c.plan.layers),
            }
            for label, c in zip(args.dtype, chats, strict=True)
        ]
    _time_dtypes(args, chats, out)
    out["accuracy"] = []
    if len(chats) > 1 and not args.plans:  # (plans agree without a bank: nothing to compare)
        tokens = chats[0].encode_text(_AGREEMENT_TEXT)[: 64 if args.quick else 512]
        reference = _agreement(chats[0], tokens, None)["logits"]
        for dtype, chat in zip(args.dtype[1:], chats[1:], strict=True):
            agreement = _agreement(chat, tokens, reference)
            del agreement["logits"]
            agreement.update(dtype=dtype, reference=args.dtype[0])
            out["accuracy"].append(agreement)
            print(
                f"accuracy, {dtype} vs {args.dtype[0]} ({len(tokens)} tokens, one at a time): KL "
                f"{agreement['kl_mean']:.2e}, top-1 agreement "
                f"{agreement['top1_agreement']:.1%}, max |logit diff| "
                f"{agreement['max_abs_logit_diff']:.3f}",
                file=sys.stderr,
            )
    out["bytes_per_token"] = _bytes_per_token(args, chats[0])
    if SWITCHES:
        out["ivf_switch_s"] = statistics.median(SWITCHES)
        line = f"moving a bank's parts to IVF: the add that starts it {out['ivf_switch_s']:.2f} s"
        if BUILDS:
            out["ivf_build_s"] = statistics.median(BUILDS)
            line += f", the build off the engine thread {out['ivf_build_s']:.2f} s"
        print(line + " (once per session)", file=sys.stderr)
    print(json.dumps(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _time_dtypes(args: argparse.Namespace, chats: list[Any], out: dict[str, Any]) -> None:
    """Decode, batching and prefill speeds of every dtype (one bank set, rounds alternating)."""
    sizes = args.bank_sizes or ([0, 512, 2048] if args.quick else [0, 16384, 65536])
    batch_bank = (args.batch_bank or [512 if args.quick else 16384])[0]
    steps = args.steps or (4 if args.quick else 16)
    prefill_tokens = args.prefill_tokens or (64 if args.quick else 1024)
    threshold = 1024 if args.quick else 0  # quick banks are small: let them switch too

    def label(dtype: str) -> str:
        return f"{dtype}, " if len(chats) > 1 else ""

    # one bank serves every column: plans with fewer memory layers search its first parts
    widest = max(chats, key=lambda c: c.memory_parts)

    decode = []
    for index in args.index:
        for size in sizes:
            bank = _bank(widest, size, "fp32", 0, index, threshold)
            kind = bank.stats().index
            rates = _decode_rates(chats, [bank], steps, args.repeats)
            for dtype, rate in zip(args.dtype, rates, strict=True):
                decode.append({
                    "dtype": dtype, "index": index, "bank_index": kind, "bank_entries": size,
                    "tokens_per_s": rate,
                })  # fmt: skip
                print(f"decode, {label(dtype)}{index} ({kind}), bank {size:>7}: {rate:7.2f} "
                      "tok/s", file=sys.stderr, flush=True)  # fmt: skip
            if args.profile:
                split = _split_rates(chats[0], [bank], steps, args.repeats)
                out.setdefault("step_split_ms", []).append(
                    {"dtype": args.dtype[0], "index": index, "bank_entries": size, **split}
                )
                print(f"step split, {label(args.dtype[0])}{index} ({kind}), bank {size:>7}: "
                      f"{split['step']:.1f} ms = " + ", ".join(
                          f"{part} {split[part]:.1f}" for part in SPLIT_PARTS
                      ), file=sys.stderr, flush=True)  # fmt: skip
    empty = {
        (r["dtype"], r["index"]): r["tokens_per_s"] for r in decode if r["bank_entries"] == sizes[0]
    }
    for row in decode:
        row["ratio_to_empty"] = row["tokens_per_s"] / empty[row["dtype"], row["index"]]
    out["decode"] = decode

    out["batching"] = []
    for index in args.index:
        first = _bank(widest, batch_bank, "fp32", 0, index, threshold)
        ones = _decode_rates(chats, [first], steps, args.repeats)
        banks = [first] + [
            _bank(widest, batch_bank, "fp32", i, index, threshold) for i in range(1, args.batch)
        ]
        manys = _decode_rates(chats, banks, steps, args.repeats)
        for dtype, one, many in zip(args.dtype, ones, manys, strict=True):
            out["batching"].append({
                "dtype": dtype,
                "index": index,
                "sessions": args.batch,
                "bank_entries": batch_bank,
                "one_tokens_per_s": one,
                "batched_tokens_per_s": many,
                "ratio": many / one,
            })  # fmt: skip
            print(
                f"batching, {label(dtype)}{index}: 1 -> {one:.2f} tok/s, {args.batch} -> "
                f"{many:.2f} tok/s ({many / one:.2f}x)",
                file=sys.stderr,
            )

    out["prefill"] = []
    for dtype, chat in zip(args.dtype, chats, strict=True):
        rate = _prefill_rate(chat, prefill_tokens, max(1, args.repeats // 2))
        out["prefill"].append({"dtype": dtype, "tokens": prefill_tokens, "tokens_per_s": rate})
        print(f"prefill, {dtype}: {rate:.1f} tok/s", file=sys.stderr)


def _bytes_per_token(args: argparse.Namespace, chat: Any) -> list[dict[str, Any]]:
    rows = []
    for choice in args.memory_layers:
        engine = EngineConfig(memory_layers=choice)
        layers = engine.memory_layer_indices(chat.model.cfg.num_layers)
        variant = chat.with_plan(replace(chat.plan, layers=layers))
        for storage in ("fp32", "fp16"):
            bank = _bank(variant, 4096, storage, 0)
            rows.append(
                {
                    "memory_layers": choice,
                    "layers": len(layers),
                    "storage": storage,
                    "bytes_per_token": bank.stats().bytes / len(bank),
                }
            )
            print(
                f"memory layers {choice} ({len(layers)}), {storage}: "
                f"{rows[-1]['bytes_per_token'] / 1024:.1f} KiB per token",
                file=sys.stderr,
            )
    return rows
