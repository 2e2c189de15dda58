"""The streaming tar reader: formats, chunking, refusals, modes, strict numbers, deep trees, and
that no input makes anything but a ConfinferError escape."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# -- numbers: ASCII digits only, bounded ------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "\u00b2",  # SUPERSCRIPT TWO: str.isdigit() says yes, int() says no
        "\u0661\u0662",  # ARABIC-INDIC DIGITS ONE, TWO: int() would read 12
        "\uff11\uff12",  # FULLWIDTH DIGITS ONE, TWO
        "1_000",
        "+12",
        "-1",
        " 12",
        "12 ",
        "",
        "1" * 21,  # past 20 digits
        "0x10",
        "1e3",
        "\udcff",  # a byte that was not UTF-8
    ],
)
def test_pax_size_must_be_ascii_decimal(tmp_path: Path, value: str) -> None:
    raw = ("size=" + value).encode("utf-8", "surrogateescape")
    record = pax_record(raw)
    data = raw_header(b"P", size=len(record), typeflag=b"x") + padded(record) + raw_header(b"f")
    err = refusal(data + END, tmp_path / "out")
    assert err.reason == "archive-malformed"


def pax_record(body: bytes) -> bytes:
    """``"%d %s\\n"`` with the length counting itself."""
    n = len(body) + 2
    while len(b"%d %s\n" % (n, body)) != n:
        n += 1
    return b"%d %s\n" % (n, body)


def test_pax_size_of_twenty_digits_is_read_and_capped(tmp_path: Path) -> None:
    record = pax_record(b"size=" + b"9" * 20)
    data = raw_header(b"P", size=len(record), typeflag=b"x") + padded(record) + raw_header(b"f")
    assert refusal(data + END, tmp_path / "out").reason == "size-limit"


@pytest.mark.parametrize(
    "record",
    [
        "\u0661\u0661 path=ab\n".encode(),  # an Arabic-Indic length
        "\u00b2\u00b2 path=abcdefghijklm\n".encode(),  # superscripts
        b"+11 path=a\n",
        b"1_1 path=ab\n",
        b"0" * 19 + b"1 x\n",  # 20 digits, but a length too small to hold them
        b"1" * 21 + b" path=a\n",
        b"99999999999999999999 path=a\n",  # 20 digits, past the data
    ],
)
def test_pax_record_length_must_be_ascii_decimal(record: bytes) -> None:
    with pytest.raises(ConfinferError) as info:
        parse_pax(record)
    assert info.value.reason == "archive-malformed"


@pytest.mark.parametrize(
    "field",
    [
        "\u0660\u0660\u0660\u0666\u0664\u0664\x00".encode(),  # Arabic-Indic 000644
        "\u00b2".encode() + b"\x00",
        b"0644\x00\x00\x00\x00"[:4] + b"8\x00\x00\x00",  # 8 is not octal
        b"-0000644",
        b"+0000644",
        b"00_00644",
        b"0 644\x00\x00\x00",  # a space inside
        b"\x81" + bytes(7),  # high bit set, but not the base-256 marker
        b"\xff" * 8,  # base-256 negative
    ],
)
def test_header_numbers_must_be_octal_or_base256(field: bytes) -> None:
    with pytest.raises(ConfinferError) as info:
        parse_number(field, "mode")
    assert info.value.reason == "archive-malformed"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"0000644\x00", 0o644),
        (b"   644 \x00", 0o644),
        (b"644\x00garbage", 0o644),  # after the terminator: ignored, as tar does
        (b"\x00" * 8, 0),
        (b" " * 8, 0),
        (b"\x80" + (5).to_bytes(7, "big"), 5),
    ],
)
def test_header_numbers_that_are_read(field: bytes, value: int) -> None:
    assert parse_number(field, "mode") == value


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def fails_cleanly(data: bytes, chunk: int = 512) -> ConfinferError | None:
    """Extract ``data``; the error if any. Anything but a ConfinferError fails the test, and
    a refusal leaves the destination empty."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        try:
            extract(data, root, chunk=chunk, max_bytes=MiB)
        except ConfinferError as exc:
            assert not root.exists()
            return exc
    return None


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=700), chunk=st.integers(1, 1024))
def test_property_any_pax_payload_fails_cleanly(payload: bytes, chunk: int) -> None:
    data = raw_header(b"P", size=len(payload), typeflag=b"x") + padded(payload)
    fails_cleanly(data + raw_header(b"f") + END, chunk)


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.one_of(st.binary(max_size=24), st.text(max_size=8).map(str.encode)),
            st.sampled_from([b"size", b"path", b"mtime", b"GNU.sparse.size", b"linkpath"]),
            st.one_of(st.binary(max_size=40), st.text(max_size=12).map(str.encode)),
        ),
        max_size=4,
    )
)
def test_property_pax_records_with_any_lengths_and_values(
    records: list[tuple[bytes, bytes, bytes]],
) -> None:
    payload = b"".join(length + b" " + key + b"=" + value + b"\n" for length, key, value in records)
    data = raw_header(b"P", size=len(payload), typeflag=b"x") + padded(payload)
    fails_cleanly(data + raw_header(b"f") + END)
    # The records alone, and well-formed lengths around any value.
    try:
        parse_pax(payload)
    except ConfinferError:
        pass
    framed = b"".join(pax_record(key + b"=" + value) for _, key, value in records)
    data = raw_header(b"P", size=len(framed), typeflag=b"x") + padded(framed)
    fails_cleanly(data + raw_header(b"f") + padded(b"x" * 3) + END)


