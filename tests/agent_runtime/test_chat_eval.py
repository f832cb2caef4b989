"""The pretrained-model recall and ppl evaluation (agent_runtime.training.chat_eval) on a tiny
random Llama: probes are well-formed, and the modes compute what they claim."""

from __future__ import annotations

import math

from agent_runtime.training.chat_eval import make_probes, mode_plan, run_ppl, run_probe, run_recall
from tests.conftest import tiny_llama_chat

LINES = ["hello there", "my name is Priya", "the code is 4711", "how are you today?"] * 10


def test_probes_state_a_held_out_fact_then_filler_then_a_differently_worded_question() -> None:
    chat = tiny_llama_chat()
    probes = make_probes(chat, LINES, 200, 5, seed=1)
    assert len({p.value for p in probes}) == 5
    for p in probes:
        assert p.value in p.messages[0]["content"] and p.messages[-1]["role"] == "user"
        assert p.value not in p.messages[-1]["content"]
        assert p.distance >= 200
    fixed = make_probes(chat, LINES, 200, 4, seed=2, corrections=True)
    assert all(p.corrected_from and p.corrected_from != p.value for p in fixed)
    assert all(any(p.value in m["content"] for m in p.messages[2:-1]) for p in fixed)


def test_full_mode_is_full_attention_and_exact_memory_answers_the_same() -> None:
    exact = tiny_llama_chat(3, window=16, block=8, k=10_000, exact=True)
    probe = make_probes(exact, LINES, 60, 1, seed=3)[0]
    full = exact.with_plan(mode_plan(exact, "full", 120))  # type: ignore[arg-type]
    assert full.plan.window >= 120 and not full.plan.layers
    a, _ = run_probe(exact, probe, use_prefix=True, max_tokens=6)
    b, _ = run_probe(full, probe, use_prefix=True, max_tokens=6)
    assert a == b
    rows = run_recall(exact, LINES, [20], 2, modes=("memory", "window", "full"), forms=("prefix",))
    assert [r["mode"] for r in rows] == ["memory", "window", "full"]
    assert rows[0]["recall"] == rows[2]["recall"]


def test_ppl_rows_score_the_same_tokens_with_every_bank_size() -> None:
    chat = tiny_llama_chat(4)
    document = [t for line in LINES for t in chat.encode_turn("user", line)][:300]
    rows = run_ppl(chat, document, [0, 32, 256], scored=64)
    assert [r["memory_entries"] for r in rows] == [0, 32, 256]
    assert {r["scored_tokens"] for r in rows} == {64}
    assert all(math.isfinite(r["bits_per_token"]) for r in rows)
    assert rows[0]["bits_per_token"] != rows[2]["bits_per_token"]  # the memory is read


def test_a_journalled_recall_run_resumes_and_other_settings_start_over(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each probe is journalled as it completes; a rerun answers from the journal (the same
    rows), a run cut short by a kill resumes after its last whole line, and a journal of other
    settings is not reused."""
    import io

    chat = tiny_llama_chat(5, window=16, block=8)
    journal = tmp_path / "r.json.probes.jsonl"
    args = (chat, LINES, [20, 40], 2)
    kw = {"modes": ("memory", "window"), "forms": ("prefix",), "journal": journal}
    first = run_recall(*args, **kw, settings={"a": 1})  # type: ignore[arg-type]
    assert len(journal.read_text().splitlines()) == 8  # 2 distances x 2 modes x 2 probes
    out = io.StringIO()
    again = run_recall(*args, **kw, settings={"a": 1}, out=out)  # type: ignore[arg-type]
    assert again == first
    assert out.getvalue().count("(from the journal)") == 8
    # a kill mid-write: the last line is cut; the probe it held is run again
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    out = io.StringIO()
    resumed = run_recall(*args, **kw, settings={"a": 1}, out=out)  # type: ignore[arg-type]
    assert [r["answers"] for r in resumed] == [r["answers"] for r in first]
    assert out.getvalue().count("(from the journal)") == 5
    out = io.StringIO()
    run_recall(*args, **kw, settings={"a": 1}, out=out)  # type: ignore[arg-type]
    assert out.getvalue().count("(from the journal)") == 8  # the rerun probes were journalled
    out = io.StringIO()
    run_recall(*args, **kw, settings={"a": 2}, out=out)  # type: ignore[arg-type]
    assert "(from the journal)" not in out.getvalue()
