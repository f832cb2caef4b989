"""``agent-runtime train --base``: LoRA fine-tuning of a pretrained chat model, on a random
2-layer Llama (seconds). LoRA starts as the base and merges exactly; the loss falls; the data
puts the loss on answers only and never uses the eval's values or phrasings; a run stopped
(or killed) and resumed equals an uninterrupted one; the output serves."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import agent_runtime.training.chat_eval as chat_eval
from agent_runtime.cli import main as cli_main
from agent_runtime.config import EngineConfig
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.models.llama.adapter import ADAPTER_FILE, merge_adapter, read_adapter
from agent_runtime.models.llama.family import LlamaChatModel
from agent_runtime.models.llama.hf import save_hf_dir
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.source import load_pretrained
from agent_runtime.models.loader import load_model
from agent_runtime.training.chat_data import (
    ACKS,
    NOT_TOLD,
    SUBJECTS,
    RecallConversations,
    eval_could_draw,
    train_value,
)
from agent_runtime.training.finetune import (
    TARGETS,
    LoraConfig,
    add_lora,
    answer_loss,
    build_parser,
    finetune,
    merged_state_dict,
)
from memory import MemoryBank, MemoryConfig
from tests.conftest import TIMEOUT, tiny_llama_chat

FILLER = """hi, how are you doing today?
pretty good, just got back from a walk with the dog
nice, where did you go?
down by the river, it was sunny

what do you do for work?
I teach maths at a high school
do you like it?
most days, the kids are fun

have you seen any good movies lately?
not really, I mostly watch old comedies
"""
SEQ = 256  # the tiny model's context; its near-byte-level tokenizer needs ~230 per fact
RUN = ["--seq-len", str(SEQ), "--batch", "2", "--lr", "5e-3", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random chat model saved as a Hugging Face directory, and a filler file."""
    root = tmp_path_factory.mktemp("base")
    chat = tiny_llama_chat()
    save_hf_dir(root / "tiny", chat.model.cfg, chat.model.state_dict())
    chat.tokenizer.save(root / "tiny")
    (root / "filler.txt").write_text(FILLER, encoding="utf-8")
    return root


def args_for(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--base",
        str(base / "tiny"),
        "--out",
        str(out),
        "--filler",
        str(base / "filler.txt"),
        "--data-dir",
        str(base / "data"),
        *RUN,
        *extra,
    ]


