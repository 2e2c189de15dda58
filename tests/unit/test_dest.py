"""loader.dest: safe relative paths and a destination that only ever holds what it should, that
turns every write failure into one error, and whose wipe removes any tree (committed or not)."""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from confinfer.errors import (
    ConfinferError,
    NoSpaceError,
    SizeLimitError,
    UnsafeArchiveError,
    UsageError,
)
from loader import signals
from loader.dest import Destination, WriteFailed, dir_mode, file_mode, safe_relpath

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
        "",
        ".",
        "./",
        "/",
        "//",
        "/etc/passwd",
        "../x",
        "a/../b",
        "a/..",
        "..",
        "a\x00b",
        "a\\b",
        "..\\x",
        "a\nb",
        "a\x7fb",
        "\udcff",
        "x" * 256,
        "a/" * 2048 + "b",
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


# -- the wipe: any tree, iterative, descriptor-relative -----------------------------------------

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def plant_chain(root: Path, depth: int, *, files_every: int = 100) -> None:
    """A chain of ``depth`` nested directories below ``root``, made descriptor by descriptor
    (the path is far beyond PATH_MAX), with a file at the bottom and every few levels."""
    fd = os.open(root, DIR_FLAGS)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if level % files_every == 0 or level == depth - 1:
                f = os.open("secret", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
                os.write(f, b"plaintext")
                os.close(f)
    finally:
        os.close(fd)


@pytest.mark.parametrize("depth", [1200, 5000])
def test_wipe_removes_a_tree_deeper_than_recursion_and_path_max(tmp_path: Path, depth: int) -> None:
    root = tmp_path / "m"
    before = open_fds()
    dest = Destination(root)
    os.close(dest.open_file("top", size=0))
    plant_chain(root, depth)
    dest.wipe()
    assert not root.exists()
    assert open_fds() == before  # no descriptor left behind, however deep it went


def test_deep_tree_wiped_by_the_context_and_root_kept_when_it_existed(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    root.mkdir(mode=0o750)
    with pytest.raises(KeyError), Destination(root) as dest:
        dest.mkdir("a/b", 0o755)
        plant_chain(root / "a", 3000)
        raise KeyError("boom")
    assert root.is_dir() and list(root.iterdir()) == []
    assert root.stat().st_mode & 0o777 == 0o750


def test_wide_and_deep_tree_with_files_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "m"
    dest = Destination(root)
    for i in range(30):
        dest.mkdir(f"w{i}/x/y")
        for j in range(5):
            os.close(dest.open_file(f"w{i}/x/f{j}", size=0))
    plant_chain(root / "w7" / "x", 700, files_every=7)
    dest.wipe()
    assert not root.exists()


def test_wipe_reopens_ancestors_by_name_when_dotdot_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its descriptor window the wipe climbs through ".."; should that not lead to the
    directory it came down through, it walks down again from root by name."""
    real_open = os.open

    def no_dotdot(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "..":
            raise PermissionError(errno.EACCES, "denied")
        return real_open(path, flags, *args, **kwargs)

    root = tmp_path / "m"
    dest = Destination(root)
    plant_chain(root, 300, files_every=10)
    monkeypatch.setattr(os, "open", no_dotdot)
    dest.wipe()
    monkeypatch.undo()
    assert not root.exists()


def test_a_symlink_swapped_in_during_the_wipe_is_removed_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "keep").write_text("not ours")
    (outside / "d" / "keep").write_text("not ours")
    root = tmp_path / "m"
    dest = Destination(root)
    dest.mkdir("a/b")
    fd = dest.open_file("a/b/f", size=1)
    os.write(fd, b"x")
    os.close(fd)
    (root / "plain-link").symlink_to(outside)
    real_scandir = os.scandir
    swapped: list[bool] = []

    def swapping(fd: Any) -> Any:
        listing = real_scandir(fd)
        if not swapped:
            # After the wipe has listed root (and seen "a" as a directory): swap in a link.
            entries = list(listing)
            listing.close()
            os.rename(root / "a", tmp_path / "moved")
            (root / "a").symlink_to(outside)
            swapped.append(True)
            return _Listing(entries)
        return listing

    monkeypatch.setattr(os, "scandir", swapping)
    dest.wipe()
    monkeypatch.undo()
    assert swapped and not root.exists()
    assert (outside / "keep").read_text() == "not ours"
    assert (outside / "d" / "keep").read_text() == "not ours"


class _Listing:
    """What os.scandir returns, from entries read already."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self._entries = entries

    def __enter__(self) -> list[os.DirEntry[str]]:
        return self._entries

    def __exit__(self, *exc: object) -> None:
        return None


def test_wipe_stays_on_the_destination_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory on another device (something mounted inside) is not entered: reported."""
    root = tmp_path / "m"
    dest = Destination(root)
    dest.mkdir("mnt")
    os.close(dest.open_file("f", size=0))
    real_fstat = os.fstat
    mnt_ino = (root / "mnt").stat().st_ino

    def other_device(fd: int) -> Any:
        info = real_fstat(fd)
        if info.st_ino == mnt_ino:
            fields = list(info)
            fields[stat.ST_DEV] += 1
            return os.stat_result(fields)
        return info

    monkeypatch.setattr(os, "fstat", other_device)
    with pytest.raises(ConfinferError) as info:
        dest.wipe()
    monkeypatch.undo()
    assert info.value.reason == "wipe-failed"
    assert "another file system" in info.value.message
    assert not (root / "f").exists()


# -- wiping a committed tree (revocation) ------------------------------------------------------


def test_wipe_after_commit_removes_a_created_root(tmp_path: Path) -> None:
    root = tmp_path / "model"
    with Destination(root) as dest:
        dest.mkdir("tokenizer")
        fd = dest.open_file("tokenizer/vocab.json", size=4)
        os.write(fd, b"{}{}")
        os.close(fd)
        plant_chain(root / "tokenizer", 1500)
    assert (root / "tokenizer" / "vocab.json").read_bytes() == b"{}{}"
    before = open_fds()
    dest.wipe()
    assert not root.exists()
    dest.wipe()  # idempotent
    assert open_fds() == before
    with pytest.raises(RuntimeError):
        dest.open_file("again")


def test_wipe_after_commit_keeps_an_existing_root_empty(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    root.mkdir(mode=0o755)
    with Destination(root) as dest:
        os.close(dest.open_file("a/b/c", size=0))
    dest.wipe()
    assert root.is_dir() and list(root.iterdir()) == []
    assert root.stat().st_mode & 0o777 == 0o755
    dest.wipe()


def test_wipe_after_commit_keeps_a_root_that_became_a_mount_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "model"
    with Destination(root) as dest:
        os.close(dest.open_file("f", size=0))
    real_rmdir = os.rmdir

    def busy(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == root:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", busy)
    dest.wipe()
    monkeypatch.undo()
    assert root.is_dir() and list(root.iterdir()) == []


def test_wipe_after_commit_when_root_is_gone_already(tmp_path: Path) -> None:
    root = tmp_path / "model"
    with Destination(root) as dest:
        os.close(dest.open_file("f", size=0))
    (root / "f").unlink()
    root.rmdir()
    dest.wipe()
    assert not root.exists()


@pytest.mark.parametrize("replacement", ["directory", "symlink"])
def test_wipe_after_commit_never_wipes_what_replaced_root(tmp_path: Path, replacement: str) -> None:
    root = tmp_path / "model"
    with Destination(root) as dest:
        os.close(dest.open_file("f", size=0))
    os.rename(root, tmp_path / "elsewhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep").write_text("not ours")
    if replacement == "directory":
        os.rename(other, root)
        kept = root / "keep"
    else:
        root.symlink_to(other)
        kept = other / "keep"
    with pytest.raises(ConfinferError) as info:
        dest.wipe()
    assert info.value.reason == "wipe-failed"
    assert kept.read_text() == "not ours"


def test_a_failed_wipe_can_be_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "model"
    with Destination(root) as dest:
        fd = dest.open_file("d/weights", size=6)
        os.write(fd, b"secret")
        os.close(fd)
    real_unlink = os.unlink

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(ConfinferError) as info:
        dest.wipe()
    assert info.value.reason == "wipe-failed"
    assert info.value.message.startswith(f"could not remove everything under {root}: d/weights")
    assert (root / "d" / "weights").stat().st_size == 0  # truncated all the same
    monkeypatch.setattr(os, "unlink", real_unlink)
    dest.wipe()
    assert not root.exists()


# -- every OS error while writing is one dest-write error ---------------------------------------


ERRORS = [errno.EROFS, errno.ENOENT, errno.EACCES, errno.EIO, errno.ENOTDIR, errno.EPERM]


def failing(name: str, code: int, real: Any) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        if name == "open" and not args[1] & os.O_CREAT:
            return real(*args, **kwargs)  # directories are opened without O_CREAT
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("code", ERRORS)
@pytest.mark.parametrize("call", ["mkdir", "open", "fchmod"])
def test_os_errors_while_writing_are_dest_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    root = tmp_path / "m"
    with pytest.raises(ConfinferError) as info, Destination(root) as dest:
        os.close(dest.open_file("ok", size=0))
        monkeypatch.setattr(os, call, failing(call, code, getattr(os, call)))
        try:
            if call == "mkdir":
                dest.mkdir("sub/dir")
            else:
                os.close(dest.open_file("sub/file", size=0))
        finally:
            monkeypatch.undo()
    assert info.value.reason == "dest-write"
    assert info.value.message == f"cannot write to {root}: {os.strerror(code)}"
    assert "\n" not in info.value.one_line()
    assert not root.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_file_system_while_creating_is_no_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    root = tmp_path / "m"
    with pytest.raises(NoSpaceError) as info, Destination(root) as dest:
        monkeypatch.setattr(os, "mkdir", failing("mkdir", code, os.mkdir))
        try:
            dest.mkdir("d")
        finally:
            monkeypatch.undo()
    assert info.value.reason == "no-space"
    assert str(root) in info.value.message
    assert not root.exists()


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOSPC])
def test_write_failed_from_pwrite_all_names_the_destination(tmp_path: Path, code: int) -> None:
    root = tmp_path / "m"
    with pytest.raises(ConfinferError) as info, Destination(root) as dest:
        fd = dest.open_file("f", size=1)
        os.close(fd)
        raise WriteFailed(code, os.strerror(code))
    if code == errno.ENOSPC:
        assert info.value.reason == "no-space"
        assert info.value.message == f"the file system of {root} is full"
    else:
        assert info.value.reason == "dest-write"
        assert info.value.message == f"cannot write to {root}: {os.strerror(code)}"
    assert not root.exists()


def test_unusable_existing_root_is_dest_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mnt"
    root.mkdir()
    real_listdir = os.listdir

    def eio(path: Any) -> list[str]:
        if isinstance(path, int):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", eio)
    with pytest.raises(UsageError) as info:
        Destination(root)
    assert info.value.reason == "dest-invalid"
    assert root.is_dir()
