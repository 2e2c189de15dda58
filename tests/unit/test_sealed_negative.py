"""Every way a sealed package can be damaged or hostile is refused, with its reason, and the
destination is left without any plaintext (absent, since the destination created it): damaged
bytes, hostile manifests (also deeper than Python's recursion limit), a package file that is not
a regular file, and I/O errors on either side."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confinfer.errors import ConfinferError, UsageError
from loader import format as fmt
from loader.dest import Destination
from loader.keywrap import PemUnwrapper, PemWrapper
from loader.seal import scan, seal_model, write_package
from loader.unseal import inspect_package, open_package_file, unseal_package
from tests import sealedref

pytestmark = pytest.mark.unit

CHUNK = 64
FILES = {"a.bin": os.urandom(150), "d/b.bin": os.urandom(64), "d/empty": b""}
# a.bin: 64 + 64 + 22 bytes, d/b.bin: 64 bytes -> four chunk records.
RECORDS = [64, 64, 22, 64]


@dataclass(frozen=True)
class Package:
    data: bytes
    header_len: int
    model: Path

    @property
    def data_offset(self) -> int:
        return 12 + self.header_len + 16

    def record(self, i: int) -> tuple[int, int]:
        """(start, end) of chunk record ``i``."""
        start = self.data_offset + sum(n + 16 for n in RECORDS[:i])
        return start, start + RECORDS[i] + 16


def make_model(root: Path) -> Path:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    base = tmp_path_factory.mktemp("sealed")
    model = make_model(base / "model")
    with Destination(base / "pkg") as out:
        seal_model(model, out, PemWrapper(sealedref.kek().public_key()), chunk_size=CHUNK)
    data = (base / "pkg/model.sealed").read_bytes()
    pkg = Package(data, int.from_bytes(data[8:12], "big"), model)
    assert len(data) == pkg.record(3)[1]
    return pkg


def attempt(
    base: Path,
    data: bytes,
    *,
    kek_n: int = 0,
    max_bytes: int | None = None,
    expected_key_id: str | None = None,
) -> ConfinferError:
    """Unseal ``data``; return the error after checking that no plaintext was left."""
    pkg = sealedref.install(data, base / "pkg")
    dest = base / "dest"
    try:
        with Destination(dest, max_bytes=max_bytes) as d:
            unseal_package(
                pkg,
                d,
                PemUnwrapper(sealedref.kek(kek_n)),
                expected_key_id=expected_key_id,
                workers=2,
            )
    except ConfinferError as exc:
        assert not dest.exists()
        return exc
    raise AssertionError("the package was accepted")


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def test_the_untouched_package_unseals(package: Package, tmp_path: Path) -> None:
    pkg = sealedref.install(package.data, tmp_path / "pkg")
    with Destination(tmp_path / "dest") as d:
        unseal_package(pkg, d, PemUnwrapper(sealedref.kek()))
    assert sealedref.tree(tmp_path / "dest")["a.bin"][2] == FILES["a.bin"]


# -- bit flips in every region ------------------------------------------------------------------


def test_flipped_magic(package: Package, tmp_path: Path) -> None:
    assert attempt(tmp_path, flip(package.data, 0)).reason == "bad-magic"
    # "CFSEALv1" -> "CFSEALv0": a format this reader does not know.
    assert attempt(tmp_path, flip(package.data, 7)).reason == "unsupported-format"


def length_flip_reason(pkg: Package, data: bytes) -> str:
    """What a changed header length must be refused as."""
    new_len = int.from_bytes(data[8:12], "big")
    if not 0 < new_len <= fmt.MAX_HEADER_LEN:
        return "header-invalid"
    if 12 + new_len + 16 > len(data):
        return "truncated"
    # A longer header that only takes in JSON whitespace (the first bytes of the random tag
    # can be) still parses: then the header tag refuses it.
    extra = data[12 + pkg.header_len : 12 + new_len]
    if new_len > pkg.header_len and not extra.strip(b" \t\r\n"):
        return "header-integrity"
    return "header-invalid"


@pytest.mark.parametrize("pos", [8, 9, 10, 11])
def test_flipped_header_length(package: Package, tmp_path: Path, pos: int) -> None:
    for bit in (0, 7):
        data = flip(package.data, pos, bit)
        err = attempt(tmp_path, data)
        assert err.reason == length_flip_reason(package, data), (pos, bit, err.reason)
    assert attempt(tmp_path, flip(package.data, 8, 7)).reason == "header-invalid"


def test_flipped_header_value(package: Package, tmp_path: Path) -> None:
    # A bit flip that keeps the JSON valid ("2026" -> "3026") is caught by the header tag.
    pos = package.data.index(b'"created":"') + len(b'"created":"')
    assert attempt(tmp_path, flip(package.data, pos)).reason == "header-integrity"
    # So is one in a file size, which would otherwise move every offset.
    pos = package.data.index(b'"size":150') + len(b'"size":1')
    assert attempt(tmp_path, flip(package.data, pos)).reason == "header-integrity"
    # Or a salt character (what the chunk key is derived with), changed to another base64
    # character so that the salt still decodes: the salt is random, a bit flip might not.
    pos = package.data.index(b'"salt":"') + len(b'"salt":"') + 3
    changed = bytearray(package.data)
    changed[pos] = ord("B") if changed[pos] == ord("A") else ord("A")
    assert attempt(tmp_path, bytes(changed)).reason == "header-integrity"


def test_flipped_header_structure(package: Package, tmp_path: Path) -> None:
    pos = package.data.index(b'{"chunk_count"')
    assert attempt(tmp_path, flip(package.data, pos)).reason == "header-invalid"


@pytest.mark.parametrize("offset", [0, 7, 15])
def test_flipped_header_tag(package: Package, tmp_path: Path, offset: int) -> None:
    pos = 12 + package.header_len + offset
    assert attempt(tmp_path, flip(package.data, pos)).reason == "header-integrity"


@pytest.mark.parametrize("record", range(len(RECORDS)))
@pytest.mark.parametrize("where", ["ciphertext-first", "ciphertext-last", "tag-first", "tag-last"])
def test_flipped_chunk(package: Package, tmp_path: Path, record: int, where: str) -> None:
    start, end = package.record(record)
    pos = {
        "ciphertext-first": start,
        "ciphertext-last": end - 17,
        "tag-first": end - 16,
        "tag-last": end - 1,
    }[where]
    assert attempt(tmp_path, flip(package.data, pos, 5)).reason == "chunk-integrity"


@settings(max_examples=40, deadline=None)
@given(pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(package: Package, pos: int, bit: int) -> None:
    pos %= len(package.data)
    with tempfile.TemporaryDirectory() as tmp:
        err = attempt(Path(tmp), flip(package.data, pos, bit))
    assert err.reason in {
        "bad-magic",
        "unsupported-format",
        "header-invalid",
        "truncated",
        "header-integrity",
        "chunk-integrity",
        "key-unwrap",
        "key-mismatch",
    }


# -- truncation, trailing bytes, reordering ---------------------------------------------------


def truncation_points(pkg: Package) -> list[int]:
    points = [
        0,
        4,
        8,
        11,
        12,
        12 + pkg.header_len // 2,
        12 + pkg.header_len,
        pkg.data_offset - 1,
        pkg.data_offset,
    ]
    for i in range(len(RECORDS)):
        start, end = pkg.record(i)
        points += [start, start + 1, (start + end) // 2, end - 16, end - 1]
    return sorted(set(points))


def test_truncation_at_and_between_chunk_boundaries(package: Package, tmp_path: Path) -> None:
    for cut in truncation_points(package):
        err = attempt(tmp_path / str(cut), package.data[:cut])
        assert err.reason == "truncated", (cut, err.reason)


@pytest.mark.parametrize("extra", [b"\x00", bytes(16), os.urandom(80)])
def test_trailing_bytes(package: Package, tmp_path: Path, extra: bytes) -> None:
    assert attempt(tmp_path, package.data + extra).reason == "trailing-data"


def swap(data: bytes, a: tuple[int, int], b: tuple[int, int]) -> bytes:
    (a0, a1), (b0, b1) = sorted([a, b])
    return data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 3), (2, 3), (0, 3)])
def test_reordered_chunks(package: Package, tmp_path: Path, i: int, j: int) -> None:
    data = swap(package.data, package.record(i), package.record(j))
    assert len(data) == len(package.data)
    assert attempt(tmp_path, data).reason == "chunk-integrity"


def test_dropped_chunk_with_a_consistent_length(package: Package, tmp_path: Path) -> None:
    # Cut the last record and duplicate the one before it: right length, wrong chunk.
    s2, e2 = package.record(2)
    s3, e3 = package.record(3)
    data = package.data[:s3] + package.data[s2:e2]
    data += package.data[s3:e3][: len(package.data) - len(data)]
    assert len(data) == len(package.data)
    assert attempt(tmp_path, data).reason == "chunk-integrity"


@pytest.mark.parametrize("same_salt", [False, True])
def test_chunk_from_another_package_with_the_same_dek(
    package: Package, tmp_path: Path, same_salt: bool
) -> None:
    """Two packages under one DEK (same model, same geometry): chunks do not transplant."""
    dek = bytearray(os.urandom(32))
    wrapped = PemWrapper(sealedref.kek().public_key()).wrap(dek)
    tree = scan(package.model)
    salts = [os.urandom(32), os.urandom(32)]
    if same_salt:
        salts[1] = salts[0]
    blobs = []
    for n, salt in enumerate(salts):
        with Destination(tmp_path / f"p{n}") as out:
            write_package(
                tree,
                out,
                dek=dek,
                wrapped_dek=wrapped.wrapped,
                key_id=wrapped.key_id,
                salt=salt,
                created=f"2026-01-0{n + 1}T00:00:00Z",
                chunk_size=CHUNK,
            )
        blobs.append((tmp_path / f"p{n}/model.sealed").read_bytes())
    first, second = blobs
    for i in range(len(RECORDS)):
        start, end = package.record(i)
        mixed = first[:start] + second[start:end] + first[end:]
        assert attempt(tmp_path / f"mix{i}", mixed).reason == "chunk-integrity"


# -- keys ---------------------------------------------------------------------------------------


def test_wrong_key(package: Package, tmp_path: Path) -> None:
    assert attempt(tmp_path / "a", package.data, kek_n=1).reason == "key-mismatch"
    # A package naming a Key Vault key cannot be checked by id: the unwrap itself fails.
    spec = sealedref.Spec(
        files=dict(FILES), directories=["d"], key_id="https://vault.example.net/keys/kek/1"
    )
    assert attempt(tmp_path / "b", sealedref.build(spec), kek_n=1).reason == "key-unwrap"


def test_package_for_another_kek_than_named(package: Package, tmp_path: Path) -> None:
    err = attempt(tmp_path, package.data, expected_key_id="https://vault.example.net/keys/k")
    assert err.reason == "key-mismatch"


def test_wrapped_key_of_another_dek(tmp_path: Path) -> None:
    """A wrapped DEK swapped for another (valid) one: the header tag no longer verifies."""
    spec = sealedref.Spec(files=dict(FILES), directories=["d"])
    header = spec.header()
    other = sealedref.Spec(files={}, dek=os.urandom(32)).header()
    header["wrapped_dek"] = other["wrapped_dek"]
    # Built with spec's key: the header tag is over the new header, but the unwrapped DEK is
    # the other one, so the derived key differs.
    assert attempt(tmp_path, sealedref.build(spec, header)).reason == "header-integrity"


# -- hostile manifests with a valid header tag ---------------------------------------------------


def hostile(files: list[tuple[str, int]], dirs: list[str], **change: Any) -> bytes:
    """A package whose header says exactly this, authenticated with a key we hold. The chunk
    records are placeholders: every refusal here comes before any chunk is read."""
    spec = sealedref.Spec(files={"placeholder": b"xyz"}, chunk_size=CHUNK)
    header = spec.header()
    header["manifest"] = {
        "directories": [{"path": d, "mode": 0o755} for d in dirs],
        "files": [{"path": p, "size": s, "mode": 0o644} for p, s in files],
    }
    header["chunk_count"] = max(1, sum(-(-size // CHUNK) for _, size in files))
    header.update(change)
    return sealedref.build(spec, header)


@pytest.mark.parametrize(
    ("files", "dirs", "reason"),
    [
        ([("../evil", 3)], [], "unsafe-path"),
        ([("/etc/evil", 3)], [], "unsafe-path"),
        ([("a/../../evil", 3)], ["a"], "unsafe-path"),
        ([("a//b", 3)], ["a"], "unsafe-path"),
        ([("./a", 3)], [], "unsafe-path"),
        ([("a/", 3)], [], "unsafe-path"),
        ([("a\\..\\b", 3)], [], "unsafe-path"),
        ([("a\x00b", 3)], [], "unsafe-path"),
        ([("\udcff", 3)], [], "unsafe-path"),
        ([("x" * 256, 3)], [], "unsafe-path"),
        ([("a", 3)], ["..", "a"], "unsafe-path"),
        ([("a", 3), ("a", 3)], [], "duplicate-entry"),
        ([("d", 3)], ["d"], "duplicate-entry"),
        ([("x", 3)], ["d", "d"], "duplicate-entry"),
        ([("d/x", 3)], [], "missing-parent"),
        ([("a", 3), ("a/b", 3)], [], "missing-parent"),
        ([("x", 3)], ["d/e", "d"], "missing-parent"),
        ([("", 3)], [], "header-invalid"),
    ],
)
def test_hostile_manifest(
    tmp_path: Path, files: list[tuple[str, int]], dirs: list[str], reason: str
) -> None:
    assert attempt(tmp_path, hostile(files, dirs)).reason == reason
    assert not (tmp_path / "evil").exists()


def test_chunk_count_must_match_the_manifest(tmp_path: Path) -> None:
    data = hostile([("a", 3)], [], chunk_count=2)
    assert attempt(tmp_path, data).reason == "header-invalid"


def test_model_over_the_size_cap_is_refused_before_writing(tmp_path: Path) -> None:
    data = hostile([("a", 100), ("b", 100)], [])
    err = attempt(tmp_path / "a", data, max_bytes=199)
    assert err.reason == "size-limit"
    assert "--max-bytes" in (err.hint or "")
    # A size far beyond what the file holds is refused the same way, before any allocation.
    data = hostile([("a", 1 << 60)], [])
    assert attempt(tmp_path / "b", data, max_bytes=1 << 30).reason == "size-limit"


def test_huge_sizes_are_caught_by_the_length_check(tmp_path: Path) -> None:
    data = hostile([("a", 1 << 40)], [])
    assert attempt(tmp_path, data).reason == "truncated"


def test_special_modes_are_sanitised_not_trusted(tmp_path: Path) -> None:
    spec = sealedref.Spec(
        files={"x": b"#!/bin/sh\n"}, directories=["d"], modes={"x": 0o6777, "d": 0o1777}
    )
    pkg = sealedref.install(sealedref.build(spec), tmp_path / "pkg")
    with Destination(tmp_path / "dest") as d:
        unseal_package(pkg, d, PemUnwrapper(sealedref.kek()))
    assert (tmp_path / "dest/x").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "dest/d").stat().st_mode & 0o7777 == 0o755


# -- inspect ------------------------------------------------------------------


def test_inspect_finds_structural_damage_without_a_key(package: Package, tmp_path: Path) -> None:
    for name, data, reason in [
        ("cut", package.data[:-1], "truncated"),
        ("long", package.data + b"x", "trailing-data"),
        ("magic", flip(package.data, 0), "bad-magic"),
    ]:
        pkg = sealedref.install(data, tmp_path / name)
        with pytest.raises(ConfinferError) as info:
            inspect_package(pkg)
        assert info.value.reason == reason
    with pytest.raises(UsageError) as usage:
        inspect_package(tmp_path / "missing")
    assert usage.value.reason == "package-unreadable"
    assert fmt.PACKAGE_FILE == "model.sealed"


# -- a manifest deeper than Python's recursion limit --------------------------------------------


def deep_package(depth: int, flip_chunk: bool) -> bytes:
    dirs = ["/".join(["d"] * n) for n in range(1, depth + 1)]
    spec = sealedref.Spec(
        files={f"{dirs[-1]}/w": b"plaintext" * 20, "top": b"t"}, directories=dirs, chunk_size=CHUNK
    )
    data = sealedref.build(spec)
    return flip(data, len(data) - 1) if flip_chunk else data


def test_a_deep_tree_unseals(tmp_path: Path) -> None:
    depth = 1300  # the 2 MiB header allows about 1400 levels of one-letter names
    pkg = sealedref.install(deep_package(depth, flip_chunk=False), tmp_path / "pkg")
    with Destination(tmp_path / "dest") as d:
        unseal_package(pkg, d, PemUnwrapper(sealedref.kek()), workers=2)
    fd = os.open(tmp_path / "dest", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    try:
        assert os.listdir(fd) == ["w"]
    finally:
        os.close(fd)
    d.wipe()  # the committed tree goes too
    assert not (tmp_path / "dest").exists()


def test_a_deep_tree_then_a_bad_chunk_leaves_nothing(tmp_path: Path) -> None:
    # The last chunk (of "top") fails after the deep directories and file were written.
    err = attempt(tmp_path, deep_package(1300, flip_chunk=True))
    assert err.reason == "chunk-integrity"


# -- the package file must be a regular file, and opening it never blocks -----------------------


def plant(pkg: Path, kind: str, real: bytes) -> None:
    pkg.mkdir()
    target = pkg / fmt.PACKAGE_FILE
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "symlink-to-package":
        (pkg / "real.sealed").write_bytes(real)
        target.symlink_to(pkg / "real.sealed")
    elif kind == "directory":
        target.mkdir()
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(target))


KINDS = ["fifo", "dev-zero", "symlink-to-package", "directory", "socket"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_package_file_that_is_not_a_regular_file(
    package: Package, tmp_path: Path, kind: str
) -> None:
    pkg = tmp_path / "p"
    if kind == "socket" and len(str(pkg / fmt.PACKAGE_FILE)) > 100:
        pytest.skip("the socket path is too long for AF_UNIX")
    plant(pkg, kind, package.data)
    with pytest.raises(UsageError) as info:
        inspect_package(pkg)
    assert info.value.reason == "package-unreadable"
    dest = tmp_path / "dest"
    with pytest.raises(UsageError) as info, Destination(dest) as d:
        unseal_package(pkg, d, PemUnwrapper(sealedref.kek()))
    assert info.value.reason == "package-unreadable"
    assert "\n" not in info.value.one_line()
    assert not dest.exists()


def test_open_package_file_returns_a_blocking_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = open_package_file(path)
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


# -- I/O errors: reading the package, writing the destination -----------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.EACCES, errno.ENOENT])
def test_write_errors_are_dest_write(
    package: Package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def fail(*args: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", fail)
    err = attempt(tmp_path, package.data)
    assert err.reason == "dest-write"
    assert err.message == f"cannot write to {tmp_path / 'dest'}: {os.strerror(code)}"


def test_full_disk_while_writing_is_no_space(
    package: Package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", fail)
    assert attempt(tmp_path, package.data).reason == "no-space"


def test_read_errors_are_package_read(
    package: Package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", fail)
    err = attempt(tmp_path, package.data)
    assert err.reason == "package-read"
    assert (
        err.message
        == f"cannot read {tmp_path / 'pkg' / fmt.PACKAGE_FILE}: {os.strerror(errno.EIO)}"
    )
    monkeypatch.setattr(os, "pread", fail)
    err = attempt(tmp_path / "2", package.data)
    assert err.reason == "package-read"
