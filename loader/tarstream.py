"""A push-driven, streaming tar reader that extracts only what is safe.

It reads the formats Python's :mod:`tarfile` and GNU tar write: POSIX ustar (with the 155-byte
``prefix`` field), pax (``x`` extended headers for long paths and large sizes; ``g`` global
headers are skipped) and GNU (``L``/``K`` long names, base-256 sizes). Every header's checksum is
verified and the archive must end with two zero blocks.

Data is pushed in with :meth:`TarExtractor.feed` as it is decrypted, in chunks of any size, and
file payloads go from the caller's buffer straight to the file descriptor with ``os.write`` on
memoryview slices: no copy through small buffers, no whole-archive buffering. Only metadata (a
512-byte header block, bounded pax / long-name records) is copied.

Only regular files (type ``0`` and NUL) and directories (``5``) are written. Everything else is
refused before anything of that entry is written: links, devices, FIFOs, sparse and unknown types,
absolute or ``..`` paths, paths through an earlier file, duplicate entries, and sizes over the
destination's cap. Modes lose setuid, setgid, sticky and group/other write bits (the
destination applies :func:`loader.dest.file_mode` and :func:`loader.dest.dir_mode`). Failures and
their ``reason``:

- ``UnsafeArchiveError``: ``unsafe-entry-type`` (a link, device, FIFO, sparse, contiguous or
  unknown entry; ``details["type"]`` names it), ``path-through-file`` (below a path an earlier
  entry wrote as a file), ``duplicate-entry``, ``archive-too-many-entries``, and whatever
  :func:`loader.dest.safe_relpath` says of an absolute, ``..`` or empty path (``unsafe-path``);
- ``FormatError``: ``archive-malformed`` (bad checksum, magic, number or pax record, a lone zero
  block) and ``archive-truncated`` (the data ended before the end-of-archive marker);
- ``NoSpaceError`` when the file system is full, ``dest-write`` for other write failures.

Numbers are read strictly: header fields as ASCII octal (NUL- or space-terminated, as ustar and
GNU write them) or GNU base-256; pax lengths and sizes as at most 20 ASCII decimal digits. No
other digit (``²``, ``٣``), sign, underscore or inner space is a number here. Whatever the bytes,
only these ``ConfinferError`` subclasses leave :meth:`TarExtractor.feed`.

The size cap itself is the destination's: its ``open_file(rel, mode, size=)`` charges the size
from the header before any byte of the entry is written.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from pathlib import PurePosixPath

from confinfer.errors import FormatError, Reason, UnsafeArchiveError
from loader.dest import WRITE_SLICE, Destination, safe_relpath

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
# A pax or GNU long-name record this large is not a path; refuse rather than buffer it.
MAX_META_BYTES = 1 << 20
MAX_ENTRIES = 100_000
# Decimal digits of a pax length or size: 10**20 is beyond any file (and any 64-bit size).
MAX_DECIMAL_DIGITS = 20
_OCTAL_DIGITS = b"01234567"
_DECIMAL_DIGITS = b"0123456789"

_REGULAR = (b"0", b"\x00")
_DIRECTORY = b"5"
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"S": "GNU sparse file",
    b"D": "GNU dump directory",
    b"M": "GNU multi-volume continuation",
    b"V": "GNU volume label",
    b"N": "GNU old long name",
}
# Signed and unsigned checksums of a header whose checksum field is eight spaces.
_SIGNED = struct.Struct("148b8x356b")
_CHKSUM_SPACES = 8 * 0x20


class _State(enum.Enum):
    HEADER = enum.auto()
    FILE = enum.auto()
    META = enum.auto()
    SKIP = enum.auto()
    END = enum.auto()


class _Dir:
    """A directory of the archive as written so far: what each name in it is (a :class:`_Dir`,
    or None for a file), and whether the archive listed it (or only paths below it)."""

    __slots__ = ("children", "listed")

    def __init__(self, *, listed: bool) -> None:
        self.children: dict[str, _Dir | None] = {}
        self.listed = listed


_ABSENT = object()


def _shown(name: str) -> str:
    """An entry name fit for a one-line message: escaped and bounded."""
    text = repr(name)
    return text if len(text) <= 160 else text[:157] + "..."


def _malformed(why: str) -> FormatError:
    return FormatError(f"not a valid tar archive: {why}", reason=Reason.ARCHIVE_MALFORMED)


def parse_number(field: bytes, what: str) -> int:
    """A header number: ASCII octal, space-padded and NUL/space-terminated, or GNU base-256
    (first byte 0x80, the rest big-endian; 0xFF marks a negative number, refused)."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise _malformed(f"negative {what}")
        if field[0] != 0x80:
            raise _malformed(f"{what} field is not a number")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(_OCTAL_DIGITS):
        raise _malformed(f"{what} field is not an octal number")
    return int(text.decode("ascii"), 8)


