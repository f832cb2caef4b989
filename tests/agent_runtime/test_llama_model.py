"""The Llama-architecture decoder: logits match ``transformers`` for Llama, Qwen2 and Mistral
checkpoints read from a safetensors directory, and broken checkpoints fail naming the culprit."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.llama.config import LlamaConfig, RopeScaling
from agent_runtime.models.llama.hf import load_hf_dir, save_hf_dir
from agent_runtime.models.llama.model import LlamaModel, apply_rope, rope_inv_freq

VOCAB, T = 300, 40
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,  # transformers' default when absent is 32 for qwen2, 8 for mistral
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so head_dim 16's wavelengths (6 .. 6e5) span all three llama3 regions.
    "original_max_position_embeddings": 64,
}

# (transformers class, config kwargs): every bias placement, tying, RoPE type and head layout.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha-untied": ("Llama", {"num_key_value_heads": 4}),
    "llama-gqa-tied-llama3": (
        "Llama",
        {"num_key_value_heads": 2, "tie_word_embeddings": True, "rope_parameters": LLAMA3},
    ),
    "llama-bias-linear-head_dim32": (
        "Llama",
        {
            "num_key_value_heads": 2,
            "head_dim": 32,
            "attention_bias": True,
            "mlp_bias": True,
            "num_hidden_layers": 3,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        },
    ),
    "qwen2-gqa-tied": (
        "Qwen2",
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
    ),
    "mistral-mqa": ("Mistral", {"num_key_value_heads": 1, "sliding_window": 4096}),
}


def reference(variant: str) -> Any:
    """A tiny random ``*ForCausalLM`` in fp32, with every parameter (biases and norm weights
    included, which transformers initialises to constants) randomised so each one matters."""
    import transformers

    family, kwargs = VARIANTS[variant]
    config = getattr(transformers, f"{family}Config")(**{**BASE, **kwargs})
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def saved(variant: str, directory: Path) -> Any:
    model = reference(variant)
    model.save_pretrained(directory)
    return model


def tokens_and_positions(offset: int = 0) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, T)), torch.arange(offset, offset + T).expand(2, T)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers_within_1e_4(variant: str, tmp_path: Path) -> None:
    ref = saved(variant, tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    model = LlamaModel.from_state_dict(cfg, sd)
    assert set(model.state_dict()) == set(sd)
    assert model.num_params() == sum(t.numel() for t in sd.values())
    for offset in (0, 100):  # explicit positions shift RoPE only, as position_ids do
        tokens, positions = tokens_and_positions(offset)
        expected = ref(tokens, position_ids=positions).logits
        assert expected.std() > 0.5  # logits that differ, so the tolerance means something
        torch.testing.assert_close(model(tokens, positions), expected, atol=1e-4, rtol=0)
    tokens, _ = tokens_and_positions()
    torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama-gqa-tied-llama3", "llama-bias-linear-head_dim32"])
def test_rope_frequencies_equal_transformers_bitwise(variant: str) -> None:
    ref = reference(variant)
    cfg = LlamaConfig.from_hf(ref.config.to_dict())
    assert torch.equal(rope_inv_freq(cfg), ref.model.rotary_emb.inv_freq)


@torch.no_grad()
def test_pieces_compose_into_forward_with_explicit_grouped_attention(tmp_path: Path) -> None:
    """The contract a memory-augmented attention relies on: embed, rope, attention_inputs
    (pre-RoPE), apply_rope, any attention, finish, head - here an explicit float32 softmax over
    query groups instead of the model's SDPA."""
    saved("llama-bias-linear-head_dim32", tmp_path)
    model = LlamaModel.from_state_dict(*load_hf_dir(tmp_path))
    cfg = model.cfg
    tokens, positions = tokens_and_positions(100)
    B, H, H_kv, D = 2, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = model.rope(positions)
    assert cos.shape == sin.shape == (B, T, D) and cos.dtype == model.dtype
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = model.embed(tokens)
    assert x.shape == (B, T, cfg.hidden_size)
    for layer in model.layers:
        q, k, v = layer.attention_inputs(x)
        assert q.shape == (B, T, H, D) and k.shape == v.shape == (B, T, H_kv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        qg = q.view(B, T, H_kv, H // H_kv, D)  # query head h reads kv head h // groups
        scores = torch.einsum("btkgd,bskd->bkgts", qg, k) / D**0.5
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, D)
        x = layer.finish(x, attn)
    torch.testing.assert_close(model.head(x), model(tokens, positions), atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    ref = reference("qwen2-gqa-tied")
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, one = load_hf_dir(tmp_path / "one")
    _, sharded = load_hf_dir(tmp_path / "sharded")
    assert one.keys() == sharded.keys()
    assert all(torch.equal(one[name], sharded[name]) for name in one)


def test_load_casts_to_the_requested_dtype(tmp_path: Path) -> None:
    saved("mistral-mqa", tmp_path)
    cfg, sd = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    model = LlamaModel.from_state_dict(cfg, sd, dtype=torch.bfloat16)
    tokens, positions = tokens_and_positions()
    cos, _ = model.rope(positions)
    assert model.dtype == cos.dtype == torch.bfloat16
    assert model(tokens).dtype == torch.bfloat16


@torch.no_grad()
def test_save_hf_dir_round_trips_through_transformers(tmp_path: Path) -> None:
    import transformers

    saved("llama-gqa-tied-llama3", tmp_path / "ref")
    cfg, sd = load_hf_dir(tmp_path / "ref")
    save_hf_dir(tmp_path / "ours", cfg, sd)
    assert not list((tmp_path / "ours").glob(".*.tmp"))
    cfg2, sd2 = load_hf_dir(tmp_path / "ours")
    assert cfg2 == cfg and all(torch.equal(sd[n], sd2[n]) for n in sd)
    theirs: Any = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    tokens, positions = tokens_and_positions(100)
    torch.testing.assert_close(
        LlamaModel.from_state_dict(cfg2, sd2)(tokens, positions),
        theirs(tokens, position_ids=positions).logits,
        atol=1e-4,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trips_and_reads_transformers_config(variant: str) -> None:
    ref = reference(variant)
    cfg = LlamaConfig.from_hf(ref.config.to_dict())
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.model_type == VARIANTS[variant][0].lower()
    head_dim = getattr(ref.config, "head_dim", 64 // 4)  # Qwen2Config has no head_dim field
    assert (cfg.num_heads, cfg.head_dim) == (4, head_dim)
    assert cfg.fingerprint() == LlamaConfig.from_hf(cfg.to_hf()).fingerprint()
    assert len(cfg.fingerprint()) == 12
    assert cfg.fingerprint() != replace(cfg, rms_norm_eps=1e-5).fingerprint()


def test_bias_placement_follows_transformers_per_model_type() -> None:
    llama = LlamaConfig.from_hf({**BASE, "model_type": "llama", "attention_bias": True})
    qwen2 = LlamaConfig.from_hf({**BASE, "model_type": "qwen2"})
    mistral = LlamaConfig.from_hf({**BASE, "model_type": "mistral", "attention_bias": True})
    assert (llama.attention_bias, llama.o_proj_bias) == (True, True)
    assert (qwen2.attention_bias, qwen2.o_proj_bias) == (True, False)
    assert (mistral.attention_bias, mistral.o_proj_bias) == (False, False)
    keys = set(LlamaModel(qwen2).state_dict())
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys


def test_legacy_rope_spelling_reads_like_rope_parameters() -> None:
    legacy = {
        **BASE,
        "model_type": "llama",
        "rope_theta": 500000,  # an int in JSON: the same config, the same fingerprint
        "rope_scaling": {
            "type": "llama3",
            **{k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")},
        },
    }
    current = {**BASE, "model_type": "llama", "rope_parameters": LLAMA3}
    cfg = LlamaConfig.from_hf(legacy)
    assert cfg == LlamaConfig.from_hf(current)
    assert cfg.fingerprint() == LlamaConfig.from_hf(current).fingerprint()
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"num_key_value_heads": 3}, "num_kv_heads=3"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers='2'"),
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"eos_token_id": -1}, "eos_token_ids=(-1,)"),
    ],
)
def test_bad_config_field_is_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(named)):
        LlamaConfig.from_hf({**BASE, "model_type": "llama", **change})


