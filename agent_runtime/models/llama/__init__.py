"""Pretrained Llama-architecture decoders (Llama, Qwen2, Mistral) behind the model seam.

``config.py`` (:class:`LlamaConfig`, read from a Hugging Face ``config.json``), ``model.py``
(the network in plain PyTorch, cut into pieces a memory-augmented attention can reuse, with
HF parameter names), ``hf.py`` (loading and saving a safetensors model directory).
"""

from __future__ import annotations

__all__: list[str] = []
