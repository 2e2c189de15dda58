"""The streaming tar reader: formats, chunking, refusals, modes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confinfer.errors import ConfinferError
from loader.dest import Destination, dir_mode, file_mode
from loader.tarstream import TarExtractor, parse_number, parse_pax
from tests.tutorial_pkg import (
    build_tar,
    dir_info,
    file_info,
    model_trees,
    special_info,
    tree_entries,
)

pytestmark = pytest.mark.unit

MiB = 1 << 20


@contextmanager
def extracting(root: Path, max_bytes: int = 64 * MiB) -> Iterator[TarExtractor]:
    with Destination(root, max_bytes=max_bytes) as dest:
        extractor = TarExtractor(dest)
        try:
            yield extractor
        except BaseException:
            extractor.abort()
            dest.wipe()
            raise
        dest.commit()


def extract(data: bytes, root: Path, chunk: int = 1 << 16, max_bytes: int = 64 * MiB) -> None:
    with extracting(root, max_bytes) as ex:
        for pos in range(0, len(data), chunk):
            ex.feed(memoryview(data)[pos : pos + chunk])
        ex.close()


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def refusal(data: bytes, root: Path, **kw: int) -> ConfinferError:
    with pytest.raises(ConfinferError) as info:
        extract(data, root, **kw)
    assert not root.exists() or not any(root.iterdir())
    return info.value


def raw_header(
    name: bytes,
    *,
    size: int | bytes = 0,
    typeflag: bytes = b"0",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    mode: int = 0o644,
    checksum: int | None = None,
) -> bytes:
    """A hand-made header block, for what tarfile will not write."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = size if isinstance(size, bytes) else b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[156:157] = typeflag
    block[257:265] = magic
    if magic == b"ustar\x0000":
        block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    value = sum(block) if checksum is None else checksum
    block[148:156] = b"%06o\x00 " % value
    return bytes(block)


def padded(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 512)


END = bytes(1024)


# -- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 4096, 1 << 20])
def test_roundtrip_formats_and_chunkings(tmp_path: Path, fmt: int, chunk: int) -> None:
    deep = "/".join(["d" * 40] * 4)  # 163 characters: ustar prefix, GNU L, pax path
    entries = [
        (dir_info("m"), None),
        (file_info("m/config.json"), b'{"a": 1}'),
        (file_info("m/empty"), b""),
        (file_info("m/block"), os.urandom(512)),
        (file_info(f"m/{deep}/w.bin"), os.urandom(3000)),
        (dir_info("m/sub/"), None),
    ]
    data = build_tar(entries, fmt)
    extract(data, tmp_path / "out", chunk=chunk)
    got = tree(tmp_path / "out")
    for info, payload in entries:
        assert got[info.name.rstrip("/")] == payload


def test_names_beyond_ustar_need_pax_or_gnu(tmp_path: Path) -> None:
    long = "x" * 150 + "/" + "y" * 120 + ".safetensors"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        root = tmp_path / str(fmt)
        extract(build_tar([(file_info(long), b"w")], fmt), root)
        assert (root / long).read_bytes() == b"w"


def test_non_ascii_names_round_trip(tmp_path: Path) -> None:
    data = build_tar([(file_info("modèle/токенизатор.json"), b"{}")], tarfile.PAX_FORMAT)
    extract(data, tmp_path / "out")
    assert (tmp_path / "out" / "modèle" / "токенизатор.json").read_bytes() == b"{}"


