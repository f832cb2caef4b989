"""The Llama family's chat format and odd shapes, as the engine drives them: prompts cut at
block boundaries, templates that open every conversation with BOS, a single KV head."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.family import LlamaChatModel, tiny_random
from agent_runtime.models.llama.memory import MemoryPlan
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.tokenizer import ChatTokenizer
from memory import MemoryBank


def _bank(model: LlamaChatModel) -> MemoryBank:
    return MemoryBank(*model.memory_dims, parts=model.memory_parts)


def _engine_prefill(model: LlamaChatModel, state: object, prompt: list[int], bank: MemoryBank):
    """Feed a prompt as the engine's runner does (_prefill_chunk): block-aligned chunks."""
    logits, pos, W = None, 0, model.block
    while pos < len(prompt):
        chunk = prompt[pos : pos + W - state.position % W]  # type: ignore[attr-defined]
        logits = model.prefill(state, chunk, bank)  # type: ignore[arg-type]
        pos += len(chunk)
    return logits


def test_a_prompt_chunk_that_ends_on_a_turn_terminator_gets_no_extra_text() -> None:
    """The engine cuts a prompt into block-aligned chunks: when a user turn's ``<|im_end|>`` is
    a chunk's last token, the text after it (already next in the prompt) is not fed twice."""
    model = tiny_random(0)
    end, W = model.end_token, model.block
    for words in range(1, 40):  # find a prompt whose first terminator ends a block
        prompt = [*model.encode_turn("user", "hello " * words), *model.reply_prefix]
        at = len(model._preamble["user"]) + prompt.index(end)
        if (at + 1) % W == 0:
            break
    else:  # pragma: no cover - the tokenizer is deterministic
        raise AssertionError("no prompt puts the terminator at a block end")
    whole, chunked = model.new_state(), model.new_state()
    want = model.prefill(whole, prompt, _bank(model))
    got = _engine_prefill(model, chunked, prompt, _bank(model))
    assert chunked.position == whole.position
    assert want is not None and got is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


_LLAMA3_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system"
    "<|end_header_id|>\n\nYou are helpful.<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _llama3_like_chat() -> LlamaChatModel:
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello there, my name is Priya, be brief"] * 10, trainer)
    chat = ChatTokenizer(
        tok,
        _LLAMA3_LIKE,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        "llama3-like",
    )
    base = tiny_random(0)
    return LlamaChatModel(base.model, chat, base.plan)


def test_a_conversation_opened_by_a_system_turn_still_starts_with_the_templates_bos() -> None:
    """The template writes BOS before the first message whatever its role: a session created
    with instructions (a system turn first) feeds it too."""
    model = _llama3_like_chat()
    tok = model.tokenizer
    bos = tok.token_id("<|begin_of_text|>")
    # a user-first conversation gets it (the default system prompt path) ...
    state = model.new_state()
    model.prefill(state, model.encode_turn("user", "hi"), None)
    assert state.position == len(tok.encode(tok.turn_text("user", "hi", first=True)))
    # ... a system-first one must too: the rendered conversation starts with BOS
    rendered = tok.encode(tok.turn_text("system", "be brief", first=True))
    assert rendered[0] == bos
    state = model.new_state()
    model.prefill(state, model.encode_turn("system", "be brief"), None)
    assert state.position == len(rendered)


def test_a_single_kv_head_model_with_one_memory_layer_can_search_its_bank() -> None:
    """A multi-query model (one KV head) with one memory layer has one-part bank entries: a
    plain bank, searched through the same calls."""
    cfg = LlamaConfig(
        vocab_size=304,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    tokenizer = tiny_random(0).tokenizer
    model = LlamaChatModel(
        LlamaModel(cfg).eval(), tokenizer, MemoryPlan(layers=(1,), window=16, block=8, k=4)
    )
    bank = _bank(model)
    state = model.new_state()
    model.prefill(state, model.encode_turn("user", "hello there, my name is Priya " * 3), bank)
    assert len(bank) > 0
    _, stats = model.decode([state], [5], [bank])
    assert stats.retrieved[0] > 0
