"""LoRA adapters as files: what ``agent-runtime train --base`` writes beside the merged model it
exports, and what a registered fine-tune ships inside this package (a few MB instead of the
model's hundreds).

An adapter file (``adapter.safetensors``) holds, for each adapted linear layer ``NAME`` (a
Hugging Face weight name without ``.weight``, e.g. ``model.layers.3.self_attn.q_proj``), the two
factors ``NAME.lora_a`` (rank x in) and ``NAME.lora_b`` (out x rank); its metadata records the
rank, alpha and the weights id of the base it was trained on. :func:`merge_adapter` folds it
into a base state dict: ``W + (alpha / rank) * B @ A``, computed in float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.files import atomic_write

__all__ = ["ADAPTER_FILE", "Adapter", "merge_adapter", "read_adapter", "write_adapter"]

ADAPTER_FILE = "adapter.safetensors"
_PARTS = ("lora_a", "lora_b")


@dataclass(frozen=True)
class Adapter:
    """LoRA factors by layer name (``{name: (A, B)}``), their scale's terms, and the base's
    weights id (``""`` when unknown)."""

    factors: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float
    base_weights: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def write_adapter(path: Path, adapter: Adapter) -> None:
    """Write ``adapter`` to ``path`` atomically, factors in float32."""
    tensors = {
        f"{name}.{part}": t.detach().to(torch.float32).contiguous().cpu()
        for name, pair in adapter.factors.items()
        for part, t in zip(_PARTS, pair, strict=True)
    }
    meta = {"rank": str(adapter.rank), "alpha": repr(adapter.alpha), "base": adapter.base_weights}
    blob = save(tensors, metadata={"format": "pt", "lora": json.dumps(meta)})
    atomic_write(Path(path), blob, mode=0o644)


def read_adapter(path: Path) -> Adapter:
    """The adapter in ``path``; a missing, unreadable or inconsistent file is a
    :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora", ""))
            names = f.keys()
            tensors = {key: f.get_tensor(key) for key in names}
        rank, alpha, base = int(meta["rank"]), float(meta["alpha"]), str(meta.get("base", ""))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not a LoRA adapter (no rank/alpha metadata)") from None
    names = {key.rpartition(".")[0] for key in tensors}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name in sorted(names):
        a, b = tensors.get(f"{name}.lora_a"), tensors.get(f"{name}.lora_b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank:
            raise CheckpointError(
                f"{path}: {name} needs lora_a (rank x in) and lora_b (out x rank)"
            )
        if b.shape[1] != rank:
            raise CheckpointError(f"{path}: {name}.lora_b has rank {b.shape[1]}, expected {rank}")
        factors[name] = (a, b)
    if not factors or rank <= 0:
        raise CheckpointError(f"{path}: an adapter with no layers")
    return Adapter(factors, rank, alpha, base)


@torch.no_grad()
def merge_adapter(sd: Mapping[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    """A copy of state dict ``sd`` with ``adapter`` merged into the weights it adapts (each in
    its own dtype; the product is taken in float32). A layer the base lacks, or a factor whose
    shape does not fit it, is a :class:`CheckpointError`."""
    out = dict(sd)
    for name, (a, b) in adapter.factors.items():
        weight = sd.get(f"{name}.weight")
        if weight is None:
            raise CheckpointError(f"the adapter adapts {name}, which the base model does not have")
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(
                f"the adapter's {name} is {b.shape[0]}x{a.shape[1]}, the base's weight"
                f" {tuple(weight.shape)}"
            )
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * adapter.scale
        out[f"{name}.weight"] = (weight.to(torch.float32) + delta.to(weight.device)).to(
            weight.dtype
        )
    return out
