"""Load the configured model: a pretrained decoder (``engine.model``, by default
``smollm2-135m-recall``), else (``--model bundled`` or ``engine.checkpoint``) a byte-model
checkpoint file, else the bundled one, else an untrained byte model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent_runtime.config import EngineConfig
from agent_runtime.errors import ConfigError
from agent_runtime.models.base import ChatModel

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(config: EngineConfig, data_dir: Path | None = None) -> ChatModel[Any]:
    """The model ``serve`` runs (torch and the family are imported here, not at package import).

    ``data_dir`` holds the cache of pulled pretrained models (``<data_dir>/models``); a
    registry name missing there is fetched once (see ``agent-runtime models pull``).
    """
    import torch

    from agent_runtime.models.byte import BUNDLED_CHECKPOINT
    from agent_runtime.models.byte.family import ByteChatModel
    from agent_runtime.models.byte.model import MemorizingTransformer, ModelConfig

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "engine.device",
            config.device,
            "CUDA is not available on this machine (torch.cuda.is_available() is false);"
            " use --engine-device cpu",
        )
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.pretrained():
        return _load_pretrained(config, data_dir or Path("agent-runtime-data"))
    path = Path(config.checkpoint) if config.checkpoint else BUNDLED_CHECKPOINT
    if path.is_file():
        model = ByteChatModel.load(path, config.device)
        log.info("model loaded: %s", model.describe())
        return model
    log.warning("no checkpoint at %s: serving an UNTRAINED model (replies are noise)", path)
    torch.manual_seed(config.seed)
    return ByteChatModel(MemorizingTransformer(ModelConfig()).to(config.device).eval())


def _load_pretrained(config: EngineConfig, data_dir: Path) -> ChatModel[Any]:
    import time

    import torch

    from agent_runtime.models.llama.family import LlamaChatModel
    from agent_runtime.models.llama.memory import MemoryPlan
    from agent_runtime.models.llama.model import LlamaModel
    from agent_runtime.models.llama.source import load_pretrained

    started = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    source = load_pretrained(config.pretrained(), data_dir, dtype=dtype)
    model = LlamaModel.from_state_dict(source.config, source.state_dict, dtype=dtype)
    model = model.to(config.device)
    vector = config.vector_weights()
    model.use_vector_weights(None if vector is None else getattr(torch, vector))
    plan = MemoryPlan(
        layers=config.memory_layer_indices(source.config.num_layers),
        window=config.memory_window,
        block=config.memory_block,
        k=config.memory_k,
        exact=config.memory_exact,
        sink=0 if config.memory_exact else config.memory_sink,
        span=config.memory_span,
    )
    chat = LlamaChatModel(
        model,
        source.tokenizer,
        plan,
        source=source.description,
        weights_id=source.weights_id,
        card_note=source.card_note,
    )
    log.info("model loaded in %.1fs: %s", time.perf_counter() - started, chat.describe())
    return chat
