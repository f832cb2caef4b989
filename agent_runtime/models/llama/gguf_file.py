"""Reading a GGUF file (llama.cpp's format) as a Hugging Face checkpoint: config, tensors, tokenizer.

:func:`read_gguf` gives what a Hugging Face directory would hold: the ``config.json`` dict
(:meth:`LlamaConfig.from_hf` reads it), the state dict under ``LlamaForCausalLM`` names,
dequantised to floating point, and the :class:`ChatTokenizer`. Architectures ``llama`` (Llama
1-3, Mistral, SmolLM) and ``qwen2``.

What llama.cpp's ``convert_hf_to_gguf.py`` changes is undone here, as ``transformers`` does:

* tensor names (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
* for ``llama`` only, the rows of the q and k projections are permuted per head (llama.cpp's
  RoPE rotates interleaved pairs, Hugging Face's rotates halves): :func:`_unpermute`;
* Llama 3.1's RoPE scaling is stored as a per-frequency factor tensor (``rope_freqs.weight``)
  rather than as parameters: :func:`_llama3_rope_scaling` recovers them and checks that they
  reproduce the tensor exactly.

Quantised tensors are dequantised with ``gguf.quants`` to float32 and then cast to ``dtype``;
a tensor type it cannot dequantise is refused before any is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.model import expected_shapes
from agent_runtime.models.llama.tokenizer import ChatTokenizer

__all__ = ["ARCHITECTURES", "read_gguf"]

ARCHITECTURES = ("llama", "qwen2")
_MAGIC = b"GGUF"

# GGUF tensor name -> HF name (``{i}`` the block number), for both architectures.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"
# Llama 3.1-3.3's scaling; llama.cpp's converter stores only the factors these produce.
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR, _LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192

Progress = Callable[[int, int], None]


def read_gguf(
    path: Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None
) -> tuple[dict[str, Any], dict[str, Tensor], ChatTokenizer]:
    """(HF ``config.json`` dict, HF-named state dict in ``dtype``, tokenizer) of a GGUF file.

    ``progress(done, total)`` is called after each tensor. Every malformed or unsupported file
    is a :class:`CheckpointError` naming it and saying what is wrong; the state dict is checked
    against the config's expected names and shapes before it is returned.
    """
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    _check_tensor_types(path, tensors.values())
    tokenizer = ChatTokenizer.from_gguf_metadata(
        {k: meta.get(k) for k in meta if k.startswith("tokenizer.")}, str(path)
    )
    config = _hf_config(meta, arch, tensors, path)
    try:
        cfg = LlamaConfig.from_hf(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    sd = _state_dict(path, reader, cfg, arch, dtype, progress)
    return config, sd, tokenizer


class _Metadata:
    """The key/value metadata as plain Python values, read on demand (a vocabulary is large)."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{self._path}: metadata key {key} is unreadable: {exc}") from exc

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self._path}: metadata key {key} is missing")
        return value


def _open(path: Path) -> GGUFReader:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if magic != _MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, not {_MAGIC!r})")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises whatever numpy/struct hit in a damaged file
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: {exc}") from exc


def _check_tensor_types(path: Path, tensors: Any) -> None:
    """Refuse, before reading any, a tensor type that ``gguf.quants`` cannot dequantise."""
    checked: set[GGMLQuantizationType] = set()
    for t in tensors:
        qtype = t.tensor_type
        if qtype in checked:
            continue
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        try:
            # One all-zero block: dequantize() dispatches on the type before looking at data.
            dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name} has type {qtype.name}, which cannot be dequantised"
                " (re-quantise the model with another type, e.g. Q8_0, Q4_K_M, or F16)"
            ) from None
        checked.add(qtype)


