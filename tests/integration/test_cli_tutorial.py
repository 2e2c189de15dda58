"""``confinfer unseal`` on packages in the seed tutorial's layout, as a real process.

Packages are built the way the tutorial's ``encrypt_model.py`` builds them (tests/tutorial_pkg.py),
unwrapped offline with the KEK's private key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from testbed import tinymodel
from tests.cli import assert_refused, interrupt_midway, run_confinfer, small_tmpfs
from tests.tutorial_pkg import (
    ARCHIVE_NAME,
    build_tar,
    dir_info,
    file_info,
    files_of,
    make_archive,
    special_info,
    write_package,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def kek(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path_factory.mktemp("kek") / "kek.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, pem


def unseal_args(pkg: Path, dest: Path, pem: Path, *extra: str) -> list[str | Path]:
    return ["unseal", pkg, "--dest", dest, "--kek-private-key", pem, *extra]


def unseal(pkg: Path, dest: Path, pem: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_confinfer(*unseal_args(pkg, dest, pem, *extra))


def test_tutorial_package_unseals(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    model = tinymodel.write(tmp_path / "src" / "Phi-4-mini-reasoning")
    write_package(tmp_path / "pkg", make_archive(model, tmp_path), kek[0].public_key())
    dest = tmp_path / "dest"
    result = unseal(tmp_path / "pkg", dest, kek[1])
    assert result.returncode == 0, result.stderr
    assert files_of(dest) == {f"Phi-4-mini-reasoning/{k}": v for k, v in files_of(model).items()}


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_gnu_tar_archives_unseal(
    tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path], fmt: str
) -> None:
    model = tmp_path / "src" / "m"
    deep = model / ("d" * 60) / ("e" * 60)  # beyond 100 characters: prefix, L or pax
    deep.mkdir(parents=True)
    (deep / "weights.safetensors").write_bytes(os.urandom(70_000))
    (model / "config.json").write_text("{}")
    tar_path = tmp_path / "m.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "-cf", str(tar_path), "-C", str(model), "."], check=True
    )
    write_package(tmp_path / "pkg", tar_path.read_bytes(), kek[0].public_key())
    result = unseal(tmp_path / "pkg", tmp_path / "dest", kek[1])
    assert result.returncode == 0, result.stderr
    assert files_of(tmp_path / "dest") == files_of(model)


def _pax_dotdot() -> tarfile.TarInfo:
    info = file_info("m/ok")
    info.pax_headers = {"path": "../evil"}
    return info


Entries = list[tuple[tarfile.TarInfo, bytes | None]]
LEGIT: Entries = [(file_info("m/config.json"), b"{}")]

# name: (entries after a legitimate file, expected reason, extra flags, bytes of tar to keep)
HOSTILE: dict[str, tuple[Entries, str, tuple[str, ...], int | None]] = {
    "traversal": ([(file_info("../x"), b"x")], "unsafe-path", (), None),
    "absolute": ([(file_info("/etc/x"), b"x")], "unsafe-path", (), None),
    "symlink": (
        [(special_info("m/l", tarfile.SYMTYPE, "/etc/passwd"), None)],
        "unsafe-entry-type",
        (),
        None,
    ),
    "hardlink": (
        [(special_info("m/h", tarfile.LNKTYPE, "m/config.json"), None)],
        "unsafe-entry-type",
        (),
        None,
    ),
    "device": ([(special_info("m/d", tarfile.BLKTYPE), None)], "unsafe-entry-type", (), None),
    "fifo": ([(special_info("m/p", tarfile.FIFOTYPE), None)], "unsafe-entry-type", (), None),
    "oversize": (
        [(file_info("m/a"), b"a" * 3000), (file_info("m/b"), b"b" * 3000)],
        "size-limit",
        ("--max-bytes", "4096"),
        None,
    ),
    "under-a-file": ([(file_info("m/config.json/x"), b"x")], "path-through-file", (), None),
    "dir-under-a-file": ([(dir_info("m/config.json/d"), None)], "path-through-file", (), None),
    "pax-dotdot": ([(_pax_dotdot(), b"x")], "unsafe-path", (), None),
    "truncated": ([(file_info("m/a"), b"a" * 5000)], "archive-truncated", (), 3072),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_dest_stays_empty(
    tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path], case: str
) -> None:
    entries, reason, extra, keep = HOSTILE[case]
    # A legitimate file comes first so that there is plaintext to wipe.
    tar = build_tar(LEGIT + entries)
    write_package(tmp_path / "pkg", tar[:keep], kek[0].public_key())
    dest = tmp_path / "dest"
    dest.mkdir()
    assert_refused(unseal(tmp_path / "pkg", dest, kek[1], *extra), reason)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_tampered_tag(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    write_package(tmp_path / "pkg", build_tar([(file_info("m/a"), b"a")]), kek[0].public_key())
    archive = tmp_path / "pkg" / ARCHIVE_NAME
    data = bytearray(archive.read_bytes())
    data[-5] ^= 0x80
    archive.write_bytes(data)
    assert_refused(unseal(tmp_path / "pkg", tmp_path / "dest", kek[1]), "integrity")
    assert not (tmp_path / "dest").exists()


def test_wrong_dek(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    """A wrapped DEK that unwraps fine but is not the archive's key."""
    pkg = tmp_path / "pkg"
    write_package(pkg, build_tar([(file_info("m/a"), b"a")]), kek[0].public_key())
    other = tmp_path / "other"
    write_package(other, b"", kek[0].public_key())
    shutil.copy(other / "wrapped_model_dek.bin", pkg / "wrapped_model_dek.bin")
    assert_refused(unseal(pkg, tmp_path / "dest", kek[1]), "integrity")
    assert not (tmp_path / "dest").exists()


def test_dek_wrapped_for_another_kek(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_package(tmp_path / "pkg", build_tar([(file_info("m/a"), b"a")]), stranger.public_key())
    assert_refused(unseal(tmp_path / "pkg", tmp_path / "dest", kek[1]), "key-unwrap")
    assert not (tmp_path / "dest").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    tar = build_tar([(file_info("m/config.json"), b"{}"), (file_info("m/w"), os.urandom(3 * MiB))])
    write_package(tmp_path / "pkg", tar, kek[0].public_key())
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        assert_refused(unseal(tmp_path / "pkg", mnt / "dest", kek[1]), "no-space")
        assert list(mnt.iterdir()) == []


def test_sigterm_midway_wipes(tmp_path: Path, kek: tuple[rsa.RSAPrivateKey, Path]) -> None:
    payload = os.urandom(MiB) * 160
    write_package(tmp_path / "pkg", build_tar([(file_info("m/w"), payload)]), kek[0].public_key())
    dest = tmp_path / "dest"
    returncode, stderr = interrupt_midway(
        unseal_args(tmp_path / "pkg", dest, kek[1]), started=(dest / "m" / "w").exists
    )
    assert returncode == 130, stderr
    assert stderr.startswith("confinfer: interrupted: "), stderr
    assert not dest.exists()
