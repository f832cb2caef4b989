"""A Llama-architecture decoder (Llama, Qwen2, Mistral) in plain PyTorch, numerically matching
``transformers`` and loading its checkpoints by name.

``RMSNorm -> rope/apply_rope -> attend -> Attention -> MLP -> DecoderLayer -> LlamaModel``

The forward pass is cut into pieces that a memory-augmented attention reuses unchanged:
``embed`` -> per layer ``attention_inputs`` (pre-RoPE q, k, v), RoPE, any attention,
``finish`` (output projection, residual, MLP) -> ``head``. :meth:`LlamaModel.forward` is the
reference composition with plain causal attention over the whole sequence.

Parameter names and shapes are exactly those of ``LlamaForCausalLM.state_dict()`` (tied
checkpoints have no ``lm_head.weight``); :func:`expected_shapes` lists them for a config, so a
converter (GGUF) can produce a state dict that :meth:`LlamaModel.from_state_dict` accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agent_runtime.errors import CheckpointError
from agent_runtime.models.llama.config import LlamaConfig

__all__ = [
    "MLP",
    "Attention",
    "Decoder",
    "DecoderLayer",
    "Linear",
    "LlamaModel",
    "RMSNorm",
    "apply_rope",
    "attend",
    "expected_shapes",
    "rope_inv_freq",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back before the weight, as
    ``LlamaRMSNorm`` does: bf16 models then round at the same place as the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention, as in the HF checkpoints' q/k layout)


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | None = None) -> Tensor:
    """RoPE inverse frequencies (head_dim/2,) in float32, with the config's scaling applied.

    The operations and their order follow ``transformers.modeling_rope_utils`` so the result
    is bitwise the reference's.
    """
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: validate() guarantees these.
    assert s.low_freq_factor is not None and s.high_freq_factor is not None
    assert s.original_max_position_embeddings is not None
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k (B, T, H, D) by cos/sin (B, T, D) from :meth:`LlamaModel.rope`."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + _rotate_half(x) * sin


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention of q (B, T, H, D) over k, v (B, S, H_kv, D) -> (B, T, H, D).

    Query head h reads key/value head ``h // (H / H_kv)`` (grouped-query attention, as
    ``repeat_kv`` lays it out). ``mask`` is boolean, True where a query may see a key,
    broadcastable to (B, H, T, S); None means causal with T == S. Scale 1/sqrt(D).
    """
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
    )
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Layers


class Linear(nn.Linear):
    """``nn.Linear`` with an optional second, half-precision copy of its weight for few rows.

    On CPUs without half-precision matrix units, a float16 matrix-*vector* product is ~1.7x
    faster than float32 (half the bytes to read), while float16 matrix products of several
    rows are 2-5x *slower* (measured: ``agent-runtime bench model --dtype``). So a step of at
    most :data:`VECTOR_ROWS` rows (a few sessions decoding one token each) reads
    ``vector_weight`` one matrix-vector product per row, and every other call (prefill, larger
    batches) the full-precision ``weight``. Activations stay in the
    model's dtype: only the product's input and output are rounded. A product that overflows
    half precision (not finite) is computed again with ``weight``. ``vector_weight`` is a plain
    attribute: never in the state dict.
    """

    vector_weight: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self.weight, self.bias, self.vector_weight)