def _hf_config(meta: _Metadata, arch: str, tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``config.json`` dict that ``transformers`` would write for this model."""

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = meta.require(key("embedding_length"))
    heads = meta.require(key("attention.head_count"))
    kv_heads = meta.get(key("attention.head_count_kv"), heads)
    head_dim = meta.get(key("attention.key_length")) or meta.get(key("rope.dimension_count"))
    head_dim = head_dim or hidden // heads
    rotary = meta.get(key("rope.dimension_count"), head_dim)
    if rotary != head_dim:
        raise CheckpointError(
            f"{path}: {key('rope.dimension_count')}={rotary} rotates part of each head"
            f" (head_dim {head_dim}); partial rotary embeddings are not supported"
        )
    # Older files state the vocabulary's size only as its length.
    vocab_size = meta.get(key("vocab_size")) or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab_size:
        raise CheckpointError(f"{path}: neither {key('vocab_size')} nor a vocabulary is given")
    rope_theta = _decimal(meta.get(key("rope.freq_base"), 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.require(key("feed_forward_length")),
        "num_hidden_layers": meta.require(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.require(key("context_length")),
        "rms_norm_eps": _decimal(meta.require(key("attention.layer_norm_rms_epsilon"))),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, head_dim, rope_theta, path),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    return config


def _decimal(value: float) -> float:
    """The shortest decimal a float32 metadata value stands for: ``1e-06``, not
    ``9.99999997e-07``, so a config read from the GGUF equals the one it was converted from."""
    return float(str(np.float32(value)))


def _rope_scaling(
    meta: _Metadata,
    arch: str,
    tensors: dict[str, Any],
    head_dim: int,
    theta: float,
    path: Path,
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` or Llama 3.1's factor tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if _ROPE_FREQS in tensors:
        factors = np.asarray(
            dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        )
        return _llama3_rope_scaling(factors.astype(np.float64), head_dim, theta, path)
    if kind == "none":
        return None
    if kind == "linear":
        return {
            "rope_type": "linear",
            "factor": _decimal(meta.require(f"{arch}.rope.scaling.factor")),
        }
    raise CheckpointError(
        f"{path}: {arch}.rope.scaling.type={kind!r} is not supported (none, linear, or llama3 factors)"
    )


def _llama3_rope_scaling(
    factors: np.ndarray, head_dim: int, theta: float, path: Path
) -> dict[str, Any]:
    """Llama 3's scaling parameters behind llama.cpp's ``rope_freqs`` (one divisor per frequency).

    llama.cpp writes ``1`` for the high frequencies, ``factor`` for the low ones and a smooth
    blend between, computed from Llama 3.1's fixed ``low_freq_factor=1``,
    ``high_freq_factor=4`` and ``original_max_position_embeddings=8192``; the factor is the
    largest divisor. The recovered parameters must reproduce every divisor.
    """
    factor = _decimal(factors.max())
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": _LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = _LLAMA3_ORIGINAL_CONTEXT / _LLAMA3_LOW_FREQ_FACTOR
    high_wavelen = _LLAMA3_ORIGINAL_CONTEXT / _LLAMA3_HIGH_FREQ_FACTOR
    smooth = (_LLAMA3_ORIGINAL_CONTEXT / wavelen - _LLAMA3_LOW_FREQ_FACTOR) / (
        _LLAMA3_HIGH_FREQ_FACTOR - _LLAMA3_LOW_FREQ_FACTOR
    )
    expected = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-5, atol=0):
        raise CheckpointError(
            f"{path}: {_ROPE_FREQS} is not Llama 3.1's RoPE scaling (low_freq_factor 1,"
            " high_freq_factor 4, original context 8192); other per-frequency factors are not"
            " supported"
        )
    return params


def _hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for one that is not part of the network."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _BLOCK.fullmatch(gguf_name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows: per head, interleaved pairs -> two halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _state_dict(
    path: Path,
    reader: GGUFReader,
    cfg: LlamaConfig,
    arch: str,
    dtype: torch.dtype,
    progress: Progress | None,
) -> dict[str, Tensor]:
    expected = expected_shapes(cfg)
    network = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    unknown = [t.name for t in network if _hf_name(t.name) is None]
    if unknown:
        raise CheckpointError(
            f"{path}: tensors {', '.join(unknown[:5])} are not part of a {arch} network"
        )
    sd: dict[str, Tensor] = {}
    for done, t in enumerate(network, start=1):
        name = _hf_name(t.name)
        assert name is not None
        try:
            w = dequantize(t.data, t.tensor_type)
        except (ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: tensor {t.name} is damaged: {exc}") from exc
        if arch == "llama" and ".attn_q." in t.name:
            w = _unpermute(w, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in t.name:
            w = _unpermute(w, cfg.num_kv_heads)
        # The reader's F32 arrays are read-only views of the memory-mapped file: copied then.
        w = np.require(w, dtype=np.float32, requirements=["C", "W"])
        sd[name] = torch.from_numpy(w).to(dtype)
        if progress is not None:
            progress(done, len(network))
    missing = [n for n in expected if n not in sd]
    wrong = [n for n, shape in expected.items() if n in sd and tuple(sd[n].shape) != shape]
    unexpected = [n for n in sd if n not in expected]
    if missing or wrong or unexpected:
        parts = [
            f"{label} {', '.join(names[:5])}"
            for label, names in (
                ("missing", missing),
                ("wrong shape", wrong),
                ("unexpected", unexpected),
            )
            if names
        ]
        raise CheckpointError(f"{path}: tensors do not match the metadata: {'; '.join(parts)}")
    return sd