def _decimal(text: bytes, what: str) -> int:
    """At most :data:`MAX_DECIMAL_DIGITS` ASCII decimal digits, nothing else."""
    if not 0 < len(text) <= MAX_DECIMAL_DIGITS or text.strip(_DECIMAL_DIGITS):
        raise _malformed(f"{what} is not a decimal number")
    return int(text.decode("ascii"))


def verify_checksum(block: bytes) -> None:
    stored = parse_number(block[148:156], "checksum")
    unsigned = sum(block) - sum(block[148:156]) + _CHKSUM_SPACES
    if stored == unsigned:
        return
    # Some historic writers summed signed bytes; tarfile and GNU tar accept either.
    if stored == sum(_SIGNED.unpack(block)) + _CHKSUM_SPACES:
        return
    raise _malformed("header checksum mismatch")


def _cstring(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _decode(raw: bytes) -> str:
    # Bytes that are not UTF-8 become lone surrogates instead of a decoding error, so that
    # safe_relpath refuses the entry by name ("not valid UTF-8").
    return raw.decode("utf-8", "surrogateescape")


def parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"%d %s=%s\\n"`` whose decimal length counts the whole record."""
    records: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:
            # Trailing NUL padding inside the declared size.
            if data[pos:].strip(b"\x00"):
                raise _malformed("pax header has data after NUL padding")
            break
        space = data.find(b" ", pos, min(end, pos + MAX_DECIMAL_DIGITS + 1))
        digits = data[pos:space] if space > pos else b""
        length = _decimal(digits, "pax record length")
        stop = pos + length
        if length <= len(digits) + 1 or stop > end or data[stop - 1] != 0x0A:
            raise _malformed("pax record length does not match its data")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise _malformed("pax record without a keyword")
        records[_decode(key)] = _decode(value)
        pos = stop
    return records


class TarExtractor:
    """Feed it tar bytes in order; it writes safe entries into ``sink`` as they complete.

    Call :meth:`close` after the last byte to check the archive ended properly, and
    :meth:`abort` on any failure to release an open file descriptor. After the end-of-archive
    marker, further bytes (the tar record padding) are counted and ignored.
    """

    def __init__(self, sink: Destination, *, max_entries: int = MAX_ENTRIES) -> None:
        self._sink = sink
        self._max_entries = max_entries
        self._state = _State.HEADER
        self._header = bytearray(BLOCK)
        self._fill = 0
        self._zero_seen = False
        self._remaining = 0  # payload bytes left in FILE / META, or bytes to skip in SKIP
        self._pad = 0  # padding to skip after the current payload
        self._fd = -1
        self._meta = bytearray()
        self._meta_type = b""
        self._pending_pax: dict[str, str] = {}
        self._pending_name: str | None = None
        self._tree = _Dir(listed=True)  # what the archive put where, for path checks
        self._recorded = 0  # paths in the tree (entries and the parents they implied)
        self._last_parent: tuple[tuple[str, ...], _Dir] = ((), self._tree)
        self.files = 0
        self.directories = 0
        self.payload_bytes = 0
        self.trailing_bytes = 0

    # -- pushing data -------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state is _State.FILE:
                take = min(self._remaining, end - pos)
                self._write(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._close_file()
                    self._after_payload()
            elif state is _State.HEADER:
                take = min(BLOCK - self._fill, end - pos)
                self._header[self._fill : self._fill + take] = view[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == BLOCK:
                    self._fill = 0
                    self._on_header(bytes(self._header))
            elif state is _State.SKIP:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._after_payload()
            elif state is _State.META:
                take = min(self._remaining, end - pos)
                start = len(self._meta) - self._remaining
                self._meta[start : start + take] = view[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._on_meta()
                    self._after_payload()
            else:
                self.trailing_bytes += end - pos
                return

    def close(self) -> None:
        """Check the archive ended with its end-of-archive marker."""
        if self._state is not _State.END:
            self.abort()
            raise FormatError(
                "the tar archive ends before its end-of-archive marker",
                reason=Reason.ARCHIVE_TRUNCATED,
            )

    def abort(self) -> None:
        """Release the file being written, if any (the caller wipes the destination)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):  # it is wiped anyway; keep the first error
                os.close(fd)

    @property
    def finished(self) -> bool:
        return self._state is _State.END

    # -- headers ------------------------------------------------------------------------------

    def _on_header(self, block: bytes) -> None:
        if block == _ZERO_BLOCK:
            if self._zero_seen:
                if self._pending_pax or self._pending_name is not None:
                    raise _malformed("extended header without an entry")
                self._state = _State.END
            self._zero_seen = True
            return
        if self._zero_seen:
            raise _malformed("a lone zero block inside the archive")
        verify_checksum(block)
        magic = block[257:265]
        if magic not in (_POSIX_MAGIC, _GNU_MAGIC):
            raise _malformed("unknown header magic")
        typeflag = block[156:157]
        size = parse_number(block[124:136], "size")

        if typeflag in (b"x", b"L", b"K"):
            if size > MAX_META_BYTES:
                raise _malformed("extended header too large")
            self._meta = bytearray(size)
            self._meta_type = typeflag
            self._begin_payload(size, _State.META)
            return
        if typeflag == b"g":
            # Global pax headers carry defaults (comments, charsets) that change nothing we
            # write: each entry's own header and pax records name it.
            self._begin_payload(size, _State.SKIP)
            return

        pax, self._pending_pax = self._pending_pax, {}
        long_name, self._pending_name = self._pending_name, None
        if long_name is not None:
            name = long_name
        else:
            raw = _cstring(block[0:100])
            if magic == _POSIX_MAGIC:
                prefix = _cstring(block[345:500])
                if prefix:
                    raw = prefix + b"/" + raw
            name = _decode(raw)
        if pax.get("path"):
            name = pax["path"]
        if "size" in pax:
            size = _decimal(pax["size"].encode("utf-8", "surrogateescape"), "pax size")
        if any(key.startswith("GNU.sparse.") for key in pax):
            typeflag = b"S"
        mode = parse_number(block[100:108], "mode")

        if typeflag == b"\x00" and name.endswith("/"):
            # Pre-POSIX writers marked directories by a trailing slash alone.
            typeflag = _DIRECTORY
        if typeflag in _REGULAR:
            self._regular(name, size, mode)
        elif typeflag == _DIRECTORY:
            if size:
                raise _malformed(f"directory {_shown(name)} has a payload")
            self._directory(name, mode)
        else:
            kind = _TYPE_NAMES.get(typeflag, f"unknown type {typeflag!r}")
            raise UnsafeArchiveError(
                f"entry {_shown(name)} is a {kind}; only regular files and directories are "
                "extracted",
                reason=Reason.UNSAFE_ENTRY_TYPE,
                details={"type": kind},
            )

    def _begin_payload(self, size: int, state: _State) -> None:
        self._pad = -size % BLOCK
        if size:
            self._remaining = size
            self._state = state
        elif state is _State.META:
            self._on_meta()
            self._after_payload()
        else:
            self._after_payload()

    def _after_payload(self) -> None:
        if self._pad:
            self._remaining, self._pad = self._pad, 0
            self._state = _State.SKIP
        else:
            self._state = _State.HEADER

    def _on_meta(self) -> None:
        data, self._meta = bytes(self._meta), bytearray()
        if self._meta_type == b"x":
            self._pending_pax = parse_pax(data)
        elif self._meta_type == b"L":
            self._pending_name = _decode(_cstring(data))
        # b"K" (a long link target) is read and dropped: links are never extracted.

    # -- entries ------------------------------------------------------------------------------

    def _place(self, name: str, *, directory: bool) -> PurePosixPath | None:
        """Check an entry's path against what was written; record it and missing parents."""
        if directory and name.startswith(".") and set(name.split("/")) <= {"", "."}:
            return None  # "." or "./" (what "tar -C dir ." writes first): the destination
        rel = safe_relpath(name)
        if self._recorded >= self._max_entries:
            raise UnsafeArchiveError(
                f"the archive has more than {self._max_entries} entries",
                reason=Reason.ARCHIVE_TOO_MANY_ENTRIES,
            )
        parent = self._parent(rel.parts[:-1], name)
        seen = parent.children.get(rel.name, _ABSENT)
        if seen is not _ABSENT:
            if directory and isinstance(seen, _Dir) and not seen.listed:
                # A directory's own entry after its content: it now gets its mode.
                seen.listed = True
                return rel
            raise UnsafeArchiveError(
                f"entry {_shown(name)} appears twice in the archive", reason=Reason.DUPLICATE_ENTRY
            )
        parent.children[rel.name] = _Dir(listed=True) if directory else None
        self._recorded += 1
        return rel

    def _parent(self, parts: tuple[str, ...], name: str) -> _Dir:
        """The directory ``parts`` in the tree, recorded as implied where missing (the
        destination creates it, 0755); refused below a file. One walk per directory change:
        the work is linear in the archive, however deep its paths."""
        last_parts, last = self._last_parent
        if parts == last_parts:
            return last
        node = self._tree
        for depth, part in enumerate(parts, 1):
            child = node.children.get(part, _ABSENT)
            if child is None:
                raise UnsafeArchiveError(
                    f"entry {_shown(name)} lies below the file {_shown('/'.join(parts[:depth]))}",
                    reason=Reason.PATH_THROUGH_FILE,
                )
            if not isinstance(child, _Dir):
                child = node.children[part] = _Dir(listed=False)
                self._recorded += 1
            node = child
        self._last_parent = (parts, node)
        return node

    def _directory(self, name: str, mode: int) -> None:
        rel = self._place(name, directory=True)
        if rel is not None:
            self._sink.mkdir(rel, mode)
            self.directories += 1

    def _regular(self, name: str, size: int, mode: int) -> None:
        rel = self._place(name, directory=False)
        if rel is None:  # pragma: no cover - files never map to the root
            raise _malformed("a file entry names the destination itself")
        self._fd = self._sink.open_file(rel, mode, size=size)
        self.files += 1
        self._pad = -size % BLOCK
        if size:
            self._remaining = size
            self._state = _State.FILE
        else:
            self._close_file()
            self._after_payload()

    def _write(self, chunk: memoryview) -> None:
        while chunk:
            try:
                written = os.write(self._fd, chunk[:WRITE_SLICE])
            except OSError as exc:
                raise self._sink.write_error(exc) from exc
            chunk = chunk[written:]
            self.payload_bytes += written

    def _close_file(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            raise self._sink.write_error(exc) from exc
