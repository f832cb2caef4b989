"""The pretrained family on a GPU (runs where CUDA is present; CPU machines skip it)."""

from __future__ import annotations

import pytest
import torch

from memory import MemoryBank
from tests.conftest import tiny_llama_chat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_rows_match_cpu_rows() -> None:
    cpu = tiny_llama_chat(3)
    gpu = tiny_llama_chat(3)
    gpu.model.to("cuda")
    gpu.device = torch.device("cuda")
    gpu.reply_mask = gpu.reply_mask.to("cuda")
    turns = [t for i in range(6) for t in cpu.encode_turn("user", f"turn {i}: my name is Priya")]
    out = {}
    for name, chat in (("cpu", cpu), ("cuda", gpu)):
        bank = MemoryBank(*chat.memory_dims, parts=chat.memory_parts)
        state = chat.new_state()
        chat.prefill(state, turns, bank)
        logits, stats = chat.decode([state], [5], [bank])
        assert stats.retrieved[0] > 0
        out[name] = logits.float().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], atol=1e-3, rtol=1e-3)
