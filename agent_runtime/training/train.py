"""``agent-runtime train``: train the chat model on synthetic long conversations, resumably.

Each step draws a batch of documents longer than the window and runs them segment by segment
(XL cache + per-document memory, ``agent_runtime.models.byte.segments``), with one optimizer update per
segment as in the paper (truncated backpropagation; no gradient into the memory). A run
directory holds ``last.pt`` (model, optimizer, step) written atomically every
``--checkpoint-every`` steps and on SIGINT/SIGTERM, so a run can span several sessions:
``agent-runtime train --run-dir D`` resumes from ``D/last.pt`` when it exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from agent_runtime.config import positive_int
from agent_runtime.files import atomic_write
from agent_runtime.models.byte.model import MemorizingTransformer, ModelConfig, save_checkpoint
from agent_runtime.models.byte.segments import TensorMemory, iter_segments
from agent_runtime.training.data import ConversationGenerator

__all__ = ["main", "train"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", type=Path, required=True, help="directory for checkpoints and logs (resumes)"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=3000,
        help="total optimizer-step batches (documents batches)",
    )
    parser.add_argument("--batch", type=positive_int, default=16, help="documents per batch")
    parser.add_argument(
        "--doc-len",
        type=positive_int,
        default=768,
        help="tokens per document (a multiple of the window)",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--checkpoint-every", type=positive_int, default=50)
    parser.add_argument("--eval-every", type=positive_int, default=200)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop (checkpointed) after this long; 0 = no limit",
    )
    parser.add_argument(
        "--text", type=Path, action="append", default=[], help="real text file mixed into filler"
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write a compact serving checkpoint here at the end",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda[:N], or auto (cuda when available)"
    )
    for f in dataclasses.fields(ModelConfig):
        parser.add_argument(
            f"--model-{f.name.replace('_', '-')}", dest=f"model_{f.name}", type=int, default=None
        )


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    w = weights.reshape(-1)
    return (ce * w).sum() / w.sum().clamp(min=1.0)


@torch.no_grad()
def answer_accuracy(
    model: MemorizingTransformer, gen: ConversationGenerator, n: int, length: int
) -> float:
    """Teacher-forced exact match of every answer token (cheap progress signal during training)."""
    model.eval()
    device = next(model.parameters()).device
    tokens, weights = (t.to(device) for t in gen.batch(n, length))
    mem = TensorMemory(n, model.cfg.head_dim, device)
    correct = torch.ones(n, dtype=torch.bool, device=device)
    for seg in iter_segments(model, tokens, mem, with_targets=True):
        W = model.cfg.window
        w = weights[:, seg.index * W : seg.index * W + seg.output.logits.shape[1]]
        assert seg.targets is not None
        wrong = (seg.output.logits.argmax(-1) != seg.targets) & (w > 1.0)
        correct &= ~wrong.any(1)
    model.train()
    return float(correct.float().mean())


def train(args: argparse.Namespace) -> Path:
    run: Path = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    last = run / "last.pt"
    state: dict[str, Any] | None = (
        torch.load(last, map_location="cpu", weights_only=False) if last.exists() else None
    )
    if state is not None:
        cfg = ModelConfig(**state["config"])
        print(f"resuming {run} at step {state['step']}", flush=True)
    else:
        overrides = {
            f.name: getattr(args, f"model_{f.name}")
            for f in dataclasses.fields(ModelConfig)
            if getattr(args, f"model_{f.name}") is not None
        }
        cfg = ModelConfig(**overrides)
    if args.doc_len % cfg.window:
        raise SystemExit(f"--doc-len {args.doc_len} must be a multiple of the window {cfg.window}")
    torch.manual_seed(args.seed)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    model = MemorizingTransformer(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
    print(f"model {cfg} with {model.num_params() / 1e6:.2f}M parameters", flush=True)

    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def checkpoint() -> None:
        blob = {
            "config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic_write(last, [buf.getbuffer()], mode=0o644)

    eval_gen = ConversationGenerator(args.seed + 999_999, held_out=True)
    log = (run / "log.jsonl").open("a")
    model.train()
    started = time.perf_counter()
    session_start_elapsed = elapsed
    tokens_seen = 0
    while step < args.steps and not stop["now"]:
        # A fresh generator per step: resuming at step s draws exactly the batches s, s+1, ...
        gen = ConversationGenerator(args.seed * 1_000_003 + step, text_files=args.text)
        tokens, weights = (t.to(device) for t in gen.batch(args.batch, args.doc_len))
        lr = _lr(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        memory = TensorMemory(args.batch, cfg.head_dim, device)
        losses = []
        for seg in iter_segments(model, tokens, memory, with_targets=True):
            W = cfg.window
            assert seg.targets is not None
            loss = _loss(
                seg.output.logits, seg.targets, weights[:, seg.index * W : (seg.index + 1) * W]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss))
        step += 1
        tokens_seen += args.batch * args.doc_len
        elapsed = session_start_elapsed + time.perf_counter() - started
        rate = tokens_seen / max(1e-9, time.perf_counter() - started)
        if step % 10 == 0 or step == 1:
            eta = (args.steps - step) * args.batch * args.doc_len / max(rate, 1e-9)
            print(
                f"step {step}/{args.steps} loss {sum(losses) / len(losses):.3f} last-seg {losses[-1]:.3f} "
                f"lr {lr:.2e} {rate:.0f} tok/s elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m",
                flush=True,
            )
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "answer_loss_seg": losses[-1],
            "elapsed_s": elapsed,
        }
        if step % args.eval_every == 0 or step == args.steps:
            record["answer_acc"] = answer_accuracy(model, eval_gen, 32, args.doc_len)
            print(
                f"  eval: held-out answer exact match (teacher forced) {record['answer_acc']:.3f}",
                flush=True,
            )
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % args.checkpoint_every == 0:
            checkpoint()
        if args.max_minutes and (time.perf_counter() - started) > args.max_minutes * 60:
            print("time limit reached; checkpointing", flush=True)
            break
    checkpoint()
    if args.export is not None:
        save_checkpoint(
            args.export,
            model.eval(),
            {
                "half": True,
                "trained_steps": step,
                "train_seconds": elapsed,
                "train_args": {k: str(v) for k, v in vars(args).items()},
            },
        )
        print(f"exported {args.export}", flush=True)
    return last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--base" or a.startswith("--base=") for a in argv):
        # a pretrained chat model: the LoRA fine-tune (agent_runtime.training.finetune)
        import agent_runtime.training.finetune as finetune

        return finetune.main(argv)
    parser = argparse.ArgumentParser(
        prog="agent-runtime train",
        description=__doc__.splitlines()[0],
        epilog="With --base NAME|FILE|DIR it fine-tunes a pretrained chat model instead"
        " (LoRA; see `agent-runtime train --base X --help`).",
    )
    add_arguments(parser)
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
