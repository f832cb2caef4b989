"""``agent-runtime train --base NAME``: a short, resumable LoRA fine-tune of a pretrained chat
model that teaches it to answer from context in its own chat template.

The base model (a registry name, a ``.gguf`` or a model directory, as ``serve --model`` takes)
stays frozen; low-rank adapters (LoRA: ``W x + (alpha/r) B A x``, ``B`` zero at the start, so
the adapted model starts as the base) are trained on the attention projections of every layer
(``--lora-targets``, default ``q,k,v,o``) on the conversations of
:mod:`agent_runtime.training.chat_data`: facts stated, real dialogue, then asked in other words,
the loss on the answer tokens only. Attention is the plain causal attention of the model over
``--seq-len`` tokens (the fact in context); the memory at serving time brings a far fact back
next to the question, which is what the fine-tune teaches the model to read.

``--out DIR`` receives, at the end of every invocation, a Hugging Face directory with the
adapters merged into the weights (``serve --model DIR`` and ``eval recall --model DIR`` take
it; serving needs no LoRA code), the tokenizer and chat template, ``finetune.json`` (settings,
figures, the card sentence the server shows) and ``MODEL_CARD.md``. The training state
(``train_state.pt``: adapters, optimizer, RNG, step) is replaced atomically every
``--checkpoint-every`` steps and on SIGINT/SIGTERM; after any stop, even ``kill -9``, the same
command with ``--resume`` continues where the last checkpoint left off, with exactly the
batches and updates an uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agent_runtime.config import positive_int
from agent_runtime.errors import AgentRuntimeError, CheckpointError
from agent_runtime.files import atomic_write
from agent_runtime.models.llama.adapter import ADAPTER_FILE, Adapter, merge_adapter, write_adapter
from agent_runtime.models.llama.family import LlamaChatModel
from agent_runtime.models.llama.hf import save_hf_dir
from agent_runtime.models.llama.memory import MemoryPlan
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.registry import REGISTRY, UnknownModelError, default_data_dir
from agent_runtime.models.llama.source import FINETUNE_FILE, PretrainedSource, load_pretrained
from agent_runtime.training.chat_data import (
    RecallConversations,
    chitchat_conversations,
    read_filler,
)

__all__ = [
    "TARGETS",
    "LoRALinear",
    "LoraConfig",
    "add_lora",
    "answer_loss",
    "as_adapter",
    "base_only",
    "finetune",
    "main",
    "merged_state_dict",
]

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CARD_FILE = "MODEL_CARD.md"
_STATE_VERSION = 1

# --lora-targets names -> the linear layer inside each decoder layer
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


# ---------------------------------------------------------------------------------------------
# LoRA


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` around a frozen ``nn.Linear``; ``B`` starts at
    zero, so the wrapped layer starts equal to ``base``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.active = True  # False: the frozen base alone (see base_only)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and peft do
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.base(x)
        if not self.active:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


@contextmanager
def base_only(adapters: Mapping[str, LoRALinear]) -> Iterator[None]:
    """The adapters switched off: the model is the frozen base while inside."""
    for a in adapters.values():
        a.active = False
    try:
        yield
    finally:
        for a in adapters.values():
            a.active = True


def add_lora(model: LlamaModel, cfg: LoraConfig) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap the target linears of every layer in place; returns the
    adapters by the HF name of the layer they wrap (``model.layers.3.self_attn.q_proj``)."""
    unknown = [t for t in cfg.targets if t not in TARGETS]
    if unknown or not cfg.targets:
        raise AgentRuntimeError(
            f"--lora-targets {','.join(cfg.targets)}: choose from {','.join(TARGETS)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, LoRALinear] = {}
    for i, layer in enumerate(model.layers):
        for target in cfg.targets:
            parent_name, _, attr = TARGETS[target].partition(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise AgentRuntimeError(f"layer {i} {TARGETS[target]} already has an adapter")
            adapter = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout)
            setattr(parent, attr, adapter)
            adapters[f"model.layers.{i}.{TARGETS[target]}"] = adapter
    return adapters


def adapter_tensors(adapters: Mapping[str, LoRALinear]) -> dict[str, Tensor]:
    return {
        f"{name}.{part}": getattr(a, part).detach().cpu().clone()
        for name, a in adapters.items()
        for part in ("lora_a", "lora_b")
    }


def load_adapter_tensors(adapters: Mapping[str, LoRALinear], tensors: Mapping[str, Tensor]) -> None:
    expected = {f"{n}.{p}" for n in adapters for p in ("lora_a", "lora_b")}
    if set(tensors) != expected:
        raise CheckpointError("the training state's adapters do not match --lora-targets")
    with torch.no_grad():
        for name, a in adapters.items():
            for part in ("lora_a", "lora_b"):
                t, p = tensors[f"{name}.{part}"], getattr(a, part)
                if t.shape != p.shape:
                    raise CheckpointError(
                        f"adapter {name}.{part} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(t)


def as_adapter(adapters: Mapping[str, LoRALinear], base_weights: str = "") -> Adapter:
    """The trained factors as an :class:`Adapter` (what ``OUT/adapter.safetensors`` holds)."""
    factors = {n: (a.lora_a.detach().cpu(), a.lora_b.detach().cpu()) for n, a in adapters.items()}
    first = next(iter(adapters.values()))
    return Adapter(factors, first.rank, first.alpha, base_weights)


def merged_state_dict(model: LlamaModel, adapters: Mapping[str, LoRALinear]) -> dict[str, Tensor]:
    """The adapted model's weights under the base's HF names, adapters merged: what
    :meth:`LlamaModel.from_state_dict` and :func:`save_hf_dir` take."""
    base = {
        name.replace(".base.", "."): t.detach()
        for name, t in model.state_dict().items()
        if ".lora_" not in name
    }
    return merge_adapter(base, as_adapter(adapters))


# ---------------------------------------------------------------------------------------------
# The loss


def answer_loss(
    model: LlamaModel,
    tokens: Tensor,
    weights: Tensor,
    *,
    keep_base: float = 0.0,
    adapters: Mapping[str, LoRALinear] | None = None,
) -> Tensor:
    """Weighted mean cross-entropy of the tokens with a positive weight, each predicted from
    those before it with plain causal attention.

    With ``keep_base`` > 0 (and the ``adapters``), plus ``keep_base`` times the mean KL
    divergence from the frozen base's next-token distribution to the adapted model's at every
    other position (the system prompt, the filler dialogue, the facts and questions, and the
    end-of-text padding of an example shorter than the sequence, a few tokens at most): the
    fine-tune learns to answer from context while its ordinary chat stays the base's, instead
    of drifting toward the answer form (or toward the filler corpus's style, as a loss on the
    filler replies does).
    """
    w = weights[:, 1:]
    chosen = w > 0
    x = _hidden(model, tokens)[:, :-1]
    ce = F.cross_entropy(model.head(x[chosen]).float(), tokens[:, 1:][chosen], reduction="none")
    picked = w[chosen]
    loss = (ce * picked).sum() / picked.sum().clamp(min=1e-9)
    if keep_base > 0 and adapters:
        rest = ~chosen
        with torch.no_grad(), base_only(adapters):
            target = F.log_softmax(model.head(_hidden(model, tokens)[:, :-1][rest]).float(), -1)
        pred = F.log_softmax(model.head(x[rest]).float(), -1)
        kl = F.kl_div(pred, target, log_target=True, reduction="batchmean")
        loss = loss + keep_base * kl
    return loss


def _hidden(model: LlamaModel, tokens: Tensor) -> Tensor:
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device).expand(B, T)
    cos, sin = model.rope(positions)
    x = model.embed(tokens)
    for layer in model.layers:
        x = layer(x, cos, sin)
    return x


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# The command


def _lora_targets(text: str) -> tuple[str, ...]:
    targets = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of {', '.join(TARGETS)}"
        )
    return targets


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime train --base",
        description=__doc__.splitlines()[0],
        epilog="Without --base, `agent-runtime train` trains the bundled byte model (--run-dir).",
    )
    add = parser.add_argument
    add("--base", required=True, help="registry name, .gguf file or model directory to tune")
    add("--out", type=Path, required=True, help="output model directory (and training state)")
    add("--steps", type=positive_int, default=200, help="total optimizer steps (default 200)")
    add("--seq-len", type=positive_int, default=512, help="tokens per training conversation")
    add("--batch", type=positive_int, default=2, help="conversations per step")
    add("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    add("--warmup", type=_non_negative_int, default=10, help="warm-up steps")
    add("--lora-rank", type=positive_int, default=8)
    add("--lora-alpha", type=_positive_float, default=16.0)
    add("--lora-dropout", type=_unit_float, default=0.0)
    add(
        "--lora-targets",
        type=_lora_targets,
        default=("q", "k", "v", "o"),
        help=f"projections to adapt in every layer, from {','.join(TARGETS)} (default q,k,v,o)",
    )
    add(
        "--not-told",
        type=_unit_float,
        default=0.2,
        help="share of examples with a question about a fact never stated",
    )
    add(
        "--filler-weight",
        type=_unit_float,
        default=0.0,
        help="loss weight of the filler dialogue's replies (0: answers only)",
    )
    add(
        "--keep-base",
        type=_non_negative_float,
        default=0.0,
        help="weight of the KL divergence to the frozen base at non-answer positions"
        " (keeps its ordinary chat; 0: off)",
    )
    add("--filler", type=Path, default=None, help="filler dialogue file (default: chitchat corpus)")
    add("--seed", type=int, default=0)
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add("--threads", type=_non_negative_int, default=0, help="torch threads (0 = default)")
    add("--checkpoint-every", type=positive_int, default=10)
    add("--resume", action="store_true", help="continue from OUT/train_state.pt if it exists")
    add(
        "--stop-after",
        type=positive_int,
        default=None,
        help="stop (checkpointed, exported) after this many steps in this invocation",
    )
    add(
        "--max-minutes",
        type=_positive_float,
        default=None,
        help="stop (checkpointed, exported) after this long",
    )
    add("--data-dir", type=Path, default=None, help="model and corpus cache (default: serve's)")
    return parser


def _settings(args: argparse.Namespace, source: PretrainedSource) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (the data and the adapters)."""
    return {
        "base_weights": source.weights_id,
        "lora": asdict(_lora(args)),
        "seq_len": args.seq_len,
        "batch": args.batch,
        "seed": args.seed,
        "not_told": args.not_told,
        "filler_weight": args.filler_weight,
        "keep_base": args.keep_base,
        "filler": str(args.filler) if args.filler else "chitchat",
    }


def _lora(args: argparse.Namespace) -> LoraConfig:
    return LoraConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets))


def _check_base(spec: str) -> None:
    path = Path(spec).expanduser()
    if spec in REGISTRY or path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return
    raise AgentRuntimeError(
        f"--base {spec!r} is neither a registered model ({', '.join(sorted(REGISTRY))}), a .gguf"
        " file nor a model directory: `agent-runtime models list` shows the registered models,"
        " `agent-runtime models pull NAME` fetches one"
    )


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise AgentRuntimeError(f"--device {text!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AgentRuntimeError(
            "--device cuda: CUDA is not available on this machine; use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise AgentRuntimeError(f"--device {text!r}: use cpu, cuda or cuda:N")
    return device


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    flag = {"stop": False}

    def on_signal(signum: int, frame: object) -> None:
        flag["stop"] = True

    try:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def finetune(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> Path:
    """Run (or continue) the fine-tune ``args`` describe; returns the output directory."""
    say = out or (lambda line: print(line, flush=True))
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir: Path = args.out
    state_file = out_dir / STATE_FILE
    if state_file.exists() and not args.resume:
        raise AgentRuntimeError(
            f"{out_dir} holds a fine-tune in progress ({STATE_FILE}): add --resume to continue"
            " it, or choose another --out"
        )
    data_dir = args.data_dir or default_data_dir()
    _check_base(args.base)
    try:
        source = load_pretrained(args.base, data_dir, dtype=torch.float32)
    except UnknownModelError as exc:
        raise AgentRuntimeError(
            f"--base: {exc}; `agent-runtime models list` shows the registered models"
        ) from None
    cfg = source.config
    if args.seq_len > cfg.max_position_embeddings:
        raise AgentRuntimeError(
            f"--seq-len {args.seq_len} exceeds the model's trained context"
            f" ({cfg.max_position_embeddings} tokens)"
        )
    model = LlamaModel.from_state_dict(cfg, source.state_dict)  # shares the fp32 tensors
    chat = LlamaChatModel(
        model, source.tokenizer, MemoryPlan(layers=()), weights_id=source.weights_id
    )
    filler = read_filler(args.filler) if args.filler else chitchat_conversations(data_dir)
    data = RecallConversations(
        chat,
        filler,
        args.seq_len,
        args.seed,
        not_told=args.not_told,
        filler_weight=args.filler_weight,
    )
    settings = _settings(args, source)
    torch.manual_seed(args.seed)
    adapters = add_lora(model, _lora(args))
    model.to(device)
    params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    step, elapsed, last_loss = 0, 0.0, float("nan")
    if state_file.exists():
        step, elapsed, last_loss = _load_state(state_file, settings, adapters, opt, device)
        _truncate_log(out_dir / LOG_FILE, step)
        say(f"resuming {out_dir} at step {step}/{args.steps}")
    elif args.resume:
        say(f"no training state in {out_dir}: starting")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in params)
    say(
        f"fine-tuning {source.description}: LoRA rank {args.lora_rank} on"
        f" {','.join(args.lora_targets)} of {cfg.num_layers} layers ({n_params / 1e6:.2f}M"
        f" trainable of {model.num_params() / 1e6:.0f}M), seq {args.seq_len} x batch"
        f" {args.batch}, {args.steps} steps on {device}"
        f" ({torch.get_num_threads()} threads)"
    )

    elapsed_before = elapsed
    started = time.perf_counter()

    def save_state() -> None:
        blob = {
            "version": _STATE_VERSION,
            "settings": settings,
            "step": step,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "last_loss": last_loss,
            "adapters": adapter_tensors(adapters),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write(state_file, [buf.getbuffer()], mode=0o644)

    model.train()
    invocation = tokens_done = 0
    with _stop_on_signals() as flag, (out_dir / LOG_FILE).open("a", encoding="utf-8") as log:
        while step < args.steps and not flag["stop"]:
            tokens, weights = (t.to(device) for t in data.batch(step, args.batch))
            lr = lr_at(step, args.steps, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = answer_loss(model, tokens, weights, keep_base=args.keep_base, adapters=adapters)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            last_loss = float(loss.detach())  # synchronises a GPU: step_s is the step's real time
            step_s = time.perf_counter() - t0
            step += 1
            invocation += 1
            tokens_done += tokens.numel()
            run_s = time.perf_counter() - started
            eta = (args.steps - step) * run_s / invocation
            say(
                f"step {step}/{args.steps} loss {last_loss:.4f} lr {lr:.2e}"
                f" {tokens_done / max(run_s, 1e-9):.0f} tok/s ({step_s:.2f} s/step)"
                f" elapsed {(elapsed_before + run_s) / 60:.1f}m eta {eta / 60:.1f}m"
            )
            record = {
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "step_s": round(step_s, 4),
                "tok_s": round(tokens.numel() / max(step_s, 1e-9), 1),
                "answer_tokens": int((weights[:, 1:] > 0).sum()),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % args.checkpoint_every == 0:
                save_state()
            if args.stop_after is not None and invocation >= args.stop_after:
                break
            if args.max_minutes is not None and run_s > args.max_minutes * 60:
                say("time limit reached")
                break
        save_state()
    elapsed = elapsed_before + time.perf_counter() - started
    if flag["stop"]:
        say(f"stopped at step {step}: checkpointed; the same command with --resume continues")
    _export(out_dir, model, adapters, source, args, step, elapsed, last_loss)
    say(
        f"wrote {out_dir} (step {step}/{args.steps}); serve it with: agent-runtime serve --model {out_dir}"
    )
    return out_dir


def _export(
    out_dir: Path,
    model: LlamaModel,
    adapters: Mapping[str, LoRALinear],
    source: PretrainedSource,
    args: argparse.Namespace,
    step: int,
    elapsed: float,
    last_loss: float,
) -> None:
    """The adapted model as a Hugging Face directory (adapters merged) with its tokenizer,
    ``finetune.json`` and ``MODEL_CARD.md``; each file replaced atomically."""
    save_hf_dir(out_dir, model.cfg, merged_state_dict(model, adapters))
    write_adapter(out_dir / ADAPTER_FILE, as_adapter(adapters, source.weights_id))
    source.tokenizer.save(out_dir)
    targets = ",".join(args.lora_targets)
    done = "" if step >= args.steps else f" (of {args.steps} planned)"
    card = (
        f"Fine-tuned from {source.description} by `agent-runtime train --base` ({step} LoRA"
        f" steps{done}, rank {args.lora_rank} on {targets}) to answer from what you told it, in its"
        " own chat template; it says so when it was not told."
    )
    meta = {
        "card": card,
        "base": args.base,
        "base_description": source.description,
        "base_weights": source.weights_id,
        "steps": step,
        "planned_steps": args.steps,
        "train_seconds": round(elapsed, 1),
        "final_loss": last_loss,
        "lora": asdict(_lora(args)),
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "seed": args.seed,
        "not_told": args.not_told,
        "filler_weight": args.filler_weight,
        "keep_base": args.keep_base,
        "filler": str(args.filler) if args.filler else "chitchat-dataset 0.9.0 (PyPI)",
        "device": str(args.device),
    }
    atomic_write(out_dir / FINETUNE_FILE, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o644)
    atomic_write(out_dir / CARD_FILE, _model_card(meta).encode(), mode=0o644)


def _model_card(meta: Mapping[str, Any]) -> str:
    lora = meta["lora"]
    return f"""# Fine-tuned chat model (agent-runtime train --base)

{meta["card"]}

* **Base:** {meta["base_description"]} (`--base {meta["base"]}`), frozen; its weights id is
  `{meta["base_weights"]}`.
* **What was trained:** LoRA adapters, rank {lora["rank"]}, alpha {lora["alpha"]}, on the
  {", ".join(lora["targets"])} projections of every layer, merged into the weights here (the
  directory is a plain Hugging Face model; serving needs no LoRA code).
* **Data:** conversations in the model's own chat template (its default system prompt
  included): a user states one to three facts on everyday subjects with invented values, real
  dialogue ({meta["filler"]}) surrounds them, then the user asks for some of them in other
  words; {meta["not_told"]:.0%} of the conversations also ask for a fact never stated, answered
  with "you haven't told me". Loss on the answers only (filler replies weighted
  {meta["filler_weight"]}). Subjects, phrasings and values are disjoint from those
  `agent-runtime eval recall` measures with. At every other position, a KL divergence to the
  frozen base's prediction weighted {meta.get("keep_base", 0.0)} (0: none) keeps its ordinary
  chat.
