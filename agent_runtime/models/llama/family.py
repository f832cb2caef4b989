"""Pretrained Llama-family decoders behind the model seam (:class:`agent_runtime.models.base.ChatModel`).

A :class:`LlamaChatModel` is a :class:`LlamaModel`, its tokenizer and chat template, and a
:class:`MemoryPlan` (:mod:`agent_runtime.models.llama.memory`). Turns are encoded exactly as
the model's own chat template renders them; a reply ends with the template's turn terminator
(``<|im_end|>`` for ChatML templates), after which the text the template puts between turns
is fed too, so the conversation the model sees is the one it was tuned on.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Sequence

import torch
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.base import StepStats, TextStream
from agent_runtime.models.llama.memory import LlamaState, MemoryPlan, forward_rows
from agent_runtime.models.llama.model import VECTOR_ROWS, LlamaModel
from agent_runtime.models.llama.tokenizer import ChatTokenizer
from memory import MemoryBank

__all__ = ["LlamaChatModel"]

_STATE_VERSION = 1


class LlamaChatModel:
    """A pretrained decoder with a training-free kNN memory, as the engine drives it."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: ChatTokenizer,
        plan: MemoryPlan,
        *,
        source: str = "random weights",
        weights_id: str = "",
        card_note: str = "",
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan.validate(cfg.num_layers)
        self.source = source
        self.device = model.model.embed_tokens.weight.device
        if not weights_id:
            digest = hashlib.sha256()
            for t in model.state_dict().values():
                digest.update(t.detach().cpu().float().numpy().tobytes())
            weights_id = digest.hexdigest()[:12]
        self.weights_id = weights_id
        kv, d = cfg.num_kv_heads, cfg.head_dim
        parts = len(self.plan.layers) * kv or 1  # no memory layers: a minimal, unused bank
        self.memory_dims = (parts * d, parts * d)
        self.memory_parts = parts
        self.family = "llama"
        # what shapes bank entries: the weights and which layers' keys/values they hold
        layout = f"{cfg.fingerprint()}:{weights_id}:{self.plan.layers}:{_STATE_VERSION}"
        self.fingerprint = hashlib.sha256(layout.encode()).hexdigest()[:16]
        self.block = self.plan.block
        end = tokenizer.end_ids
        if not end:
            raise CheckpointError("the chat template has no token that ends an assistant turn")
        self.end_token = end[0]
        self.reply_prefix = tuple(tokenizer.encode(tokenizer.generation_prefix()))
        self._after_end = (
            tokenizer.encode(tokenizer.after_end_text) if tokenizer.after_end_text else []
        )
        # A reply may contain any ordinary token and its terminator, never another special one.
        vocab = cfg.vocab_size
        self.reply_mask = torch.zeros(vocab, device=self.device)
        for token in tokenizer.special_ids:
            if token < vocab and token != self.end_token:
                self.reply_mask[token] = float("-inf")
        self._preamble, self._system_opening = self._conversation_start()
        self.card = (
            f"{source}: a {model.num_params() / 1e6:.0f} M-parameter pretrained chat model (its own"
            " knowledge is small and often wrong) with a kNN memory of this conversation beyond its"
            f" {self.plan.window}-token window. It recalls facts you told it thousands of tokens"
            " ago best when the reply is started for it (an answer prefix, e.g. “Your locker code"
            " is”); asked plainly, a small model often refuses. See docs/models.md."
        )
        self.card_note = card_note
        if card_note:  # e.g. what a fine-tune (agent-runtime train --base) taught it
            self.card = f"{self.card} {card_note}"

    def _conversation_start(self) -> tuple[dict[str, list[int]], list[int]]:
        """What the template writes before a conversation's first message, by the role of that
        message (user: e.g. BOS and a default system prompt; system: e.g. BOS alone), and the
        tokens that open a system turn.

        Derived by rendering, so it holds for any template: the first turn's text minus the
        same turn's text later in a conversation.
        """
        tok = self.tokenizer
        preambles = {}
        for role in ("user", "system"):
            first, later = (
                tok.turn_text(role, "x", first=True),
                tok.turn_text(role, "x", first=False),
            )
            text = first[: len(first) - len(later)] if first.endswith(later) else ""
            preambles[role] = tok.encode(text) if text else []
        a = tok.encode(tok.turn_text("system", "a", first=False))
        b = tok.encode(tok.turn_text("system", "b", first=False))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return preambles, a[:n]

    def with_plan(self, plan: MemoryPlan) -> LlamaChatModel:
        """The same weights and tokenizer under another memory plan (evaluation modes)."""
        return LlamaChatModel(
            self.model,
            self.tokenizer,
            plan,
            source=self.source,
            weights_id=self.weights_id,
            card_note=self.card_note,
        )

    def describe(self) -> str:
        cfg, plan = self.model.cfg, self.plan
        layers = "all" if len(plan.layers) == cfg.num_layers else ",".join(map(str, plan.layers))
        dtype = str(self.model.dtype).removeprefix("torch.")
        vector = self.model.vector_dtype
        if vector is not None:
            dtype += f", decode steps of up to {VECTOR_ROWS} rows in {str(vector).removeprefix('torch.')}"
        return (
            f"{cfg.model_type} {self.weights_id} ({self.model.num_params() / 1e6:.0f}M parameters, "
            f"{dtype}, "
            f"{cfg.num_layers} layers; memory layers {layers or 'none'}, window {plan.window}, "
            f"k {plan.k}, span {plan.span}, sink {plan.sink}{', exact' if plan.exact else ''}) from {self.source}"
        )

    # -- chat format --------------------------------------------------------------------------

    def encode_turn(self, role: str, text: str) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.turn_text(role, text, first=False))

    def preamble(self, role: str = "user") -> list[int]:
        """What :meth:`prefill` puts before a conversation whose first message has ``role``
        (``user`` or ``system``): e.g. BOS and the template's default system prompt."""
        return list(self._preamble[role])

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def text_stream(self) -> TextStream:
        return self.tokenizer.stream()

    # -- state --------------------------------------------------------------------------------

    def new_state(self) -> LlamaState:
        cfg = self.model.cfg
        empty = torch.zeros(
            0, cfg.num_kv_heads, cfg.head_dim, dtype=self.model.dtype, device=self.device
        )
        return LlamaState(k=[empty] * cfg.num_layers, v=[empty] * cfg.num_layers)

    def save_state(self, state: LlamaState) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "version": _STATE_VERSION,
                "fingerprint": self.fingerprint,
                "k": torch.stack(state.k).cpu() if state.k else None,
                "v": torch.stack(state.v).cpu() if state.v else None,
                "sink_k": torch.stack(state.sink_k).cpu() if state.sink_k else None,
                "sink_v": torch.stack(state.sink_v).cpu() if state.sink_v else None,
                "position": state.position,
                "written": state.written,
                "memory_stopped": state.memory_stopped,
                "after_end_due": state.after_end_due,
            },
            buf,
        )
        return buf.getvalue()

    def load_state(self, blob: bytes) -> LlamaState:
        try:
            sd = torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or foreign files
            raise CheckpointError(f"generation state is not readable: {exc}") from exc
        if not isinstance(sd, dict) or sd.get("version") != _STATE_VERSION:
            raise CheckpointError("generation state is not a Llama-family state of this version")
        if sd.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"generation state was written by model {sd.get('fingerprint')}, not {self.fingerprint}"
            )
        cfg = self.model.cfg
        k, v = sd.get("k"), sd.get("v")
        position, written = sd.get("position"), sd.get("written")
        shape_ok = (
            isinstance(k, Tensor)
            and isinstance(v, Tensor)
            and k.shape == v.shape
            and k.dim() == 4
            and tuple(k.shape[i] for i in (0, 2, 3))
            == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        )
        if not shape_ok or not isinstance(position, int) or not isinstance(written, int):
            raise CheckpointError("generation state has the wrong shapes for this model")
        assert isinstance(k, Tensor) and isinstance(v, Tensor)
        if k.shape[1] > position or k.shape[1] >= self.plan.window + self.plan.block:
            raise CheckpointError("generation state's window does not fit its position")
        stopped = sd.get("memory_stopped")
        dt = self.model.dtype
        sink_k, sink_v = sd.get("sink_k"), sd.get("sink_v")
        sinks: tuple[list[Tensor], list[Tensor]] = ([], [])
        if sink_k is not None or sink_v is not None:
            if not (
                isinstance(sink_k, Tensor)
                and isinstance(sink_v, Tensor)
                and sink_k.shape == sink_v.shape
                and sink_k.dim() == 4
                and sink_k.shape[0] == cfg.num_layers
                and sink_k.shape[2:] == k.shape[2:]
                and sink_k.shape[1] <= min(position, self.plan.sink)
            ):
                raise CheckpointError("generation state's attention sinks do not fit this model")
            sinks = (
                list(sink_k.to(self.device, dt).unbind(0)),
                list(sink_v.to(self.device, dt).unbind(0)),
            )
        return LlamaState(
            k=list(k.to(self.device, dt).unbind(0)),
            v=list(v.to(self.device, dt).unbind(0)),
            sink_k=sinks[0],
            sink_v=sinks[1],
            after_end_due=sd.get("after_end_due") is True,
            position=position,
            written=written,
            memory_stopped=stopped if isinstance(stopped, str) else None,
        )

    def checkpoint(self, state: LlamaState) -> LlamaState:
        # A window only ever grows past its own end (memory._append writes the rows after a
        # view, never the rows inside it), so lists of the same views are a full checkpoint.
        clone = copy.copy(state)
        clone.k = list(state.k)
        clone.v = list(state.v)
        clone.sink_k = list(state.sink_k)
        clone.sink_v = list(state.sink_v)
        clone.recent_ids = list(state.recent_ids)
        clone.rotated = {}
        return clone

    def restore(self, state: LlamaState, checkpoint: LlamaState) -> None:
        state.k = list(checkpoint.k)
        state.v = list(checkpoint.v)
        state.sink_k = list(checkpoint.sink_k)
        state.sink_v = list(checkpoint.sink_v)
        state.position = checkpoint.position
        state.written = checkpoint.written
        state.recent_ids = list(checkpoint.recent_ids)
        state.memory_stopped = checkpoint.memory_stopped
        state.after_end_due = checkpoint.after_end_due
        state.rotated = {}

    # -- compute (worker thread) --------------------------------------------------------------

    def prefill(
        self, state: LlamaState, tokens: Sequence[int], bank: MemoryBank | None
    ) -> Tensor | None:
        tokens = list(tokens)
        if state.position == 0 and tokens:
            opening = self._system_opening
            role = "system" if tokens[: len(opening)] == opening else "user"
            tokens = [*self._preamble[role], *tokens]  # e.g. BOS, a default system prompt
        after = self._after_end
        if state.after_end_due and tokens and tokens[: len(after)] != after:
            tokens = [*after, *tokens]  # the text between turns, as the template writes it
        if tokens:
            # a turn that ends this call is followed by that text in the next one (unless the
            # next chunk of the prompt already starts with it)
            state.after_end_due = tokens[-1] == self.end_token
        logits: Tensor | None = None
        block = self.plan.block
        i = 0
        while i < len(tokens):
            n = min(len(tokens) - i, block - state.position % block)
            idx = torch.tensor([tokens[i : i + n]], dtype=torch.long, device=self.device)
            out, _, _ = forward_rows(self.model, self.plan, [state], idx, [bank])
            logits = out[0]
            i += n
        return logits

    def decode(
        self,
        states: Sequence[LlamaState],
        tokens: Sequence[int],
        banks: Sequence[MemoryBank | None],
    ) -> tuple[Tensor, StepStats]:
        for state, bank in zip(states, banks, strict=True):
            if state.after_end_due and self._after_end:  # a reply never follows a bare terminator
                self.prefill(state, self._after_end, bank)
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        attended: list[dict[int, float]] = [{} for _ in states]
        queries = [0] * len(states)
        logits, retrieved, seconds = forward_rows(
            self.model, self.plan, states, idx, banks, attended=attended, queries=queries
        )
        return logits, StepStats(retrieved, seconds, attended, queries)


def tiny_random(seed: int = 0, **plan: object) -> LlamaChatModel:
    """A random 2-layer Llama with a small BPE and ChatML, memory on both layers (window 16):
    every path of the family in milliseconds (tests, ``bench model --quick``)."""
    from agent_runtime.models.llama.config import LlamaConfig
    from agent_runtime.models.llama.tokenizer import small_chatml_tokenizer

    cfg = LlamaConfig(
        vocab_size=304,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from identity, so every path changes the logits
    settings: dict[str, object] = {"layers": (0, 1), "window": 16, "block": 8, "k": 4, **plan}
    tokenizer = small_chatml_tokenizer(["hello there, my name is Priya and the code is 4711."] * 10)
    return LlamaChatModel(model.eval(), tokenizer, MemoryPlan(**settings))  # type: ignore[arg-type]
