"""Synthetic long conversations that can only be answered from memory.

A document states facts ("my locker code is 7QK2ZP"), then many distractor turns, then asks
for some of the facts. Values are random strings, so the model must copy them from memory
rather than memorise them. Values are split by a hash into a training half and a held-out half:
:class:`ConversationGenerator` with ``held_out=True`` draws only values the training generator
can never produce, whatever its seed.

Documents are token lists in the chat format of ``agent_runtime.models.byte.tokenizer``.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agent_runtime.models.byte.tokenizer import ASSISTANT, END, encode, encode_turn

__all__ = ["FACTS", "ConversationGenerator", "Document", "Fact", "stated_value"]

SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]


def _code(rng: random.Random) -> str:
    return "".join(
        rng.choice(string.ascii_uppercase + string.digits) for _ in range(rng.randint(5, 7))
    )


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 6)))


def _lower(rng: random.Random) -> str:
    return "".join(
        rng.choice(string.ascii_lowercase + string.digits) for _ in range(rng.randint(6, 8))
    )


# (subject as the user says it, as the assistant says it back, value generator). Final words are
# distinct, so the words just before a value ("... code is ") identify its fact.
FACTS = [
    ("my locker code", "your locker code", _code),
    ("my pass key", "your pass key", _digits),
    ("the wifi password", "the wifi password", _lower),
    ("my cat's name", "your cat's name", _word),
    ("my home town", "your home town", _word),
    ("my booking reference", "your booking reference", _code),
    ("my bank PIN", "your bank PIN", _digits),
    ("my best friend", "your best friend", _word),
    ("the door number", "the door number", _digits),
    ("my login", "your login", _lower),
]

STATEMENTS = [
    "Remember this: {s} is {v}.",
    "Please note that {s} is {v}.",
    "For later: {s} is {v}.",
    "{S} is {v}.",
]
QUESTIONS = ["What is {s}?", "Do you remember {s}?", "Tell me {s}.", "What was {s} again?"]
ACKS = ["Got it.", "Noted.", "OK, I will remember that.", "Sure, noted."]

_SUBJECTS = [
    "I",
    "We",
    "My sister",
    "Our neighbour",
    "The teacher",
    "My uncle",
    "A friend of mine",
    "The driver",
]
_VERBS = [
    "walked to",
    "looked at",
    "talked about",
    "cleaned",
    "painted",
    "visited",
    "waited near",
    "read about",
]
_OBJECTS = [
    "the old bridge",
    "a small garden",
    "the red house",
    "the market",
    "a quiet library",
    "the river",
    "the train station",
    "a busy cafe",
    "the museum",
    "the park",
    "the harbour",
    "a tall tower",
]
_TIMES = [
    "yesterday",
    "this morning",
    "last week",
    "on Sunday",
    "after lunch",
    "in the evening",
    "today",
]
_REPLIES = [
    "I see.",
    "That sounds nice.",
    "Tell me more.",
    "Interesting.",
    "How was it?",
    "Nice.",
    "OK.",
]


def _filler_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
    if rng.random() < 0.5:
        s += f" Then {rng.choice(_SUBJECTS).lower() if rng.random() < 0.5 else 'we'} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    return s.replace(" i ", " I ")


def stated_value(reply: str) -> str:
    """The value an answer states: "Your locker code is 7QK2ZP." -> "7QK2ZP" (exact-match scoring)."""
    return reply.strip().rsplit(" is ", 1)[-1].removesuffix(".")


def _is_held_out(value: str) -> bool:
    return hashlib.sha256(value.encode()).digest()[0] % 8 == 0


@dataclass
class Fact:
    subject: str
    echo: str  # the subject as the assistant says it back
    value: str

    def statement(self, rng: random.Random) -> str:
        return rng.choice(STATEMENTS).format(
            s=self.subject, S=self.subject[0].upper() + self.subject[1:], v=self.value
        )

    def question(self, rng: random.Random) -> str:
        return rng.choice(QUESTIONS).format(s=self.subject)

    def answer_prefix(self) -> str:
        """The answer up to the value: "Your locker code is " (the model says this, then the value)."""
        return f"{self.echo[0].upper()}{self.echo[1:]} is "

    def answer(self) -> str:
        return f"{self.answer_prefix()}{self.value}."


@dataclass
class Document:
    tokens: list[int]
    weights: list[float]  # loss weight of predicting tokens[i+1]; 0 where nothing should be learned


class ConversationGenerator:
    """Draws documents and evaluation probes. Deterministic for a given seed."""

    def __init__(
        self, seed: int, *, held_out: bool = False, text_files: Sequence[Path] = ()
    ) -> None:
        self.rng = random.Random(seed)
        self.held_out = held_out
        self.texts = [p.read_text(encoding="utf-8", errors="replace") for p in text_files]

    def fact(self, used: set[str]) -> Fact:
        while True:
            subject, echo, make = self.rng.choice(FACTS)
            if subject in used:
                continue
            value = make(self.rng)
            if _is_held_out(value) == self.held_out:
                used.add(subject)
                return Fact(subject, echo, value)

    def filler_turns(self, n_tokens: int) -> list[int]:
        """Distractor conversation (or user text files, when given) of about ``n_tokens`` tokens."""
        out: list[int] = []
        while len(out) < n_tokens:
            if self.rng.random() < 0.25:
                # Copy drills: the in-window form of what memory recall needs (induction).
                code = _code(self.rng) if self.rng.random() < 0.5 else _lower(self.rng)
                out += encode_turn("user", f"Repeat after me: {code}") + encode_turn(
                    "assistant", code
                )
                continue
            if self.texts and self.rng.random() < 0.5:
                text = self.rng.choice(self.texts)
                start = self.rng.randrange(max(1, len(text) - 400))
                user = " ".join(text[start : start + self.rng.randint(80, 300)].split())
            else:
                user = " ".join(_filler_sentence(self.rng) for _ in range(self.rng.randint(1, 3)))
            out += encode_turn("user", user) + encode_turn("assistant", self.rng.choice(_REPLIES))
        return out

    def document(self, length: int, n_facts: int = 3, n_questions: int = 2) -> Document:
        """One training document of exactly ``length`` + 1 tokens (END-padded, padding unweighted)."""
        rng = self.rng
        used: set[str] = set()
        facts = [self.fact(used) for _ in range(n_facts)]
        tokens: list[int] = []
        weights: list[float] = []

        def add(toks: list[int], weight: float) -> None:
            tokens.extend(toks)
            weights.extend([weight] * len(toks))

        statements: list[int] = []
        for f in facts:
            statements += encode_turn("user", f.statement(rng)) + encode_turn(
                "assistant", rng.choice(ACKS)
            )
        qa: list[list[tuple[list[int], float]]] = []
        for f in rng.sample(facts, min(n_questions, n_facts)):
            q = [*encode_turn("user", f.question(rng)), ASSISTANT, *encode(f.answer_prefix())]
            # The value (and what ends the answer) is what memory makes possible: weight it up.
            qa.append([(q, 1.0), ([*encode(f"{f.value}."), END], 5.0)])
        qa_len = sum(len(t) for item in qa for t, _ in item)
        # Whole distractor turns while they fit, with the statements at a random turn boundary:
        # distances from a fact to its question range from a few tokens (the window can answer,
        # which teaches the memory layer what to match) to the whole document (only memory can).
        turns: list[list[int]] = []
        room = length + 1 - qa_len - len(statements)
        misses = 0
        while misses < 8:  # a few tries with other turns before padding the rest
            turn = self.filler_turns(1)
            if sum(map(len, turns)) + len(turn) > room:
                misses += 1
                continue
            turns.append(turn)
        turns.insert(rng.randint(0, len(turns)), statements)
        for turn in turns:
            add(turn, 1.0)
        for item in qa:
            for toks, w in item:
                add(toks, w)
        tokens, weights = tokens[: length + 1], weights[: length + 1]
        pad = length + 1 - len(tokens)
        tokens += [END] * pad
        weights += [0.0] * pad
        # weights[i] weighs predicting tokens[i+1]: shift by one, as the targets are.
        return Document(tokens, [*weights[1:], 0.0])

    def batch(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L+1) long, weights (B, L) float) for training."""
        docs = [self._dense_document(length) for _ in range(batch)]
        tokens = torch.tensor([d.tokens for d in docs], dtype=torch.long)
        weights = torch.tensor([d.weights[:length] for d in docs], dtype=torch.float32)
        return tokens, weights

    def _dense_document(self, length: int) -> Document:
        # Many questions per document: answers are the scarce signal that teaches retrieval.
        n_facts = self.rng.randint(2, 6)
        return self.document(length, n_facts=n_facts, n_questions=self.rng.randint(1, n_facts))

    def probe(self, distance: int, n_facts: int = 1) -> tuple[list[int], list[int], str]:
        """An evaluation probe: (context tokens ending in the question and <|assistant|>, the same
        with the fact statements removed, expected answer). ``distance`` tokens of filler separate
        the last statement from the question."""
        used: set[str] = set()
        facts = [self.fact(used) for _ in range(n_facts)]
        head: list[int] = []
        for f in facts:
            head += encode_turn("user", f.statement(self.rng)) + encode_turn(
                "assistant", self.rng.choice(ACKS)
            )
        target = self.rng.choice(facts)
        filler = self.filler_turns(distance)
        question = [*encode_turn("user", target.question(self.rng)), ASSISTANT]
        return head + filler + question, filler + question, target.value
