"""Recall of a pretrained chat model through its kNN memory: ``agent-runtime eval recall --model``.

A probe is a conversation in the model's own chat template: the user states a fact with a
held-out value (an invented name, a code, a number: nothing the model could know), real
dialogue follows as filler (the ``chitchat-dataset`` corpus, fetched by package name like a
model), then the user asks for the fact in other words. The reply counts when it contains the
value. Each probe runs in three modes on the same weights:

* ``memory``: the served configuration (window + kNN memory);
* ``window``: the same window, no memory (what is lost without it);
* ``full``: every token in the window, i.e. plain full attention: the model's own **ceiling**
  with the fact in context (only where the conversation fits its trained context).

Question forms: ``chat`` asks and lets the model answer freely; ``prefix`` also starts the
reply with an answer prefix ("Your sister's name is"), the ``response.create`` ``prefix``
option of the API. Small chat models often refuse to answer from context in their own
template (SmolLM2-135M: "I'm sorry, I don't have the ability to remember"), so both are
measured and the model card says which one works.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from agent_runtime.models.llama.family import LlamaChatModel
from agent_runtime.models.llama.memory import MemoryPlan
from agent_runtime.models.llama.registry import Entry, fetch_member
from memory import MemoryBank, MemoryConfig

__all__ = [
    "CHITCHAT",
    "Probe",
    "chitchat_lines",
    "dialogue_document",
    "make_probes",
    "run_ppl",
    "run_probe",
    "run_recall",
]

CHITCHAT = Entry(
    name="chitchat",
    package="chitchat-dataset",
    version="0.9.0",
    member="chitchat_dataset/dataset.json",
    sha256="d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a",
    license="MIT",
    description="7,168 open-domain conversations (Ohio State University), 2.5 M words",
    size=40_303_934,
)

# (statement, question, answer prefix, kind of value); the question never repeats the
# statement's wording.
FORMS: tuple[tuple[str, str, str, str], ...] = (
    (
        "My sister's name is {v}.",
        "What did I say my sister is called?",
        "Your sister's name is",
        "name",
    ),
    (
        "The code for my locker is {v}.",
        "Can you remind me of my locker code?",
        "Your locker code is",
        "code",
    ),
    (
        "I parked the car on level {v} of the garage.",
        "Which floor of the garage is my car on?",
        "You parked the car on level",
        "number",
    ),
    (
        "My dentist appointment is on March {v}th.",
        "What day in March do I see the dentist?",
        "Your dentist appointment is on March",
        "number",
    ),
    ("We named our new puppy {v}.", "What's the name of my puppy?", "Your puppy is called", "name"),
    ("I grew up in a small town called {v}.", "Where did I grow up?", "You grew up in", "name"),
    ("My flight tomorrow is {v}.", "What's my flight number?", "Your flight number is", "flight"),
    (
        "The wifi password at the cabin is {v}.",
        "What was the cabin's wifi password?",
        "The cabin's wifi password is",
        "code",
    ),
    ("My manager at work is {v}.", "Who is my manager?", "Your manager is", "name"),
    (
        "I keep my spare key under the {v} flowerpot.",
        "Where is my spare key?",
        "Your spare key is under the",
        "colour",
    ),
    (
        "My bike lock combination is {v}.",
        "What's the combination of my bike lock?",
        "Your bike lock combination is",
        "code",
    ),
    (
        "Our hotel room number is {v}.",
        "Which room are we staying in?",
        "Your hotel room number is",
        "room",
    ),
)
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "te",
    "zu",
    "no",
    "vi",
    "sha",
    "dor",
    "len",
    "mar",
    "qui",
    "bel",
)
_COLOURS = ("turquoise", "crimson", "lilac", "ochre", "teal", "mustard", "violet", "amber")


def _value(kind: str, rng: random.Random) -> str:
    if kind == "name":
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    if kind == "code":
        return str(rng.randint(1000, 9999))
    if kind == "flight":
        return f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(100, 999)}"
    if kind == "room":
        return str(rng.randint(101, 989))
    if kind == "colour":
        return rng.choice(_COLOURS)
    return str(rng.randint(11, 28))


@dataclass
class Probe:
    messages: list[dict[str, str]]
    """The conversation up to and including the question."""
    value: str
    prefix: str
    distance: int
    """Tokens between the fact and the question (as encoded)."""
    corrected_from: str = ""
    """For a correction probe, the earlier value that was replaced."""


def chitchat_lines(data_dir: Path) -> list[str]:
    """Every message of the chitchat corpus (fetched once into ``data_dir/corpora``)."""
    path = fetch_member(CHITCHAT, Path(data_dir) / "corpora")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [m["text"] for conv in data.values() for turn in conv["messages"] for m in turn]


def make_probes(
    chat: LlamaChatModel,
    lines: Sequence[str],
    distance: int,
    n: int,
    seed: int,
    *,
    corrections: bool = False,
) -> list[Probe]:
    """``n`` probes at ``distance`` tokens (facts, forms and filler drawn with ``seed``)."""
    rng = random.Random(seed * 1_000_003 + distance)
    probes = []
    for i in range(n):
        statement, question, prefix, kind = FORMS[(i + seed) % len(FORMS)]
        value = _value(kind, rng)
        messages = [
            {"role": "user", "content": statement.format(v=value)},
            {"role": "assistant", "content": "Got it, I'll remember that."},
        ]
        old = ""
        used = 0
        while used < distance:
            user, reply = rng.choice(lines), rng.choice(lines)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            used += len(chat.encode_turn("user", user)) + len(chat.encode_turn("assistant", reply))
            if corrections and not old and used >= distance // 2:
                old, value = value, _value(kind, rng)
                while value == old:
                    value = _value(kind, rng)
                text = "Actually, I got that wrong earlier. " + statement.format(v=value)
                messages += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": "Thanks, noted."},
                ]
        messages.append({"role": "user", "content": question})
        probes.append(Probe(messages, value, prefix, used, old))
    return probes


def mode_plan(chat: LlamaChatModel, mode: str, tokens: int) -> MemoryPlan | None:
    """The plan of one mode, or None when ``full`` does not fit the trained context."""
    plan = chat.plan
    if mode == "memory":
        return plan
    if mode == "window":
        return replace(plan, layers=())
    limit = chat.model.cfg.max_position_embeddings
    window = -(-(tokens + 64) // plan.block) * plan.block  # + the default system prompt
    if window + plan.block > limit:
        return None
    return replace(plan, layers=(), window=window)


def _prompt(chat: LlamaChatModel, probe: Probe, use_prefix: bool) -> list[int]:
    prompt = [t for m in probe.messages for t in chat.encode_turn(m["role"], m["content"])]
    prompt += chat.reply_prefix
    if use_prefix:
        prompt += chat.tokenizer.encode(probe.prefix)
    return prompt


@torch.no_grad()
def run_probe(
    chat: LlamaChatModel,
    probe: Probe,
    *,
    use_prefix: bool,
    max_tokens: int = 24,
    memory: MemoryConfig | None = None,
) -> tuple[str, dict[str, float]]:
    """The model's answer to ``probe`` (greedy) and how long its prefill and decode took;
    ``memory`` configures the bank as serving's ``memory.*`` settings do (default: theirs)."""
    parts = chat.memory_parts
    d = chat.memory_dims[0]
    config = memory or MemoryConfig()
    bank = MemoryBank(d, d, config, parts=parts) if chat.plan.layers else None
    state = chat.new_state()
    prompt = _prompt(chat, probe, use_prefix)
    began = time.perf_counter()
    logits = chat.prefill(state, prompt, bank)
    prefilled = time.perf_counter()
    stream = chat.text_stream()
    text = ""
    produced = 0
    while logits is not None and produced < max_tokens:
        token = int((logits + chat.reply_mask).argmax())
        if token == chat.end_token:
            break
        text += stream.push(token)
        produced += 1
        out, _ = chat.decode([state], [token], [bank])
        logits = out[0]
    text += stream.flush()
    done = time.perf_counter()
    return text, {
        "prompt_tokens": len(prompt),
        "prefill_tok_s": len(prompt) / max(prefilled - began, 1e-9),
        "decode_tok_s": produced / max(done - prefilled, 1e-9),
    }


