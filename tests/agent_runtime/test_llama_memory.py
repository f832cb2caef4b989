"""The training-free kNN memory of pretrained decoders (agent_runtime.models.llama.memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent_runtime.config import EngineConfig
from agent_runtime.errors import ConfigError
from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.memory import LlamaState, MemoryPlan, forward_rows
from agent_runtime.models.llama.model import LlamaModel
from memory import MemoryBank, MemoryConfig

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def tiny_llama(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(CFG)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # far from identity: every path matters
    return model.eval()


def bank_for(plan: MemoryPlan, config: MemoryConfig | None = None) -> MemoryBank:
    parts = max(1, len(plan.layers)) * CFG.num_kv_heads
    d = parts * CFG.head_dim
    return MemoryBank(d, d, config or MemoryConfig(), parts=parts)


def new_state() -> LlamaState:
    empty = torch.zeros(0, CFG.num_kv_heads, CFG.head_dim)
    return LlamaState(k=[empty] * CFG.num_layers, v=[empty] * CFG.num_layers)


def feed(
    model: LlamaModel, plan: MemoryPlan, state: LlamaState, tokens: torch.Tensor, bank: MemoryBank
) -> list[torch.Tensor]:
    """Feed tokens (T,) in block-aligned chunks, then one at a time; logits after each chunk."""
    out, i = [], 0
    while i < tokens.shape[0]:
        n = min(tokens.shape[0] - i, plan.block - state.position % plan.block)
        n = 1 if i > tokens.shape[0] // 2 else n  # the second half as decode steps
        logits, _, _ = forward_rows(model, plan, [state], tokens[None, i : i + n], [bank])
        out.append(logits[0])
        i += n
    return out


@pytest.mark.parametrize("span", [0, 2])
def test_exact_mode_reproduces_full_attention_far_past_the_window(span: int) -> None:
    """With neighbours (span) too: every entry must still be attended exactly once."""
    model = tiny_llama()
    plan = MemoryPlan(layers=(0, 1, 2), window=16, block=8, k=10_000, exact=True, span=span)
    bank = bank_for(plan)
    state = new_state()
    tokens = torch.randint(0, CFG.vocab_size, (120,), generator=torch.Generator().manual_seed(1))
    got = feed(model, plan, state, tokens, bank)
    assert len(bank) >= 120 - plan.window - plan.block  # most of the history is in the bank
    with torch.no_grad():
        full = model(tokens[None])[0]
    ends, i = [], 0
    for _ in got:  # the position after each fed chunk
        n = min(120 - i, plan.block - i % plan.block)
        n = 1 if i > 60 else n
        i += n
        ends.append(i - 1)
    want = torch.stack([full[e] for e in ends])
    torch.testing.assert_close(torch.stack(got), want, atol=1e-4, rtol=0)


def test_without_memory_far_tokens_are_forgotten_and_with_it_they_are_not() -> None:
    """The window alone differs from full attention once history leaves it; memory closes
    most of the gap (exact mode closes all of it, tested above)."""
    model = tiny_llama(2)
    tokens = torch.randint(0, CFG.vocab_size, (96,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens[None])[0, -1]
    errors = {}
    for name, plan in {
        "window": MemoryPlan(layers=(), window=16, block=8, k=0),
        "memory": MemoryPlan(layers=(0, 1, 2), window=16, block=8, k=64),
    }.items():
        state = new_state()
        errors[name] = float(
            (feed(model, plan, state, tokens, bank_for(plan))[-1] - full).abs().max()
        )
    assert errors["memory"] < errors["window"] / 2, errors


def test_retrieved_positions_stay_in_range_and_keep_order() -> None:
    model = tiny_llama()
    plan = MemoryPlan(layers=(1,), window=16, block=8, k=4)
    bank = bank_for(plan)
    state = new_state()
    feed(model, plan, state, torch.randint(0, CFG.vocab_size, (300,)), bank)
    # the bank holds true positions, and the window starts right after the last entry
    ids = bank.live_ids()
    assert state.position - state.cached == len(ids)
    res = bank.search_parts(np.ones((2, 1, CFG.head_dim), np.float32), 4)
    assert (
        res.positions is not None
        and (res.positions[res.mask] < state.position - state.cached).all()
    )


def test_batched_rows_equal_rows_alone() -> None:
    model = tiny_llama()
    plan = MemoryPlan(layers=(0, 2), window=16, block=8, k=4)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen) for n in (40, 23, 70)]
    alone, together = [], []
    banks, states = [], []
    for p in prompts:
        state, bank = new_state(), bank_for(plan)
        feed(model, plan, state, p, bank)
        twin_state, twin_bank = new_state(), bank_for(plan)
        feed(model, plan, twin_state, p, twin_bank)
        states.append(state)
        banks.append(bank)
        logits, _, _ = forward_rows(model, plan, [twin_state], torch.tensor([[7]]), [twin_bank])
        alone.append(logits[0])
    logits, retrieved, _ = forward_rows(model, plan, states, torch.tensor([[7], [7], [7]]), banks)
    together = list(logits)
    torch.testing.assert_close(torch.stack(together), torch.stack(alone), atol=1e-5, rtol=0)
    assert retrieved[2] > 0


def test_plan_is_validated_by_setting_name() -> None:
    with pytest.raises(ConfigError, match="memory_window"):
        MemoryPlan(layers=(), window=20, block=8).validate(3)
    with pytest.raises(ConfigError, match="memory_layers"):
        MemoryPlan(layers=(3,)).validate(3)


def test_memory_layers_take_indices_and_ranges() -> None:
    def layers(text: str, n: int | None = 30) -> tuple[int, ...]:
        return EngineConfig(memory_layers=text).memory_layer_indices(n)

    assert layers("all", 4) == (0, 1, 2, 3) and layers("none") == ()
    assert layers("auto") == tuple(range(6, 30)) and layers("auto", 2) == (0, 1)
    assert layers("4,8,12") == (4, 8, 12)
    assert layers("15-29") == tuple(range(15, 30))
    assert layers("0, 10-12 ,29") == (0, 10, 11, 12, 29)
    for bad in ("12-10", "-3", "a-b", "1,,2", "3-"):
        with pytest.raises(ConfigError, match=r"memory_layers.*ranges like"):
            layers(bad)
    for bad in ("28-30", "5,4-6"):  # past the model's layers; a layer twice
        with pytest.raises(ConfigError, match="distinct indices >= 0 below 30"):
            layers(bad)


def test_attention_sinks_stay_in_attention_and_out_of_the_bank() -> None:
    model = tiny_llama(4)
    tokens = torch.randint(0, CFG.vocab_size, (120,), generator=torch.Generator().manual_seed(6))
    last = {}
    for sink in (0, 4):
        plan = MemoryPlan(layers=(0, 1, 2), window=16, block=8, k=4, sink=sink)
        state, bank = new_state(), bank_for(plan)
        last[sink] = feed(model, plan, state, tokens, bank)[-1]
        positions = bank.search_parts(np.ones((6, 1, CFG.head_dim), np.float32), 200).positions
        assert positions is not None
        if sink:
            assert [t.shape[0] for t in state.sink_k] == [4, 4, 4]
            assert positions[positions >= 0].min() == 4  # never retrieved twice
            assert len(bank) == state.position - state.cached - 4
    assert not torch.allclose(last[0], last[4])  # the sinks are attended
    with pytest.raises(ConfigError, match="memory_sink"):
        MemoryPlan(layers=(0,), exact=True, sink=4).validate(3)


def test_keys_reach_the_bank_through_the_privacy_noiser_and_a_spent_budget_stops_writes() -> None:
    from agent_runtime.errors import BudgetExhaustedError

    model = tiny_llama()
    plan = MemoryPlan(layers=(0, 2), window=16, block=8, k=4)
    tokens = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(8))
    plain_state, plain = new_state(), bank_for(plan)
    feed(model, plan, plain_state, tokens, plain)
    noised_state, noised = new_state(), bank_for(plan)
    noised_state.protect = lambda keys: keys + 100.0
    feed(model, plan, noised_state, tokens, noised)
    ids = plain.live_ids()
    np.testing.assert_allclose(noised.get(ids)[0], plain.get(ids)[0] + 100.0, atol=1e-4)
    np.testing.assert_array_equal(noised.get(ids)[1], plain.get(ids)[1])  # values are not noised

    def spent(keys: np.ndarray) -> np.ndarray:
        raise BudgetExhaustedError("privacy budget spent")

    stopped, bank = new_state(), bank_for(plan)
    stopped.protect = spent
    feed(model, plan, stopped, tokens, bank)
    assert len(bank) == 0 and stopped.memory_stopped == "privacy budget spent"


def test_windows_grow_in_place_and_a_checkpoint_survives_the_growth() -> None:
    """Windows are appended in place in a buffer with spare rows (no copy per token); a
    checkpoint of an earlier window keeps its contents while the live state grows past it,
    and decoding again from the rolled-back state gives the first run's logits."""
    from agent_runtime.models.llama.family import LlamaChatModel

    model = tiny_llama()
    plan = MemoryPlan(layers=(0, 2), window=16, block=8, k=4)
    state, bank = new_state(), bank_for(plan)
    gen = torch.Generator().manual_seed(9)
    feed(model, plan, state, torch.randint(0, CFG.vocab_size, (35,), generator=gen), bank)
    buffer = state.k[1]._base
    saved = LlamaChatModel.checkpoint(None, state)  # type: ignore[arg-type]
    before = [t.clone() for t in saved.k]
    steps = torch.randint(0, CFG.vocab_size, (4,), generator=gen)
    first = [
        forward_rows(model, plan, [state], steps[None, i : i + 1], [bank])[0] for i in range(4)
    ]
    assert state.k[1]._base is buffer  # grown in place, not copied
    for t, b in zip(saved.k, before, strict=True):
        torch.testing.assert_close(t, b, atol=0, rtol=0)
    LlamaChatModel.restore(None, state, saved)  # type: ignore[arg-type]
    again = [
        forward_rows(model, plan, [state], steps[None, i : i + 1], [bank])[0] for i in range(4)
    ]
    torch.testing.assert_close(torch.stack(again), torch.stack(first), atol=0, rtol=0)
