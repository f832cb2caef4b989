"""Long real documents for ``eval ppl``: files inside Debian packages, fetched by package name.

Bits per token as memory grows (the paper's table) needs documents whose far context matters:
a long technical text where the names defined early recur thousands of tokens later. Debian's
``linux-doc-6.1`` ships the kernel's documentation (GPL-2.0), among it single documents of
30K-75K tokens. :func:`fetch_document` runs ``apt-get download`` (the machine's own package
client, configured for its mirror and proxy) into a temporary directory, reads the member out
of the ``.deb`` (an ``ar`` archive holding ``data.tar.*``) without installing anything, checks
the text's SHA-256 against the one recorded here and keeps it under ``<data dir>/corpora``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import lzma
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from agent_runtime.errors import AgentRuntimeError, StorageError

__all__ = [
    "DOCUMENTS",
    "DebDocument",
    "DocumentError",
    "fetch_document",
    "members_of_deb",
    "read_ar",
]


class DocumentError(AgentRuntimeError):
    """A document could not be fetched, or is not the one recorded."""


@dataclass(frozen=True)
class DebDocument:
    """The text of ``member`` (gzip-compressed in the package when it ends in ``.gz``) inside
    Debian's ``package``; ``sha256`` and ``size`` are of the decompressed text."""

    name: str
    package: str
    version: str
    """The version whose text ``sha256`` records (tried first; the mirror's current after)."""
    member: str
    sha256: str
    size: int
    license: str

    @property
    def filename(self) -> str:
        base = Path(self.member).name
        return base[:-3] if base.endswith(".gz") else base


_KDOC = "./usr/share/doc/linux-doc-6.1/Documentation/"
_LINUX_DOC_VERSION = "6.1.192-3"  # Debian 12's, December 2026
APT_TIMEOUT_S = 600

DOCUMENTS: dict[str, DebDocument] = {
    d.name: d
    for d in (
        DebDocument(
            "rcu-requirements",
            "linux-doc-6.1",
            _LINUX_DOC_VERSION,
            _KDOC + "RCU/Design/Requirements/Requirements.rst.gz",
            "c03742608ec618d667a394a4e9b14f0dbaa51bb186d634f8af479e34c4c3919d",
            136444,
            "GPL-2.0",
        ),
        DebDocument(
            "alsa-driver",
            "linux-doc-6.1",
            _LINUX_DOC_VERSION,
            _KDOC + "sound/kernel-api/writing-an-alsa-driver.rst.gz",
            "63acf50cf30efd476d4c373ce8d43328a09116c028a88a4410cba70029cd9dcd",
            146339,
            "GPL-2.0",
        ),
        DebDocument(
            "kvm-api",
            "linux-doc-6.1",
            _LINUX_DOC_VERSION,
            _KDOC + "virt/kvm/api.rst.gz",
            "3c8601a521b43d886ecf62924a5d324ec6214ad9542345927d6488c9bb32cff4",
            289083,
            "GPL-2.0",
        ),
    )
}


def read_ar(fh: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """The members of a Unix ``ar`` archive (a ``.deb``): (name, contents)."""
    if fh.read(8) != b"!<arch>\n":
        raise DocumentError("not a Debian package (no ar header)")
    while header := fh.read(60):
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DocumentError("truncated or corrupt Debian package (bad ar member header)")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DocumentError("corrupt Debian package (bad ar member size)") from None
        data = fh.read(size)
        if len(data) < size:
            raise DocumentError("truncated Debian package")
        if size % 2:
            fh.read(1)  # members are 2-byte aligned
        yield name, data


def members_of_deb(deb: Path, members: Sequence[str]) -> dict[str, bytes]:
    """The bytes of those of ``members`` (paths as ``dpkg -c`` lists them) that a ``.deb`` file
    holds, read in one pass over its ``data.tar`` (a missing member is absent from the result)."""
    wanted, found = set(members), {}
    with deb.open("rb") as fh:
        for name, data in read_ar(fh):
            if not name.startswith("data.tar"):
                continue
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
                    for info in tar:
                        if info.name in wanted:
                            if not info.isfile():
                                raise DocumentError(f"{info.name} in {deb.name} is not a file")
                            got = tar.extractfile(info)
                            assert got is not None  # a regular file
                            found[info.name] = got.read()
            except (tarfile.TarError, lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
                raise DocumentError(f"cannot read {deb.name}'s {name}: {exc}") from None
            return found
    raise DocumentError(f"{deb.name} has no data.tar member")


def _text_of(doc: DebDocument, raw: bytes) -> bytes:
    if doc.member.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DocumentError(f"cannot decompress {doc.member}: {exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != doc.sha256:
        raise DocumentError(
            f"{doc.filename} from {doc.package} has sha256 {digest}, expected {doc.sha256}"
            " (the package's documentation changed; this document cannot be compared)"
        )
    return raw


def _is_current(path: Path, doc: DebDocument) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == doc.size
        and hashlib.sha256(path.read_bytes()).hexdigest() == doc.sha256
    )


def _apt_download(doc: DebDocument, into: Path) -> Path:
    """The package's ``.deb``: the recorded version, else the mirror's current one (a point
    release replaces the old version on the mirror; the documents' hashes then decide)."""
    reasons = []
    for spec in (f"{doc.package}={doc.version}", doc.package):
        try:
            done = subprocess.run(
                ["apt-get", "download", spec],
                cwd=into,
                check=False,
                capture_output=True,
                text=True,
                timeout=APT_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"cannot run apt-get download {spec}: {exc}")
            continue
        debs = sorted(into.glob("*.deb"))
        if done.returncode == 0 and len(debs) == 1:
            return debs[0]
        for deb in debs:
            deb.unlink()
        detail = done.stderr.strip().splitlines()[-1:] or [f"{len(debs)} packages written"]
        reasons.append(f"apt-get download {spec} exited with status {done.returncode}: {detail[0]}")
    raise DocumentError(
        f"could not download {doc.package} for document {doc.name!r} ({'; '.join(reasons)});"
        " is a Debian mirror reachable? Or pass --files with a text file"
    )


def fetch_document(name: str, directory: Path, *, out: IO[str] | None = None) -> Path:
    """``directory``/<document's file>, fetched with ``apt-get download`` unless already there
    with the recorded hash. One download writes every registered document of the package."""
    out = out or sys.stderr
    doc = DOCUMENTS.get(name)
    if doc is None:
        raise DocumentError(f"unknown document {name!r}; known: {', '.join(sorted(DOCUMENTS))}")
    directory = Path(directory)
    dest = directory / doc.filename
    if _is_current(dest, doc):
        return dest
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download.", dir=directory) as t:
            print(f"downloading {doc.package} with apt-get ...", file=out, flush=True)
            deb = _apt_download(doc, Path(t))
            others = [
                d
                for d in DOCUMENTS.values()
                if d.package == doc.package
                and d is not doc
                and not _is_current(directory / d.filename, d)
            ]
            raw = members_of_deb(deb, [doc.member, *(d.member for d in others)])
            if doc.member not in raw:
                raise DocumentError(f"{deb.name} has no {doc.member}")
            texts = {doc.name: _text_of(doc, raw[doc.member])}
            for other in others:  # each other document's failure is its own fetch's to report
                if other.member in raw:
                    with contextlib.suppress(DocumentError):
                        texts[other.name] = _text_of(other, raw[other.member])
            for doc_name, text in texts.items():
                part = Path(t) / DOCUMENTS[doc_name].filename
                part.write_bytes(text)
                os.replace(part, directory / DOCUMENTS[doc_name].filename)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}", exc.errno) from exc
    return dest
