"""Training-free kNN memory for a pretrained decoder: local window + top-k retrieved pairs.

Every layer attends to a **local window**: the pre-RoPE keys/values of the last ``window`` to
``window + block`` tokens, kept per session (:class:`LlamaState`). When the window holds
``window + block`` tokens its oldest ``block`` leave it; at the **memory layers** their
pre-RoPE keys and values go to the session's bank, one entry per token with one part per
(memory layer, KV head) (``MemoryBank(parts=...)``); elsewhere they are dropped.

At a memory layer each query head searches its KV head's part of the bank with its pre-RoPE
query (a content match, independent of how far back the entry is), takes the top ``k`` and
attends **jointly** over them and its window: one softmax over both (the InfLLM/EM-LLM
recipe; the Memorizing Transformer's gate needs training, this needs none).

With ``span`` each hit also brings its neighbours (ids within ``span``: the words around a
fact, each entry once), and the first ``sink`` tokens of the conversation stay in attention
for good once they leave the window (attention sinks), without being written to the bank.

Positions. The window keeps its true relative positions. Retrieved entries are placed just
before the window, in their original order (entry ``r`` of the ``n`` retrieved, sorted by true
position, sits at ``window_start - n + r``), and the sinks before them at 0.., so a later
statement still reads as later and no distance exceeds ``sink + n + window + block`` whatever
the conversation's length: the model never sees a position outside its trained range. Each
row is computed in a frame shifted so its first position is 0 (RoPE is relative: a shift
changes nothing but rounding).

**Exact mode** (``exact=True``) gives retrieved entries their true positions and should be
run with every layer a memory layer and ``k`` at least the history: it then reproduces full
causal attention (tested to 1e-4 against :meth:`LlamaModel.forward`), which is how the
retrieval path is verified.

Functions here run on the engine's worker thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from agent_runtime.errors import ConfigError
from agent_runtime.models.base import add_mass, write_memories
from agent_runtime.models.llama.model import LlamaModel
from memory import MemoryBank

__all__ = ["LlamaState", "MemoryPlan", "forward_rows"]


@dataclass(frozen=True)
class MemoryPlan:
    """How a pretrained decoder uses its kNN memory (see the module docstring). Serving builds
    it from ``engine.memory_*`` (:class:`~agent_runtime.config.EngineConfig` holds the served
    defaults: k 4 with 16 neighbours each side); the defaults here are the plain retrieval."""

    layers: tuple[int, ...]
    """Memory layers (0-based); the others attend to their window only."""
    window: int = 512
    """Tokens every layer always attends to (at least; up to ``window + block``)."""
    block: int = 64
    """Tokens moved from the window to the bank at once (``window`` is a multiple of it)."""
    k: int = 32
    """Entries retrieved per query head and token at each memory layer."""
    exact: bool = False
    """Retrieved entries at their true positions (verification; see the module docstring)."""
    span: int = 0
    """Each retrieved entry comes with its neighbours within ``span`` tokens (a fact with the
    words around it, in order: InfLLM retrieves blocks); ``k * (2 * span + 1)`` entries per head."""
    sink: int = 0
    """The conversation's first tokens, attended by every query after they leave the window
    (attention sinks: StreamingLLM, InfLLM's initial tokens); not written to the bank."""

    def validate(self, num_layers: int) -> MemoryPlan:
        if self.block < 1 or self.window < self.block or self.window % self.block:
            raise ConfigError(
                "engine.memory_window",
                self.window,
                f"must be a positive multiple of engine.memory_block ({self.block})",
            )
        if self.k < 0:
            raise ConfigError("engine.memory_k", self.k, "must be >= 0")
        if self.span < 0:
            raise ConfigError("engine.memory_span", self.span, "must be >= 0")
        if self.sink < 0 or (self.exact and self.sink):
            raise ConfigError("engine.memory_sink", self.sink, "must be >= 0 (and 0 in exact mode)")
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                "engine.memory_layers",
                ",".join(map(str, self.layers)),
                f"must be distinct layer indices in 0..{num_layers - 1}",
            )
        return self


@dataclass
class LlamaState:
    """One session's decoding state: the window's pre-RoPE keys/values for every layer."""

    k: list[Tensor]  # per layer (C, kv_heads, head_dim): positions position-C .. position-1
    v: list[Tensor]
    sink_k: list[Tensor] = field(default_factory=list)  # per layer (<= plan.sink, kv, D): 0, 1, ...
    sink_v: list[Tensor] = field(default_factory=list)
    position: int = 0
    written: int = 0
    recent_ids: list[np.ndarray] = field(default_factory=list)
    protect: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    memory_stopped: str | None = None
    after_end_due: bool = False
    """The last token fed ended a turn: the template's text after a terminator comes next."""
    rotated: dict[int, tuple[Tensor, int, Tensor]] = field(default_factory=dict, repr=False)
    """Per layer: (the window tensor ``k[layer]`` it was made from, frame shift, its keys with
    RoPE applied): a derived cache, valid only while that exact tensor is the window; never saved."""

    @property
    def cached(self) -> int:
        return int(self.k[0].shape[0])


