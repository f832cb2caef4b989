"""How far a fine-tune moved a model's ordinary chat: greedy replies to everyday prompts, and the
mean per-token KL(base || tuned), teacher-forced on the base's own replies to those prompts and
on real chitchat replies (8 drawn at random from the corpus).

    python benchmarks/pretrained/chat_drift.py --base smollm2-135m-instruct \
        --models smollm2-135m-recall runs/my-finetune --json benchmarks/pretrained/finetune_chat_drift.json

docs/models.md ("Fine-tuning") records the figures.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch

from agent_runtime.models.llama.family import LlamaChatModel
from agent_runtime.models.llama.memory import MemoryPlan
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.registry import default_data_dir
from agent_runtime.models.llama.source import load_pretrained
from agent_runtime.training.chat_eval import Probe, chitchat_lines, run_probe

PROMPTS = [
    "Hi, who are you?",
    "What's the weather like today?",
    "Can you suggest a good book to read this weekend?",
    "I just got back from a long walk by the river.",
    "How do I make pancakes?",
    "What do you think about cats?",
    "I'm feeling a bit tired today.",
    "Tell me something interesting about the moon.",
]


def load(spec: str, data: Path) -> LlamaChatModel:
    source = load_pretrained(spec, data)
    model = LlamaModel.from_state_dict(source.config, source.state_dict).eval()
    return LlamaChatModel(model, source.tokenizer, MemoryPlan(layers=()))


def replies(chat: LlamaChatModel) -> list[str]:
    out = []
    for prompt in PROMPTS:
        probe = Probe([{"role": "user", "content": prompt}], value="\0", prefix="", distance=0)
        out.append(run_probe(chat, probe, use_prefix=False, max_tokens=40)[0])
    return out


@torch.no_grad()
def log_probs(chat: LlamaChatModel, prompt: list[int], reply: list[int]) -> torch.Tensor:
    logits = chat.model(torch.tensor([prompt + reply]))[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data_dir or default_data_dir()
    base = load(args.base, data)
    own = replies(base)
    head = list(base.reply_prefix)
    pairs = [
        (base.encode_turn("user", p) + head, base.tokenizer.encode(r))
        for p, r in zip(PROMPTS, own, strict=True)
    ]
    lines, rng = chitchat_lines(data), random.Random(123)
    for _ in range(8):
        user, reply = rng.choice(lines), rng.choice(lines)
        pairs.append((base.encode_turn("user", user) + head, base.tokenizer.encode(reply)))
    pairs = [(base.preamble() + p, r) for p, r in pairs]
    reference = [log_probs(base, p, r) for p, r in pairs]
    result: dict[str, Any] = {
        "base": {"model": args.base, "replies": dict(zip(PROMPTS, own, strict=True))}
    }
    for spec in args.models:
        chat = load(spec, data)
        kls = [
            float((ref.exp() * (ref - log_probs(chat, p, r))).sum(-1).mean())
            for (p, r), ref in zip(pairs, reference, strict=True)
        ]
        result[spec] = {
            "own_replies_kl": sum(kls[:8]) / 8,
            "chitchat_replies_kl": sum(kls[8:]) / 8,
            "replies": dict(zip(PROMPTS, replies(chat), strict=True)),
        }
        print(
            spec, {k: round(v, 4) for k, v in result[spec].items() if k.endswith("_kl")}, flush=True
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
