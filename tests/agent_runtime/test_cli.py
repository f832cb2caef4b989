"""The README's path, for real: ``agent-runtime serve`` in a subprocess, the quickstart client, SIGTERM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent_runtime.bench.launch import serve_process
from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def test_serve_answers_the_quickstart_client_and_shuts_down_gracefully(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "AGENT_RUNTIME_MAX_SESSIONS": "8"}
    with serve_process(data, cwd=tmp_path, env=env, timeout=TIMEOUT * 3) as server:
        with urllib.request.urlopen(f"{server.http}/readyz", timeout=TIMEOUT) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{server.http}/", timeout=TIMEOUT) as resp:
            assert "text/html" in resp.headers["Content-Type"]
            assert b"/v1/realtime" in resp.read()
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py"), "Hi! " * 60, server.url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 6,
            check=True,
        )
        assert "[session sess_" in out.stderr
        assert re.search(r"\[(completed|incomplete): \{'input_tokens': 243", out.stderr), out.stderr
        code = server.stop(timeout=TIMEOUT * 3)  # SIGTERM: graceful shutdown
        assert code == 0, server.log_text()
    # Graceful shutdown snapshotted the session's bank to the data directory.
    assert list(data.glob("sessions/*/sess_*/bank/*")), sorted(str(p) for p in data.rglob("*"))
    assert (data / "sessions.rdb").exists() or list(data.glob("*.rdb")), (
        "embedded Redis lives in the data dir"
    )


@pytest.mark.slow
def test_serve_with_no_model_named_serves_the_pretrained_chat_model(tmp_path: Path) -> None:
    """``agent-runtime serve`` alone serves SmolLM2 with the recall fine-tune (docs/models.md,
    "The default"), pulled on first start; here the pull finds the tests' model cache."""
    import json

    from agent_runtime.config import DEFAULT_MODEL, EngineConfig
    from agent_runtime.models.loader import load_model
    from tests.server.test_pretrained_serving import _test_data

    load_model(EngineConfig(model=DEFAULT_MODEL), _test_data())  # pulled once for all tests
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(_test_data() / "models", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RUNTIME_ENGINE_")}
    with serve_process(data, cwd=tmp_path, env=env, timeout=TIMEOUT * 12, model=None) as server:
        with urllib.request.urlopen(f"{server.http}/v1/models", timeout=TIMEOUT) as resp:
            listed = json.loads(resp.read())
        request = urllib.request.Request(
            f"{server.http}/v1/chat/completions",
            data=json.dumps({
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "Hi! Who are you?"}],
                "max_tokens": 12,
            }).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=TIMEOUT * 6) as resp:
            reply = json.loads(resp.read())
    assert [m["id"] for m in listed["data"]] == [DEFAULT_MODEL]
    assert reply["model"] == DEFAULT_MODEL
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["message"]["content"]


def _every_command() -> list[list[str]]:
    from agent_runtime.cli import BENCHES, TOOLS

    return [["serve"], ["config"], *([name] for name in TOOLS), *(["bench", b] for b in BENCHES)]


@pytest.mark.parametrize("command", _every_command(), ids=" ".join)
def test_every_command_prints_its_help(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--help`` of every command prints its options and exits 0 (argparse formats help
    with ``%``: a setting's docstring with a literal ``%`` once made ``serve --help`` crash)."""
    from agent_runtime.cli import main

    try:
        code = main([*command, "--help"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    out = capsys.readouterr()
    assert code in (0, None), (command, out.err[-2000:])
    assert "usage:" in out.out and "Traceback" not in out.err


def test_test_and_bench_servers_serve_the_byte_model_unless_told_otherwise() -> None:
    """``start_server`` adds ``--model bundled`` only when neither its arguments nor its
    environment choose a model, a checkpoint or a config file (which could name one)."""
    from agent_runtime.bench.launch import _model_args

    assert _model_args([], {}, "bundled") == ["--model", "bundled"]
    assert _model_args(["--port", "0"], {}, None) == []  # serve's own default
    for args in (
        ["--model", "x"],
        ["--model=x"],
        ["--engine-model=x"],
        ["--engine-checkpoint", "c.pt"],
        ["--config", "c.toml"],
        ["--config=c.toml"],
    ):
        assert _model_args(args, {}, "bundled") == [], args
    for name in ("ENGINE_MODEL", "ENGINE_CHECKPOINT", "CONFIG"):
        assert _model_args([], {f"AGENT_RUNTIME_{name}": "x"}, "bundled") == [], name
    assert _model_args([], {"AGENT_RUNTIME_ENGINE_MODEL": ""}, "bundled") == ["--model", "bundled"]
