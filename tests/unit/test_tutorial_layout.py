"""The tutorial's package layout as unseal input: round trips, hostile tars, integrity, deep trees,
package files that are not regular files, I/O errors."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confinfer.errors import ConfinferError, Interrupted
from loader import tutorial
from loader.dest import Destination
from tests.tutorial_pkg import (
    ARCHIVE_NAME,
    WRAPPED_DEK_NAME,
    build_tar,
    dir_info,
    encrypt_archive,
    file_info,
    files_of,
    make_archive,
    model_trees,
    special_info,
    tree_entries,
)

pytestmark = pytest.mark.unit

MiB = 1 << 20


def model_dir(root: Path, name: str = "Phi-4-mini-reasoning") -> Path:
    model = root / name
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (model / "tokenizer" / "tokenizer.json").write_text('{"v": 1}')
    (model / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3 * MiB + 17))
    (model / "model-00002-of-00002.safetensors").write_bytes(os.urandom(MiB))
    (model / "empty.txt").write_bytes(b"")
    return model


def seal(tmp_path: Path, tar: bytes, dek: bytes | None = None) -> tuple[Path, bytearray]:
    dek = os.urandom(32) if dek is None else dek
    archive = tmp_path / "pkg" / ARCHIVE_NAME
    archive.parent.mkdir(exist_ok=True)
    archive.write_bytes(encrypt_archive(tar, dek))
    return archive, bytearray(dek)


def unseal(
    archive: Path, dest_root: Path, dek: bytearray, max_bytes: int | None = None
) -> list[int]:
    steps: list[int] = []
    with Destination(dest_root, max_bytes=max_bytes) as dest:
        tutorial.unseal_tutorial(archive, dest, dek, steps.append)
    return steps


def refused(
    tmp_path: Path, tar: bytes, *, max_bytes: int | None = None, dek: bytes | None = None
) -> ConfinferError:
    archive, key = seal(tmp_path, tar)
    if dek is not None:
        key = bytearray(dek)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, key, max_bytes)
    assert list(dest.iterdir()) == []
    return info.value


def test_roundtrip_of_the_tutorials_own_archive(tmp_path: Path) -> None:
    model = model_dir(tmp_path / "src")
    archive, dek = seal(tmp_path, make_archive(model, tmp_path))
    steps = unseal(archive, tmp_path / "dest", dek)
    assert files_of(tmp_path / "dest") == {
        f"Phi-4-mini-reasoning/{k}": v for k, v in files_of(model).items()
    }
    assert sum(steps) == archive.stat().st_size
    assert max(steps) <= tutorial.CHUNK
    assert (tmp_path / "dest").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_roundtrip_formats(tmp_path: Path, fmt: int) -> None:
    long = "d" * 120 + "/" + "w" * 130 + ".bin"
    payload = os.urandom(tutorial.CHUNK + 1000)  # a payload that spans chunks
    tar = build_tar([(file_info(long), payload), (file_info("c.json"), b"{}")], fmt)
    archive, dek = seal(tmp_path, tar)
    unseal(archive, tmp_path / "dest", dek)
    assert files_of(tmp_path / "dest") == {long: payload, "c.json": b"{}"}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=model_trees(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_property_roundtrip_through_the_tutorial_layout(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes | None], fmt: int
) -> None:
    work = tmp_path_factory.mktemp("prop")
    archive, dek = seal(work, build_tar(tree_entries(files), fmt))
    unseal(archive, work / "dest", dek)
    got = {
        p.relative_to(work / "dest").as_posix(): None if p.is_dir() else p.read_bytes()
        for p in (work / "dest").rglob("*")
    }
    assert got == files


def test_detect_and_wrapped_dek(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    assert tutorial.detect(pkg) is None
    (pkg / ARCHIVE_NAME).write_bytes(b"x" * 40)
    (pkg / WRAPPED_DEK_NAME).write_bytes(b"w" * 256)
    found = tutorial.detect(pkg)
    assert found is not None and found.read_wrapped_dek() == b"w" * 256
    (pkg / WRAPPED_DEK_NAME).write_bytes(b"")
    with pytest.raises(ConfinferError) as info:
        found.read_wrapped_dek()
    assert info.value.reason == "wrapped-dek-invalid"
    (pkg / WRAPPED_DEK_NAME).write_bytes(b"w" * 2000)
    with pytest.raises(ConfinferError) as info:
        found.read_wrapped_dek()
    assert info.value.reason == "wrapped-dek-invalid"


# -- hostile tar content, properly encrypted ----------------------------------------------------


def _with_pax_path(name: str, path: str) -> tarfile.TarInfo:
    info = file_info(name)
    info.pax_headers = {"path": path}
    return info


Entries = list[tuple[tarfile.TarInfo, bytes | None]]

HOSTILE: dict[str, tuple[Entries, str]] = {
    "traversal": ([(file_info("../x"), b"x")], "unsafe-path"),
    "absolute": ([(file_info("/etc/x"), b"x")], "unsafe-path"),
    "symlink": ([(special_info("m/l", tarfile.SYMTYPE, "/etc/passwd"), None)], "unsafe-entry-type"),
    "hardlink": (
        [(file_info("m/a"), b"a"), (special_info("m/h", tarfile.LNKTYPE, "m/a"), None)],
        "unsafe-entry-type",
    ),
    "device": ([(special_info("m/null", tarfile.CHRTYPE), None)], "unsafe-entry-type"),
    "fifo": ([(special_info("m/p", tarfile.FIFOTYPE), None)], "unsafe-entry-type"),
    "file-then-file-below": (
        [(file_info("m/a"), b"a"), (file_info("m/a/b"), b"b")],
        "path-through-file",
    ),
    "file-then-dir-below": (
        [(file_info("m/a"), b"a"), (dir_info("m/a/d"), None)],
        "path-through-file",
    ),
    "file-then-same-dir": ([(file_info("m/a"), b"a"), (dir_info("m/a"), None)], "duplicate-entry"),
    "pax-path-dotdot": ([(_with_pax_path("m/ok", "../evil"), b"x")], "unsafe-path"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_dest_empty(tmp_path: Path, case: str) -> None:
    entries, reason = HOSTILE[case]
    # A legitimate file first, so that refusing has something to wipe.
    tar = build_tar([(file_info("m/config.json"), b"{}"), *entries])
    assert refused(tmp_path, tar).reason == reason
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_oversize_vs_max_bytes(tmp_path: Path) -> None:
    tar = build_tar([(file_info("m/a"), b"a" * 1000), (file_info("m/b"), b"b" * 5000)])
    assert refused(tmp_path, tar, max_bytes=4096).reason == "size-limit"


def test_truncated_tar(tmp_path: Path) -> None:
    tar = build_tar([(file_info("m/a"), os.urandom(5000))])
    assert refused(tmp_path, tar[:3000]).reason == "archive-truncated"


def test_tampered_tag(tmp_path: Path) -> None:
    archive, dek = seal(tmp_path, build_tar([(file_info("m/a"), b"a" * 100)]))
    data = bytearray(archive.read_bytes())
    data[-1] ^= 0x01
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, dek)
    assert info.value.reason == "integrity"
    assert not dest.exists()


def test_tampered_ciphertext_reports_integrity_not_tar(tmp_path: Path) -> None:
    archive, dek = seal(tmp_path, build_tar([(file_info("m/a"), b"a" * 100)]))
    data = bytearray(archive.read_bytes())
    data[12 + 150] ^= 0x01  # inside the first header: the tar reader refuses it first
    archive.write_bytes(data)
    with pytest.raises(ConfinferError) as info:
        unseal(archive, tmp_path / "dest", dek)
    assert info.value.reason == "integrity"
    assert not (tmp_path / "dest").exists()


def test_wrong_dek(tmp_path: Path) -> None:
    tar = build_tar([(file_info("m/a"), b"a" * 100)])
    assert refused(tmp_path, tar, dek=os.urandom(32)).reason == "integrity"


def test_dek_of_wrong_length(tmp_path: Path) -> None:
    archive, _ = seal(tmp_path, build_tar([(file_info("m/a"), b"a")]))
    with pytest.raises(ConfinferError) as info:
        unseal(archive, tmp_path / "dest", bytearray(16))
    assert info.value.reason == "dek-length"
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("size", [0, 1, 27])
def test_too_short(tmp_path: Path, size: int) -> None:
    archive = tmp_path / ARCHIVE_NAME
    archive.write_bytes(os.urandom(size))
    with pytest.raises(ConfinferError) as info:
        unseal(archive, tmp_path / "dest", bytearray(32))
    assert info.value.reason == "archive-too-short"
    assert not (tmp_path / "dest").exists()


def test_empty_ciphertext_is_a_truncated_tar(tmp_path: Path) -> None:
    archive, dek = seal(tmp_path, b"")
    assert archive.stat().st_size == 28
    with pytest.raises(ConfinferError) as info:
        unseal(archive, tmp_path / "dest", dek)
    assert info.value.reason == "archive-truncated"


def test_interrupt_midway_wipes(tmp_path: Path) -> None:
    payload = os.urandom(3 * tutorial.CHUNK)
    archive, dek = seal(tmp_path, build_tar([(file_info("m/a"), payload)]))
    dest_root = tmp_path / "dest"

    def stop(n: int) -> None:
        if n == tutorial.CHUNK:  # after the first chunk, not the nonce
            assert any(dest_root.rglob("a"))  # plaintext has been written by now
            raise Interrupted("stopped by SIGTERM")

    with pytest.raises(Interrupted), Destination(dest_root) as dest:
        tutorial.unseal_tutorial(archive, dest, dek, stop)
    assert not dest_root.exists()


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfinferError) as info:
        unseal(tmp_path, tmp_path / "dest", bytearray(32))
    assert info.value.reason == "package-unreadable"
    with pytest.raises(ConfinferError) as info:
        unseal(tmp_path / "missing", tmp_path / "dest", bytearray(32))
    assert info.value.reason == "package-unreadable"


# -- deep trees --------------------------------------------------------------------------------

DEEP = "/".join(["d"] * 2046)  # with "/fN": as deep as a path may go (4095 bytes)


def test_a_deep_tree_then_a_hostile_entry_leaves_nothing(tmp_path: Path) -> None:
    entries: Entries = [(file_info(f"{DEEP}/f{i}"), b"plaintext") for i in range(3)]
    entries.append((special_info("m/l", tarfile.SYMTYPE, "/etc/passwd"), None))
    assert refused(tmp_path, build_tar(entries)).reason == "unsafe-entry-type"


def test_a_deep_tree_then_a_bad_tag_leaves_nothing(tmp_path: Path) -> None:
    tar = build_tar([(file_info(f"{DEEP}/f"), b"plaintext")])
    archive, dek = seal(tmp_path, tar)
    data = bytearray(archive.read_bytes())
    data[-1] ^= 0x01
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, dek)
    assert info.value.reason == "integrity"
    assert not dest.exists()


def test_a_deep_tree_unseals_and_a_committed_one_wipes(tmp_path: Path) -> None:
    archive, dek = seal(tmp_path, build_tar([(file_info(f"{DEEP}/f"), b"deep")]))
    root = tmp_path / "dest"
    with Destination(root) as dest:
        tutorial.unseal_tutorial(archive, dest, dek)
    assert len(list(root.iterdir())) == 1
    dest.wipe()
    assert not root.exists()


# -- package files that are not regular files ---------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [ARCHIVE_NAME, WRAPPED_DEK_NAME])
@pytest.mark.parametrize("kind", ["fifo", "symlink", "dev-zero", "directory"])
def test_detect_refuses_what_is_not_a_regular_file(tmp_path: Path, name: str, kind: str) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / ARCHIVE_NAME).write_bytes(b"x" * 40)
    (pkg / WRAPPED_DEK_NAME).write_bytes(b"w" * 256)
    target = pkg / name
    target.rename(pkg / "real")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        target.symlink_to(pkg / "real")
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    with pytest.raises(ConfinferError) as info:
        tutorial.detect(pkg)
    assert info.value.reason == "package-unreadable"
    assert str(target) in info.value.message


def test_detect_needs_both_names(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    os.mkfifo(pkg / ARCHIVE_NAME)  # only one of the two: not this layout at all
    assert tutorial.detect(pkg) is None
    assert tutorial.detect(tmp_path / "missing") is None


@pytest.mark.timeout(60)
def test_a_fifo_swapped_in_after_detect_is_refused_without_blocking(tmp_path: Path) -> None:
    archive = tmp_path / "pkg" / ARCHIVE_NAME
    wrapped = tmp_path / "pkg" / WRAPPED_DEK_NAME
    archive.parent.mkdir()
    archive.write_bytes(b"x" * 40)
    wrapped.write_bytes(b"w" * 256)
    package = tutorial.detect(tmp_path / "pkg")
    assert package is not None
    for path in (archive, wrapped):
        path.unlink()
        os.mkfifo(path)
    with pytest.raises(ConfinferError) as info:
        package.read_wrapped_dek()
    assert info.value.reason == "package-unreadable"
    dest = tmp_path / "dest"
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, bytearray(32))
    assert info.value.reason == "package-unreadable"
    assert not dest.exists()


# -- I/O errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOENT, errno.EACCES])
def test_write_errors_are_dest_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def fail(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    archive, dek = seal(tmp_path, build_tar([(file_info("m/secret"), b"plaintext")]))
    dest = tmp_path / "dest"
    monkeypatch.setattr(os, "write", fail)
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, dek)
    monkeypatch.undo()
    assert info.value.reason == "dest-write"
    assert info.value.message == f"cannot write to {dest}: {os.strerror(code)}"
    assert not dest.exists()


def test_read_errors_are_package_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    archive, dek = seal(tmp_path, build_tar([(file_info("m/a"), os.urandom(3 * tutorial.CHUNK))]))
    dest = tmp_path / "dest"
    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(ConfinferError) as info:
        unseal(archive, dest, dek)
    monkeypatch.undo()
    assert info.value.reason == "package-read"
    assert info.value.message == f"cannot read {archive}: {os.strerror(errno.EIO)}"
    assert not dest.exists()