def test_global_pax_header_is_skipped(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "c" * 700}
    ) as tf:
        info = file_info("a.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    extract(buf.getvalue(), tmp_path / "out")
    assert tree(tmp_path / "out") == {"a.txt": b"hi"}


def test_dot_root_entry_and_implicit_parents(tmp_path: Path) -> None:
    data = build_tar(
        [
            (dir_info("./"), None),
            (file_info("./a/b/c.txt"), b"c"),
            (dir_info("./a/b"), None),  # after its content, as `tar` of a file list writes
        ]
    )
    extract(data, tmp_path / "out")
    assert tree(tmp_path / "out") == {"a": None, "a/b": None, "a/b/c.txt": b"c"}


def test_gnu_base256_size_is_read_and_capped_before_writing(tmp_path: Path) -> None:
    huge = 9 << 30  # past the 8 GiB octal limit: GNU writes base-256
    field = b"\x80" + huge.to_bytes(11, "big")
    assert parse_number(field, "size") == huge
    data = raw_header(b"big.bin", size=field, magic=b"ustar  \x00") + bytes(4096)
    err = refusal(data, tmp_path / "out")
    assert err.reason == "size-limit"


def test_pax_size_overrides_header_size(tmp_path: Path) -> None:
    record = b"16 size=1048577\n"
    data = (
        raw_header(b"PaxHeader", size=len(record), typeflag=b"x")
        + padded(record)
        + raw_header(b"big.bin", size=0)
    )
    err = refusal(data + END, tmp_path / "out", max_bytes=MiB)
    assert err.reason == "size-limit"


def test_trailing_bytes_after_end_are_ignored(tmp_path: Path) -> None:
    data = build_tar([(file_info("a"), b"a")]) + b"\x01" * 700
    with extracting(tmp_path / "out") as ex:
        ex.feed(data)
        ex.close()
        assert ex.finished and ex.trailing_bytes > 700
    assert tree(tmp_path / "out") == {"a": b"a"}


# -- modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_mode", "want"),
    [(0o4777, 0o755), (0o2755, 0o755), (0o666, 0o644), (0o100, 0o500), (0o000, 0o400)],
)
def test_file_modes_are_sanitised(tmp_path: Path, given_mode: int, want: int) -> None:
    assert file_mode(given_mode) == want
    extract(build_tar([(file_info("f", given_mode), b"x")]), tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "f").stat().st_mode) == want


def test_dir_modes_are_sanitised(tmp_path: Path) -> None:
    assert dir_mode(0o1777) == 0o755
    assert dir_mode(0o500) == 0o700
    extract(build_tar([(dir_info("d", 0o3777), None)]), tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "d").stat().st_mode) == 0o755


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "type_name"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CONTTYPE, "contiguous file"),
    ],
)
def test_special_entries_are_refused(tmp_path: Path, kind: bytes, type_name: str) -> None:
    data = build_tar([(file_info("ok"), b"1"), (special_info("bad", kind, "ok"), None)])
    err = refusal(data, tmp_path / "out")
    assert err.reason == "unsafe-entry-type"
    assert err.details["type"] == type_name


def test_unknown_and_sparse_types_are_refused(tmp_path: Path) -> None:
    err = refusal(raw_header(b"x", typeflag=b"Z") + END, tmp_path / "a")
    assert (err.reason, err.details["type"]) == ("unsafe-entry-type", "unknown type b'Z'")
    record = b"22 GNU.sparse.major=1\n"
    data = raw_header(b"P", size=len(record), typeflag=b"x") + padded(record)
    err = refusal(data + raw_header(b"s") + END, tmp_path / "b")
    assert (err.reason, err.details["type"]) == ("unsafe-entry-type", "GNU sparse file")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "//x"])
def test_escaping_paths_are_refused(tmp_path: Path, name: str) -> None:
    err = refusal(build_tar([(file_info(name), b"x")]), tmp_path / "out")
    assert err.reason == "unsafe-path"


def test_pax_path_override_to_dotdot_is_refused(tmp_path: Path) -> None:
    info = file_info("innocent.txt")
    info.pax_headers = {"path": "../evil.txt"}
    err = refusal(build_tar([(info, b"x")], tarfile.PAX_FORMAT), tmp_path / "out")
    assert err.reason == "unsafe-path"
    assert not (tmp_path / "evil.txt").exists()


def test_gnu_long_name_to_dotdot_is_refused(tmp_path: Path) -> None:
    name = "../" + "a" * 120
    err = refusal(build_tar([(file_info(name), b"x")], tarfile.GNU_FORMAT), tmp_path / "out")
    assert err.reason == "unsafe-path"


def test_ustar_prefix_to_absolute_is_refused(tmp_path: Path) -> None:
    data = raw_header(b"x", prefix=b"/etc") + padded(b"x") + END
    assert refusal(data, tmp_path / "out").reason == "unsafe-path"


def test_path_through_a_file_is_refused(tmp_path: Path) -> None:
    for i, second in enumerate([file_info("a/f/x"), dir_info("a/f/d")]):
        payload = b"x" if second.type == tarfile.REGTYPE else None
        data = build_tar([(file_info("a/f"), b"f"), (second, payload)])
        assert refusal(data, tmp_path / str(i)).reason == "path-through-file"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (file_info("a"), file_info("a")),
        (file_info("a"), dir_info("a")),
        (dir_info("a"), file_info("a")),
        (dir_info("a"), dir_info("a")),
        (file_info("d/a"), file_info("d//a")),
    ],
)
def test_duplicates_are_refused(
    tmp_path: Path, first: tarfile.TarInfo, second: tarfile.TarInfo
) -> None:
    def payload(i: tarfile.TarInfo) -> bytes | None:
        return b"x" if i.type == tarfile.REGTYPE else None

    data = build_tar([(first, payload(first)), (second, payload(second))])
    assert refusal(data, tmp_path / "out").reason == "duplicate-entry"


