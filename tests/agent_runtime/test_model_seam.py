"""The model seam (agent_runtime.models.base) as the byte family implements it."""

from __future__ import annotations

import pytest
import torch

from agent_runtime.errors import CheckpointError
from agent_runtime.models.byte.family import ByteChatModel
from memory import MemoryBank
from tests.conftest import tiny_model


def test_the_logged_model_id_hashes_the_weights_not_only_the_config() -> None:
    a, b, a_again = (
        ByteChatModel(tiny_model(1)),
        ByteChatModel(tiny_model(2)),
        ByteChatModel(tiny_model(1)),
    )
    assert a.fingerprint == b.fingerprint  # same config: banks are compatible
    assert a.weights_id != b.weights_id  # different checkpoints log different ids
    assert a.weights_id == a_again.weights_id
    assert a.weights_id in a.describe()


def test_saved_state_round_trips_and_restore_rolls_back() -> None:
    model = ByteChatModel(tiny_model(3))
    bank = MemoryBank(*model.memory_dims)
    state = model.new_state()
    model.prefill(state, model.encode_turn("user", "hello there, " * 4), bank)
    saved = model.save_state(state)
    mark = model.checkpoint(state)
    before = model.prefill(model.load_state(saved), [65], bank)
    model.prefill(state, [66, 67, 68], bank)
    model.restore(state, mark)
    after = model.prefill(state, [65], bank)
    assert before is not None and after is not None
    torch.testing.assert_close(before, after)
    with pytest.raises(CheckpointError):
        model.load_state(b"not a state")
