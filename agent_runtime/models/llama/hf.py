"""Reading and writing a Hugging Face model directory: ``config.json`` plus safetensors weights.

A directory holds either ``model.safetensors`` or ``model.safetensors.index.json`` with the
shards it names. Every failure is a :class:`CheckpointError` naming the file, because the
operator's fix is always "replace that file". Tokenizer files are not read here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from agent_runtime.errors import CheckpointError
from agent_runtime.files import atomic_write
from agent_runtime.models.llama.config import LlamaConfig
from agent_runtime.models.llama.model import expected_shapes

__all__ = ["CONFIG_FILE", "INDEX_FILE", "WEIGHTS_FILE", "load_hf_dir", "save_hf_dir"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers that old transformers versions saved; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(
    path: Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaConfig, dict[str, Tensor]]:
    """The config and the tensors (HF names, floating-point ones cast to ``dtype``) of a directory.

    Tensors are cast one at a time as they are read, so peak memory stays near the model's
    size in ``dtype``. Names are not checked against the config here;
    :meth:`LlamaModel.from_state_dict` does that.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    cfg_path = path / CONFIG_FILE
    try:
        cfg = LlamaConfig.from_hf(_read_json(cfg_path))
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc
    if (path / WEIGHTS_FILE).is_file():
        return cfg, _read_shard(path / WEIGHTS_FILE, None, dtype)
    if not (path / INDEX_FILE).is_file():
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")
    sd: dict[str, Tensor] = {}
    for shard, names in _read_index(path / INDEX_FILE).items():
        sd.update(_read_shard(shard, names, dtype))
    return cfg, sd


def save_hf_dir(path: Path, cfg: LlamaConfig, sd: Mapping[str, Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` that :func:`load_hf_dir` and
    ``transformers`` read back.

    ``sd`` must hold exactly the tensors ``cfg`` needs (a mismatch is a :class:`CheckpointError`
    before anything is written). Each file is replaced atomically; the weights go first, so a
    directory whose config was replaced has its weights.
    """
    path = Path(path)
    expected = expected_shapes(cfg)
    wrong = sorted(set(expected) ^ set(sd)) or [
        n for n, shape in expected.items() if tuple(sd[n].shape) != shape
    ]
    if wrong:
        raise CheckpointError(f"state dict does not match the config: {', '.join(wrong[:5])}")
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS_FILE
    tensors = {n: sd[n].detach().contiguous().cpu() for n in expected}
    # one durable write path for every file we own (temp file, fsync, rename, directory fsync)
    atomic_write(weights, save(tensors, metadata={"format": "pt"}), mode=0o644)
    atomic_write(path / CONFIG_FILE, (json.dumps(cfg.to_hf(), indent=2) + "\n").encode())


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(index: Path) -> dict[Path, set[str]]:
    """Shard file -> the tensor names the index assigns to it."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    shards: dict[Path, set[str]] = {}
    for name, file in weight_map.items():
        shards.setdefault(index.parent / file, set()).add(name)
    return shards


def _read_shard(file: Path, names: set[str] | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one safetensors file; with ``names``, exactly those must be in it."""
    out: dict[str, Tensor] = {}
    try:
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            if names is not None and keys != names:
                raise CheckpointError(
                    f"{file}: holds {len(keys)} tensors, the index assigns it {len(names)}"
                    f" (differing: {', '.join(sorted(keys ^ names)[:5])})"
                )
            for key in sorted(keys):
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if t.is_floating_point() else t
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file}: unreadable safetensors file: {exc}") from exc
    return out
