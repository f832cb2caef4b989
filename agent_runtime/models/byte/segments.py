"""Segment-wise forward over long documents (training and evaluation).

A document is processed in segments of W tokens. Each segment attends to the previous segment
through an XL-style cache (detached) and retrieves from a per-document memory holding every
earlier segment's memory-layer keys/values (exact top-k in torch, the same ranking FAISS's exact
search gives). This is the reference that incremental decoding must match.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from agent_runtime.models.byte.model import KVCache, MemorizingTransformer, ModelOutput, Retrieval

__all__ = ["SegmentStep", "TensorMemory", "iter_segments"]


class TensorMemory:
    """A batch of per-document memories as tensors; exact top-k retrieval, no gradient into it.

    ``capacity`` bounds each document's memory (oldest entries dropped first), mirroring a bank.
    """

    def __init__(self, batch: int, dim: int, device: torch.device | str, capacity: int = 0) -> None:
        self.keys = torch.zeros(batch, 0, dim, device=device)
        self.values = torch.zeros(batch, 0, dim, device=device)
        self.capacity = capacity

    def add(self, keys: Tensor, values: Tensor) -> None:
        self.keys = torch.cat([self.keys, keys.detach()], 1)
        self.values = torch.cat([self.values, values.detach()], 1)
        if self.capacity and self.keys.shape[1] > self.capacity:
            self.keys = self.keys[:, -self.capacity :]
            self.values = self.values[:, -self.capacity :]

    def clear(self) -> None:
        self.keys = self.keys[:, :0]
        self.values = self.values[:, :0]

    def __len__(self) -> int:
        return int(self.keys.shape[1])

    def __call__(self, queries: Tensor, k: int) -> Retrieval:
        B, H, T, hs = queries.shape
        M = self.keys.shape[1]
        if M == 0:
            z = queries.new_zeros(B, H, T, k)
            return Retrieval(z, queries.new_zeros(B, H, T, k, hs), z.bool())
        all_scores = queries @ self.keys[:, None].transpose(
            -1, -2
        )  # (B, H, T, M), grad w.r.t. queries only
        kk = min(k, M)
        scores, idx = all_scores.topk(kk, dim=-1)  # (B, H, T, kk)
        values = torch.gather(
            self.values[:, None, None].expand(B, H, T, M, hs),
            3,
            idx[..., None].expand(B, H, T, kk, hs),
        )
        mask = torch.ones_like(scores, dtype=torch.bool)
        if kk < k:
            scores = F.pad(scores, (0, k - kk))
            values = F.pad(values, (0, 0, 0, k - kk))
            mask = F.pad(mask, (0, k - kk))
        return Retrieval(scores, values, mask)


@dataclass
class SegmentStep:
    index: int
    output: ModelOutput
    targets: Tensor | None


def iter_segments(
    model: MemorizingTransformer,
    tokens: Tensor,
    memory: TensorMemory | None,
    *,
    with_targets: bool = False,
) -> Iterator[SegmentStep]:
    """Run ``tokens`` (B, L) through ``model`` segment by segment, yielding each segment's output.

    Between segments the XL cache is rolled and the segment's memory keys/values are added to
    ``memory`` (None disables memory: local attention only). The caller may backpropagate each
    segment's loss before asking for the next (truncated backpropagation, as in the paper).
    """
    W = model.cfg.window
    B = tokens.shape[0]
    inputs = tokens[:, :-1] if with_targets else tokens
    cache: KVCache | None = None
    for j, start in enumerate(range(0, inputs.shape[1], W)):
        idx = inputs[:, start : start + W]
        pos = torch.arange(start, start + idx.shape[1], device=tokens.device).expand(B, -1)
        out = model(idx, pos, cache, memory)
        targets = tokens[:, start + 1 : start + 1 + idx.shape[1]] if with_targets else None
        yield SegmentStep(j, out, targets)
        cache = KVCache(
            [k.detach() for k in out.cache.k],
            [v.detach() for v in out.cache.v],
            out.cache.pos,
            out.cache.ids,
        )
        if memory is not None:
            memory.add(out.mem_keys, out.mem_values)
