"""Training conversations for ``agent-runtime train --base``: facts told, real dialogue, then asked.

Each example is one conversation in the model's own chat template (encoded exactly as the
serving path encodes it, default system prompt included): the user states one to three facts
on open subjects in plain words, real dialogue follows and surrounds them as filler (the
``chitchat-dataset`` corpus, or any text file), then the user asks for some of them in other
words and the assistant answers with the value. Some questions ask for a fact that was never
stated, and the answer says so (a model that copies from context should not invent). The loss
falls on the answer tokens and the turn terminator only (``weights``); filler replies can get a
small weight (``filler_weight``) to keep the model's ordinary chat.

Held out from :mod:`agent_runtime.training.chat_eval` (what ``eval recall`` measures), by
construction and checked by tests: other subjects (none of the eval's nouns), other phrasings,
and values the eval's generators can never draw (other name syllables, codes of 3, 5 or 6
digits where the eval's have 4, other numbers and colours, other formats).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

import agent_runtime.training.chat_eval as chat_eval
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.models.llama.family import LlamaChatModel
from agent_runtime.models.llama.registry import fetch_member

__all__ = [
    "SUBJECTS",
    "Example",
    "RecallConversations",
    "Subject",
    "chitchat_conversations",
    "eval_could_draw",
    "read_filler",
    "train_value",
]


@dataclass(frozen=True)
class Subject:
    """One kind of fact: how the user states it, asks for it, and how it is answered."""

    kind: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    what: str
    """The fact as the assistant names it when it was never told ("your cousin's name")."""


def _s(
    kind: str, statements: Sequence[str], questions: Sequence[str], answer: str, what: str
) -> Subject:
    return Subject(kind, tuple(statements), tuple(questions), answer, what)


SUBJECTS: tuple[Subject, ...] = (
    _s(
        "name",
        ("My grandmother's name is {v}.", "My grandma is called {v}."),
        ("What's my grandmother called?", "Do you remember my grandma's name?"),
        "Your grandmother's name is {v}.",
        "your grandmother's name",
    ),
    _s(
        "name",
        ("Our cat is called {v}.", "We have a cat named {v}."),
        ("What did we name our cat?", "What's the cat's name again?"),
        "Your cat is called {v}.",
        "your cat's name",
    ),
    _s(
        "name",
        ("My best friend from school is {v}.", "My oldest friend is called {v}."),
        ("Who is my oldest friend?", "What's my school friend's name?"),
        "Your best friend from school is {v}.",
        "your best friend's name",
    ),
    _s(
        "name",
        ("My landlord is a man named {v}.", "The guy who rents us the flat is {v}."),
        ("Who is my landlord?", "What's the landlord's name?"),
        "Your landlord is {v}.",
        "your landlord's name",
    ),
    _s(
        "name",
        ("The neighbour's dog is named {v}.", "Next door they have a dog called {v}."),
        ("What's the neighbour's dog called?", "Do you recall the name of the dog next door?"),
        "The neighbour's dog is named {v}.",
        "the name of your neighbour's dog",
    ),
    _s(
        "name",
        ("I was born in a village named {v}.", "The village where I was born is {v}."),
        ("Which village was I born in?", "Where was I born?"),
        "You were born in {v}.",
        "where you were born",
    ),
    _s(
        "name",
        ("We live on {v} Road.", "Our street is {v} Road."),
        ("What street do we live on?", "What's the name of our road?"),
        "You live on {v} Road.",
        "your street",
    ),
    _s(
        "name",
        ("My boat is called the {v}.", "I named my sailing boat {v}."),
        ("What is my boat called?", "What's the name of my sailing boat?"),
        "Your boat is called the {v}.",
        "your boat's name",
    ),
    _s(
        "name",
        ("My doctor is Dr. {v}.", "The GP I see is Dr. {v}."),
        ("Who is my doctor?", "What's my GP's name?"),
        "Your doctor is Dr. {v}.",
        "your doctor's name",
    ),
    _s(
        "name",
        ("My cousin's name is {v}.", "I have a cousin called {v}."),
        ("What's my cousin called?", "Remind me of my cousin's name."),
        "Your cousin's name is {v}.",
        "your cousin's name",
    ),
    _s(
        "code",
        ("The PIN for the office door is {v}.", "To open the office door I type {v}."),
        ("What's the office door PIN?", "How do I get into the office?"),
        "The office door PIN is {v}.",
        "the office door PIN",
    ),
    _s(
        "code",
        ("The safe in the basement opens with {v}.", "The basement safe's combination is {v}."),
        ("How do I open the basement safe?", "What's the combination of the safe downstairs?"),
        "The basement safe opens with {v}.",
        "the combination of the safe",
    ),
    _s(
        "code",
        ("My gym membership number is {v}.", "At the gym my member number is {v}."),
        ("What's my gym membership number?", "Which member number do I have at the gym?"),
        "Your gym membership number is {v}.",
        "your gym membership number",
    ),
    _s(
        "code",
        ("My library card number is {v}.", "The number on my library card is {v}."),
        ("What's on my library card?", "Can you tell me my library card number?"),
        "Your library card number is {v}.",
        "your library card number",
    ),
    _s(
        "code",
        ("The tracking number of my parcel is {v}.", "My parcel can be tracked with {v}."),
        ("How do I track my parcel?", "What was the parcel's tracking number?"),
        "Your parcel's tracking number is {v}.",
        "your parcel's tracking number",
    ),
    _s(
        "number",
        ("My train leaves from platform {v}.", "I have to catch the train at platform {v}."),
        ("Which platform is my train on?", "Where does my train leave from?"),
        "Your train leaves from platform {v}.",
        "your platform",
    ),
    _s(
        "number",
        ("My daughter is {v} years old.", "Our daughter just turned {v}."),
        ("How old is my daughter?", "What age is our daughter now?"),
        "Your daughter is {v} years old.",
        "your daughter's age",
    ),
    _s(
        "number",
        ("I sit in row {v} at the theatre.", "Our theatre seats are in row {v}."),
        ("Which row are we sitting in at the theatre?", "What row are our theatre seats?"),
        "Your theatre seats are in row {v}.",
        "your row at the theatre",
    ),
    _s(
        "hour",
        ("My piano lesson is at {v} o'clock.", "I have piano at {v} o'clock."),
        ("When is my piano lesson?", "What time do I have piano?"),
        "Your piano lesson is at {v} o'clock.",
        "the time of your piano lesson",
    ),
    _s(
        "colour",
        ("I painted the front door {v}.", "Our front door is {v} now."),
        ("What colour is our front door?", "Which colour did I paint the door?"),
        "Your front door is {v}.",
        "the colour of your front door",
    ),
    _s(
        "colour",
        ("My umbrella is the {v} one.", "The {v} umbrella is mine."),
        ("Which umbrella is mine?", "What colour is my umbrella?"),
        "Your umbrella is the {v} one.",
        "which umbrella is yours",
    ),
    _s(
        "plate",
        ("My car's number plate is {v}.", "The plate on my car reads {v}."),
        ("What's my car's registration?", "What does my number plate say?"),
        "Your car's number plate is {v}.",
        "your number plate",
    ),
    _s(
        "desk",
        ("My desk at work is {v}.", "At the office I sit at desk {v}."),
        ("Which desk is mine at work?", "Where do I sit at the office?"),
        "Your desk is {v}.",
        "your desk number",
    ),
    _s(
        "handle",
        ("My username on the forum is {v}.", "On the forum I go by {v}."),
        ("What's my forum username?", "What name do I use on the forum?"),
        "Your forum username is {v}.",
        "your forum username",
    ),
    _s(
        "train",
        ("My train tomorrow is the {v}.", "Tomorrow I'm on train {v}."),
        ("Which train am I taking tomorrow?", "What's tomorrow's train number?"),
        "Your train tomorrow is the {v}.",
        "your train number",
    ),
)

# What the assistant says after a fact is stated (the eval's acknowledgement is not among them).
ACKS = (
    "Okay, noted.",
    "Thanks for telling me.",
    "Sure, I'll keep that in mind.",
    "Understood.",
    "Good to know!",
    "All right.",
)
LEAD_INS = ("", "", "", "By the way, ", "Oh, and ", "Just so you know, ", "Quick note: ")
NOT_TOLD = (
    "You haven't told me {what}.",
    "I don't know {what}; you haven't mentioned it.",
    "You didn't tell me {what} in this conversation.",
)

# -- values ----------------------------------------------------------------------------------

_TRAIN_SYLLABLES = (
    "pa",
    "go",
    "fi",
    "tu",
    "ser",
    "win",
    "hal",
    "ori",
    "bra",
    "del",
    "ny",
    "jo",
    "cas",
    "pim",
    "ul",
    "hen",
)
_TRAIN_COLOURS = (
    "orange",
    "navy",
    "beige",
    "scarlet",
    "olive",
    "pink",
    "silver",
    "maroon",
    "lime",
    "grey",
)
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


@cache
def _eval_names() -> frozenset[str]:
    syl = chat_eval._SYLLABLES
    names = {"".join(p).capitalize() for n in (2, 3) for p in itertools.product(syl, repeat=n)}
    return frozenset(n.lower() for n in names)


def eval_could_draw(value: str) -> bool:
    """Whether any value generator of ``eval recall`` (:mod:`chat_eval`) can produce ``value``."""
    v = value.strip()
    if v.lower() in _eval_names() or v in chat_eval._COLOURS:
        return True
    if v.isdigit() and not v.startswith("0"):
        n = int(v)
        return 1000 <= n <= 9999 or 101 <= n <= 989 or 11 <= n <= 28
    return re.fullmatch(r"[A-Z]{2}[1-9]\d\d", v) is not None  # flight numbers


def _draw(kind: str, rng: random.Random) -> str:
    if kind == "name":
        return "".join(rng.choice(_TRAIN_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    if kind == "code":
        digits = rng.choice((3, 5, 5, 6))
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind == "number":
        return str(rng.choice((*range(1, 11), *range(29, 61))))
    if kind == "hour":
        return str(rng.randint(1, 10))
    if kind == "colour":
        return rng.choice(_TRAIN_COLOURS)
    if kind == "plate":
        return "".join(rng.choice(_LETTERS) for _ in range(3)) + f" {rng.randint(100, 999)}"
    if kind == "desk":
        return f"{rng.choice(_LETTERS)}{rng.randint(1, 99)}"
    if kind == "handle":
        return "".join(rng.choice(_TRAIN_SYLLABLES) for _ in range(2)) + str(rng.randint(10, 99))
    if kind == "train":
        return f"{rng.choice(('IC', 'RE', 'EX'))} {rng.randint(1000, 9999)}"
    raise ValueError(f"unknown value kind {kind!r}")


def train_value(kind: str, rng: random.Random) -> str:
    """A training value of ``kind`` that the eval's generators can never draw."""
    while True:
        value = _draw(kind, rng)
        if not eval_could_draw(value):
            return value


