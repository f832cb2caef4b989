"""The bundled byte-level Memorizing Transformer: model, tokenizer, incremental generation.

``model.py`` (the network and its checkpoints), ``tokenizer.py`` (bytes + role tokens),
``generation.py`` (per-session state, chunked prefill and batched decode with the bank),
``segments.py`` (training-time segments with an XL cache), ``family.py`` (the model seam).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_CHECKPOINT"]

BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "chat.pt"
"""The checkpoint ``agent-runtime serve`` uses by default (see docs/model-card.md)."""
