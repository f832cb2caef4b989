"""Long real documents from Debian packages (agent_runtime.training.documents): the .deb reader
on packages built here, the hash check, and one real download of linux-doc-6.1 with apt-get."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from agent_runtime.training import documents
from agent_runtime.training.documents import (
    DOCUMENTS,
    DebDocument,
    DocumentError,
    fetch_document,
    member_of_deb,
)


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_deb(path: Path, files: dict[str, bytes], compression: str = "xz") -> Path:
    """A .deb as dpkg-deb writes it: debian-binary, control.tar, data.tar.<compression>."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:gz"):
        pass
    path.write_bytes(
        b"!<arch>\n"
        + _ar_member("debian-binary", b"2.0\n")
        + _ar_member("control.tar.gz", control.getvalue())
        + _ar_member(f"data.tar.{compression}", buf.getvalue())
    )
    return path


def test_a_member_is_read_out_of_a_deb_without_installing_it(tmp_path: Path) -> None:
    text = b"odd-sized text, so the ar member needs its padding byte."
    deb = make_deb(tmp_path / "p.deb", {"./usr/share/doc/p/a.rst.gz": gzip.compress(text)})
    assert gzip.decompress(member_of_deb(deb, "./usr/share/doc/p/a.rst.gz")) == text
    with pytest.raises(DocumentError, match=r"has no \./usr/share/doc/p/b\.rst"):
        member_of_deb(deb, "./usr/share/doc/p/b.rst")
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(DocumentError, match="no ar header"):
        member_of_deb(tmp_path / "bad.deb", "x")
    (tmp_path / "cut.deb").write_bytes(deb.read_bytes()[:100])
    with pytest.raises(DocumentError, match="truncated"):
        member_of_deb(tmp_path / "cut.deb", "x")


def test_a_document_whose_text_changed_is_refused_and_nothing_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt-get is a real program here: a stand-in on PATH writes the package into the current
    directory, as `apt-get download` does (the real download is the next test)."""
    text = b"The RCU requirements, briefly.\n"
    member = "./usr/share/doc/p/r.rst.gz"
    doc = DebDocument("tiny", "p", member, hashlib.sha256(text).hexdigest(), len(text), "x")
    deb = make_deb(tmp_path / "p_1_all.deb", {member: gzip.compress(text)})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\ncp {deb} .\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setitem(DOCUMENTS, "tiny", doc)
    got = fetch_document("tiny", tmp_path / "corpora")
    assert got.read_bytes() == text and got.name == "r.rst"
    monkeypatch.setitem(DOCUMENTS, "tiny", replace(doc, sha256="0" * 64))
    got.unlink()
    with pytest.raises(DocumentError, match=r"has sha256 .*expected 0000"):
        fetch_document("tiny", tmp_path / "corpora")
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == []
    with pytest.raises(DocumentError, match=r"unknown document 'nope'; known: .*rcu-requirements"):
        fetch_document("nope", tmp_path)
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\necho 'E: Unable to locate package p' >&2\nexit 100\n"
    )
    with pytest.raises(DocumentError, match=r"could not download p .*Unable to locate package p"):
        fetch_document("tiny", tmp_path / "corpora")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="not a Debian machine")
def test_the_kernel_documents_download_from_debian_by_package_name(tmp_path: Path) -> None:
    path = fetch_document("rcu-requirements", tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DOCUMENTS["rcu-requirements"].sha256
    # one download wrote the package's other documents too
    assert {p.name for p in tmp_path.iterdir()} == {
        d.filename for d in DOCUMENTS.values() if d.package == "linux-doc-6.1"
    }
    assert "grace period" in path.read_text(encoding="utf-8")
    assert documents.fetch_document("kvm-api", tmp_path).stat().st_size == DOCUMENTS["kvm-api"].size
