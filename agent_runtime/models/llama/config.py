"""Configuration of a Llama-architecture decoder (Llama, Qwen2, Mistral), read from and written
to a Hugging Face ``config.json``.

The three families share one network and differ only in where the linear layers carry a bias,
which ``transformers`` hard-codes per model type rather than reading from the config:

* ``llama``: ``attention_bias`` puts a bias on q, k, v *and* o; ``mlp_bias`` on gate, up, down.
* ``qwen2``: q, k, v always have a bias, o never; the MLP never (the config has no such keys).
* ``mistral``: no bias anywhere, whatever the config says.

:class:`LlamaConfig` stores the q/k/v bias as ``attention_bias`` and derives the o bias
(:attr:`LlamaConfig.o_proj_bias`), and :meth:`LlamaConfig.validate` refuses combinations that
``transformers`` cannot build, so a config always describes a network with a reference.

Sliding-window attention (Mistral v0.1's ``sliding_window``, Qwen2's ``use_sliding_window``) is
recorded in :attr:`LlamaConfig.sliding_window` but not applied: the model attends to the full
causal context, which equals the reference exactly while a sequence fits in the window. The
runtime can cap its context there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agent_runtime.errors import CheckpointError

__all__ = ["MODEL_TYPES", "LlamaConfig", "RopeScaling"]

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}

# What ``transformers`` assumes for a key missing from config.json, per model type (the class
# defaults of LlamaConfig / Qwen2Config / MistralConfig), so a sparse file reads the same here.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "num_key_value_heads": 32,
    },
    "mistral": {
        "max_position_embeddings": 4096 * 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
}


@dataclass(frozen=True)
class RopeScaling:
    """Rescaling of the RoPE inverse frequencies for long context.

    ``linear`` divides every frequency by ``factor`` (position interpolation). ``llama3``
    (Llama 3.1+) divides only the low frequencies (wavelength above
    ``original_max_position_embeddings / low_freq_factor``) and blends smoothly up to
    ``original_max_position_embeddings / high_freq_factor``; its three extra fields are required.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and hyper-parameters of a Llama-architecture decoder; invalid values never construct.

    ``head_dim`` is explicit because it may differ from ``hidden_size // num_heads`` (Mistral
    Nemo, Qwen3-style configs). ``eos_token_ids`` is a tuple: chat models stop on several.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v projections; see o_proj_bias for o
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # recorded, not applied (module docstring)
    model_type: str = "llama"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def o_proj_bias(self) -> bool:
        """Only Llama's ``attention_bias`` reaches the output projection (Qwen2 hard-codes none)."""
        return self.attention_bias and self.model_type == "llama"

    def validate(self) -> None:
        """Raise :class:`CheckpointError` naming the first field that no reference network has."""
        if self.model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"model_type={self.model_type!r} is not supported (expected one of {MODEL_TYPES})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads != 0:
            raise CheckpointError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise CheckpointError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        _check_positive_number("rms_norm_eps", self.rms_norm_eps)
        _check_positive_number("rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"{name}={getattr(self, name)!r} must be a boolean")
        if self.model_type == "qwen2" and not self.attention_bias:
            raise CheckpointError("attention_bias=False: qwen2 always has q/k/v biases")
        if self.model_type == "mistral" and self.attention_bias:
            raise CheckpointError("attention_bias=True: mistral has no attention biases")
        if self.model_type != "llama" and self.mlp_bias:
            raise CheckpointError(f"mlp_bias=True: {self.model_type} has no MLP biases")
        ids = (self.bos_token_id, *self.eos_token_ids)
        if not isinstance(self.eos_token_ids, tuple) or any(
            i is not None and (type(i) is not int or i < 0) for i in ids
        ):
            raise CheckpointError(
                f"bos_token_id={self.bos_token_id!r}, eos_token_ids={self.eos_token_ids!r}:"
                " token ids must be non-negative integers (eos_token_ids a tuple)"
            )
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Read a ``config.json`` dict of model type llama, qwen2 or mistral.

        Accepts both RoPE spellings: ``rope_parameters`` (``{"rope_type", "rope_theta", ...}``,
        written by transformers 5) and the older top-level ``rope_theta`` + ``rope_scaling``
        (whose type key is ``rope_type`` or, older still, ``type``).
        """
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"model_type={model_type!r} is not supported (expected one of {MODEL_TYPES})"
            )
        defaults = _DEFAULTS[model_type]

        def get(key: str, default: Any = None) -> Any:
            # Presence, not truthiness: an explicit null (bos_token_id, sliding_window) is kept.
            return d[key] if key in d else defaults.get(key, default)

        act = get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"hidden_act={act!r} is not supported (expected 'silu')")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            _check_positive_int(key, d.get(key))
        heads = d["num_attention_heads"]
        # Checked under their config.json names, before validate() would name our fields.
        kv_heads = _check_positive_int("num_key_value_heads", get("num_key_value_heads") or heads)
        head_dim = _check_positive_int("head_dim", get("head_dim") or d["hidden_size"] // heads)
        max_positions = _check_positive_int(
            "max_position_embeddings", get("max_position_embeddings")
        )
        theta, scaling = _read_rope(d, max_positions)
        if model_type == "qwen2":
            attention_bias, mlp_bias = True, False
            window = d.get("sliding_window", 4096) if d.get("use_sliding_window") else None
        elif model_type == "mistral":
            attention_bias, mlp_bias = False, False
            window = get("sliding_window")
        else:
            attention_bias, mlp_bias = get("attention_bias", False), get("mlp_bias", False)
            window = None
        eos = get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=_as_float(get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=get("tie_word_embeddings", False),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,),
            sliding_window=window,
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict; :meth:`from_hf` reads it back to an equal config.

        RoPE is written in both spellings, so transformers 4 (``rope_theta``/``rope_scaling``)
        and 5 (``rope_parameters``) read the same frequencies.
        """
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update({k: v for k, v in asdict(self.rope_scaling).items() if v is not None})
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen2":
            # transformers windows only layers >= max_window_layers; 0 windows all of them, the
            # conservative reading of a recorded window.
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0
        else:
            d["sliding_window"] = self.sliding_window
        return d

    def fingerprint(self) -> str:
        """Short hash of the canonical JSON of every field: equal configs, equal fingerprints."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _check_positive_int(name: str, value: Any) -> int:
    if type(value) is not int or value <= 0:
        raise CheckpointError(f"{name}={value!r} must be a positive integer")
    return value


def _as_float(value: Any) -> Any:
    """JSON ints where floats belong (``"rope_theta": 500000``) become floats, so that equal
    configs have equal fingerprints; anything else is left for validate() to name."""
    return float(value) if type(value) is int else value


def _check_positive_number(name: str, value: Any) -> None:
    if type(value) not in (int, float) or value <= 0:
        raise CheckpointError(f"{name}={value!r} must be a positive number")


def _read_rope(d: Mapping[str, Any], max_positions: Any) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either RoPE spelling; see :meth:`LlamaConfig.from_hf`."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError(f"rope_parameters={params!r} must be an object")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise CheckpointError(
            f"rope_parameters={dict(params)!r}: per-layer-type RoPE is not supported"
        )
    theta = _as_float(params.get("rope_theta", d.get("rope_theta")) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"rope_type={rope_type!r} is not supported (expected default or one of {ROPE_TYPES})"
        )
    if "factor" not in params:
        raise CheckpointError(f"rope_parameters.factor is missing for rope_type={rope_type!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", _as_float(params["factor"]))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise CheckpointError(f"rope_parameters.{key} is missing for rope_type='llama3'")
    # transformers' fallbacks: a top-level value (Phi-3 style) wins, then max_position_embeddings.
    original = d.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", max_positions
    )
    return theta, RopeScaling(
        "llama3",
        _as_float(params["factor"]),
        _as_float(params["low_freq_factor"]),
        _as_float(params["high_freq_factor"]),
        original,
    )


def _validate_rope_scaling(s: RopeScaling) -> None:
    if s.rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"rope_scaling.rope_type={s.rope_type!r} is not supported (expected one of {ROPE_TYPES})"
        )
    _check_positive_number("rope_scaling.factor", s.factor)
    if s.rope_type == "llama3":
        _check_positive_number("rope_scaling.low_freq_factor", s.low_freq_factor)
        _check_positive_number("rope_scaling.high_freq_factor", s.high_freq_factor)
        _check_positive_int(
            "rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings
        )
        assert s.low_freq_factor is not None and s.high_freq_factor is not None
        if s.high_freq_factor <= s.low_freq_factor:
            raise CheckpointError(
                f"rope_scaling.high_freq_factor={s.high_freq_factor} must exceed"
                f" low_freq_factor={s.low_freq_factor}"
            )
