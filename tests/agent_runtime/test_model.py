"""The model: incremental decoding with a FAISS bank matches the segment-wise reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agent_runtime.errors import CheckpointError
from agent_runtime.models.byte.generation import GenerationState, decode_step, prefill
from agent_runtime.models.byte.model import ModelConfig, load_checkpoint, save_checkpoint
from agent_runtime.models.byte.segments import TensorMemory, iter_segments
from memory import MemoryBank, MemoryConfig
from tests.conftest import TINY, tiny_model


def reference(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Segment-wise forward: logits (L, V) and every memory key/value (L, hs)."""
    mem = TensorMemory(1, model.cfg.head_dim, "cpu")
    outs = list(iter_segments(model, tokens[None], mem))
    logits = torch.cat([o.output.logits for o in outs], 1)[0]
    keys = torch.cat([o.output.mem_keys for o in outs], 1)[0]
    values = torch.cat([o.output.mem_values for o in outs], 1)[0]
    return logits, keys, values


@torch.no_grad()
def test_incremental_decoding_matches_segment_forward_within_1e_4() -> None:
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=64, window=16, mem_layer=2, mem_topk=8)
    model = tiny_model(1, cfg)
    torch.manual_seed(2)
    tokens = torch.randint(0, 260, (150,))
    ref_logits, ref_keys, ref_values = reference(model, tokens)

    bank = MemoryBank(*model.memory_dims, MemoryConfig())
    state = GenerationState.new(model)
    # An uneven prefill crossing block boundaries, then token-by-token decoding.
    logits = prefill(model, state, tokens[:37].tolist(), bank)
    assert logits is not None
    worst = float((logits - ref_logits[36]).abs().max())
    for t in range(37, len(tokens)):
        step_logits, _ = decode_step(model, [state], [int(tokens[t])], [bank])
        worst = max(worst, float((step_logits[0] - ref_logits[t]).abs().max()))
    assert worst < 1e-4
    # The bank holds exactly the completed blocks, each key/value the model's own at its position.
    n = (len(tokens) // cfg.window) * cfg.window
    assert len(bank) == n
    keys, values = bank.get(bank.live_ids())
    np.testing.assert_allclose(keys, ref_keys[:n].numpy(), atol=1e-5)
    np.testing.assert_allclose(values, ref_values[:n].numpy(), atol=1e-5)


@torch.no_grad()
def test_batched_decoding_of_sessions_at_different_positions_matches_each_alone() -> None:
    model = tiny_model(3)
    torch.manual_seed(4)
    streams = [torch.randint(0, 256, (n,)) for n in (9, 40, 71)]
    refs = [reference(model, s)[0] for s in streams]
    states = [GenerationState.new(model) for _ in streams]
    banks = [MemoryBank(*model.memory_dims) for _ in streams]
    for s, st, b in zip(streams, states, banks, strict=True):
        prefill(model, st, s[:-8].tolist(), b)
    worst = 0.0
    for i in range(8, 0, -1):
        logits, _ = decode_step(model, states, [int(s[-i]) for s in streams], banks)
        for row, ref in zip(logits, refs, strict=True):
            worst = max(worst, float((row - ref[-i]).abs().max()))
    assert worst < 1e-4


def test_memory_changes_the_output_only_through_retrieval() -> None:
    """With memory on, tokens far beyond the window influence the prediction; with it off they cannot."""
    model = tiny_model(5)
    W = TINY.window
    torch.manual_seed(6)
    # Stacked local layers see n_layer * W tokens back; the shared tail is longer than that.
    tail = torch.randint(0, 256, ((TINY.n_layer + 1) * W,))
    a = torch.cat([torch.randint(0, 256, (2 * W,)), tail])
    b = torch.cat([torch.randint(0, 256, (2 * W,)), tail])

    def last_logits(tokens: torch.Tensor, memory: bool) -> torch.Tensor:
        mem = TensorMemory(1, TINY.head_dim, "cpu") if memory else None
        with torch.no_grad():
            return [s.output.logits for s in iter_segments(model, tokens[None], mem)][-1][0, -1]

    assert float((last_logits(a, True) - last_logits(b, True)).abs().max()) > 1e-4
    assert float((last_logits(a, False) - last_logits(b, False)).abs().max()) < 1e-5


def test_no_gradient_flows_into_the_memory() -> None:
    model = tiny_model(7)
    model.train()
    tokens = torch.randint(0, 256, (2, 3 * TINY.window + 1))
    mem = TensorMemory(2, TINY.head_dim, "cpu")
    for seg in iter_segments(model, tokens, mem, with_targets=True):
        seg.output.logits.sum().backward()
    assert not mem.keys.requires_grad and not mem.values.requires_grad
    gate = model.blocks[TINY.mem_layer].attn.gate_bias  # type: ignore[union-attr]
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0, (
        "the learned gate gets gradient"
    )


def test_checkpoint_round_trip_and_clear_errors(tmp_path: Path) -> None:
    model = tiny_model(8)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"note": "x"})
    loaded, extra = load_checkpoint(path)
    assert extra["note"] == "x"
    assert loaded.cfg == model.cfg
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    blob = torch.load(path, weights_only=True)
    blob["format"] = 99
    torch.save(blob, bad)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_fingerprint_distinguishes_models() -> None:
    assert TINY.fingerprint() == ModelConfig(**TINY.__dict__).fingerprint()
    assert TINY.fingerprint() != ModelConfig(**{**TINY.__dict__, "window": 32}).fingerprint()


@torch.no_grad()
def test_memory_keys_match_the_query_that_repeats_their_preceding_context() -> None:
    """The n-gram features make retrieval an induction match: a query whose last ``mem_ngram``
    tokens repeat the tokens before a stored entry finds that entry first among thousands."""
    cfg = TINY
    model = tiny_model(7)
    attn = model.blocks[cfg.mem_layer].attn
    attn.q.weight.zero_()  # type: ignore[union-attr]  # leave only the context features
    attn.kv.weight[: cfg.head_dim].zero_()  # type: ignore[union-attr]
    torch.manual_seed(8)
    n = cfg.mem_ngram
    context = torch.randint(0, 256, (n,))
    target = 20 * cfg.window + 5  # the entry right after the context, deep in memory
    stream = torch.randint(0, 256, (64 * cfg.window,))
    stream[target - n : target] = context
    stream[-n:] = context  # the stream ends by repeating the context: a query for what followed
    _, keys, _ = reference(model, stream)
    queries: list[torch.Tensor] = []

    class Recording(TensorMemory):
        def __call__(self, q: torch.Tensor, k: int):  # type: ignore[no-untyped-def]
            queries.append(q[0, :, -1])
            return super().__call__(q, k)

    list(iter_segments(model, stream[None], Recording(1, cfg.head_dim, "cpu")))
    scores = queries[-1] @ keys[: -cfg.window].T  # (heads, entries in memory)
    assert scores.argmax(-1).tolist() == [target] * cfg.n_head
    assert torch.allclose(scores[:, target], torch.ones(cfg.n_head), atol=1e-5)