@dataclass
class _Retrieved:
    """One row's retrieval at one memory layer, shaped for attention."""

    keys: Tensor  # (kv, g, T, k, D) pre-RoPE
    values: Tensor  # (kv, g, T, k, D)
    positions: Tensor  # (kv, g, T, k) true positions
    mask: Tensor  # (kv, g, T, k)
    weights: Tensor | None = None  # set by _attend_row: the attention each entry received


def _search(
    bank: MemoryBank, q: Tensor, first: int, kv: int, k: int, span: int = 0
) -> tuple[_Retrieved | None, int]:
    """Top-k of each query head (q: (T, H, D) pre-RoPE) in parts ``first..first+kv-1``."""
    T, H, D = q.shape
    g = H // kv
    queries = q.float().reshape(T, kv, g, D).permute(1, 2, 0, 3).reshape(kv, g * T, D)
    res = bank.search_parts(queries.cpu().numpy(), k, first, span)
    assert res.keys is not None and res.positions is not None
    if not res.mask.any():
        return None, 0
    # Each row's entries in conversation order (empty slots, position -1, first): entry r of a
    # row then sits at frame position start - n + r in every row (_attend_row), one RoPE table.
    # (one flat gather per array: np.take_along_axis costs 10x more at these sizes)
    n = res.mask.shape[-1]
    order = np.argsort(res.positions, axis=-1, kind="stable")
    flat = (order + (np.arange(order.size // n) * n).reshape((*order.shape[:-1], 1))).ravel()
    positions = res.positions.reshape(-1)[flat]
    mask = res.mask.reshape(-1)[flat]
    keys = res.keys.reshape(-1, D)[flat]
    values = res.values.reshape(-1, D)[flat]
    dev, dt = q.device, q.dtype
    shape = (kv, g, T, n)
    return (
        _Retrieved(
            keys=torch.from_numpy(keys).to(dev, dt).view(*shape, D),
            values=torch.from_numpy(values).to(dev, dt).view(*shape, D),
            positions=torch.from_numpy(positions).to(dev).view(shape),
            mask=torch.from_numpy(mask).to(dev).view(shape),
        ),
        int(mask.sum()),
    )


class RopeTable:
    """cos/sin of every position a frame uses, computed once (positions repeat every layer)."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.cos = torch.zeros(0)
        self.sin = torch.zeros(0)  # sign-folded: -sin on the first half (rotate-half's minus)

    def at(self, x: Tensor, positions: Tensor, top: int | None = None) -> Tensor:
        """RoPE of x (..., D) at integer positions of shape x.shape[:-1] or broadcastable to
        it (a (k,) row of positions for x (..., k, D) is one small gather, not one per row).
        ``top``: the largest position, when the caller knows it (saves a reduction)."""
        if top is None:
            top = int(positions.max()) if positions.numel() else -1
        need = top + 1
        if need > self.cos.shape[0]:
            size = max(need, 2 * self.cos.shape[0], 1024)
            grid = torch.arange(size, device=x.device)[None]
            cos, sin = self.model.rope(grid)
            half = sin.shape[-1] // 2
            self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)
        cos, sin = self.cos[positions], self.sin[positions]
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # no negation pass over x
        return torch.addcmul(x * cos, swapped, sin)


def _append(t: Tensor, new: Tensor, spare: int) -> Tensor:
    """``torch.cat([t, new])``, written in place after ``t`` in the buffer ``t`` is a slice of
    when there is room (else a new buffer with ``spare`` free rows): a window grows by a token
    per step without copying itself.

    Only the rows after ``t`` are written, so every other view of the buffer (a checkpoint of an
    earlier window, say) keeps its contents; a view that extends past ``t`` belongs to a state
    that was rolled back to ``t`` and is discarded."""
    n = new.shape[0]
    base = t._base
    if (
        base is not None
        and base.dim() == t.dim()
        and base.shape[1:] == t.shape[1:]
        and base.dtype == new.dtype
        and base.is_contiguous()
        and t.is_contiguous()
    ):
        row = base.stride(0)
        off = (t.storage_offset() - base.storage_offset()) // row
        end = off + t.shape[0]
        if end + n <= base.shape[0]:
            base[end : end + n] = new
            return base[off : end + n]
    buf = torch.empty((t.shape[0] + n + spare, *t.shape[1:]), dtype=new.dtype, device=new.device)
    buf[: t.shape[0]] = t
    buf[t.shape[0] : t.shape[0] + n] = new
    return buf[: t.shape[0] + n]


def _scores(qg: Tensor, keys: Tensor) -> Tensor:
    """q (kv, g, T, D) . keys (S, kv, D) -> (kv, g, T, S)."""
    kv, g, T, D = qg.shape
    return (qg.reshape(kv, g * T, D) @ keys.permute(1, 2, 0)).view(kv, g, T, -1)


def _mix(p: Tensor, values: Tensor) -> Tensor:
    """weights (kv, g, T, S) . values (kv, S, D) -> (kv, g, T, D)."""
    kv, g, T, S = p.shape
    return (p.reshape(kv, g * T, S) @ values).view(kv, g, T, -1)


def _attend_row(
    rope: RopeTable,
    plan: MemoryPlan,
    state: LlamaState,
    layer: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem: _Retrieved | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of one row's T new queries (T, H, D) over its window, its new keys and its
    retrieved entries; returns (T, H, D) and the window's keys and values with the new ones
    appended (for :func:`_advance`)."""
    T, H, D = q.shape
    kv = k.shape[1]
    g = H // kv
    C = state.cached
    start = state.position - C  # true position of the window's first key
    spare = 2 * plan.block
    keys = _append(state.k[layer], k, spare)
    values = _append(state.v[layer], v, spare)
    n_mem = 0 if mem is None else mem.mask.shape[-1]
    # sinks that have left the window (the first tokens; while inside it they are window keys)
    n_sink = min(len(state.sink_k[layer]), start) if state.sink_k else 0
    # the frame: sinks at 0.., then the retrieved entries, then the window
    shift = 0 if plan.exact else max(0, start - n_mem - n_sink)
    dev = q.device
    q_pos = torch.arange(state.position, state.position + T, device=dev) - shift
    k_pos = torch.arange(start, state.position + T, device=dev) - shift
    top = state.position + T - 1 - shift  # the frame's last position (the newest key's)
    q_r = rope.at(q, q_pos[:, None], top)
    # The frame moves only when a block leaves the window, so the window's rotated keys are
    # reused step to step and only the new keys are rotated.
    hit = state.rotated.get(layer)
    if C and hit is not None and hit[0] is state.k[layer] and hit[1] == shift:
        k_r = _append(hit[2], rope.at(k, k_pos[C:, None], top), spare)
    else:
        k_r = rope.at(keys, k_pos[:, None], top)
    state.rotated[layer] = (keys, shift, k_r)  # keys becomes the window in _advance
    qg = q_r.view(T, kv, g, D).permute(1, 2, 0, 3).float()  # (kv, g, T, D)
    scale = 1.0 / math.sqrt(D)
    # (plain batched matmuls over strided views: einsum copies these layouts, 7x slower)
    win = _scores(qg, k_r.float()) * scale  # (kv, g, T, C+T)
    if T > 1:  # one query sees every key
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, C+T)
        win = win.masked_fill(~causal, float("-inf"))
    vals_win = values.float().permute(1, 0, 2)  # (kv, C+T, D)
    if n_sink:
        s_pos = torch.arange(n_sink, device=dev)
        sk = rope.at(state.sink_k[layer][:n_sink], s_pos[:, None])
        sinks = _scores(qg, sk.float()) * scale
        win = torch.cat([sinks, win], dim=-1)  # sinks always precede the queries: no mask
        vals_win = torch.cat([state.sink_v[layer][:n_sink].float().permute(1, 0, 2), vals_win], 1)
    if mem is None:
        p = torch.softmax(win, dim=-1)
        out = _mix(p, vals_win)
    else:
        if plan.exact:
            m_pos = mem.positions - shift
            m_pos = torch.where(mem.mask, m_pos, torch.zeros_like(m_pos))
        else:
            # original order (each row is sorted by position: _search), packed just before the
            # window; the same frame positions for every row (empty slots' are clamped)
            m_pos = (torch.arange(start - n_mem - shift, start - shift, device=dev)).clamp_min(0)
        mk = rope.at(mem.keys, m_pos, None if plan.exact else max(0, start - shift - 1)).float()
        # (plain products: einsum's planning costs more than these tiny contractions; one
        # query row multiplies and sums, several use the batched matmul)
        if T == 1:
            sm = (mk * qg.unsqueeze(-2)).sum(-1) * scale
        else:
            sm = (mk @ qg.unsqueeze(-1)).squeeze(-1) * scale
        sm = sm.masked_fill(~mem.mask, float("-inf"))
        p = torch.softmax(torch.cat([sm, win], dim=-1), dim=-1)
        mem.weights = p[..., :n_mem]
        out = (p[..., :n_mem].unsqueeze(-2) @ mem.values.float()).squeeze(-2)
        out = out + _mix(p[..., n_mem:], vals_win)
    return out.permute(2, 0, 1, 3).reshape(T, H, D).to(q.dtype), keys, values


def _advance(
    plan: MemoryPlan,
    state: LlamaState,
    ks: list[Tensor],
    vs: list[Tensor],
    windows: tuple[list[Tensor], list[Tensor]],
    bank: MemoryBank | None,
) -> None:
    """Take a row's grown windows (``windows``: each layer's keys and values with the new
    ``ks``/``vs`` appended); move full blocks to the bank."""
    state.k, state.v = windows
    before = state.position
    state.position += ks[0].shape[0]
    if before < plan.sink:  # the first tokens are kept as sinks
        take = min(plan.sink, state.position) - before
        if not state.sink_k:
            state.sink_k = [t[:0] for t in ks]
            state.sink_v = [t[:0] for t in vs]
        state.sink_k = [torch.cat([s, t[:take]]) for s, t in zip(state.sink_k, ks, strict=True)]
        state.sink_v = [torch.cat([s, t[:take]]) for s, t in zip(state.sink_v, vs, strict=True)]
    while state.cached >= plan.window + plan.block:
        n = plan.block
        first = state.position - state.cached
        skip = min(n, max(0, plan.sink - first))  # sinks are attended, not retrieved
        if plan.layers and skip < n:
            keys = torch.cat([state.k[i][skip:n].reshape(n - skip, -1) for i in plan.layers], 1)
            values = torch.cat([state.v[i][skip:n].reshape(n - skip, -1) for i in plan.layers], 1)
            write_memories(
                state, bank, keys.float().cpu().numpy(), values.float().cpu().numpy(), first + skip
            )
        state.k = [t[n:] for t in state.k]
        state.v = [t[n:] for t in state.v]


def _rope_table(model: LlamaModel) -> RopeTable:
    table = getattr(model, "_memory_rope", None)
    if not isinstance(table, RopeTable):
        table = RopeTable(model)
        model._memory_rope = table  # type: ignore[assignment]
    return table


@torch.no_grad()
def forward_rows(
    model: LlamaModel,
    plan: MemoryPlan,
    states: Sequence[LlamaState],
    tokens: Tensor,
    banks: Sequence[MemoryBank | None],
    *,
    every: bool = False,
    attended: list[dict[int, float]] | None = None,
    queries: list[int] | None = None,
) -> tuple[Tensor, list[int], float]:
    """Feed tokens (B, T) to B sessions (batched projections and MLPs, per-row attention and
    bank searches); returns the last logits (B, vocab) (``every``: all of them, (B, T, vocab)),
    entries retrieved per row, and the seconds spent searching. T must not cross a multiple of
    ``plan.block`` for any row. ``attended``/``queries`` (one per row), when given, collect the
    attention mass each stored position received and the query rows it is spread over."""
    B = tokens.shape[0]
    kv = model.cfg.num_kv_heads
    x = model.embed(tokens)
    retrieved = [0] * B
    searching = 0.0
    new_k: list[list[Tensor]] = [[] for _ in range(B)]
    new_v: list[list[Tensor]] = [[] for _ in range(B)]
    grown: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in range(B)]
    memory_at = {layer: i for i, layer in enumerate(plan.layers)}
    masses: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(B)]
    rope = _rope_table(model)
    for li, layer in enumerate(model.layers):
        q, k, v = layer.attention_inputs(x)
        out = torch.empty_like(q)
        for b in range(B):
            mem = None
            bank = banks[b]
            if li in memory_at and bank is not None and len(bank) and plan.k:
                began = time.perf_counter()
                mem, n = _search(bank, q[b], memory_at[li] * kv, kv, plan.k, plan.span)
                searching += time.perf_counter() - began
                retrieved[b] += n
            out[b], keys, values = _attend_row(rope, plan, states[b], li, q[b], k[b], v[b], mem)
            grown[b][0].append(keys)
            grown[b][1].append(values)
            if attended is not None and queries is not None and li in memory_at:
                queries[b] += q.shape[1] * q.shape[2]  # tokens x query heads
                if mem is not None and mem.weights is not None:  # summed once, after the step
                    masses[b].append((mem.positions.reshape(-1), mem.weights.reshape(-1)))
            new_k[b].append(k[b])
            new_v[b].append(v[b])
        x = layer.finish(x, out)
    logits = model.head(x) if every else model.head(x[:, -1:])[:, 0]
    if attended is not None:
        for b, got in enumerate(masses):
            if got:
                positions = torch.cat([g[0] for g in got]).cpu().numpy()
                add_mass(attended[b], positions, torch.cat([g[1] for g in got]).cpu().numpy())
    for b in range(B):
        _advance(plan, states[b], new_k[b], new_v[b], grown[b], banks[b])
    return logits, retrieved, searching
