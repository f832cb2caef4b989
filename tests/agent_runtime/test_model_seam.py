"""The model seam (agent_runtime.models.base) as both families implement it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from agent_runtime.errors import CheckpointError
from agent_runtime.models.byte.family import ByteChatModel
from memory import MemoryBank
from tests.conftest import tiny_llama_chat, tiny_model

FAMILIES = ("byte", "llama", "llama-with-sinks")


def make(family: str, seed: int = 0) -> Any:
    if family == "byte":
        return ByteChatModel(tiny_model(seed))
    return tiny_llama_chat(seed, sink=4 if family.endswith("sinks") else 0)


def bank_of(model: Any) -> MemoryBank:
    return MemoryBank(*model.memory_dims, parts=model.memory_parts)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_logged_model_id_hashes_the_weights_not_only_the_config(family: str) -> None:
    a, b, a_again = make(family, 1), make(family, 2), make(family, 1)
    if family == "byte":
        assert a.fingerprint == b.fingerprint  # same config: banks are compatible
    assert a.weights_id != b.weights_id  # different checkpoints log different ids
    assert a.weights_id == a_again.weights_id
    assert a.weights_id in a.describe()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_state_round_trips_and_restore_rolls_back(family: str) -> None:
    model = make(family, 3)
    bank = bank_of(model)
    state = model.new_state()
    model.prefill(state, model.encode_turn("user", "hello there, " * 4), bank)
    saved = model.save_state(state)
    state.recent_ids = []
    mark = model.checkpoint(state)
    token = model.encode_turn("user", "a")[-2]
    twin = bank_of(model)
    twin.load_state_dict(bank.state_dict())
    before = model.prefill(model.load_state(saved), [token], twin)
    model.prefill(state, [token] * 40, bank)  # far enough to write memories
    assert state.recent_ids
    bank.remove(np.concatenate(state.recent_ids))  # as the engine rolls a reply back
    model.restore(state, mark)
    after = model.prefill(state, [token], bank)
    assert before is not None and after is not None
    torch.testing.assert_close(before, after)
    with pytest.raises(CheckpointError):
        model.load_state(b"not a state")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_conversation_writes_its_past_to_the_bank(family: str) -> None:
    model = make(family)
    bank = bank_of(model)
    state = model.new_state()
    for i in range(12):
        model.prefill(
            state, model.encode_turn("user", f"turn {i}: hello there, my name is Priya"), bank
        )
    assert state.written == len(bank) > 0
    sinks = getattr(getattr(model, "plan", None), "sink", 0)
    # only the window (and the attention sinks) are not in it
    assert state.position - len(bank) - sinks <= 2 * model.block + 64
    logits, stats = model.decode(
        [state, model.load_state(model.save_state(state))], [5, 5], [bank, bank]
    )
    assert logits.shape[0] == 2 and stats.retrieved[0] > 0
    torch.testing.assert_close(logits[0], logits[1])


def test_llama_turns_are_the_chat_template_and_a_reply_cannot_open_a_turn() -> None:
    model = tiny_llama_chat()
    tok = model.tokenizer
    turns = [("user", "hello there"), ("assistant", "hi"), ("user", "my name is Priya")]
    text = "".join(tok.decode(model.encode_turn(r, t), special=True) for r, t in turns)
    rendered = tok.render(
        [{"role": r, "content": t} for r, t in turns], add_generation_prompt=False
    )
    assert rendered.endswith(text) and rendered.startswith("<|im_start|>system")
    assert tok.decode(list(model.reply_prefix), special=True) == "<|im_start|>assistant\n"
    start = tok.token_id("<|im_start|>")
    assert model.reply_mask[start] == float("-inf") and model.reply_mask[model.end_token] == 0
    # the template's default system prompt opens a conversation that does not start with one
    state = model.new_state()
    user = model.encode_turn("user", "hi")
    model.prefill(state, user, None)
    assert state.position == len(tok.encode(tok.turn_text("user", "hi", first=True)))
    state = model.new_state()
    system = model.encode_turn("system", "be brief")
    model.prefill(state, system, None)
    assert state.position == len(system)


def test_llama_state_of_another_model_is_refused() -> None:
    a, b = tiny_llama_chat(1), tiny_llama_chat(2)
    with pytest.raises(CheckpointError, match="written by model"):
        b.load_state(a.save_state(a.new_state()))
    assert np.isfinite(a.reply_mask.numpy()).sum() > 0
