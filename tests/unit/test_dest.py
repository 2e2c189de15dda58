"""loader.dest: safe relative paths and a destination that only ever holds what it should."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path, PurePosixPath

import pytest

from confinfer.errors import (
    ConfinferError,
    NoSpaceError,
    SizeLimitError,
    UnsafeArchiveError,
    UsageError,
)
from loader import signals
from loader.dest import Destination, dir_mode, file_mode, safe_relpath

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a", "a"),
        ("a/b/c.bin", "a/b/c.bin"),
        ("./a/b", "a/b"),
        ("a//b/", "a/b"),
        ("model/", "model"),
        ("тест/模型.json", "тест/模型.json"),
        ("..a/b..", "..a/b.."),
        ("x" * 255, "x" * 255),
    ],
)
def test_safe_relpath_accepts_and_normalises(name: str, expected: str) -> None:
    assert safe_relpath(name) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "./", "/", "//", "/etc/passwd", "../x", "a/../b", "a/..", "..",
        "a\x00b", "a\\b", "..\\x", "a\nb", "a\x7fb", "\udcff", "x" * 256, "a/" * 2048 + "b",
    ],
)
def test_safe_relpath_refuses(name: str) -> None:
    with pytest.raises(UnsafeArchiveError) as info:
        safe_relpath(name)
    assert info.value.reason == "unsafe-path"


def test_modes_lose_special_and_write_bits() -> None:
    assert file_mode(0o4777) == 0o755
    assert file_mode(0o000) == 0o400
    assert file_mode(0o666) == 0o644
    assert dir_mode(0o1777) == 0o755
    assert dir_mode(0o000) == 0o700


def test_new_root_is_private_and_removed_by_wipe(tmp_path: Path) -> None:
    root = tmp_path / "model"
    dest = Destination(root)
    assert root.stat().st_mode & 0o777 == 0o700
    fd = dest.open_file("a/b/c.bin", 0o6755, size=3)
    os.write(fd, b"abc")
    os.close(fd)
    dest.wipe()
    assert not root.exists()


def test_existing_empty_root_is_kept_but_emptied(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    root.mkdir(mode=0o750)
    dest = Destination(root)
    dest.mkdir("d", 0o777)
    os.close(dest.open_file("d/f"))
    dest.wipe()
    assert root.is_dir() and not any(root.iterdir())
    assert root.stat().st_mode & 0o777 == 0o750


def test_non_empty_root_is_refused_and_untouched(tmp_path: Path) -> None:
    root = tmp_path / "busy"
    root.mkdir()
    (root / "keep").write_text("x")
    with pytest.raises(UsageError) as info:
        Destination(root)
    assert info.value.reason == "dest-not-empty"
    assert (root / "keep").read_text() == "x"


@pytest.mark.parametrize("kind", ["file", "symlink", "no-parent"])
def test_unusable_root_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    root = tmp_path / "root"
    if kind == "file":
        root.write_text("x")
    elif kind == "symlink":
        root.symlink_to(target)
    else:
        root = tmp_path / "missing" / "root"
    with pytest.raises(UsageError) as info:
        Destination(root)
    assert info.value.reason == "dest-invalid"


def test_files_and_directories_get_sanitised_modes(tmp_path: Path) -> None:
    with Destination(tmp_path / "m") as dest:
        dest.mkdir("d", 0o2777)
        os.close(dest.open_file("d/x", 0o4777))
        os.close(dest.open_file("implicit/parent/y", 0o600))
    assert (tmp_path / "m/d").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "m/d/x").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "m/implicit/parent").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "m/implicit/parent/y").stat().st_mode & 0o7777 == 0o600


def test_open_file_is_exclusive(tmp_path: Path) -> None:
    with Destination(tmp_path / "m") as dest:
        os.close(dest.open_file("f"))
        with pytest.raises(UnsafeArchiveError) as info:
            dest.open_file("f")
        assert info.value.reason == "duplicate-entry"
        dest.mkdir("d")
        with pytest.raises(UnsafeArchiveError):
            dest.open_file("d")


def test_paths_through_files_and_symlinks_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "m"
    with Destination(root) as dest:
        os.close(dest.open_file("file"))
        with pytest.raises(UnsafeArchiveError) as info:
            dest.open_file("file/x")
        assert info.value.reason == "path-conflict"
        # Something else plants links inside the destination: nothing follows them.
        (root / "link").symlink_to(outside)
        (root / "flink").symlink_to(outside / "target")
        with pytest.raises(UnsafeArchiveError):
            dest.open_file("link/x")
        with pytest.raises(UnsafeArchiveError):
            dest.mkdir("link")
        with pytest.raises(UnsafeArchiveError):
            dest.open_file("flink")
        with pytest.raises(UnsafeArchiveError):
            dest.open_file("../outside/x")
    assert list(outside.iterdir()) == []


def test_size_cap_counts_sizes_and_charges(tmp_path: Path) -> None:
    root = tmp_path / "m"
    with pytest.raises(SizeLimitError) as info, Destination(root, max_bytes=10) as dest:
        os.close(dest.open_file("a", size=6))
        dest.charge(4)
        assert dest.used == 10
        dest.open_file("b", size=1)
    assert info.value.reason == "size-limit"
    assert not root.exists()


def test_context_commits_on_success_and_wipes_on_error(tmp_path: Path) -> None:
    with Destination(tmp_path / "ok") as dest:
        fd = dest.open_file("f")
        os.write(fd, b"data")
        os.close(fd)
    assert (tmp_path / "ok/f").read_bytes() == b"data"
    with pytest.raises(RuntimeError):
        dest.open_file("g")

    with pytest.raises(KeyError), Destination(tmp_path / "bad") as dest:
        os.close(dest.open_file("f"))
        raise KeyError("boom")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(RuntimeError):
        dest.mkdir("again")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_file_system_becomes_no_space(tmp_path: Path, code: int) -> None:
    with pytest.raises(NoSpaceError) as info, Destination(tmp_path / "m") as dest:
        os.close(dest.open_file("f"))
        raise OSError(code, os.strerror(code))
    assert info.value.reason == "no-space"
    assert not (tmp_path / "m").exists()


def test_other_os_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(PermissionError), Destination(tmp_path / "m"):
        raise PermissionError(errno.EACCES, "denied")
    assert not (tmp_path / "m").exists()


def test_wipe_truncates_files_still_held_open(tmp_path: Path) -> None:
    dest = Destination(tmp_path / "m")
    fd = dest.open_file("held", size=5)
    os.write(fd, b"12345")
    try:
        dest.wipe()
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    dest.wipe()  # idempotent
    assert not (tmp_path / "m").exists()


def test_wipe_holds_signals_until_done(tmp_path: Path) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_errors_are_confinfer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfinferError):
        safe_relpath("../x")
