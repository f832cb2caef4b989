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
    members_of_deb,
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
    files = {"./usr/share/doc/p/a.rst.gz": gzip.compress(text), "./usr/share/doc/p/b": b"x"}
    for compression in ("xz", "gz"):
        deb = make_deb(tmp_path / f"p.{compression}.deb", files, compression)
        got = members_of_deb(deb, ["./usr/share/doc/p/a.rst.gz", "./usr/share/doc/p/c"])
        assert list(got) == ["./usr/share/doc/p/a.rst.gz"]  # a missing member is absent
        assert gzip.decompress(got["./usr/share/doc/p/a.rst.gz"]) == text
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(DocumentError, match="no ar header"):
        members_of_deb(tmp_path / "bad.deb", ["x"])
    (tmp_path / "cut.deb").write_bytes(deb.read_bytes()[:100])
    with pytest.raises(DocumentError, match="truncated"):
        members_of_deb(tmp_path / "cut.deb", ["x"])
    # a data.tar whose compressed stream is damaged: a clear error, not lzma's or zlib's
    for compression in ("xz", "gz"):
        raw = bytearray(make_deb(tmp_path / "d.deb", files, compression).read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 40] = bytes(40)
        (tmp_path / "damaged.deb").write_bytes(bytes(raw))
        with pytest.raises(
            DocumentError, match=rf"cannot read damaged\.deb's data\.tar\.{compression}"
        ):
            members_of_deb(tmp_path / "damaged.deb", ["./usr/share/doc/p/a.rst.gz"])


def _apt_get(bin_dir: Path, script: str) -> None:
    (bin_dir / "apt-get").write_text("#!/bin/sh\n" + script + "\n")
    (bin_dir / "apt-get").chmod(0o755)


def test_fetching_checks_the_text_reuses_a_good_copy_and_names_what_went_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt-get is a real program here: a stand-in first on PATH writes the package into the
    current directory, as `apt-get download` does (the real download is the next test)."""
    text = b"The RCU requirements, briefly.\n"
    member = "./usr/share/doc/p/r.rst.gz"
    doc = DebDocument("tiny", "p", "1", member, hashlib.sha256(text).hexdigest(), len(text), "x")
    deb = make_deb(tmp_path / "p_1_all.deb", {member: gzip.compress(text)})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setitem(DOCUMENTS, "tiny", doc)
    corpora = tmp_path / "corpora"
    _apt_get(bin_dir, f'echo "$@" >> {tmp_path}/calls\ncp {deb} .')
    got = fetch_document("tiny", corpora)
    assert got.read_bytes() == text and got.name == "r.rst"
    assert (tmp_path / "calls").read_text() == "download p=1\n"  # the recorded version
    _apt_get(bin_dir, "exit 100")  # no mirror needed now: the checked copy is reused
    assert fetch_document("tiny", corpora) == got
    got.write_bytes(text.upper())  # an altered copy is fetched again
    _apt_get(bin_dir, f'[ "$2" = p=1 ] && exit 100\ncp {deb} .')  # that version is gone
    assert fetch_document("tiny", corpora).read_bytes() == text
    # the text changed upstream: refused by its hash, nothing kept
    monkeypatch.setitem(DOCUMENTS, "tiny", replace(doc, sha256="0" * 64))
    got.unlink()
    with pytest.raises(DocumentError, match=r"has sha256 .*expected 0000"):
        fetch_document("tiny", corpora)
    assert sorted(p.name for p in corpora.iterdir()) == []
    monkeypatch.setitem(DOCUMENTS, "tiny", doc)
    # a damaged member inside an intact package
    bad = make_deb(tmp_path / "bad_1_all.deb", {member: b"not gzip data"})
    _apt_get(bin_dir, f"cp {bad} .")
    with pytest.raises(DocumentError, match=r"cannot decompress \./usr/share/doc/p/r\.rst\.gz"):
        fetch_document("tiny", corpora)
    _apt_get(bin_dir, f"cp {make_deb(tmp_path / 'other.deb', {'./x': b'x'})} .")
    with pytest.raises(DocumentError, match=r"other\.deb has no \./usr/share/doc/p/r\.rst\.gz"):
        fetch_document("tiny", corpora)
    with pytest.raises(DocumentError, match=r"unknown document 'nope'; known: .*rcu-requirements"):
        fetch_document("nope", tmp_path)
    # no mirror: both attempts are named
    _apt_get(bin_dir, 'echo "E: Unable to locate package $2" >&2\nexit 100')
    with pytest.raises(DocumentError, match=r"could not download p .*package p=1;.*package p\)"):
        fetch_document("tiny", corpora)
    _apt_get(bin_dir, "exit 0")  # success, but no package written
    with pytest.raises(DocumentError, match="0 packages written"):
        fetch_document("tiny", corpora)
    assert sorted(p.name for p in corpora.iterdir()) == []  # no download directory left


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--document", "rcu-requirements"], "--document needs --model"),
        (["--model", "x", "--document", "nope"], "--document: unknown 'nope'; known: rcu-req"),
        (["--files", "/no/such.txt"], "--files: no such file: /no/such.txt"),
    ],
)
def test_eval_ppl_refuses_a_document_it_cannot_read_before_loading_a_model(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent_runtime.training.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["ppl", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