def test_an_invalid_config_cannot_be_constructed() -> None:
    cfg = LlamaConfig.from_hf({**BASE, "model_type": "qwen2"})
    with pytest.raises(CheckpointError, match="attention_bias=False"):
        replace(cfg, attention_bias=False)
    with pytest.raises(CheckpointError, match="head_dim=15"):
        replace(cfg, head_dim=15)


# ---------------------------------------------------------------------------------------------
# Broken checkpoints


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    saved("llama-gqa-tied-llama3", tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(CheckpointError, match=re.escape(f"missing {name}")):
        LlamaModel.from_state_dict(cfg, {k: v for k, v in sd.items() if k != name})
    with pytest.raises(CheckpointError, match=re.escape(f"{name} has shape (96, 65)")):
        LlamaModel.from_state_dict(cfg, {**sd, name: torch.zeros(96, 65)})
    with pytest.raises(CheckpointError, match=r"unexpected lm_head\.weight.*tie_word_embeddings"):
        LlamaModel.from_state_dict(cfg, {**sd, "lm_head.weight": torch.zeros(VOCAB, 64)})
    with pytest.raises(CheckpointError, match=re.escape(f"{name} has dtype torch.int8")):
        LlamaModel.from_state_dict(cfg, {**sd, name: sd[name].to(torch.int8)})
    with pytest.raises(CheckpointError, match=re.escape(name)):
        save_hf_dir(tmp_path / "out", cfg, {k: v for k, v in sd.items() if k != name})
    assert not (tmp_path / "out").exists()


def test_missing_or_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no-such-dir: no such model directory"):
        load_hf_dir(tmp_path / "no-such-dir")
    saved("mistral-mqa", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_hf_dir(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**BASE, "model_type": "llama", "vocab_size": -1})
    )
    with pytest.raises(CheckpointError, match=r"config\.json: vocab_size=-1"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_hf_dir(tmp_path)


def test_shard_missing_from_an_index_is_named(tmp_path: Path) -> None:
    reference("llama-mha-untied").save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: missing")):
        load_hf_dir(tmp_path)


def test_steps_of_few_rows_use_the_half_precision_copy_and_larger_ones_the_weights() -> None:
    """``use_vector_weights``: a (1, 1) step reads the float16 copies (close to float32, not
    equal), a step of more than ``VECTOR_ROWS`` rows reads the float32 weights (bitwise the
    plain model's), an overflowing half-precision product falls back, and the copies never
    reach the state dict."""
    from agent_runtime.models.llama.model import VECTOR_ROWS, Linear

    assert VECTOR_ROWS < 2 * 5  # ``many`` below is a full-precision step

    cfg = LlamaConfig.from_hf({**BASE, "model_type": "llama", "tie_word_embeddings": True})
    torch.manual_seed(0)
    plain = LlamaModel(cfg).eval()
    fast = LlamaModel.from_state_dict(cfg, plain.state_dict())
    fast.use_vector_weights(torch.float16)
    assert fast.vector_dtype == torch.float16 and plain.vector_dtype is None
    assert set(fast.state_dict()) == set(plain.state_dict())
    one = torch.randint(0, VOCAB, (1, 1))
    many = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(fast(many), plain(many), atol=0, rtol=0)
        a, b = fast(one), plain(one)
        assert a.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        layer = Linear(4, 2, bias=True)
        layer.weight.fill_(1.0)
        layer.vector_weight = layer.weight.detach().half()
        big = torch.full((1, 4), 3e4)  # 1.2e5 per output: past float16's 65504
        torch.testing.assert_close(layer(big), torch.full((1, 2), 1.2e5) + layer.bias)
    fast.use_vector_weights(None)
    assert fast.vector_dtype is None
    with torch.no_grad():
        torch.testing.assert_close(fast(one), b, atol=0, rtol=0)


@pytest.mark.parametrize("sessions", [2, 3, 4])
def test_a_few_sessions_batched_get_exactly_the_logits_each_gets_alone(sessions: int) -> None:
    """Up to ``VECTOR_ROWS`` sessions decoding together (the serving path: ``decode`` with
    their own windows and banks) are computed row by row through the half-precision copies,
    each exactly as a step of one session: their logits are bitwise those of each alone; a
    row whose half-precision product overflows falls back to full precision on its own."""
    from agent_runtime.models.llama.family import tiny_random
    from agent_runtime.models.llama.model import VECTOR_ROWS, Linear
    from memory import MemoryBank, MemoryConfig

    assert sessions <= VECTOR_ROWS
    chat = tiny_random(3)
    chat.model.use_vector_weights(torch.float16)

    def fresh() -> tuple[list[Any], list[MemoryBank]]:
        states, banks = [], []
        for i in range(sessions):
            bank = MemoryBank(*chat.memory_dims, MemoryConfig(), parts=chat.memory_parts)
            state = chat.new_state()
            chat.prefill(
                state, chat.encode_turn("user", f"my code is {4711 + i} " * (3 + 2 * i)), bank
            )
            states.append(state)
            banks.append(bank)
        return states, banks

    with torch.no_grad():
        tokens = [11, 7, 13, 17][:sessions]
        states, banks = fresh()
        together, _ = chat.decode(states, tokens, banks)
        states, banks = fresh()
        for i in range(sessions):
            alone, _ = chat.decode([states[i]], [tokens[i]], [banks[i]])
            torch.testing.assert_close(together[i : i + 1], alone, atol=0, rtol=0)
        plain = LlamaModel.from_state_dict(chat.model.cfg, chat.model.state_dict())
        rows = torch.tensor([[11], [13]])
        assert not torch.equal(chat.model(rows), plain(rows))  # it did read the half copies
        # a row whose half-precision product overflows falls back alone; the others do not
        layer = Linear(4, 2, bias=True)
        layer.weight.fill_(1.0)
        layer.vector_weight = layer.weight.detach().half()
        x = torch.tensor([[[0.1234, 0.5678, 0.9012, 0.3456]], [[3e4] * 4], [[0.5, -0.1, 0.2, 0.3]]])
        y = layer(x)
        for i in range(3):
            torch.testing.assert_close(y[i : i + 1], layer(x[i : i + 1]), atol=0, rtol=0)
        torch.testing.assert_close(y[1], torch.full((1, 2), 1.2e5) + layer.bias)  # full precision
        assert not torch.equal(y[0], torch.nn.functional.linear(x[0], layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_one_row_projections_equal_the_separate_ones_and_fall_back_on_overflow(
    bias: bool,
) -> None:
    """A one-row step reads q, k, v (and gate, up) through one fused half-precision copy: the
    same products as each projection's own copy, biases included (Llama's attention_bias and
    mlp_bias), and full precision when half precision overflows."""
    cfg = LlamaConfig.from_hf(
        {**BASE, "model_type": "llama", "attention_bias": bias, "mlp_bias": bias}
    )
    torch.manual_seed(1)
    plain = LlamaModel(cfg).eval()
    with torch.no_grad():
        for p in plain.parameters():
            if p.dim() == 1 and bias:
                p.uniform_(-0.5, 0.5)  # biases that change the result
    fast = LlamaModel.from_state_dict(cfg, plain.state_dict())
    fast.use_vector_weights(torch.float16)
    layer, ref = fast.layers[0], plain.layers[0]
    x = torch.randn(1, 1, cfg.hidden_size)

    def by_hand(lin: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(h.half(), lin.weight.half()).float()
        return y if lin.bias is None else y + lin.bias

    with torch.no_grad():
        q, k, v = layer.attention_inputs(x)
        h = layer.input_layernorm(x)
        a = ref.self_attn
        for got, lin in ((q, a.q_proj), (k, a.k_proj), (v, a.v_proj)):
            torch.testing.assert_close(got.flatten(2), by_hand(lin, h), atol=2e-3, rtol=1e-3)
        m = ref.mlp
        want = by_hand(
            m.down_proj, torch.nn.functional.silu(by_hand(m.gate_proj, h)) * by_hand(m.up_proj, h)
        )
        torch.testing.assert_close(layer.mlp(h), want, atol=2e-3, rtol=1e-3)
        assert not torch.equal(layer.mlp(h), ref.mlp(h))  # it did read the half copies
        big = x * 1e5  # normed away before q/k/v, so overflow the MLP's products instead
        torch.testing.assert_close(layer.mlp(big), ref.mlp(big), atol=0, rtol=0)
        hot = layer.input_layernorm.weight.clone()
        layer.input_layernorm.weight.fill_(1e5)  # q/k/v inputs past float16's 65504
        ref.input_layernorm.weight.fill_(1e5)
        for got, want_ in zip(layer.attention_inputs(x), ref.attention_inputs(x), strict=True):
            torch.testing.assert_close(got, want_, atol=0, rtol=0)
        layer.input_layernorm.weight.copy_(hot)
