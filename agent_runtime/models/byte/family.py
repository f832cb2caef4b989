"""The bundled byte model behind the model seam (:class:`agent_runtime.models.base.ChatModel`)."""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.base import StepStats
from agent_runtime.models.byte import generation
from agent_runtime.models.byte.generation import GenerationState
from agent_runtime.models.byte.model import MemorizingTransformer
from agent_runtime.models.byte.tokenizer import ASSISTANT, END, Utf8Stream, encode, encode_turn
from memory import MemoryBank

__all__ = ["ByteChatModel"]


class ByteChatModel:
    """A :class:`MemorizingTransformer` with the byte tokenizer and its chat format."""

    def __init__(self, model: MemorizingTransformer, source: str = "untrained") -> None:
        self.model = model
        self.source = source
        self.device = next(model.parameters()).device
        self.fingerprint = model.cfg.fingerprint()
        self.memory_dims = model.memory_dims
        self.memory_parts = 1
        self.family = "byte"
        self.block = model.cfg.window
        self.end_token = END
        self.reply_prefix: tuple[int, ...] = (ASSISTANT,)
        # A reply may contain bytes and END, never another role token.
        self.reply_mask = torch.full((model.cfg.vocab_size,), float("-inf"), device=self.device)
        self.reply_mask[:256] = 0.0
        self.reply_mask[END] = 0.0
        digest = hashlib.sha256()
        for t in model.state_dict().values():
            digest.update(t.detach().cpu().numpy().tobytes())
        self.weights_id = digest.hexdigest()[:12]
        self.card = (
            "The bundled byte model is a 1.2 M-parameter demonstration trained on synthetic chats:"
            " it recalls facts told in its trained phrasings (“Remember this: my locker code is"
            " 7QK2ZP.” … “What was my locker code again?”) thousands of tokens later, and is not a"
            " general chatbot. See docs/model-card.md."
        )

    def describe(self) -> str:
        return (
            f"byte model {self.weights_id} (config {self.fingerprint}, "
            f"{self.model.num_params()} parameters) from {self.source}"
        )

    # -- chat format --------------------------------------------------------------------------

    def encode_turn(self, role: str, text: str) -> list[int]:
        return encode_turn(role, text)

    def encode_text(self, text: str) -> list[int]:
        return encode(text)

    def text_stream(self) -> Utf8Stream:
        return Utf8Stream()

    # -- state --------------------------------------------------------------------------------

    def new_state(self) -> GenerationState:
        return GenerationState.new(self.model)

    def save_state(self, state: GenerationState) -> bytes:
        buf = io.BytesIO()
        torch.save(state.state_dict(), buf)
        return buf.getvalue()

    def load_state(self, blob: bytes) -> GenerationState:
        try:
            sd = torch.load(io.BytesIO(blob), weights_only=True)
            return GenerationState.from_state_dict(sd, self.device)
        except Exception as exc:  # torch raises many types for corrupt or foreign files
            raise CheckpointError(f"generation state is not readable: {exc}") from exc

    def checkpoint(self, state: GenerationState) -> GenerationState:
        # Cache tensors are never mutated in place (each step concatenates new ones), so a
        # shallow copy with fresh pending lists is a full checkpoint.
        clone = copy.copy(state)
        clone.pending_keys = list(state.pending_keys)
        clone.pending_values = list(state.pending_values)
        clone.recent_ids = list(state.recent_ids)
        return clone

    def restore(self, state: GenerationState, checkpoint: GenerationState) -> None:
        state.restore(checkpoint)

    # -- compute (worker thread) --------------------------------------------------------------

    def prefill(
        self, state: GenerationState, tokens: Sequence[int], bank: MemoryBank | None
    ) -> Tensor | None:
        return generation.prefill(self.model, state, tokens, bank)

    def decode(
        self,
        states: Sequence[GenerationState],
        tokens: Sequence[int],
        banks: Sequence[MemoryBank | None],
    ) -> tuple[Tensor, StepStats]:
        logits, retriever = generation.decode_step(self.model, states, tokens, banks)
        attended, queries = retriever.attention_mass()
        return logits, StepStats(list(retriever.retrieved), retriever.seconds, attended, queries)

    @classmethod
    def load(cls, path: Path, device: str) -> ByteChatModel:
        from agent_runtime.models.byte.model import load_checkpoint

        model, _extra = load_checkpoint(path, device)
        return cls(model, str(path))