NUMERIC_FIELDS = {"mode": (100, 108), "size": (124, 136), "checksum": (148, 156)}


@settings(max_examples=400, deadline=None)
@given(
    field=st.sampled_from(sorted(NUMERIC_FIELDS)),
    value=st.one_of(
        st.binary(min_size=1, max_size=12),
        st.text(alphabet=st.characters(categories=("Nd", "No")), max_size=6).map(str.encode),
    ),
    typeflag=st.sampled_from([b"0", b"5", b"x", b"L", b"g", b"\x00"]),
    fix_checksum=st.booleans(),
)
def test_property_any_header_number_fails_cleanly(
    field: str, value: bytes, typeflag: bytes, fix_checksum: bool
) -> None:
    start, end = NUMERIC_FIELDS[field]
    block = bytearray(raw_header(b"name", typeflag=typeflag))
    block[start:end] = value[: end - start].ljust(end - start, b"\x00")
    data = with_checksum(block) if fix_checksum and field != "checksum" else bytes(block)
    fails_cleanly(data + bytes(2048) + END)


@settings(max_examples=300, deadline=None)
@given(block=st.binary(min_size=512, max_size=512), magic=st.booleans())
def test_property_any_header_block_fails_cleanly(block: bytes, magic: bool) -> None:
    raw = bytearray(block)
    if magic:
        raw[257:265] = b"ustar\x0000"
    fails_cleanly(with_checksum(raw) + bytes(1024) + END)


# -- deep trees and hostile names -------------------------------------------------------------

DEEP = "/".join(["d"] * 2047)  # 4093 bytes: as deep as a path may go


def test_deepest_path_extracts(tmp_path: Path) -> None:
    info = file_info(DEEP + "/f")
    data = build_tar([(info, b"deep"), (file_info(DEEP + "/g"), b"g")], tarfile.PAX_FORMAT)
    with Destination(tmp_path / "out", max_bytes=64 * MiB) as dest:
        extractor = TarExtractor(dest)
        extractor.feed(memoryview(data))
        extractor.close()
    fd = os.open(tmp_path / "out", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2047):
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        assert sorted(os.listdir(fd)) == ["f", "g"]
    finally:
        os.close(fd)
    # The committed tree is deeper than shutil.rmtree (pytest's tmp_path clean-up) can recurse.
    dest.wipe()
    assert not (tmp_path / "out").exists()


def test_deep_tree_then_a_refusal_leaves_nothing(tmp_path: Path) -> None:
    deep = DEEP.rsplit("/", 1)[0]  # 2046 levels: room for the names below
    entries: list[tuple[tarfile.TarInfo, bytes | None]]
    entries = [(file_info(f"{deep}/f{i}"), b"plaintext") for i in range(3)]
    entries.append((special_info("m/l", tarfile.SYMTYPE, "/etc/passwd"), None))
    data = build_tar(entries, tarfile.PAX_FORMAT)
    assert refusal(data, tmp_path / "out").reason == "unsafe-entry-type"
    assert not (tmp_path / "out").exists()


def test_many_entries_in_deep_directories(tmp_path: Path) -> None:
    """Paths are checked against a tree of names, so deep entries cost what they are long."""
    a, b = "/".join(["a"] * 600), "/".join(["b"] * 600)
    entries = [(file_info(f"{a if i % 2 else b}/f{i}"), b"") for i in range(100)]
    entries.append((file_info(f"{a}/f1/x"), b"x"))  # below a file: still noticed
    data = build_tar(entries, tarfile.PAX_FORMAT)
    assert refusal(data, tmp_path / "out").reason == "path-through-file"


@pytest.mark.parametrize(
    ("pax", "reason"),
    [
        ({"path": "a\x00b"}, "unsafe-path"),
        ({"path": "a/\x00/b"}, "unsafe-path"),
        ({"path": "x" * 5000}, "unsafe-path"),
        ({"path": "a/" * 2048 + "b"}, "unsafe-path"),
        ({"path": "ok", "GNU.sparse.size": "10"}, "unsafe-entry-type"),
    ],
)
def test_hostile_pax_names(tmp_path: Path, pax: dict[str, str], reason: str) -> None:
    info = file_info("innocent")
    info.pax_headers = pax
    data = build_tar([(info, b"x")], tarfile.PAX_FORMAT)
    assert refusal(data, tmp_path / "out").reason == reason


def test_gnu_long_name_with_nul_is_cut_there(tmp_path: Path) -> None:
    name = b"real\x00../../evil\x00"
    data = raw_header(b"././@LongLink", size=len(name), typeflag=b"L", magic=b"ustar  \x00")
    data += padded(name) + raw_header(b"x", magic=b"ustar  \x00") + END
    extract(data, tmp_path / "out")
    assert tree(tmp_path / "out") == {"real": b""}


def test_extended_header_too_large(tmp_path: Path) -> None:
    data = raw_header(b"P", size=(1 << 20) + 1, typeflag=b"x") + END
    assert refusal(data, tmp_path / "out").reason == "archive-malformed"


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOSPC])
def test_write_errors_name_the_destination_not_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def fail(fd: int, data: Any) -> int:
        raise OSError(code, os.strerror(code))

    data = build_tar([(file_info("secret-name"), b"payload")])
    monkeypatch.setattr(os, "write", fail)
    err = refusal(data, tmp_path / "out")
    monkeypatch.undo()
    root = tmp_path / "out"
    if code == errno.ENOSPC:
        assert (err.reason, err.message) == ("no-space", f"the file system of {root} is full")
    else:
        assert err.reason == "dest-write"
        assert err.message == f"cannot write to {root}: {os.strerror(code)}"