VECTOR_ROWS = 4
"""Steps of at most this many rows read the half-precision copies (:class:`Linear`), one
matrix-vector product per row. On this project's CPU (2 cores, AVX-512, MKL) the float32 matrix
product of a whole SmolLM2 step costs about the same for 2 to 8 rows (65-100 ms) as
float16 matrix-vector products for 5 to 7 rows (13 ms a row), so rows up to 4 are cheaper one
by one (docs/models.md, "Batching few sessions"). Each row is computed exactly as a step of
one session computes it: a session's logits do not depend on what is batched with it."""


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _by_rows(step: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``step`` of x (..., features) computed on each row alone, as a (1, 1, features) step of
    one session, when x has 2 to :data:`VECTOR_ROWS` rows and so reads the half-precision
    copies (each row also falls back to full precision on its own); None otherwise. The rows'
    results (a tensor or a tuple of tensors, each (1, 1, ...)) are stitched back to x's
    leading shape."""
    if not 1 < _rows(x) <= VECTOR_ROWS:
        return None
    lead = x.shape[:-1]
    outs = [step(row) for row in x.reshape(-1, 1, 1, x.shape[-1])]
    if isinstance(outs[0], tuple):
        return tuple(
            torch.cat(parts).view(*lead, *parts[0].shape[2:]) for parts in zip(*outs, strict=True)
        )
    return torch.cat(outs).view(*lead, *outs[0].shape[2:])


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, vector: Tensor | None) -> Tensor:
    if vector is not None:
        rows = _by_rows(lambda row: _linear(row, weight, bias, vector), x)
        if rows is not None:
            return cast(Tensor, rows)
        if _rows(x) == 1:
            y = _one_row(x, vector, bias)
            if y is not None:
                return y
    return F.linear(x, weight, bias)


def _one_row(x: Tensor, vector: Tensor, bias: Tensor | None) -> Tensor | None:
    """``x @ vector.T (+ bias)`` for a one-row x, in ``vector``'s dtype, back in x's; None if it
    overflowed."""
    y = F.linear(x.to(vector.dtype), vector).to(x.dtype)
    if not math.isfinite(float(y.sum())):  # an inf or NaN anywhere makes the sum one (one pass)
        return None
    return y if bias is None else y + bias


def _fused(modules: Sequence[nn.Linear], dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One ``dtype`` weight for several projections of the same input (their outputs side by
    side), and their biases (None if none has one): one matrix-vector product instead of
    several for a one-row step."""
    weight = torch.cat([m.weight.detach() for m in modules]).to(dtype)
    if all(m.bias is None for m in modules):
        return weight, None
    biases = [
        m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
        for m in modules
    ]
    return weight, torch.cat(biases)


class Attention(nn.Module):
    """The four projections of a self-attention block (named as in HF's ``self_attn``).

    The attention itself is not here: :class:`DecoderLayer` runs it between
    ``attention_inputs`` and ``finish`` so that it can be replaced.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.sizes = (q_dim, kv_dim, kv_dim)
        self.vector_qkv: tuple[Tensor, Tensor | None] | None = None  # q, k, v fused (few rows)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.vector_gate_up: tuple[Tensor, Tensor | None] | None = None  # fused (few rows)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.vector_gate_up
        rows = None if fused is None else _by_rows(self.forward, x)
        if rows is not None:
            return cast(Tensor, rows)
        if fused is not None and _rows(x) == 1:
            both = _one_row(x, *fused)
            if both is not None:
                gate, up = both.chunk(2, dim=-1)
                return cast(Tensor, self.down_proj(F.silu(gate) * up))
        y: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``, split around the attention."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attention_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-RoPE q (B, T, H, D), k and v (B, T, H_kv, D) of the layer input x (B, T, hidden)."""
        B, T, _ = x.shape
        a = self.self_attn
        rows = None if a.vector_qkv is None else _by_rows(self.attention_inputs, x)
        if rows is not None:
            return cast(tuple[Tensor, Tensor, Tensor], rows)
        h = self.input_layernorm(x)
        if a.vector_qkv is not None and _rows(h) == 1:
            qkv = _one_row(h, *a.vector_qkv)
            if qkv is not None:
                q, k, v = torch.split(qkv, list(a.sizes), dim=-1)
                return (
                    q.view(B, T, self.num_heads, self.head_dim),
                    k.view(B, T, self.num_kv_heads, self.head_dim),
                    v.view(B, T, self.num_kv_heads, self.head_dim),
                )
        q = a.q_proj(h).view(B, T, self.num_heads, self.head_dim)
        k = a.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        v = a.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """The layer's output from its input x and the attention result attn (B, T, H, D)."""
        x = x + self.self_attn.o_proj(attn.flatten(2))
        y: Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return y

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """Reference composition: RoPE on q and k, then :func:`attend` with ``mask``."""
        q, k, v = self.attention_inputs(x)
        return self.finish(x, attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask))


