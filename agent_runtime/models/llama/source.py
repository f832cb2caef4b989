"""Loading a pretrained model from whatever ``--model`` names: a registered model, a ``.gguf``
file or a Hugging Face directory, into one :class:`PretrainedSource`.

The three differ only in where config, tensors and tokenizer are read from; what the engine
builds from them is the same. A registered model loads from its converted cache (safetensors,
fast); a ``.gguf`` is dequantised on every load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.gguf_file import read_gguf
from agent_runtime.models.llama.hf import INDEX_FILE, WEIGHTS_FILE, load_hf_dir
from agent_runtime.models.llama.registry import SOURCE_FILE, resolve, sha256_of
from agent_runtime.models.llama.tokenizer import ChatTokenizer

__all__ = ["FINETUNE_FILE", "PretrainedSource", "load_pretrained"]


@dataclass(frozen=True)
class PretrainedSource:
    """A model's config, HF-named state dict and tokenizer, and what they were read from.

    ``weights_id`` is the first 12 hex digits of the SHA-256 of the file the weights came
    from: the GGUF (a registered model's cache records the one it was converted from, so
    both load paths of one file agree), or for another directory its ``model.safetensors``
    (the index of a sharded one); for a registered fine-tune, which no single file holds, the
    first 12 hex digits of the SHA-256 of its GGUF's and its adapter's hashes together.
    ``description`` adds the model's name, for logs and reports.
    Hashing reads the whole file once per load (about 1 s per GB) unless the cache recorded it.
    """

    config: LlamaConfig
    state_dict: dict[str, Tensor]
    tokenizer: ChatTokenizer
    description: str
    weights_id: str
    card_note: str = ""
    """A sentence for the model card from the directory's ``finetune.json`` (written by
    ``agent-runtime train --base``), empty otherwise."""


def load_pretrained(
    spec: str, data_dir: Path, dtype: torch.dtype = torch.float32, fetch: bool = True
) -> PretrainedSource:
    """The model ``spec`` names (see :func:`~agent_runtime.models.llama.registry.resolve`),
    tensors in ``dtype``; a registered model missing from ``data_dir`` is pulled if ``fetch``."""
    path = resolve(spec, data_dir, fetch=fetch)
    if path.is_file():
        config, sd, tokenizer = read_gguf(path, dtype=dtype)
        try:
            cfg = LlamaConfig.from_hf(config)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        weights_id = sha256_of(path)[:12]
        return PretrainedSource(cfg, sd, tokenizer, f"{path.name} sha256:{weights_id}", weights_id)
    cfg, sd = load_hf_dir(path, dtype)
    tokenizer = ChatTokenizer.from_dir(path)
    name, weights_id = _identify_dir(path)
    description = f"{name} sha256:{weights_id}"
    return PretrainedSource(cfg, sd, tokenizer, description, weights_id, _card_note(path))


FINETUNE_FILE = "finetune.json"


def _card_note(path: Path) -> str:
    """The ``card`` sentence of a fine-tuned directory's ``finetune.json``, if any."""
    try:
        note = json.loads((path / FINETUNE_FILE).read_text(encoding="utf-8")).get("card", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return note if isinstance(note, str) else ""


def _identify_dir(path: Path) -> tuple[str, str]:
    """(name, weights id): a converted registry model by its recorded origin, another
    directory by its weights file."""
    try:
        source = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
        name = f"{source['name']} ({source['package']}=={source['version']})"
        if source.get("adapter"):
            name += f" + {source['adapter']}"
        return name, str(source.get("weights_id") or source["sha256"])[:12]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    weights = path / WEIGHTS_FILE
    if not weights.is_file():  # sharded: the index names every shard
        weights = path / INDEX_FILE
    return f"{path.name}/{weights.name}", sha256_of(weights)[:12]
