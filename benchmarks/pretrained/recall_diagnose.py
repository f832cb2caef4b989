"""Why does a recall probe miss? Retrieval or reading, layer by layer, with the prefill cached.

A 16K-token probe costs minutes of prefill on a CPU, and most levers (k, neighbour spans, which
layers retrieve) act at the question. This script prefills each chosen probe of
``eval recall`` (same seed and distance, so the same facts and filler) up to its question once,
keeps that state (the window and the bank) in ``--cache``, and then asks the question under
each variant from the same state. For every variant it reports the answer, whether it holds the
value, and, at each step of the answer, how much of the memory attention went to the fact's
tokens (the stated value's tokens and the whole statement), per memory layer.

    python benchmarks/pretrained/recall_diagnose.py --model smollm2-135m-recall \
        --distance 16000 --probes 2,4,5,7 --memory-k 32 --memory-span 0 \
        --variants base k=64 k=4,span=16 --json benchmarks/pretrained/recall_diagnose_16k.json

The probes are prefilled with ``--memory-k``/``--memory-span`` (serve's defaults unless given);
a variant is ``key=value[,key=value]`` over that plan's ``k``, ``span`` and ``layers`` (which of
the memory layers retrieve at the question, e.g. ``layers=10-29``); ``base`` is that plan;
``decode:VARIANT`` prefills the question with that plan and decodes the answer with the variant.
Each row records the plan it ran (``plan``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_runtime.config import EngineConfig
from agent_runtime.models.llama import memory as llama_memory
from agent_runtime.models.llama.registry import default_data_dir
from agent_runtime.models.loader import load_model
from agent_runtime.training.chat_eval import chitchat_lines, make_probes
from memory import MemoryBank, MemoryConfig


def parse_variant(text: str, plan: llama_memory.MemoryPlan) -> tuple[llama_memory.MemoryPlan, set]:
    """A variant's plan and the memory layers allowed to retrieve (all, unless ``layers=``)."""
    allowed = set(plan.layers)
    if text == "base":
        return plan, allowed
    changes: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key in ("k", "span"):
            changes[key] = int(value)
        elif key == "layers":
            lo, _, hi = value.partition("-")
            allowed = set(range(int(lo), int(hi or lo) + 1)) & set(plan.layers)
        else:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
    return replace(plan, **changes), allowed


def value_positions(chat: Any, offset: int, statement: str, value: str) -> tuple[range, range]:
    """Positions of the statement turn, and of the tokens that spell the value in it."""
    turn = chat.encode_turn("user", statement)
    statement_range = range(offset, offset + len(turn))
    text, hits = "", []
    start = statement.find(value)
    for i in range(len(turn)):
        before = len(text)
        text = chat.tokenizer.decode(turn[: i + 1])
        # the turn's text has the template's header before the statement
        head = text.find(statement[: max(1, start)]) if start >= 0 else -1
        if head >= 0:
            lo, hi = head + start, head + start + len(value)
            if before < hi and len(text) > lo:
                hits.append(offset + i)
    value_range = range(min(hits), max(hits) + 1) if hits else range(0)
    return statement_range, value_range


class Recorder:
    """Wraps the memory attention: per call (memory layer), the mass on the given positions."""

    def __init__(self, plan_layers: tuple[int, ...]) -> None:
        self.plan_layers = plan_layers
        self.allowed: set[int] = set(plan_layers)
        self.watch: dict[str, range] = {}
        self.statement_text = ""
        self.steps: list[dict[str, dict[int, float]]] = []
        self.recording = False
        self._orig = llama_memory._attend_row

    def __enter__(self) -> Recorder:
        orig = self._orig

        def attend(rope, plan, state, layer, q, k, v, mem):  # type: ignore[no-untyped-def]
            if mem is not None and layer not in self.allowed:
                mem = None
            out = orig(rope, plan, state, layer, q, k, v, mem)
            if self.recording and mem is not None and mem.weights is not None:
                pos = mem.positions[..., -1, :]  # (kv, g, n)
                w = mem.weights[..., -1, :]  # the last query token's attention
                heads = w.shape[0] * w.shape[1]
                step = self.steps[-1]
                for name, where in self.watch.items():
                    inside = (pos >= where.start) & (pos < where.stop) & mem.mask[..., -1, :]
                    step[name][layer] = float((w * inside).sum()) / heads
                step["retrieved_any"][layer] = float(mem.weights[..., -1, :].sum()) / heads
                where = self.watch.get("statement")
                if where is not None:  # the mass on each token of the statement, all layers
                    inside = (pos >= where.start) & (pos < where.stop) & mem.mask[..., -1, :]
                    per: dict[int, float] = {}  # (a later chunk of a prefill replaces it)
                    step["per_token"][layer] = per  # type: ignore[assignment]
                    for p_, m_ in zip(pos[inside].tolist(), w[inside].tolist(), strict=True):
                        per[p_] = per.get(p_, 0.0) + m_ / heads
            return out

        llama_memory._attend_row = attend  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        llama_memory._attend_row = self._orig  # type: ignore[assignment]

    def new_step(self) -> None:
        self.steps.append({name: {} for name in [*self.watch, "retrieved_any", "per_token"]})


