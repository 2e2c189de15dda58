"""The seed tutorial's package layout, read as an unseal input.

The tutorial's ``encrypt_model.py`` tars the model directory and encrypts the whole tar as one
AES-256-GCM stream, ``model_archive.tar.enc`` = ``[12-byte nonce][ciphertext][16-byte tag]``
(no associated data), and stores the DEK wrapped RSA-OAEP-256 by the Key Vault KEK, raw bytes, in
``wrapped_model_dek.bin``.

Unlike the tutorial's own reader, this one never holds the archive in memory and never trusts the
tar: a second thread reads and decrypts the ciphertext into a fixed ring of preallocated buffers,
and each chunk is pushed through :class:`loader.tarstream.TarExtractor`, which writes only regular
files and directories inside the destination. One tag covers the whole archive, so entries are
written before they are authenticated; the destination is kept only once the tag has verified,
and any failure wipes it.

When the tar content is refused, the rest of the archive is still decrypted (nothing more is
written) so that the failure is reported for what it is: a bad tag (tampering, a wrong key) as
``integrity``, and only an authentic archive's hostile content as the tar reader's reason.

Both files must be regular files; they are opened without following a symbolic link and without
blocking (:func:`loader.unseal.open_package_file`), so a FIFO or a device in their place is
refused (``package-unreadable``) rather than waited on or read forever.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from confinfer.errors import (
    ConfinferError,
    FormatError,
    IntegrityError,
    KeyUnwrapError,
    Reason,
    SizeLimitError,
    UnsafeArchiveError,
    UsageError,
)
from loader import signals
from loader.aead import OUT_SLACK, GcmStreamDecryptor
from loader.dest import Destination
from loader.tarstream import TarExtractor
from loader.unseal import not_regular, open_package_file, read_error

ARCHIVE_NAME = "model_archive.tar.enc"
WRAPPED_DEK_NAME = "wrapped_model_dek.bin"
NONCE_LEN = 12
TAG_LEN = 16
DEK_LEN = 32
# Ciphertext read and decrypted per step. Large enough that per-chunk Python overhead vanishes
# next to the copy; DEPTH such chunks are decrypted ahead of the writer. Together they stay far
# below the loader's memory budget.
CHUNK = 2 << 20
DEPTH = 4
# What the tar content can be refused for (as opposed to the environment failing).
_REFUSALS = (UnsafeArchiveError, FormatError, SizeLimitError)
# RSA-OAEP output is the modulus size: 512 bytes for RSA-4096, the largest Key Vault key.
_MAX_WRAPPED_DEK = 1024


@dataclass(frozen=True)
class TutorialPackage:
    """A package directory in the tutorial's layout."""

    archive: Path
    wrapped_dek: Path

    def read_wrapped_dek(self) -> bytes:
        """The RSA-OAEP-256-wrapped DEK, exactly as the tutorial wrote it (raw bytes)."""
        fd = open_package_file(self.wrapped_dek)
        parts: list[bytes] = []
        left = _MAX_WRAPPED_DEK + 1
        try:
            while left:
                part = os.read(fd, left)
                if not part:
                    break
                parts.append(part)
                left -= len(part)
        except OSError as exc:
            raise read_error(self.wrapped_dek, exc) from exc
        finally:
            os.close(fd)
        blob = b"".join(parts)
        if not blob or len(blob) > _MAX_WRAPPED_DEK:
            raise KeyUnwrapError(
                f"{self.wrapped_dek} is {'empty' if not blob else 'too large'}; expected an "
                "RSA-OAEP-wrapped 32-byte key",
                reason=Reason.WRAPPED_DEK_INVALID,
            )
        return blob


