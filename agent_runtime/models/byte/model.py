"""The Memorizing Transformer chat model (Wu et al., ICLR 2022), read top to bottom in data-flow order.

``RoPE -> LocalAttention -> MemoryAttention -> MLP -> Block -> ModelConfig -> MemorizingTransformer``

* Every layer attends to a sliding local window of ``W`` tokens (a token at position t sees
  positions t-W+1..t). Training feeds segments of W tokens with an XL-style cache of the previous
  segment; generation keeps a rolling KV cache. Both use the same mask, so they agree.
* One memory layer (about 3/4 depth) also attends to the top-k entries retrieved from a kNN
  memory by inner product of L2-normalised, position-free keys. Its local attention uses the
  same position-free keys, so a match learned within the window transfers to the bank. Its keys and values are one shared
  head (multi-query), so one memory entry is stored per token. Local and memory attention are
  mixed by the paper's learned per-head gate ``g = sigmoid(b_h)``.
* Memory is block-synchronous, as in the paper: positions are grouped into blocks of W; a token
  in block b retrieves from the entries of all blocks < b. Training adds segment j to a document's
  memory after processing it; generation writes a block to the session's bank when the stream
  enters the next block. Every earlier token is therefore either in the window or in the bank.
* The model holds no session state. Memory is reached through a :class:`Retriever` passed in;
  no gradient flows into the bank.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agent_runtime.errors import CheckpointError
from agent_runtime.files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "KVCache",
    "MemorizingTransformer",
    "ModelConfig",
    "ModelOutput",
    "Retrieval",
    "Retriever",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 2  # 2: memory-layer n-gram features and token ids in the cache
NO_POSITION = -(10**12)  # position of an empty cache slot: outside every window
NO_TOKEN = -1  # token id of an empty cache slot


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (local attention only; memory keys are position-free)


def rope_tables(pos: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin for absolute positions ``pos`` (B, T) -> (B, 1, T, head_dim/2) each.

    Angles are computed in float64: positions reach millions in long sessions, where float32
    angles would lose the relative phase that RoPE relies on.
    """
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim
    )
    angles = pos.to(torch.float64)[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.remainder(angles, 2 * math.pi)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs of channels of x (B, H, T, hs)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """(B, 1, T, S) bool: query at t may see key at s iff t-W < s <= t."""
    diff = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    return (diff >= 0) & (diff < window)


# ---------------------------------------------------------------------------------------------
# Memory access


@dataclass
class Retrieval:
    """Top-k memory entries for every query: scores (B, H, T, k) (differentiable w.r.t. the
    queries during training), values (B, H, T, k, hs), mask (B, H, T, k) of valid entries."""

    scores: Tensor
    values: Tensor
    mask: Tensor
    positions: Tensor | None = None
    """Stored positions of the entries (B, H, T, k), -1 where invalid (serving only)."""
    weights: Tensor | None = None
    """Set by the attention that consumed this retrieval: the mass each entry received."""


class Retriever(Protocol):
    """Looks up the top-k memory entries for L2-normalised queries (B, H, T, hs)."""

    def __call__(self, queries: Tensor, k: int) -> Retrieval: ...


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass
class KVCache:
    """Per-layer keys/values of the last W-1 tokens (post-RoPE), their positions and token ids.

    k, v: one (B, H_kv, C, hs) tensor per layer; pos: (B, C) absolute positions, NO_POSITION
    for empty slots; ids: (B, C) token ids, NO_TOKEN for empty slots (the memory layer's n-gram
    features read the tokens before a chunk from here). Local attention of the memory layer has
    H_kv = 1.
    """

    k: list[Tensor]
    v: list[Tensor]
    pos: Tensor
    ids: Tensor


class LocalAttention(nn.Module):
    """Multi-head causal attention over a sliding window, with RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window = cfg.n_head, cfg.head_dim, cfg.window
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = apply_rope(
            q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin
        )  # (B, H, T, hs)
        k = apply_rope(k.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        kk, vv = (
            (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        )
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # (B, H, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class NGramFeatures(nn.Module):
    """Content of the last ``n`` tokens, added to the memory layer's queries and keys.

    The query of token t sees tokens t, t-1, ..., t-n+1; the key of token t sees the n tokens
    *before* it, t-1, ..., t-n, through the same per-offset embeddings. So the key of an entry
    equals the query of a later token exactly when the n tokens preceding the entry are the n
    tokens ending at the query: retrieval finds "what came after this context last time" and the
    entry's value carries that next token (an induction match, as a short convolution gives the
    recall layers of H3/Based). This is what lets a 4-layer byte model find a fact's value among
    64K entries from the words that introduced it. Purely relative: keys stay position-free.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n, self.vocab = cfg.mem_ngram, cfg.vocab_size
        # One table per offset, plus one row per offset for "no token" (start of stream).
        self.emb = nn.Embedding(self.n * (cfg.vocab_size + 1), cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.head_dim, bias=False)

    def reset_parameters(self) -> None:
        """Unit-variance features from the start, so exact context matches dominate the first
        retrievals (at GPT-2's 0.02 they would be ~100x weaker than the content part)."""
        nn.init.normal_(self.emb.weight, std=1.0 / math.sqrt(self.n))
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.in_features))

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``ids`` (B, n + T): the n tokens before the chunk, then the chunk's T tokens
        (NO_TOKEN where none). Returns query features (B, 1, T, hs) and key features (B, T, hs)."""
        n, V = self.n, self.vocab
        ids = torch.where(ids < 0, torch.full_like(ids, V), ids)
        offsets = torch.arange(n, device=ids.device) * (V + 1)
        # window[:, t, o] = token at chunk position t - o, for o = 0..n (n+1 columns).
        window = ids.unfold(1, n + 1, 1).flip(-1)  # (B, T, n+1)
        q = self.emb(window[..., :n] + offsets).sum(2)  # tokens t .. t-n+1
        k = self.emb(window[..., 1:] + offsets).sum(2)  # tokens t-1 .. t-n
        return self.proj(q)[:, None], self.proj(k)


class MemoryAttention(nn.Module):
    """Local window attention plus kNN memory attention, mixed by a learned per-head gate.

    Queries and keys are L2-normalised (cosine attention with a learned temperature), so the
    inner-product search in the bank ranks exactly as the attention logits do. Keys and values
    are one shared head: one memory entry per token. With ``mem_ngram`` > 0, queries and keys
    also carry :class:`NGramFeatures` of the tokens before them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window, self.topk = (
            cfg.n_head,
            cfg.head_dim,
            cfg.window,
            cfg.mem_topk,
        )
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        # log of the attention temperature: cosine logits need a scale well above 1/sqrt(hs).
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        # The paper's gate: g = sigmoid(b_h). Starts at 0.5 so both paths get gradient.
        self.gate_bias = nn.Parameter(torch.zeros(cfg.n_head))
        # Logit of a "nothing relevant" entry with a zero value, per head: when no retrieved entry
        # matches well, memory attention reads (mostly) nothing instead of averaging 32 weak
        # matches, which in a bank of 64K entries are many and consistently misleading.
        self.null_logit = nn.Parameter(torch.zeros(cfg.n_head))
        self.ngram = NGramFeatures(cfg) if cfg.mem_ngram > 0 else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None,
        retriever: Retriever | None,
        ids: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).split(self.head_dim, dim=2)  # (B, T, hs) each
        if self.ngram is not None:
            fq, fk = self.ngram(ids)
            q, k = q + fq, k + fk
        qn = F.normalize(q, dim=-1)
        kn = F.normalize(k, dim=-1)[:, None]  # (B, 1, T, hs) position-free memory key
        v = v[:, None]  # (B, 1, T, hs)
        scale = self.log_scale.exp()

        # Local attention uses the same position-free q/k as the memory (no RoPE here; the other
        # layers carry position): what this layer learns to match within the window, it matches
        # in the bank too. That is what lets retrieval be learned from nearby examples.
        kr = kn
        kk, vv = (
            (kr, v) if past is None else (torch.cat([past[0], kr], 2), torch.cat([past[1], v], 2))
        )
        # The temperature multiplies q (not SDPA's float ``scale``) so that it keeps its gradient.
        local = F.scaled_dot_product_attention(
            qn * scale,
            kk.expand(B, self.n_head, -1, -1),
            vv.expand(B, self.n_head, -1, -1),
            attn_mask=mask,
            scale=1.0,
        )  # (B, H, T, hs)
        if retriever is None:
            out = local
        else:
            mem = retriever(qn, self.topk)
            logits = (scale * mem.scores).masked_fill(~mem.mask, float("-inf"))  # (B, H, T, k)
            null = self.null_logit.view(1, -1, 1, 1).expand(B, -1, T, 1)
            weights = torch.softmax(torch.cat([logits, null], -1), dim=-1)[..., :-1]
            mem_out = (weights.unsqueeze(-2) @ mem.values).squeeze(-2)  # (B, H, T, hs)
            g = torch.sigmoid(self.gate_bias).view(1, -1, 1, 1)
            # Where nothing could be retrieved, the token relies on local attention alone.
            has_mem = mem.mask.any(-1, keepdim=True)
            out = torch.where(has_mem, g * mem_out + (1 - g) * local, local)
            if mem.positions is not None:  # provenance: the gated share each entry received
                mem.weights = (weights * g).detach()
        y = self.proj(out.transpose(1, 2).reshape(B, T, C))
        return y, (kr, v), (kn[:, 0], v[:, 0])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(F.gelu(self.fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, memory: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn: LocalAttention | MemoryAttention = (
            MemoryAttention(cfg) if memory else LocalAttention(cfg)
        )
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelConfig:
    vocab_size: int = 264  # 256 bytes + 4 role tokens, padded to a multiple of 8
    n_layer: int = 4  # small enough to train on a 2-core CPU
    n_head: int = 2  # head_dim 64: memory keys of 64 dims
    n_embd: int = 128  # trains at ~11K tokens/s on 2 CPU cores
    window: int = 128  # W: local attention span and training segment length
    mem_layer: int = 2  # about 3/4 depth (0-based), as in the paper
    mem_topk: int = 32  # k retrieved per query head, as in the paper
    mem_ngram: int = 12  # tokens of context in the memory layer's query/key features (0: off)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        if self.n_embd % self.n_head != 0 or self.head_dim % 2 != 0:
            raise CheckpointError(
                f"n_embd={self.n_embd} must split into {self.n_head} heads of even size"
            )
        if not 0 <= self.mem_layer < self.n_layer:
            raise CheckpointError(f"mem_layer={self.mem_layer} must be in 0..{self.n_layer - 1}")
        if not 0 <= self.mem_ngram < self.window:
            raise CheckpointError(f"mem_ngram={self.mem_ngram} must be in 0..{self.window - 1}")
        if self.window < 2 or self.mem_topk < 1:
            raise CheckpointError(
                f"window={self.window} must be >= 2 and mem_topk={self.mem_topk} >= 1"
            )

    def fingerprint(self) -> str:
        """Hash of everything that shapes memory-bank contents: banks from another config are refused."""
        blob = json.dumps({"format": CHECKPOINT_FORMAT, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab)
    cache: KVCache  # keys/values of this chunk, per layer, for the caller's rolling cache
    mem_keys: Tensor  # (B, T, hs) L2-normalised position-free keys of the memory layer
    mem_values: Tensor  # (B, T, hs)


class MemorizingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i == cfg.mem_layer) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for m in self.modules():
            if isinstance(m, NGramFeatures):
                m.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def memory_dims(self) -> tuple[int, int]:
        """(key_dim, value_dim) of one memory entry."""
        return self.cfg.head_dim, self.cfg.head_dim

    def empty_cache(self, batch: int, device: torch.device | str = "cpu") -> KVCache:
        hs = self.cfg.head_dim
        heads = [1 if i == self.cfg.mem_layer else self.cfg.n_head for i in range(self.cfg.n_layer)]
        k = [torch.zeros(batch, h, 0, hs, device=device) for h in heads]
        return KVCache(
            k=k,
            v=[t.clone() for t in k],
            pos=torch.zeros(batch, 0, dtype=torch.long, device=device),
            ids=torch.zeros(batch, 0, dtype=torch.long, device=device),
        )

    def forward(
        self,
        idx: Tensor,
        pos: Tensor,
        cache: KVCache | None = None,
        retriever: Retriever | None = None,
    ) -> ModelOutput:
        """Logits for tokens ``idx`` (B, T) at absolute positions ``pos`` (B, T).

        ``cache`` holds earlier tokens' keys/values (at most the last W-1 are visible); all
        queries of one call must lie in the same memory block, so that one retrieval serves them.
        """
        B = idx.shape[0]
        past_pos = cache.pos if cache is not None else idx.new_zeros(B, 0)
        # The n tokens before the chunk (the cache holds them in order; NO_TOKEN before the start).
        n = self.cfg.mem_ngram
        before = cache.ids[:, -n:] if cache is not None and n else idx.new_zeros(B, 0)
        before = F.pad(before, (n - before.shape[1], 0), value=NO_TOKEN)
        ngram_ids = torch.cat([before, idx], 1)
        mask = window_mask(pos, torch.cat([past_pos, pos], 1), self.cfg.window)
        cos, sin = rope_tables(pos, self.cfg.head_dim)
        x = self.wte(idx)
        new_k: list[Tensor] = []
        new_v: list[Tensor] = []
        mem_kv: tuple[Tensor, Tensor] | None = None
        for i, layer in enumerate(self.blocks):
            block = cast(Block, layer)
            past = (cache.k[i], cache.v[i]) if cache is not None else None
            h = block.ln1(x)
            if isinstance(block.attn, MemoryAttention):
                y, kv, mem_kv = block.attn(h, cos, sin, mask, past, retriever, ngram_ids)
            else:
                y, kv = block.attn(h, cos, sin, mask, past)
            x = x + y
            x = x + block.mlp(block.ln2(x))
            new_k.append(kv[0])
            new_v.append(kv[1])
        assert mem_kv is not None
        logits = self.lm_head(self.ln_f(x))
        return ModelOutput(logits, KVCache(new_k, new_v, pos, idx), mem_kv[0], mem_kv[1])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints: a plain dict holding the config, with a format version


def save_checkpoint(
    path: str | Path, model: MemorizingTransformer, extra: dict[str, Any] | None = None
) -> None:
    """Write model weights (fp32 unless ``extra['half']``) and config atomically and durably."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if extra and extra.get("half"):
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(model.cfg),
        "model": state,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write(path, [buf.getbuffer()], mode=0o644)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MemorizingTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; any incompatibility is a CheckpointError."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch checkpoint: {exc}"
        ) from exc
    if isinstance(blob, dict) and "optimizer" in blob and "format" not in blob:
        raise CheckpointError(
            f"{path} is a training checkpoint (step {blob.get('step')}), not a serving one:"
            f" export it with `agent-runtime train --run-dir {Path(path).parent} --steps"
            f" {blob.get('step')} --export model.pt` and serve model.pt"
        )
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        fmt = blob.get("format") if isinstance(blob, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format {fmt!r}; this runtime reads format {CHECKPOINT_FORMAT}"
        )
    known = {f.name for f in fields(ModelConfig)}
    raw = blob.get("config", {})
    if not isinstance(raw, dict) or set(raw) - known:
        raise CheckpointError(f"checkpoint {path} has an unknown model config {raw!r}")
    cfg = ModelConfig(**raw)
    model = MemorizingTransformer(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match its config: {exc}") from exc
    return model.to(device).eval(), dict(blob.get("extra", {}))