# -- filler ----------------------------------------------------------------------------------


def chitchat_conversations(data_dir: Path) -> list[list[str]]:
    """The chitchat corpus as conversations (each a list of turns, alternating speakers)."""
    data = json.loads(
        fetch_member(chat_eval.CHITCHAT, Path(data_dir) / "corpora").read_text("utf-8")
    )
    return [
        [" ".join(m["text"] for m in turn) for turn in conv["messages"]] for conv in data.values()
    ]


def read_filler(path: Path) -> list[list[str]]:
    """Filler dialogue from a text file: one turn per line, a blank line between conversations."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentRuntimeError(f"--filler {path}: unreadable: {exc}") from exc
    convs = [
        [ln.strip() for ln in block.splitlines() if ln.strip()] for block in text.split("\n\n")
    ]
    convs = [c for c in convs if len(c) >= 2]
    if not convs:
        raise AgentRuntimeError(f"--filler {path}: no conversation of two or more lines")
    return convs


# -- examples --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    user: str
    reply: str
    weight: float
    value: str = ""
    not_told: bool = False


@dataclass
class Example:
    """One training conversation: ``seq_len`` tokens, a loss weight per token (of the token
    being predicted), and what the loss-bearing answers are (for tests and logs)."""

    tokens: list[int]
    weights: list[float]
    answers: list[str]
    facts: list[tuple[str, str]]
    """(statement, value) of each stated fact."""


class RecallConversations:
    """Deterministic training batches: batch ``step`` is the same whoever draws it and when
    (a resumed run sees exactly the data of an uninterrupted one)."""

    def __init__(
        self,
        chat: LlamaChatModel,
        filler: Sequence[Sequence[str]],
        seq_len: int,
        seed: int = 0,
        *,
        not_told: float = 0.2,
        filler_weight: float = 0.0,
    ) -> None:
        self.chat = chat
        self.seq_len = seq_len
        self.seed = seed
        self.not_told = not_told
        self.filler_weight = filler_weight
        self.pad = chat.end_token
        need = self._minimum()
        if need > seq_len:
            raise AgentRuntimeError(
                f"--seq-len {seq_len} is too short: one fact and its question need {need} tokens"
            )
        # only turns short enough to leave room for facts and questions (by characters: a
        # token is at least one; the exact cost is counted when a turn is placed)
        longest = max(16, seq_len // 4)
        self.filler = [[t for t in conv if len(t) <= longest] for conv in filler if len(conv) >= 2]
        self.filler = [c for c in self.filler if len(c) >= 2]
        if not self.filler:
            raise AgentRuntimeError("no filler dialogue turns short enough for --seq-len")

    # -- pieces, encoded as the serving path encodes them ----------------------------------

    def _user(self, text: str, first: bool) -> list[int]:
        head = self.chat.preamble("user") if first else []
        return [*head, *self.chat.encode_turn("user", text)]

    def _reply(self, text: str, weight: float) -> tuple[list[int], list[float]]:
        """An assistant turn as generated: the reply prefix, the text, the terminator, the
        text between turns; ``weight`` on the text and the terminator."""
        chat = self.chat
        body = [*chat.encode_text(text), chat.end_token]
        after = (
            chat.encode_text(chat.tokenizer.after_end_text) if chat.tokenizer.after_end_text else []
        )
        tokens = [*chat.reply_prefix, *body, *after]
        weights = [0.0] * len(chat.reply_prefix) + [weight] * len(body) + [0.0] * len(after)
        return tokens, weights

    def _minimum(self) -> int:
        """Tokens of the longest one-fact conversation (statement, acknowledgement, question,
        answer) any draw can make: every example fits when this does."""
        lead = max(LEAD_INS, key=len)
        ack = max(len(self._reply(a, 0)[0]) for a in ACKS)
        longest = 0
        for s in SUBJECTS:
            v = {"name": "Halwinoriser", "code": "123456", "plate": "XYZ 999"}.get(
                s.kind, "IC 9999"
            )
            n = max(len(self._user(lead + t.format(v=v), True)) for t in s.statements) + ack
            n += max(len(self._user(q, False)) for q in s.questions)
            n += len(self._reply(s.answer.format(v=v), 1)[0])
            longest = max(longest, n)
        return longest

    # -- examples ------------------------------------------------------------------------

    def _events(self, rng: random.Random, n_facts: int) -> tuple[list[_Event], int]:
        """Statements of ``n_facts`` facts, then questions about a non-empty subset of them
        (and, sometimes, about a fact never stated); returns the events and how many are
        statements."""
        subjects = rng.sample(SUBJECTS, n_facts + 1)
        stated, unstated = subjects[:n_facts], subjects[n_facts]
        values = [train_value(s.kind, rng) for s in stated]
        events = [
            _Event(
                rng.choice(LEAD_INS) + rng.choice(s.statements).format(v=v),
                rng.choice(ACKS),
                self.filler_weight,
                value=v,
            )
            for s, v in zip(stated, values, strict=True)
        ]
        asked = rng.sample(range(n_facts), rng.randint(1, n_facts))
        questions = [
            _Event(rng.choice(stated[i].questions), stated[i].answer.format(v=values[i]), 1.0)
            for i in asked
        ]
        if rng.random() < self.not_told:
            reply = rng.choice(NOT_TOLD).format(what=unstated.what)
            at = rng.randint(0, len(questions))
            questions.insert(at, _Event(rng.choice(unstated.questions), reply, 1.0, not_told=True))
        return events + questions, n_facts

    def example(self, rng: random.Random) -> Example:
        n_facts = rng.randint(1, 3)
        events, n_statements = self._events(rng, n_facts)
        while n_facts > 1 and self._length(events, {}) > self.seq_len:
            n_facts -= 1  # fewer facts until the core fits (one always does: _minimum)
            events, n_statements = self._events(rng, n_facts)
        if self._length(events, {}) > self.seq_len:
            events = [e for e in events if not e.not_told]
        # real dialogue into the gaps; most of it between the statements and the questions
        gaps: dict[int, list[tuple[str, str]]] = {}
        slots = list(range(len(events)))
        bias = [3.0 if i == n_statements else 1.0 for i in slots]
        used = self._length(events, gaps)
        misses = 0
        while misses < 6:
            conv = rng.choice(self.filler)
            start = rng.randrange(len(conv) - 1)
            pair = (conv[start], conv[start + 1])
            slot = rng.choices(slots, bias)[0]
            cost = len(self._user(pair[0], False)) + len(self._reply(pair[1], 0)[0])
            if used + cost > self.seq_len:
                misses += 1
                continue
            gaps.setdefault(slot, []).append(pair)
            used += cost
        tokens, weights = self._render(events, gaps)
        assert len(tokens) == used <= self.seq_len
        pad = self.seq_len - len(tokens)
        return Example(
            tokens + [self.pad] * pad,
            weights + [0.0] * pad,
            [e.reply for e in events[n_statements:]],
            [(e.user, e.value) for e in events[:n_statements]],
        )

    def _render(
        self, events: list[_Event], gaps: dict[int, list[tuple[str, str]]]
    ) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        weights: list[float] = []
        for i, event in enumerate(events):
            turns = [(u, a, self.filler_weight) for u, a in gaps.get(i, [])]
            for user, reply, weight in [*turns, (event.user, event.reply, event.weight)]:
                u = self._user(user, first=not tokens)
                r, w = self._reply(reply, weight)
                tokens += u + r
                weights += [0.0] * len(u) + w
        return tokens, weights

    def _length(self, events: list[_Event], gaps: dict[int, list[tuple[str, str]]]) -> int:
        return len(self._render(events, gaps)[0])

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (size, seq_len) and weights of batch ``step`` (a function of seed and step)."""
        rng = random.Random(self.seed * 1_000_003 + step)
        examples = [self.example(rng) for _ in range(size)]
        tokens = torch.tensor([e.tokens for e in examples], dtype=torch.long)
        weights = torch.tensor([e.weights for e in examples], dtype=torch.float32)
        return tokens, weights
