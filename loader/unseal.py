"""Reading a sealed package: inspect its structure, or unseal it into a destination.

Order of checks in :func:`unseal_package`, each before anything is written:

1. magic and header length (``bad-magic``, ``unsupported-format``, ``header-invalid``,
   ``truncated``); the header JSON, strictly typed (``header-invalid``);
2. the key id against the one the operator named (``key-mismatch``), then the DEK from the
   unwrapper (``key-mismatch``, ``key-unwrap``);
3. the header tag (``header-integrity``): from here on the header is the owner's;
4. the manifest (``unsafe-path``, ``duplicate-entry``, ``missing-parent``), the size cap
   (``size-limit``), the package length (``truncated``, ``trailing-data``).

Then chunks are decrypted in parallel; each is authenticated (``chunk-integrity``) before its
plaintext is written. Any failure leaves the destination wiped (the caller's
:class:`~loader.dest.Destination` context does it).

Package files (``model.sealed``, and the tutorial layout's two files) are opened by
:func:`open_package_file` only: never through a symbolic link, never blocking (a FIFO planted in
the package directory is refused, not waited on), and only if they are regular files
(``package-unreadable``). An I/O error while reading one is ``package-read``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confinfer.closable import Closable
from confinfer.errors import ConfinferError, IntegrityError, KeyUnwrapError, Reason, UsageError
from loader import format as fmt
from loader.aead import ChunkCipher, derive_chunk_key, verify_header_tag
from loader.dest import Destination
from loader.keywrap import DekUnwrapper, key_ids_match, zero
from loader.progress import Progress
from loader.workers import OpenFiles, pwrite_all, run_chunks

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def not_regular(path: Path, mode: int) -> UsageError:
    """The refusal of package file ``path``, of file type ``mode``, as not a regular file."""
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return UsageError(
        f"{path} is {kind}; a package file must be a regular file",
        reason=Reason.PACKAGE_UNREADABLE,
        hint="copy the package files themselves (cp -L), not links or special files",
    )


def open_package_file(path: Path) -> int:
    """A read descriptor of the regular file ``path``, or UsageError (``package-unreadable``).

    The last component is never followed if it is a symbolic link, the open never blocks (a
    FIFO, a device) and nothing but a regular file is kept open; the descriptor is returned in
    blocking mode.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        why = exc.strerror or os.strerror(exc.errno or 0)
        if exc.errno == errno.ELOOP:
            why = "it is a symbolic link (not followed)"
        raise UsageError(f"cannot open {path}: {why}", reason=Reason.PACKAGE_UNREADABLE) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular(path, info.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_error(path: Path, exc: OSError) -> ConfinferError:
    """The one-line error for an I/O error while reading package file ``path``."""
    why = exc.strerror or os.strerror(exc.errno or 0)
    return ConfinferError(f"cannot read {path}: {why}", reason=Reason.PACKAGE_READ)


@dataclass
class SealedPackage(Closable):
    """An open ``model.sealed``: its descriptor, size and (not yet authenticated) header."""

    path: Path
    fd: int
    file_size: int
    header_bytes: bytes
    header_tag: bytes
    header: fmt.Header

    @classmethod
    def open(cls, pkg_dir: Path) -> SealedPackage:
        path = pkg_dir / fmt.PACKAGE_FILE
        fd = open_package_file(path)
        try:
            size = os.fstat(fd).st_size
            try:
                prefix = os.pread(fd, fmt.PREFIX_LEN, 0)
                header_len = fmt.read_prefix(prefix, size)
                rest = os.pread(fd, header_len + fmt.TAG_LEN, fmt.PREFIX_LEN)
            except OSError as exc:
                raise read_error(path, exc) from exc
            if len(rest) != header_len + fmt.TAG_LEN:
                raise IntegrityError("the package is truncated", reason=Reason.TRUNCATED)
            header_bytes, tag = rest[:header_len], rest[header_len:]
            header = fmt.parse_header(header_bytes)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return cls(path, fd, size, header_bytes, tag, header)

    def layout(self) -> fmt.Layout:
        return fmt.Layout(self.header, len(self.header_bytes))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def inspect_package(pkg_dir: Path) -> dict[str, Any]:
    """Header, manifest and structure of a package, checked without any key."""
    with SealedPackage.open(pkg_dir) as pkg:
        fmt.validate(pkg.header)
        layout = pkg.layout()
        fmt.check_size(layout, pkg.file_size)
        return fmt.describe(pkg.header, len(pkg.header_bytes), pkg.file_size)


def unseal_package(
    pkg_dir: Path,
    dest: Destination,
    unwrapper: DekUnwrapper,
    *,
    expected_key_id: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> fmt.Header:
    """Authenticate and decrypt the package in ``pkg_dir`` into ``dest``.

    ``dest.max_bytes`` caps the model's total size. On an exception ``dest`` may hold partial
    output: run this inside ``with dest:`` (or call ``dest.wipe()``).
    """
    with SealedPackage.open(pkg_dir) as pkg:
        header = pkg.header
        if expected_key_id and not key_ids_match(expected_key_id, header.key_id):
            raise KeyUnwrapError(
                f"the package was sealed for the KEK {header.key_id}, not {expected_key_id}",
                reason=Reason.KEY_MISMATCH,
            )
        dek = unwrapper.unwrap(header.wrapped_dek, header.key_id)
        try:
            key = derive_chunk_key(dek, header.salt)
        finally:
            zero(dek)
        try:
            prefix = fmt.authenticated_prefix(pkg.header_bytes)
            verify_header_tag(key, prefix, pkg.header_tag)
            fmt.validate(header, max_bytes=dest.max_bytes)
            layout = pkg.layout()
            fmt.check_size(layout, pkg.file_size)
            cipher = ChunkCipher(key, hashlib.sha256(prefix).digest())
            _extract(pkg, layout, cipher, dest, progress, workers)
        finally:
            zero(key)
    return header


def _extract(
    pkg: SealedPackage,
    layout: fmt.Layout,
    cipher: ChunkCipher,
    dest: Destination,
    progress: Progress | None,
    workers: int | None,
) -> None:
    header = pkg.header
    if progress is not None:
        progress.set_total(header.total_size)
    for d in header.directories:
        dest.mkdir(d.path, d.mode)
    for f in header.files:
        if f.size == 0:
            os.close(dest.open_file(f.path, f.mode, size=0))

    def open_target(file: int) -> int:
        entry = header.files[file]
        return dest.open_file(entry.path, entry.mode, size=entry.size)

    targets = OpenFiles(open_target, lambda f: len(layout.chunks_of(f)))

    def work(index: int, inbuf: memoryview, outbuf: memoryview) -> None:
        ref = layout.chunk(index)
        record = ref.length + fmt.TAG_LEN
        try:
            got = os.preadv(pkg.fd, [inbuf[:record]], ref.package_offset)
        except OSError as exc:
            raise read_error(pkg.path, exc) from exc
        if got != record:
            raise IntegrityError("the package is truncated", reason=Reason.TRUNCATED)
        n = cipher.open_into(
            index, ref.final, inbuf[: ref.length], inbuf[ref.length : record], outbuf
        )
        if ref.file >= 0:
            fd = targets.acquire(ref.file)
            try:
                pwrite_all(fd, [outbuf[:n]], ref.file_offset)
                targets.release(ref.file)  # closes the file after its last chunk
            except OSError as exc:
                raise dest.write_error(exc) from exc
        if progress is not None:
            progress.advance(ref.length)

    try:
        run_chunks(layout.count, work, buffer_size=layout.chunk_size + fmt.TAG_LEN, workers=workers)
    finally:
        targets.close_all()