def forced_value(runner: Any, rec: Recorder, restore: Any, question: list[int], probe: Any) -> dict:
    """Teacher-forced, in the prefix form: log p of the value's tokens after the answer prefix,
    and the memory attention on the value at the step that predicts its first token."""
    state, bank = restore()
    prefix = runner.tokenizer.encode(probe.prefix)
    value = runner.tokenizer.encode(f"{probe.prefix} {probe.value}")[len(prefix) :]
    rec.steps, rec.recording = [], True
    rec.new_step()
    logits = getattr(runner, "prefiller", runner).prefill(state, [*question, *prefix], bank)
    logp = []
    for j, token in enumerate(value):
        logp.append(float(torch.log_softmax(logits.float(), -1)[token]))
        if j + 1 < len(value):
            out, _ = runner.decode([state], [token], [bank])
            logits = out[0]
    rec.recording = False
    first = rec.steps[0]
    per_token: dict[int, float] = {}
    for per in first["per_token"].values():
        for pos, mass in per.items():  # type: ignore[attr-defined]
            per_token[pos] = per_token.get(pos, 0.0) + mass
    top = sorted(first["value"].items(), key=lambda kv: -kv[1])[:4]
    return {
        "logp": round(sum(logp), 3),
        "p_first": round(float(np.exp(logp[0])), 4),
        "value_mass": round(sum(first["value"].values()), 4),
        "statement_mass": round(sum(first["statement"].values()), 4),
        "top_layers": [(layer, round(m, 4)) for layer, m in top],
        "statement_tokens": [
            (runner.tokenizer.decode([tok]), round(per_token.get(pos, 0.0), 3))
            for pos, tok in statement_tokens(runner, rec)
        ],
    }


def statement_tokens(runner: Any, rec: Recorder) -> list[tuple[int, int]]:
    where = rec.watch["statement"]
    turn = runner.encode_turn("user", rec.statement_text)
    return list(zip(range(where.start, where.stop), turn, strict=True))


def save_cached(path: Path, saved: dict[str, Any]) -> None:
    """The prefilled state as .npz (no pickle), written whole or not at all."""
    bank = dict(saved["bank"])
    arrays = bank.pop("arrays")
    part = path.with_name(path.name + ".part")
    with part.open("wb") as fh:
        np.savez(
            fh,
            window=np.frombuffer(saved["state"], np.uint8),
            bank_json=np.frombuffer(json.dumps(bank).encode(), np.uint8),
            **{f"bank_{name}": array for name, array in arrays.items()},
        )
    os.replace(part, path)