class Decoder(nn.Module):
    """Embedding, layers and final norm: the ``model.`` prefix of the HF parameter names."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# The model


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF checkpoint for ``cfg`` and its shape, in module order."""
    with torch.device("meta"):
        return _shapes(LlamaModel(cfg))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class LlamaModel(nn.Module):
    """Llama/Qwen2/Mistral causal LM; ``state_dict()`` keys equal ``*ForCausalLM``'s.

    Built with random (default-initialised) weights; use :meth:`from_state_dict` for a checkpoint.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg  # valid: LlamaConfig validates on construction
        self.model = Decoder(cfg)
        self.lm_head: nn.Linear | None = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.vector_head: Tensor | None = None  # the head's weight for few rows (see Linear)

    @classmethod
    def from_state_dict(
        cls, cfg: LlamaConfig, sd: Mapping[str, Tensor], dtype: torch.dtype = torch.float32
    ) -> LlamaModel:
        """The model with exactly the tensors of ``sd`` (HF names), cast to ``dtype``.

        Names and shapes are checked strictly: a missing, unexpected or wrong-shaped tensor is a
        :class:`CheckpointError` naming it. The module is built on the meta device and the
        tensors are assigned, so no random weights are allocated first. The model is in eval mode.
        """
        with torch.device("meta"):
            model = cls(cfg)
        expected = _shapes(model)
        missing = [name for name in expected if name not in sd]
        unexpected = sorted(name for name in sd if name not in expected)
        if missing or unexpected:
            hint = (
                " (tie_word_embeddings is set: a tied model has no lm_head.weight)"
                if "lm_head.weight" in unexpected
                else ""
            )
            raise CheckpointError(
                f"checkpoint does not match the {cfg.model_type} config:"
                f" missing {_names(missing)}, unexpected {_names(unexpected)}{hint}"
            )
        for name, shape in expected.items():
            t = sd[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(t.shape)}, the config needs {shape}"
                )
            if not t.is_floating_point():
                raise CheckpointError(
                    f"tensor {name} has dtype {t.dtype}; quantized tensors must be dequantized"
                )
        model.load_state_dict({name: sd[name].to(dtype) for name in expected}, assign=True)
        return model.eval()

    @property
    def layers(self) -> Sequence[DecoderLayer]:
        return cast("Sequence[DecoderLayer]", self.model.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_params(self) -> int:
        """Parameter count; a tied head is counted once, with the embedding."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) -> hidden states (B, T, hidden)."""
        return cast(Tensor, self.model.embed_tokens(tokens))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, head_dim) in the model's dtype for absolute positions (B, T).

        Angles are computed in float32 from float32 inverse frequencies, as the reference does,
        so logits match it; the frequencies are recomputed per call (head_dim/2 values) rather
        than kept in a buffer that ``.to(dtype)`` would round.
        """
        inv_freq = rope_inv_freq(self.cfg, positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def head(self, x: Tensor) -> Tensor:
        """Final norm and output projection: hidden (B, T, hidden) -> logits (B, T, vocab)."""
        h = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return _linear(h, weight, None, self.vector_head)

    def use_vector_weights(self, dtype: torch.dtype | None) -> None:
        """Give every projection and the head a ``dtype`` copy of its weight for steps of few
        rows (:class:`Linear`; +2 bytes per parameter for float16), or drop the copies (None).
        The projections of one input are copied side by side (q, k and v; gate and up), so a
        one-row step reads each group in one matrix-vector product.

        The copies are taken now: code that changes the weights afterwards (loading others,
        an optimizer step) must call this again, or one-row steps keep computing with the old
        ones. Serving loads a model once (``models.loader``) and never changes it."""
        for layer in self.layers:  # q/k/v and gate/up: one fused copy each (the same bytes)
            a, mlp = layer.self_attn, layer.mlp
            a.vector_qkv = None if dtype is None else _fused((a.q_proj, a.k_proj, a.v_proj), dtype)
            mlp.vector_gate_up = (
                None if dtype is None else _fused((mlp.gate_proj, mlp.up_proj), dtype)
            )
            for module in (a.o_proj, mlp.down_proj):
                module.vector_weight = None if dtype is None else module.weight.detach().to(dtype)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.vector_head = None if dtype is None else weight.detach().to(dtype)

    @property
    def vector_dtype(self) -> torch.dtype | None:
        """The dtype of the one-row weight copies (None: there are none)."""
        return None if self.vector_head is None else self.vector_head.dtype

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) of tokens (B, T) with full causal attention over the sequence.

        ``positions`` (B, T) are the RoPE positions (default 0..T-1); the mask is causal in
        sequence order whatever they are, as in the reference without a cache.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = self.rope(positions)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(x)


def _names(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