def detect(pkg_dir: Path) -> TutorialPackage | None:
    """The tutorial layout in ``pkg_dir``, or None when one of its two names is missing.

    Names that are there but are not regular files (a symbolic link, a FIFO, a directory) are
    refused here, ``package-unreadable``, before anything is opened or read.
    """
    archive, wrapped = pkg_dir / ARCHIVE_NAME, pkg_dir / WRAPPED_DEK_NAME
    modes = []
    for path in (archive, wrapped):
        try:
            modes.append(os.lstat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise UsageError(
                f"cannot read {path}: {exc.strerror}", reason=Reason.PACKAGE_UNREADABLE
            ) from None
    for path, mode in zip((archive, wrapped), modes, strict=True):
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
    return TutorialPackage(archive=archive, wrapped_dek=wrapped)


def unseal_tutorial(
    archive: Path,
    dest: Destination,
    dek: bytearray,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decrypt ``archive`` and extract its tar into ``dest``, or leave ``dest`` empty.

    ``progress`` is called with the number of archive bytes consumed by each step (they add up
    to the file's size once the whole archive has been read and verified). On return
    the whole archive has authenticated and every entry is in ``dest``; the caller commits it.
    On any exception (a bad tag, refused tar content, the size cap, a full disk, a signal)
    ``dest`` has been wiped.
    """
    try:
        if len(dek) != DEK_LEN:
            raise KeyUnwrapError(
                f"the unwrapped model key is {len(dek)} bytes; AES-256 needs {DEK_LEN}",
                reason=Reason.DEK_LENGTH,
            )
        _extract(archive, dest, dek, progress)
    except BaseException:
        dest.wipe()
        raise


def _extract(
    archive: Path,
    dest: Destination,
    dek: bytearray,
    progress: Callable[[int], None] | None,
) -> None:
    fd = open_package_file(archive)
    try:
        size = os.fstat(fd).st_size
        if size < NONCE_LEN + TAG_LEN:
            raise IntegrityError(
                f"{archive.name} is {size} bytes, shorter than its {NONCE_LEN}-byte nonce "
                f"and {TAG_LEN}-byte tag",
                reason=Reason.ARCHIVE_TOO_SHORT,
            )
        nonce = _read_at(archive, fd, NONCE_LEN, 0)
        tag = _read_at(archive, fd, TAG_LEN, size - TAG_LEN)
        if progress is not None:
            progress(NONCE_LEN)

        extractor = TarExtractor(dest)
        reader = _DecryptAhead(archive, fd, NONCE_LEN, size - NONCE_LEN - TAG_LEN,
                               GcmStreamDecryptor(dek, nonce), tag)  # fmt: skip
        refused: ConfinferError | None = None
        try:
            for plaintext, consumed in reader.chunks():
                if refused is None:
                    try:
                        extractor.feed(plaintext)
                    except _REFUSALS as exc:
                        # Keep decrypting (writing nothing) to learn whether the archive is
                        # authentic; drop the unauthenticated plaintext written so far now.
                        refused = exc
                        extractor.abort()
                        dest.wipe()
                plaintext.release()
                reader.recycle()
                if progress is not None:
                    progress(consumed)
            # chunks() ends only once the tag has verified.
            if refused is not None:
                raise refused
            extractor.close()
            if progress is not None:
                progress(TAG_LEN)
        finally:
            with signals.deferred():  # a second signal must not cut the clean-up short
                extractor.abort()
                reader.stop()
    finally:
        os.close(fd)


class _DecryptAhead:
    """Reads and decrypts the ciphertext on a second thread, a few chunks ahead of the writer.

    ``pread`` and AES-GCM release the GIL, so reading and decrypting overlap with the
    extractor's ``os.write`` calls. Memory is a fixed ring of :data:`DEPTH` plaintext buffers
    plus one ciphertext buffer, whatever the archive's size.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        offset: int,
        length: int,
        decryptor: GcmStreamDecryptor,
        tag: bytes,
    ) -> None:
        self._path, self._fd, self._offset, self._length = path, fd, offset, length
        self._decryptor, self._tag = decryptor, tag
        self._buffers = [bytearray(CHUNK + OUT_SLACK) for _ in range(DEPTH)]
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int, int] | BaseException | None] = (
            queue.SimpleQueue()
        )
        for buf in self._buffers:
            self._free.put(buf)
        self._current: bytearray | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tutorial-decrypt", daemon=True)

    def chunks(self) -> Iterator[tuple[memoryview, int]]:
        """(plaintext, archive bytes it came from) per chunk; call :meth:`recycle` after each.

        Ends after the last chunk once the tag has verified; raises IntegrityError when it
        does not, or whatever reading failed with.
        """
        self._thread.start()
        while True:
            item = self._full.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, produced, consumed = item
            self._current = buf
            yield memoryview(buf)[:produced], consumed

    def recycle(self) -> None:
        """Hand the buffer of the last chunk back to the reading thread."""
        if self._current is not None:
            self._free.put(self._current)
            self._current = None

    def stop(self) -> None:
        """Stop the thread (if it still runs) and zero every buffer."""
        self._stopping.set()
        self._free.put(None)
        if self._thread.is_alive():
            self._thread.join()
        for buf in self._buffers:
            buf[:] = bytes(len(buf))

    def _run(self) -> None:
        inbuf = bytearray(CHUNK)
        inview = memoryview(inbuf)
        offset, remaining = self._offset, self._length
        try:
            while remaining:
                buf = self._free.get()
                if buf is None or self._stopping.is_set():
                    return
                try:
                    got = os.preadv(self._fd, [inview[: min(CHUNK, remaining)]], offset)
                except OSError as exc:
                    raise read_error(self._path, exc) from exc
                if not got:
                    raise IntegrityError(
                        "the archive changed size while it was read", reason=Reason.ARCHIVE_CHANGED
                    )
                produced = self._decryptor.update_into(inview[:got], buf)
                offset += got
                remaining -= got
                self._full.put((buf, produced, got))
            self._decryptor.finalize(self._tag)
            self._full.put(None)
        except BaseException as exc:  # handed to the consuming thread, which raises it
            self._full.put(exc)
        finally:
            inview.release()
            inbuf[:] = bytes(len(inbuf))


def _read_at(path: Path, fd: int, length: int, offset: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise read_error(path, exc) from exc
    if len(data) != length:
        raise IntegrityError(
            "the archive changed size while it was read", reason=Reason.ARCHIVE_CHANGED
        )
    return data
