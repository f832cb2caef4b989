"""Load the configured model: a checkpoint file, else the bundled one, else an untrained model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent_runtime.config import EngineConfig
from agent_runtime.errors import ConfigError
from agent_runtime.models.base import ChatModel

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(config: EngineConfig) -> ChatModel[Any]:
    """The model ``serve`` runs (torch and the family are imported here, not at package import)."""
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
    path = Path(config.checkpoint) if config.checkpoint else BUNDLED_CHECKPOINT
    if path.is_file():
        model = ByteChatModel.load(path, config.device)
        log.info("model loaded: %s", model.describe())
        return model
    log.warning("no checkpoint at %s: serving an UNTRAINED model (replies are noise)", path)
    torch.manual_seed(config.seed)
    return ByteChatModel(MemorizingTransformer(ModelConfig()).to(config.device).eval())