* **Run:** {meta["steps"]} steps of {meta["batch"]} x {meta["seq_len"]} tokens (planned
  {meta["planned_steps"]}), peak learning rate {meta["lr"]}, {meta["train_seconds"]:.0f} s on
  {meta["device"]}; last loss {meta["final_loss"]:.4f}.
* **Measured recall:** not measured by the training run; measure it with
  `agent-runtime eval recall --model <this directory> --forms chat --modes memory,window,full`
  (docs/models.md records the project's figures).
* **Limits:** trained with the fact inside a {meta["seq_len"]}-token context (plain attention),
  not through the kNN memory: at serving time the memory brings a far fact next to the
  question, and the model has only learnt to read it from context. A short fine-tune of a
  small model; its general knowledge and chat are the base model's.
"""


def _load_state(
    file: Path,
    settings: Mapping[str, Any],
    adapters: Mapping[str, LoRALinear],
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[int, float, float]:
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{file}: unreadable training state: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("version") != _STATE_VERSION:
        raise CheckpointError(f"{file}: not a training state of this version")
    saved = blob.get("settings", {})
    differ = sorted(k for k in settings if saved.get(k) != settings[k])
    if differ:
        raise AgentRuntimeError(
            f"{file} was written with other settings ("
            + ", ".join(f"{k}: {saved.get(k)!r} now {settings[k]!r}" for k in differ)
            + "); use the same options to resume, or another --out"
        )
    load_adapter_tensors(adapters, blob["adapters"])
    opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"])
    if device.type == "cuda" and blob.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return int(blob["step"]), float(blob["elapsed_s"]), float(blob.get("last_loss", "nan"))


def _truncate_log(log: Path, step: int) -> None:
    """Drop log records of steps after the checkpoint (a run killed between checkpoints)."""
    if not log.exists():
        return
    kept = [
        line
        for line in log.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write(log, ("".join(f"{line}\n" for line in kept)).encode(), mode=0o644)


def main(argv: Sequence[str] | None = None) -> int:
    finetune(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