def run_recall(
    chat: LlamaChatModel,
    lines: Sequence[str],
    distances: Sequence[int],
    n: int,
    *,
    modes: Sequence[str] = ("memory", "window", "full"),
    forms: Sequence[str] = ("prefix", "chat"),
    corrections: bool = False,
    seed: int = 0,
    out: Any = None,
    memory: MemoryConfig | None = None,
    journal: Path | None = None,
    settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (distance, form, mode): recall over ``n`` probes, speeds, and the answers.

    With ``journal``, each probe's result is appended to that JSON-lines file as it completes
    (a line on ``out`` says so too), and probes a previous run with the same ``settings``
    already answered are taken from it: a stopped evaluation (a 16K probe takes minutes on a
    CPU) resumes where it stopped when run again.
    """
    rows = []
    key_of = json.dumps({"settings": settings or {}, "seed": seed, "corrections": corrections})
    done = _read_journal(journal, key_of) if journal else {}
    for distance in distances:
        probes = make_probes(chat, lines, distance, n, seed, corrections=corrections)
        for form in forms:
            for mode in modes:
                longest = max(len(_prompt(chat, p, form == "prefix")) for p in probes)
                plan = mode_plan(chat, mode, longest + 32)  # + the answer
                if plan is None:
                    continue
                runner = chat.with_plan(plan)
                hits, stale, answers, speeds = 0, 0, [], []
                for i, probe in enumerate(probes):
                    probe_key = f"{distance}/{form}/{mode}/{i}/{probe.value}"
                    if probe_key in done:
                        answer, speed = done[probe_key]["answer"], done[probe_key]["speed"]
                    else:
                        answer, speed = run_probe(
                            runner, probe, use_prefix=form == "prefix", memory=memory
                        )
                        if journal is not None:
                            _append_journal(journal, key_of, probe_key, answer, speed)
                    ok = probe.value.lower() in answer.lower()
                    if out is not None and journal is not None:
                        print(
                            f"# probe {i + 1}/{len(probes)} ({distance} {form} {mode}):"
                            f" {'recalled' if ok else 'missed'}"
                            f"{' (from the journal)' if probe_key in done else ''}",
                            file=out,
                            flush=True,
                        )
                    hits += ok
                    stale += (
                        bool(probe.corrected_from)
                        and probe.corrected_from.lower() in answer.lower()
                    )
                    answers.append({"value": probe.value, "answer": answer, "ok": ok})
                    speeds.append(speed)
                row = {
                    "distance": distance,
                    "form": form,
                    "mode": mode,
                    "recall": hits / len(probes),
                    "n": len(probes),
                    "prefill_tok_s": sum(s["prefill_tok_s"] for s in speeds) / len(speeds),
                    "decode_tok_s": sum(s["decode_tok_s"] for s in speeds) / len(speeds),
                    "answers": answers,
                }
                if corrections:
                    row["stale"] = stale / len(probes)
                rows.append(row)
                if out is not None:
                    brief = {k: v for k, v in row.items() if k != "answers"}
                    print(json.dumps(brief), file=out, flush=True)
    return rows


def _read_journal(journal: Path, key_of: str) -> dict[str, dict[str, Any]]:
    """The probes ``journal`` holds for these settings (lines of other settings, and a last
    line cut short by a kill, are ignored)."""
    done: dict[str, dict[str, Any]] = {}
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return done
    for line in lines:
        try:
            record = json.loads(line)
            if record["run"] == key_of and isinstance(record["answer"], str):
                done[record["probe"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _append_journal(
    journal: Path, key_of: str, probe: str, answer: str, speed: dict[str, float]
) -> None:
    journal.parent.mkdir(parents=True, exist_ok=True)
    record = {"run": key_of, "probe": probe, "answer": answer, "speed": speed}
    with journal.open("a+b") as fh:
        fh.seek(0, 2)
        cut = fh.tell() > 0 and (fh.seek(-1, 2), fh.read(1))[1] != b"\n"  # a killed write
        fh.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())
        fh.flush()


def dialogue_document(
    chat: LlamaChatModel, data_dir: Path, tokens: int, seed: int = 0
) -> list[int]:
    """``tokens`` tokens of whole chitchat conversations in the model's chat template (real
    dialogue: names and topics recur within a conversation, not across them)."""
    data = json.loads(fetch_member(CHITCHAT, Path(data_dir) / "corpora").read_text("utf-8"))
    convs = list(data.values())
    random.Random(seed).shuffle(convs)
    out: list[int] = []
    for conv in convs:
        for i, turn in enumerate(conv["messages"]):
            text = " ".join(m["text"] for m in turn)
            out += chat.encode_turn("user" if i % 2 == 0 else "assistant", text)
        if len(out) >= tokens:
            break
    return out[:tokens]


@torch.no_grad()
def run_ppl(
    chat: LlamaChatModel, document: Sequence[int], memory_sizes: Sequence[int], scored: int
) -> list[dict[str, Any]]:
    """Bits per token of the document's last ``scored`` tokens with a bank of at most each
    ``memory_sizes`` entries (0: the window alone), the whole document fed in blocks."""
    from agent_runtime.models.llama.memory import forward_rows

    rows = []
    tokens = torch.tensor(list(document))
    for size in memory_sizes:
        plan = chat.plan if size else replace(chat.plan, layers=())
        d = chat.memory_dims[0]
        config = MemoryConfig(capacity=max(size, 1))
        bank = MemoryBank(d, d, config, parts=chat.memory_parts) if size else None
        state = chat.new_state()
        nll, counted, i = 0.0, 0, 0
        first_scored = len(tokens) - scored
        began = time.perf_counter()
        while i < len(tokens) - 1:
            n = min(len(tokens) - 1 - i, plan.block - state.position % plan.block)
            logits, _, _ = forward_rows(
                chat.model, plan, [state], tokens[None, i : i + n], [bank], every=True
            )
            targets = tokens[i + 1 : i + n + 1]
            keep = torch.arange(i + 1, i + n + 1) >= first_scored
            if keep.any():
                logp = torch.log_softmax(logits[0].float(), dim=-1)
                picked = logp[torch.arange(n), targets][keep]
                nll -= float(picked.sum())
                counted += int(keep.sum())
            i += n
        rows.append(
            {
                "memory_entries": size,
                "bits_per_token": nll / max(counted, 1) / math.log(2),
                "scored_tokens": counted,
                "document_tokens": len(tokens),
                "tokens_per_s": len(tokens) / (time.perf_counter() - began),
            }
        )
    return rows
