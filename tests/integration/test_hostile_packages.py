"""Hostile package files and hostile destinations, through the real ``confinfer`` process.

- a package file that is not a regular file (a FIFO, a link to ``/dev/zero``, a directory) is
  refused in one line and never waited on: each command has a finite timeout far above its
  normal run time, so a hang fails the test instead of the suite;
- a read-only destination (a read-only tmpfs, a read-only bind mount) is ``dest-write``, and the
  destination is left empty;
- a package that builds a tree deeper than Python's recursion limit and then fails leaves
  nothing behind;
- a committed model on a tmpfs mount point is wiped to an empty mount point (revocation).

Mounting needs root; those tests are skipped where the mount is not permitted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader.dest import Destination
from tests import sealedref
from tests.cli import assert_refused, run_confinfer, small_tmpfs
from tests.tutorial_pkg import (
    ARCHIVE_NAME,
    WRAPPED_DEK_NAME,
    build_tar,
    file_info,
    special_info,
    write_package,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# A refusal takes about a second (interpreter start-up); a command that blocks would never end.
REFUSAL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    private, _ = sealedref.write_pem(tmp_path_factory.mktemp("keys"), 0)
    return private


def sealed_package(
    pkg: Path, files: dict[str, bytes] | None = None, directories: list[str] | None = None
) -> bytes:
    spec = sealedref.Spec(
        files=files or {"config.json": b"{}", "w.bin": os.urandom(300)},
        directories=directories or [],
        chunk_size=64,
    )
    data = sealedref.build(spec)
    sealedref.install(data, pkg)
    return data


def tutorial_package(pkg: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    write_package(pkg, build_tar(entries), sealedref.kek(0).public_key())


def unseal(pkg: Path, dest: Path, pem: Path) -> subprocess.CompletedProcess[str]:
    return run_confinfer(
        "unseal", pkg, "--dest", dest, "--kek-private-key", pem, timeout=REFUSAL_TIMEOUT_S
    )


def inspect(pkg: Path) -> subprocess.CompletedProcess[str]:
    return run_confinfer("inspect", pkg, timeout=REFUSAL_TIMEOUT_S)


def replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


# -- package files that are not regular files ---------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_sealed_package_file_that_is_not_a_regular_file(
    tmp_path: Path, pem: Path, kind: str
) -> None:
    pkg = tmp_path / "pkg"
    sealed_package(pkg)
    replace_with(pkg / "model.sealed", kind)
    assert_refused(inspect(pkg), "package-unreadable")
    dest = tmp_path / "dest"
    assert_refused(unseal(pkg, dest, pem), "package-unreadable")
    assert not dest.exists()


@pytest.mark.parametrize("name", [ARCHIVE_NAME, WRAPPED_DEK_NAME])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_tutorial_file_that_is_not_a_regular_file(
    tmp_path: Path, pem: Path, name: str, kind: str
) -> None:
    pkg = tmp_path / "pkg"
    tutorial_package(pkg, [(file_info("m/config.json"), b"{}")])
    replace_with(pkg / name, kind)
    assert_refused(inspect(pkg), "package-unreadable")
    dest = tmp_path / "dest"
    assert_refused(unseal(pkg, dest, pem), "package-unreadable")
    assert not dest.exists()


# -- read-only destinations ---------------------------------------------------------------------


@contextlib.contextmanager
def mounted(argv: list[str], where: Path, *more: list[str]) -> Iterator[Path]:
    """Run ``mount ARGV... WHERE`` (then each of ``more`` + WHERE); skip when not permitted;
    unmount on the way out."""
    result = subprocess.run(
        ["mount", *argv, str(where)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    try:
        for extra in more:
            subprocess.run(
                ["mount", *extra, str(where)], capture_output=True, text=True, check=True
            )
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@contextlib.contextmanager
def read_only_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    with mounted(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], where) as mnt:
        yield mnt


@contextlib.contextmanager
def read_only_bind(source: Path, where: Path) -> Iterator[Path]:
    source.mkdir()
    where.mkdir()
    with mounted(["--bind", str(source)], where, ["-o", "remount,bind,ro"]) as mnt:
        yield mnt


@pytest.mark.parametrize("layout", ["sealed", "tutorial"])
def test_read_only_tmpfs_destination_is_dest_write(tmp_path: Path, pem: Path, layout: str) -> None:
    pkg = tmp_path / "pkg"
    if layout == "sealed":
        sealed_package(
            pkg, directories=["d"], files={"d/config.json": b"{}", "w.bin": os.urandom(300)}
        )
    else:
        tutorial_package(pkg, [(file_info("m/config.json"), b"{}")])
    with read_only_tmpfs(tmp_path / "ro") as mnt:
        result = unseal(pkg, mnt, pem)
        assert_refused(result, "dest-write")
        assert f"cannot write to {mnt}: Read-only file system" in result.stderr
        assert list(mnt.iterdir()) == []


def test_read_only_bind_mount_destination_is_dest_write(tmp_path: Path, pem: Path) -> None:
    pkg = tmp_path / "pkg"
    sealed_package(pkg)
    with read_only_bind(tmp_path / "src", tmp_path / "ro") as mnt:
        result = unseal(pkg, mnt, pem)
        assert_refused(result, "dest-write")
        assert "Read-only file system" in result.stderr
        assert list(mnt.iterdir()) == []
        # A destination to be created on it cannot be: the destination itself is refused.
        assert_refused(unseal(pkg, mnt / "model", pem), "dest-invalid")
        assert list(mnt.iterdir()) == []
    assert list((tmp_path / "src").iterdir()) == []


def test_seal_into_a_read_only_tmpfs_is_dest_write(tmp_path: Path) -> None:
    _, public = sealedref.write_pem(tmp_path, 0)
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(os.urandom(1000))
    with read_only_tmpfs(tmp_path / "ro") as mnt:
        result = run_confinfer(
            "seal", model, "--out", mnt, "--kek-public-key", public, timeout=REFUSAL_TIMEOUT_S
        )
        assert_refused(result, "dest-write")
        assert list(mnt.iterdir()) == []


# -- deep trees that fail ---------------------------------------------------------------------


def test_deep_sealed_tree_then_a_bad_chunk_leaves_nothing(tmp_path: Path, pem: Path) -> None:
    dirs = ["/".join(["d"] * n) for n in range(1, 1301)]
    pkg = tmp_path / "pkg"
    data = sealed_package(
        pkg, directories=dirs, files={f"{dirs[-1]}/w": b"plaintext" * 20, "top": b"t"}
    )
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # the last chunk: after the deep tree has been written
    (pkg / "model.sealed").write_bytes(flipped)
    dest = tmp_path / "dest"
    assert_refused(unseal(pkg, dest, pem), "chunk-integrity")
    assert not dest.exists()


def test_deep_tutorial_tree_then_a_hostile_entry_leaves_nothing(tmp_path: Path, pem: Path) -> None:
    deep = "/".join(["d"] * 2046)
    pkg = tmp_path / "pkg"
    tutorial_package(
        pkg,
        [(file_info(f"{deep}/f{i}"), b"plaintext") for i in range(3)]
        + [(special_info("m/l", tarfile.SYMTYPE, "/etc/passwd"), None)],
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    assert_refused(unseal(pkg, dest, pem), "unsafe-entry-type")
    assert list(dest.iterdir()) == []


# -- revocation: a committed model on a tmpfs mount point ---------------------------------------


def test_committed_model_on_a_mount_point_is_wiped_to_an_empty_mount(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "16m") as mnt:
        with Destination(mnt) as dest:
            fd = dest.open_file("model/w.bin", size=5)
            os.write(fd, b"plain")
            os.close(fd)
        # What the model server might add later (caches, unpacked shards) goes too.
        deep = mnt / "model"
        for _ in range(50):
            deep = deep / "d"
        deep.mkdir(parents=True)
        (deep / "x").write_bytes(b"plain")
        dest.wipe()
        assert os.path.ismount(mnt)
        assert list(mnt.iterdir()) == []
        dest.wipe()