def test_oversize_entry_is_refused_from_its_header(tmp_path: Path) -> None:
    data = build_tar([(file_info("small"), b"s" * 100), (file_info("big"), b"b" * 5000)])
    err = refusal(data, tmp_path / "out", max_bytes=4096)
    assert err.reason == "size-limit"


def test_too_many_entries(tmp_path: Path) -> None:
    data = build_tar([(file_info(f"f{i}"), b"") for i in range(5)])
    with pytest.raises(ConfinferError) as info, Destination(tmp_path / "out") as dest:
        ex = TarExtractor(dest, max_entries=4)
        try:
            ex.feed(data)
        finally:
            dest.wipe()
    assert info.value.reason == "archive-too-many-entries"


# -- malformed and truncated --------------------------------------------------------------------


def test_bad_checksum(tmp_path: Path) -> None:
    data = bytearray(build_tar([(file_info("a"), b"a")]))
    data[0] ^= 1
    assert refusal(bytes(data), tmp_path / "out").reason == "archive-malformed"


def test_signed_checksum_is_accepted(tmp_path: Path) -> None:
    name = "é".encode()  # bytes >= 0x80 make the signed and unsigned sums differ
    block = bytearray(raw_header(name))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\x00 " % signed
    extract(bytes(block) + END, tmp_path / "out")
    assert (tmp_path / "out" / "é").read_bytes() == b""


def test_unknown_magic(tmp_path: Path) -> None:
    data = raw_header(b"a", magic=b"\x00" * 8) + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


def test_bad_octal(tmp_path: Path) -> None:
    data = raw_header(b"a", size=b"12x4567\x00\x00\x00\x00\x00") + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


def test_lone_zero_block(tmp_path: Path) -> None:
    data = bytes(512) + raw_header(b"a") + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


@pytest.mark.parametrize(
    "record",
    [b"5 a=b\n", b"x path=a\n", b"11 path=a\n", b"11 patha..\n", b"9 path=a", b"7 =abc\n"],
)
def test_bad_pax_records(record: bytes) -> None:
    with pytest.raises(ConfinferError) as info:
        parse_pax(record)
    assert info.value.reason == "archive-malformed"


def test_good_pax_records() -> None:
    assert parse_pax(b"11 path=ab\n15 size=123456\n\x00\x00") == {
        "path": "ab",
        "size": "123456",
    }
    assert parse_pax(b"12 path=a\nb\n") == {"path": "a\nb"}


@pytest.mark.parametrize(
    "cut",
    [
        lambda d: d[:-1024],  # no end-of-archive blocks
        lambda d: d[:-512],  # one zero block
        lambda d: d[:700],  # inside the first payload
        lambda d: d[:300],  # inside a header
        lambda d: b"",  # nothing at all
    ],
)
def test_truncated(tmp_path: Path, cut: Callable[[bytes], bytes]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = file_info("a")
        info.size = 1000
        tf.addfile(info, io.BytesIO(b"a" * 1000))
    data = buf.getvalue()
    data = data[: 512 + 1024 + 1024]  # drop the record padding: header, payload, end marker
    assert refusal(cut(data), tmp_path / "out").reason == "archive-truncated"


def test_extended_header_without_entry(tmp_path: Path) -> None:
    record = b"11 path=ab\n"
    data = raw_header(b"P", size=len(record), typeflag=b"x") + padded(record) + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


def test_directory_with_payload(tmp_path: Path) -> None:
    data = raw_header(b"d", typeflag=b"5", size=3) + padded(b"abc") + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


# -- property: whatever tarfile writes comes back ----------------------------------------------

@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=model_trees(),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    chunk=st.integers(min_value=1, max_value=5000),
)
def test_property_roundtrip(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[str, bytes | None],
    fmt: int,
    chunk: int,
) -> None:
    root = tmp_path_factory.mktemp("prop") / "out"
    extract(build_tar(tree_entries(files), fmt), root, chunk=chunk)
    assert tree(root) == dict(sorted(files.items()))