def load_cached(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        bank = json.loads(z["bank_json"].tobytes())
        bank["arrays"] = {
            n[5:]: z[n] for n in z.files if n.startswith("bank_") and n != "bank_json"
        }
        return {"state": z["window"].tobytes(), "bank": bank}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-recall")
    parser.add_argument(
        "--distance", type=int, default=16000, help="tokens of filler (eval recall's 16k is 16000)"
    )
    parser.add_argument("--probes", default="0", help="probe indices, as eval recall numbers them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["base"])
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "agent-runtime" / "recall-diagnose",
        help="where prefilled states are kept (~740 MB per 16K probe)",
    )
    served = EngineConfig()
    parser.add_argument(
        "--memory-k", type=int, default=served.memory_k, help="the plan that prefills (as serve's)"
    )
    parser.add_argument("--memory-span", type=int, default=served.memory_span)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    engine = EngineConfig(model=args.model, memory_k=args.memory_k, memory_span=args.memory_span)
    engine.validate()
    chat: Any = load_model(engine, data_dir)
    lines = chitchat_lines(data_dir)
    wanted = [int(i) for i in args.probes.split(",")]
    probes = make_probes(chat, lines, args.distance, max(wanted) + 1, args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)
    parts, d = chat.memory_parts, chat.memory_dims[0]
    rows = []
    with Recorder(chat.plan.layers) as rec:
        for i in wanted:
            probe = probes[i]
            body = [
                t for m in probe.messages[:-1] for t in chat.encode_turn(m["role"], m["content"])
            ]
            question = chat.encode_turn("user", probe.messages[-1]["content"]) + list(
                chat.reply_prefix
            )
            offset = len(chat.preamble("user"))
            statement = probe.messages[0]["content"]
            watch_statement, watch_value = value_positions(chat, offset, statement, probe.value)
            weights = getattr(chat, "weights_id", "")[:12]
            plan = f"k{chat.plan.k}-span{chat.plan.span}"
            cache = args.cache / f"{weights}-{plan}-{args.distance}-{args.seed}-{i}.npz"
            if cache.exists():
                saved = load_cached(cache)
            else:
                began = time.perf_counter()
                state = chat.new_state()
                bank = MemoryBank(d, d, MemoryConfig(), parts=parts)
                rec.recording = False
                chat.prefill(state, body, bank)
                saved = {"state": chat.save_state(state), "bank": bank.state_dict()}
                save_cached(cache, saved)
                print(
                    f"# probe {i}: prefilled {len(body)} tokens in {time.perf_counter() - began:.0f} s",
                    flush=True,
                )
            for variant in args.variants:
                decode_only = variant.startswith("decode:")
                plan, allowed = parse_variant(variant.removeprefix("decode:"), chat.plan)
                runner = chat.with_plan(plan)
                if decode_only:  # the question is prefilled with the plan as served
                    runner.prefiller = chat

                def restore(runner: Any = runner, saved: Any = saved) -> tuple[Any, MemoryBank]:
                    state = runner.load_state(saved["state"])
                    bank = MemoryBank(d, d, MemoryConfig(), parts=parts)
                    bank.load_state_dict(saved["bank"])
                    return state, bank

                state, bank = restore()
                rec.allowed = allowed
                rec.watch = {"value": watch_value, "statement": watch_statement}
                rec.statement_text = statement
                rec.steps = []
                rec.recording = True
                rec.new_step()
                logits = getattr(runner, "prefiller", runner).prefill(state, question, bank)
                stream, text, tokens = runner.text_stream(), "", []
                while logits is not None and len(tokens) < args.max_tokens:
                    token = int((logits + runner.reply_mask).argmax())
                    if token == runner.end_token:
                        break
                    tokens.append(token)
                    text += stream.push(token)
                    rec.new_step()
                    out, _ = runner.decode([state], [token], [bank])
                    logits = out[0]
                text += stream.flush()
                rec.recording = False
                ok = probe.value.lower() in text.lower()
                # the step that produced each answer token: mass on the value, summed over layers
                per_step = [
                    {
                        "value": round(sum(s["value"].values()), 4),
                        "statement": round(sum(s["statement"].values()), 4),
                        "memory": round(sum(s["retrieved_any"].values()), 4),
                    }
                    for s in rec.steps
                ]
                best = max(range(len(per_step)), key=lambda j: per_step[j]["value"], default=0)
                layers = rec.steps[best]["value"] if rec.steps else {}
                top = sorted(layers.items(), key=lambda kv: -kv[1])[:6]
                row = {
                    "probe": i,
                    "value": probe.value,
                    "variant": variant,
                    "plan": {"k": plan.k, "span": plan.span},
                    "ok": ok,
                    "answer": text,
                    "value_mass_first_step": per_step[0] if per_step else None,
                    "value_mass_best_step": best,
                    "value_mass_best": per_step[best] if per_step else None,
                    "top_layers": [(layer, round(m, 4)) for layer, m in top],
                    "layers_with_value": sum(1 for m in layers.values() if m > 0),
                    "forced": forced_value(runner, rec, restore, question, probe),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