def losses(out: Path) -> dict[int, float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(base: Path) -> Path:
    """An uninterrupted 6-step run."""
    out = base / "reference"
    finetune(build_parser().parse_args(args_for(base, out, "--steps", "6")), out=lambda s: None)
    return out


def data_for(chat: LlamaChatModel, **kw: float) -> RecallConversations:
    return RecallConversations(chat, read_filler_text(), SEQ, seed=3, **kw)  # type: ignore[arg-type]


def read_filler_text() -> list[list[str]]:
    return [[ln for ln in block.splitlines() if ln] for block in FILLER.split("\n\n")]


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_at_init_leaves_logits_unchanged() -> None:
    model = tiny_llama_chat().model
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        before = model(tokens)
        adapters = add_lora(model, LoraConfig(rank=4, targets=tuple(TARGETS)))
        after = model(tokens)
    assert len(adapters) == model.cfg.num_layers * len(TARGETS)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_merged_model_equals_the_adapted_one() -> None:
    model = tiny_llama_chat().model
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        base_logits = model(tokens)
        adapters = add_lora(model, LoraConfig(rank=4, targets=("q", "v", "o", "down")))
        for a in adapters.values():
            a.lora_b.normal_(0.0, 0.2)
        adapted = model(tokens)
        merged = LlamaModel.from_state_dict(cfg, merged_state_dict(model, adapters))
        merged_logits = merged(tokens)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(merged_logits, adapted, atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(tiny_llama_chat().model.state_dict())


def test_unknown_lora_target_is_refused() -> None:
    with pytest.raises(AgentRuntimeError, match="choose from"):
        add_lora(tiny_llama_chat().model, LoraConfig(targets=("q", "qq")))


def test_loss_decreases_on_a_tiny_overfit_batch() -> None:
    chat = tiny_llama_chat()
    tokens, weights = data_for(chat).batch(0, 1)
    adapters = add_lora(chat.model, LoraConfig(rank=8, targets=("q", "k", "v", "o", "up")))
    params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    opt = torch.optim.AdamW(params, lr=3e-2)
    seen = []
    for _ in range(30):
        loss = answer_loss(chat.model, tokens, weights)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        seen.append(float(loss.detach()))
    assert seen[-1] < 0.75 * seen[0], seen  # a random tiny net learns slowly; SmolLM2: docs


def test_keep_base_is_the_kl_to_the_frozen_base_and_holds_it_there() -> None:
    """At the start (B = 0) the KL term is 0; once the adapters move it is positive, and
    training with it keeps the non-answer predictions nearer the base than without."""
    chat = tiny_llama_chat()
    ex = [data_for(chat).example(random.Random(i)) for i in range(2)]
    tokens = torch.tensor([e.tokens for e in ex])
    weights = torch.tensor([e.weights for e in ex])
    rest = weights[:, 1:] == 0

    def drift(keep_base: float) -> tuple[float, float]:
        model = tiny_llama_chat().model
        with torch.no_grad():
            base = torch.log_softmax(model(tokens)[:, :-1][rest].float(), -1)
        torch.manual_seed(0)
        adapters = add_lora(model, LoraConfig(rank=4))
        plain = answer_loss(model, tokens, weights)
        kept = answer_loss(model, tokens, weights, keep_base=keep_base, adapters=adapters)
        assert torch.allclose(plain, kept)  # B = 0: the adapted model is the base
        params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
        opt = torch.optim.AdamW(params, lr=2e-2)
        for _ in range(15):
            loss = answer_loss(model, tokens, weights, keep_base=keep_base, adapters=adapters)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        with torch.no_grad():
            now = torch.log_softmax(model(tokens)[:, :-1][rest].float(), -1)
            answer = float(answer_loss(model, tokens, weights))
        kl = float(torch.nn.functional.kl_div(now, base, log_target=True, reduction="batchmean"))
        return kl, answer

    free_kl, free_answer = drift(0.0)
    kept_kl, kept_answer = drift(1.0)
    assert free_kl > 0 and kept_kl < 0.5 * free_kl, (free_kl, kept_kl)
    assert kept_answer < 1.5 * free_answer + 0.5  # it still learns the answers


# -- data ------------------------------------------------------------------------------------


def test_loss_falls_on_answer_tokens_only() -> None:
    chat = tiny_llama_chat()
    data = data_for(chat, not_told=0.5)
    rng = random.Random(5)
    end = chat.tokenizer.decode([chat.end_token], special=True)
    not_told_seen = 0
    for _ in range(20):
        ex = data.example(rng)
        assert len(ex.tokens) == len(ex.weights) == SEQ
        assert ex.tokens[: len(chat.preamble())] == chat.preamble()  # the default system prompt
        weighted = [t for t, w in zip(ex.tokens, ex.weights, strict=True) if w > 0]
        # exactly the answers and their terminators, nothing of the questions or the filler
        assert chat.tokenizer.decode(weighted, special=True) == "".join(a + end for a in ex.answers)
        assert set(w for w in ex.weights if w > 0) == {1.0}
        # every weighted span is a reply: it follows the assistant header the model generates after
        spans = [i for i, w in enumerate(ex.weights) if w > 0 and ex.weights[i - 1] == 0]
        for i in spans:
            assert tuple(ex.tokens[i - len(chat.reply_prefix) : i]) == chat.reply_prefix
        stated = {v for _, v in ex.facts}
        for answer in ex.answers:
            told = [v for v in stated if v in answer]
            if not told:  # a question about a fact never stated: the answer says so
                not_told_seen += 1
                assert any(answer.startswith(n.split("{")[0]) for n in NOT_TOLD)
        text = chat.tokenizer.decode(ex.tokens, special=True)
        for statement, value in ex.facts:
            assert statement in text and value in statement
    assert not_told_seen > 0


def test_filler_weight_puts_a_small_loss_on_filler_replies() -> None:
    chat = tiny_llama_chat()
    ex = data_for(chat, filler_weight=0.1).example(random.Random(1))
    assert 0.1 in ex.weights and 1.0 in ex.weights


def test_training_values_and_phrasings_are_disjoint_from_the_eval() -> None:
    rng = random.Random(0)
    kinds = {s.kind for s in SUBJECTS}
    train = {train_value(k, rng) for k in kinds for _ in range(3000)}
    eval_values = {
        chat_eval._value(k, rng) for k in {f[3] for f in chat_eval.FORMS} for _ in range(3000)
    }
    assert all(eval_could_draw(v) for v in eval_values)  # the predicate knows the eval's pools
    assert not train & eval_values
    assert not any(eval_could_draw(v) for v in train)
    # other phrasings, other subjects, another acknowledgement
    train_text = [t for s in SUBJECTS for t in (*s.statements, *s.questions, s.answer)]
    eval_text = [t for f in chat_eval.FORMS for t in f[:3]]
    assert not set(train_text) & set(eval_text)
    eval_nouns = ("sister", "locker", "garage", "dentist", "puppy", "grew up", "flight", "wifi")
    eval_nouns += ("manager", "spare key", "bike", "hotel")
    assert not [t for t in train_text if any(n in t.lower() for n in eval_nouns)]
    assert "Got it, I'll remember that." not in ACKS


def test_too_short_a_sequence_is_a_clear_error() -> None:
    with pytest.raises(AgentRuntimeError, match="too short"):
        RecallConversations(tiny_llama_chat(), read_filler_text(), 64)


def test_batches_are_a_function_of_the_step() -> None:
    chat = tiny_llama_chat()
    a, b = data_for(chat), data_for(chat)
    assert torch.equal(a.batch(7, 2)[0], b.batch(7, 2)[0])
    assert not torch.equal(a.batch(7, 2)[0], a.batch(8, 2)[0])


# -- the command -----------------------------------------------------------------------------


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(base: Path, reference: Path) -> None:
    out = base / "resumed"
    quiet = {"out": lambda s: None}
    finetune(
        build_parser().parse_args(args_for(base, out, "--steps", "6", "--stop-after", "2")), **quiet
    )
    assert sorted(losses(out)) == [1, 2]
    finetune(build_parser().parse_args(args_for(base, out, "--steps", "6", "--resume")), **quiet)
    assert losses(out) == losses(reference)
    ref, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["steps"] == 6 and meta["final_loss"] == losses(reference)[6]
    # a finished run resumed again trains no further and exports the same model
    finetune(build_parser().parse_args(args_for(base, out, "--steps", "6", "--resume")), **quiet)
    assert losses(out) == losses(reference)
    assert json.loads((out / "finetune.json").read_text())["final_loss"] == meta["final_loss"]
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(ref[n], again[n]) for n in ref)


def test_the_loss_of_the_reference_run_falls(reference: Path) -> None:
    seen = losses(reference)
    assert seen[6] < seen[1]


def test_existing_run_needs_resume_and_the_same_settings(base: Path, reference: Path) -> None:
    parse = build_parser().parse_args
    with pytest.raises(AgentRuntimeError, match="--resume"):
        finetune(parse(args_for(base, reference, "--steps", "6")), out=lambda s: None)
    with pytest.raises(AgentRuntimeError, match="lora"):
        finetune(
            parse(args_for(base, reference, "--steps", "6", "--resume", "--lora-rank", "4")),
            out=lambda s: None,
        )


@pytest.mark.slow
def test_kill_9_and_resume_continues_the_same_run(base: Path, reference: Path) -> None:
    out = base / "killed"
    cmd = [sys.executable, "-m", "agent_runtime", "train", *args_for(base, out, "--steps", "6")]
    cmd += ["--checkpoint-every", "1"]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + TIMEOUT * 6
        while not (out / "train_state.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # killed before the end
    rerun = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=TIMEOUT * 6)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout
    assert losses(out) == losses(reference)


def test_output_loads_through_the_model_loader_and_generates(base: Path, reference: Path) -> None:
    chat = load_model(EngineConfig(model=str(reference), memory_window=16, memory_block=8), base)
    assert isinstance(chat, LlamaChatModel)
    assert "Fine-tuned from" in chat.card and "6 LoRA steps" in chat.card
    assert (reference / "MODEL_CARD.md").read_text().startswith("# Fine-tuned chat model")
    # only the adapted projections changed
    tuned, original = (
        load_file(reference / "model.safetensors"),
        load_file(base / "tiny" / "model.safetensors"),
    )
    changed = {n for n in tuned if not torch.equal(tuned[n], original[n])}
    assert changed == {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"
    }
    # the adapter alone, merged into the base, is the exported model (what a shipped
    # fine-tune is: a few MB instead of the whole model)
    adapter = read_adapter(reference / ADAPTER_FILE)
    assert {f"{n}.weight" for n in adapter.factors} == changed
    assert (adapter.rank, adapter.alpha) == (8, 16.0)
    assert adapter.base_weights == load_pretrained(str(base / "tiny"), base).weights_id
    merged = merge_adapter(original, adapter)
    for name in changed:
        torch.testing.assert_close(merged[name], tuned[name], atol=1e-6, rtol=0)
    d = chat.memory_dims[0]
    bank = MemoryBank(d, d, MemoryConfig(), parts=chat.memory_parts)
    state = chat.new_state()
    prompt = chat.encode_turn("user", "hello there, my name is Priya " * 3) + list(
        chat.reply_prefix
    )
    logits = chat.prefill(state, prompt, bank)
    assert logits is not None
    for _ in range(20):  # past the window: the bank is written and searched
        token = int((logits + chat.reply_mask).argmax())
        out, _ = chat.decode([state], [token], [bank])
        logits = out[0]
        assert torch.isfinite(logits).all()
    assert len(bank) > 0


def test_bad_arguments_are_one_clear_line_and_exit_2(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", *args_for(base, tmp_path / "o", "--steps", "-1")])
    assert exc.value.code == 2
    assert "argument --steps" in capsys.readouterr().err
    assert cli_main(["train", "--base", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "agent-runtime models list" in err
    assert not (tmp_path / "o").exists()
    assert cli_main(["train", *args_for(base, tmp_path / "o", "--seq-len", "300")]) == 2
    assert "exceeds the model's trained context" in capsys.readouterr().err
    assert cli_main(["train", *args_for(base, tmp_path / "o", "--device", "tpu")]) == 2
    assert "--device" in capsys.readouterr().err


def test_steps_minus_one_through_the_real_entry_point(base: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_runtime",
            "train",
            *args_for(base, tmp_path / "o", "--steps", "-1"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    assert out.returncode == 2, out.stderr
    assert "--steps" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


def test_train_without_base_is_still_the_byte_model_trainer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "--run-dir" in help_text and "--base" in help_text
