"""The sealed package format, version 1: byte layout, header schema and chunk geometry.

This module knows where every byte of ``model.sealed`` lies and what the header must say; it
does no cryptography (that is :mod:`loader.aead`) and no I/O beyond reading the fixed prefix.
The normative description is docs/sealed-format.md; the constants here are its numbers::

    magic "CFSEALv1" (8) | u32 BE header_len | header (UTF-8 JSON) | header_tag (16) | chunks

Chunk ``i`` is ``ciphertext (len_i bytes) | tag (16)``; ``len_i`` and every offset follow from
the manifest and ``chunk_size`` alone (:class:`Layout`).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as dt
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from confinfer.errors import (
    FormatError,
    IntegrityError,
    Reason,
    SizeLimitError,
    UnsafeArchiveError,
)
from loader.dest import safe_relpath

PACKAGE_FILE = "model.sealed"
MAGIC = b"CFSEALv1"
MAGIC_FAMILY = b"CFSEAL"
VERSION = 1
CIPHER = "AES-256-GCM"
KDF = "HKDF-SHA256"
WRAP = "RSA-OAEP-256"
LEN = struct.Struct(">I")
PREFIX_LEN = len(MAGIC) + LEN.size
TAG_LEN = 16
SALT_LEN = 32
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_CHUNK_SIZE = 8 << 20
# The header is parsed in memory; this bound keeps a hostile one from costing more than a
# few tens of MiB. A manifest entry takes about 100 bytes: that is room for ~20 000 files.
MAX_HEADER_LEN = 2 << 20
MAX_FILE_SIZE = 1 << 62
MAX_WRAPPED_DEK = 1024
MAX_KEY_ID = 1024
MAX_CHUNKS = 1 << 64

_TOP_KEYS = frozenset(
    {
        "version",
        "cipher",
        "kdf",
        "chunk_size",
        "salt",
        "key_id",
        "wrap",
        "wrapped_dek",
        "created",
        "chunk_count",
        "manifest",
    }
)


@dataclass(frozen=True)
class DirEntry:
    path: str
    mode: int


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int


@dataclass(frozen=True)
class Header:
    """A parsed version-1 header. Nothing in it is trusted before the header tag verifies."""

    chunk_size: int
    salt: bytes
    key_id: str
    wrapped_dek: bytes
    created: str
    chunk_count: int
    directories: tuple[DirEntry, ...]
    files: tuple[FileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "cipher": CIPHER,
            "kdf": KDF,
            "chunk_size": self.chunk_size,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "key_id": self.key_id,
            "wrap": WRAP,
            "wrapped_dek": base64.b64encode(self.wrapped_dek).decode("ascii"),
            "created": self.created,
            "chunk_count": self.chunk_count,
            "manifest": {
                "directories": [{"path": d.path, "mode": d.mode} for d in self.directories],
                "files": [{"path": f.path, "size": f.size, "mode": f.mode} for f in self.files],
            },
        }

    def encode(self) -> bytes:
        """The header bytes as written: compact JSON, keys sorted, UTF-8."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def chunk_count(files: Sequence[FileEntry], chunk_size: int) -> int:
    """Chunk records for these files: one per started ``chunk_size`` piece, at least one."""
    return max(1, sum(-(-f.size // chunk_size) for f in files))


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def authenticated_prefix(header_bytes: bytes) -> bytes:
    """``magic | u32 BE len | header``: what the header tag covers and the chunks' AAD hashes."""
    return MAGIC + LEN.pack(len(header_bytes)) + header_bytes


# -- reading -----------------------------------------------------------------------------------


def _invalid(why: str) -> FormatError:
    return FormatError(f"the package header is invalid: {why}", reason=Reason.HEADER_INVALID)


def read_prefix(prefix: bytes, file_size: int) -> int:
    """Check the magic and return ``header_len`` from the first 12 bytes of the package."""
    if len(prefix) < len(MAGIC) or not prefix.startswith(MAGIC):
        if prefix[: len(MAGIC_FAMILY)] == MAGIC_FAMILY and len(prefix) >= len(MAGIC):
            raise FormatError(
                f"this package is format {prefix[6:8]!r}; this version reads {MAGIC[6:]!r} only",
                reason=Reason.UNSUPPORTED_FORMAT,
            )
        if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
            raise _truncated()
        raise FormatError(
            f"not a sealed model package (no {MAGIC.decode()} magic)", reason=Reason.BAD_MAGIC
        )
    if len(prefix) < PREFIX_LEN:
        raise _truncated()
    (header_len,) = LEN.unpack_from(prefix, len(MAGIC))
    if not 0 < header_len <= MAX_HEADER_LEN:
        raise _invalid(f"header length {header_len} is outside 1..{MAX_HEADER_LEN}")
    if PREFIX_LEN + header_len + TAG_LEN > file_size:
        raise _truncated()
    return int(header_len)


def _truncated() -> IntegrityError:
    return IntegrityError("the package is truncated", reason=Reason.TRUNCATED)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str = "") -> int:
    value = obj.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise _invalid(f"{where}{key!r} must be an integer in {lo}..{hi}")
    return value


def _str(obj: dict[str, Any], key: str, where: str = "", limit: int = 8192) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _invalid(f"{where}{key!r} must be a non-empty string")
    return value


def _b64(obj: dict[str, Any], key: str) -> bytes:
    text = _str(obj, key)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _invalid(f"{key!r} is not base64") from None


def _object(value: Any, keys: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    if set(value) != keys:
        extra, missing = set(value) - keys, keys - set(value)
        what = f"unknown key {sorted(extra)[0]!r}" if extra else f"missing {sorted(missing)[0]!r}"
        raise _invalid(f"{where}: {what}")
    return value


_DIR_KEYS = frozenset({"path", "mode"})
_FILE_KEYS = frozenset({"path", "size", "mode"})


def parse_header(header_bytes: bytes) -> Header:
    """Parse and type-check the header JSON (strictly). Semantic checks: :func:`validate`."""
    try:
        text = header_bytes.decode("utf-8")
        raw = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(f"not strict UTF-8 JSON ({type(exc).__name__})") from None
    top = _object(raw, _TOP_KEYS, "the header")
    version = top["version"]
    if type(version) is not int or version != VERSION:
        raise FormatError(
            f"header version {version!r} is not supported (this reader knows {VERSION})",
            reason=Reason.UNSUPPORTED_FORMAT,
        )
    for key, expected in (("cipher", CIPHER), ("kdf", KDF), ("wrap", WRAP)):
        if top[key] != expected:
            raise FormatError(
                f"{key} {top[key]!r} is not supported (expected {expected!r})",
                reason=Reason.UNSUPPORTED_FORMAT,
            )
    chunk_size = _int(top, "chunk_size", 1, MAX_CHUNK_SIZE)
    salt = _b64(top, "salt")
    if len(salt) != SALT_LEN:
        raise _invalid(f"'salt' must be {SALT_LEN} bytes")
    wrapped = _b64(top, "wrapped_dek")
    if len(wrapped) > MAX_WRAPPED_DEK:
        raise _invalid("'wrapped_dek' is too long")
    key_id = _str(top, "key_id", limit=MAX_KEY_ID)
    created = _str(top, "created", limit=64)
    count = _int(top, "chunk_count", 1, MAX_CHUNKS - 1)
    manifest = _object(top["manifest"], frozenset({"directories", "files"}), "'manifest'")
    dirs_raw, files_raw = manifest["directories"], manifest["files"]
    if not isinstance(dirs_raw, list) or not isinstance(files_raw, list):
        raise _invalid("'manifest' directories and files must be lists")
    directories = []
    for n, item in enumerate(dirs_raw):
        where = f"directory #{n}: "
        entry = _object(item, _DIR_KEYS, where.rstrip(": "))
        directories.append(
            DirEntry(_str(entry, "path", where), _int(entry, "mode", 0, 0o7777, where))
        )
    files = []
    for n, item in enumerate(files_raw):
        where = f"file #{n}: "
        entry = _object(item, _FILE_KEYS, where.rstrip(": "))
        files.append(
            FileEntry(
                _str(entry, "path", where),
                _int(entry, "size", 0, MAX_FILE_SIZE, where),
                _int(entry, "mode", 0, 0o7777, where),
            )
        )
    return Header(
        chunk_size=chunk_size,
        salt=salt,
        key_id=key_id,
        wrapped_dek=wrapped,
        created=created,
        chunk_count=count,
        directories=tuple(directories),
        files=tuple(files),
    )


def _manifest_path(path: str) -> PurePosixPath:
    rel = safe_relpath(path)
    if str(rel) != path:
        raise UnsafeArchiveError(
            f"manifest path {path!r} is not in normal form (expected {str(rel)!r})",
            reason=Reason.UNSAFE_PATH,
        )
    return rel


def validate(header: Header, *, max_bytes: int | None = None) -> None:
    """Semantic checks on a parsed header; raise before anything is written.

    Paths are safe and normalised, unique across files and directories; every parent of an
    entry is a directory listed earlier; the chunk count matches the sizes; the total fits
    ``max_bytes``.
    """
    dirs: set[PurePosixPath] = set()
    root = PurePosixPath(".")
    for d in header.directories:
        rel = _manifest_path(d.path)
        if rel in dirs:
            raise UnsafeArchiveError(
                f"directory {d.path!r} is listed twice", reason=Reason.DUPLICATE_ENTRY
            )
        if rel.parent != root and rel.parent not in dirs:
            raise UnsafeArchiveError(
                f"directory {d.path!r} comes before its parent is listed",
                reason=Reason.MISSING_PARENT,
            )
        dirs.add(rel)
    seen: set[PurePosixPath] = set()
    for f in header.files:
        rel = _manifest_path(f.path)
        if rel in seen or rel in dirs:
            raise UnsafeArchiveError(f"{f.path!r} is listed twice", reason=Reason.DUPLICATE_ENTRY)
        if rel.parent != root and rel.parent not in dirs:
            raise UnsafeArchiveError(
                f"file {f.path!r} lies in a directory the manifest does not list",
                reason=Reason.MISSING_PARENT,
            )
        seen.add(rel)
    expected = chunk_count(header.files, header.chunk_size)
    if expected >= MAX_CHUNKS or header.chunk_count != expected:
        raise _invalid(f"'chunk_count' is {header.chunk_count}, the manifest needs {expected}")
    total = header.total_size
    if max_bytes is not None and total > max_bytes:
        raise SizeLimitError(
            f"the model is {total} bytes, over the size cap of {max_bytes} bytes",
            hint="raise --max-bytes (max_bytes) if the model is expected to be this large",
        )


# -- geometry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRef:
    """Where chunk ``index`` comes from and goes to."""

    index: int
    final: bool
    file: int  # index into Header.files; -1 for the lone empty chunk
    file_offset: int
    length: int  # plaintext (and ciphertext) bytes; the record adds a 16-byte tag
    package_offset: int  # of the record


class Layout:
    """Chunk geometry of one package, computed from its header alone (O(files) memory)."""

    def __init__(self, header: Header, header_len: int) -> None:
        self.header = header
        self.chunk_size = header.chunk_size
        self.data_offset = PREFIX_LEN + header_len + TAG_LEN
        self.count = header.chunk_count
        # First chunk index and first record offset of each file, in stream order.
        self._first: list[int] = []
        self._offset: list[int] = []
        index, offset = 0, self.data_offset
        for f in header.files:
            n = -(-f.size // self.chunk_size)
            self._first.append(index)
            self._offset.append(offset)
            index += n
            offset += f.size + n * TAG_LEN
        self.package_size = offset if index else offset + TAG_LEN
        self._real = index  # chunks that carry file bytes; 0 means one empty chunk

    def chunk(self, index: int) -> ChunkRef:
        if not 0 <= index < self.count:
            raise IndexError(index)
        final = index == self.count - 1
        if self._real == 0:
            return ChunkRef(index, final, -1, 0, 0, self.data_offset)
        # The file that holds chunk `index`: the last one whose first chunk is <= index (an
        # empty file shares its first index with the next file, which comes after it).
        f = bisect.bisect_right(self._first, index) - 1
        k = index - self._first[f]
        start = k * self.chunk_size
        length = min(self.chunk_size, self.header.files[f].size - start)
        return ChunkRef(
            index, final, f, start, length, self._offset[f] + k * (self.chunk_size + TAG_LEN)
        )

    def chunks_of(self, file: int) -> range:
        """Indices of the chunks that carry file ``file``'s bytes (empty for an empty file)."""
        first = self._first[file]
        return range(first, first + -(-self.header.files[file].size // self.chunk_size))

    def __iter__(self) -> Iterator[ChunkRef]:
        for i in range(self.count):
            yield self.chunk(i)


def check_size(layout: Layout, file_size: int) -> None:
    """The package file must be exactly as long as its header says."""
    if file_size < layout.package_size:
        raise _truncated()
    if file_size > layout.package_size:
        raise IntegrityError(
            "the package has bytes after its last chunk", reason=Reason.TRAILING_DATA
        )


def describe(header: Header, header_len: int, file_size: int) -> dict[str, Any]:
    """What ``confinfer inspect`` prints: the header plus the computed structure."""
    layout = Layout(header, header_len)
    return {
        "header": header.to_json(),
        "structure": {
            "header_len": header_len,
            "data_offset": layout.data_offset,
            "chunks": layout.count,
            "plaintext_bytes": header.total_size,
            "package_bytes": layout.package_size,
            "file_bytes": file_size,
        },
    }
