"""Where plaintext goes: a destination directory that is written safely and wiped on failure.

:class:`Destination` is the only way model plaintext reaches the file system. It creates only
directories and regular files, only inside its root, and never through a symbolic link: every
path is resolved one component at a time from a directory descriptor with ``O_NOFOLLOW``. It
charges every byte against an optional size cap before writing, and on any failure (including
a full file system and a signal) it wipes what it wrote, so that nothing of the plaintext stays.

Modes are sanitised on the way in (:func:`file_mode`, :func:`dir_mode`): no setuid, setgid or
sticky bits, no group or other write.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path, PurePosixPath
from types import TracebackType

from confinfer.errors import (
    ConfinferError,
    NoSpaceError,
    Reason,
    SizeLimitError,
    UnsafeArchiveError,
    UsageError,
)
from loader import signals

LOG = logging.getLogger(__name__)

# Linux limits: PATH_MAX counts the terminating NUL, NAME_MAX is per component (bytes).
MAX_PATH_BYTES = 4095
# Largest single write into a file. Writes of 2 MiB and more make the kernel allocate
# huge page-cache folios, which on a fragmented machine means direct compaction: measured
# here, 2 GiB written in 4 MiB calls took 0.4 s to 5.6 s of system time from run to run, in
# 256-512 KiB calls a steady 0.45 s. Every writer of model bytes slices its writes to this.
WRITE_SLICE = 512 * 1024
MAX_NAME_BYTES = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def file_mode(mode: int) -> int:
    """A regular file's mode: no setuid/setgid/sticky, no group/other write, owner may read."""
    return (mode & 0o755) | 0o400


def dir_mode(mode: int) -> int:
    """A directory's mode: as :func:`file_mode`, and the owner may always enter and write."""
    return (mode & 0o755) | 0o700


def _unsafe(name: str, why: str) -> UnsafeArchiveError:
    shown = repr(name)
    if len(shown) > 160:
        shown = shown[:157] + "..."
    return UnsafeArchiveError(f"unsafe path {shown}: {why}", reason=Reason.UNSAFE_PATH)


def safe_relpath(name: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside a destination, or UnsafeArchiveError.

    Refused (reason ``unsafe-path``): empty names, ``.`` alone, absolute paths, any ``..``
    component, NUL and other control characters, backslashes, text that is not valid UTF-8
    (lone surrogates), and names longer than Linux allows (4095 bytes, 255 per component).
    Empty and ``.`` components (``a//b``, ``./a``, a trailing ``/``) are dropped.
    """
    if not isinstance(name, str) or not name:
        raise _unsafe(str(name), "empty name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _unsafe(name, "control character")
    if "\\" in name:
        raise _unsafe(name, "backslash")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise _unsafe(name, "not valid UTF-8") from None
    if name.startswith("/"):
        raise _unsafe(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise _unsafe(name, "names the destination itself")
    if ".." in parts:
        raise _unsafe(name, "'..' component")
    if len(encoded) > MAX_PATH_BYTES:
        raise _unsafe(name, "path too long")
    if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts):
        raise _unsafe(name, "name too long")
    return PurePosixPath(*parts)


def no_space_error(exc: OSError) -> NoSpaceError | None:
    """The NoSpaceError for a write that hit ENOSPC/EDQUOT, else None."""
    if exc.errno not in _NO_SPACE:
        return None
    return NoSpaceError(
        "the destination file system is full",
        hint="give the destination (tmpfs) more room than the model's size",
    )


class Destination:
    """A directory that receives extracted plaintext and is wiped unless committed.

    ``root`` must not exist (it is then created, mode 0700, and removed again by :meth:`wipe`)
    or be an empty directory (left in place, emptied by :meth:`wipe`). Use it as a context
    manager: an exception inside the block wipes and re-raises (ENOSPC/EDQUOT become
    :class:`~confinfer.errors.NoSpaceError`); leaving the block normally commits.
    Methods are thread-safe.
    """

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()
        self._created = False
        self._state = "open"
        try:
            os.mkdir(self.root, 0o700)
            self._created = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise UsageError(
                f"cannot create {self.root}: its parent directory does not exist",
                reason=Reason.DEST_INVALID,
            ) from None
        except OSError as exc:
            raise UsageError(
                f"cannot create {self.root}: {exc.strerror}", reason=Reason.DEST_INVALID
            ) from None
        try:
            self._root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            self._forget_root()
            raise UsageError(
                f"{self.root} is not a directory (or is a symbolic link): {exc.strerror}",
                reason=Reason.DEST_INVALID,
            ) from None
        if self._created:
            os.fchmod(self._root_fd, 0o700)
        elif os.listdir(self._root_fd):
            os.close(self._root_fd)
            raise UsageError(
                f"{self.root} is not empty",
                reason=Reason.DEST_NOT_EMPTY,
                hint="give a new path or an empty directory",
            )

    def _forget_root(self) -> None:
        if self._created:
            try:
                os.rmdir(self.root)
            except OSError:
                LOG.warning("could not remove %s", self.root)

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Destination:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.commit()
            return
        self.wipe()
        if isinstance(exc, OSError):
            full = no_space_error(exc)
            if full is not None:
                raise full from exc

    # -- writing --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"the destination {self.root} is {self._state}")

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` against the cap; SizeLimitError when the total goes over it."""
        if nbytes < 0:
            raise ValueError("cannot charge a negative size")
        with self._lock:
            self._check_open()
            total = self.used + nbytes
            if self.max_bytes is not None and total > self.max_bytes:
                raise SizeLimitError(
                    f"the model needs more than the size cap of {self.max_bytes} bytes",
                    hint="raise --max-bytes (max_bytes) if the model is expected to be larger",
                )
            self.used = total

    def _walk(self, parts: tuple[str, ...], name: str) -> int:
        """A descriptor of the directory ``parts`` below root, created (0755) as needed."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                try:
                    os.mkdir(part, dir_mode(0o755), dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise UnsafeArchiveError(
                            f"{name!r} lies below something that is not a directory",
                            reason=Reason.PATH_CONFLICT,
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mkdir(self, rel: str | PurePosixPath, mode: int = 0o755) -> Path:
        """Create directory ``rel`` (and missing parents); an existing directory gets ``mode``."""
        path = safe_relpath(str(rel))
        with self._lock:
            self._check_open()
            parent = self._walk(path.parts[:-1], str(rel))
            try:
                try:
                    os.mkdir(path.name, 0o700, dir_fd=parent)
                except FileExistsError:
                    pass
                try:
                    fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise UnsafeArchiveError(
                            f"{str(rel)!r} exists and is not a directory", reason=Reason.PATH_CONFLICT
                        ) from None
                    raise
                try:
                    os.fchmod(fd, dir_mode(mode))
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
        return self.root / path

    def open_file(
        self, rel: str | PurePosixPath, mode: int = 0o644, size: int | None = None
    ) -> int:
        """Create regular file ``rel`` (and missing parents) and return a write descriptor.

        ``size``, when given, is charged against the cap before anything is created. The
        caller owns (and closes) the descriptor.
        """
        path = safe_relpath(str(rel))
        if size is not None:
            self.charge(size)
        with self._lock:
            self._check_open()
            parent = self._walk(path.parts[:-1], str(rel))
            try:
                try:
                    fd = os.open(path.name, _FILE_FLAGS, 0o600, dir_fd=parent)
                except FileExistsError:
                    raise UnsafeArchiveError(
                        f"{str(rel)!r} is written twice", reason=Reason.DUPLICATE_ENTRY
                    ) from None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise UnsafeArchiveError(
                            f"{str(rel)!r} is a symbolic link", reason=Reason.PATH_CONFLICT
                        ) from None
                    raise
            finally:
                os.close(parent)
            try:
                os.fchmod(fd, file_mode(mode))
            except BaseException:
                os.close(fd)
                raise
            return fd

    # -- outcome --------------------------------------------------------------------------

    def commit(self) -> None:
        """Keep what was written; the destination takes no more writes."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "committed"
            os.close(self._root_fd)

    def wipe(self) -> None:
        """Remove everything written (files are truncated first); remove root if we made it.

        Idempotent. Signals are held back until it is done. Raises ConfinferError
        (``wipe-failed``) when something could not be removed.
        """
        with signals.deferred(), self._lock:
            if self._state != "open":
                return
            self._state = "wiped"
            failures: list[str] = []
            try:
                _wipe_dir(self._root_fd, failures)
            finally:
                os.close(self._root_fd)
            if self._created and not failures:
                try:
                    os.rmdir(self.root)
                except OSError as exc:
                    failures.append(f"{self.root}: {exc.strerror}")
        if failures:
            raise ConfinferError(
                f"could not remove everything under {self.root}: {failures[0]}",
                reason=Reason.WIPE_FAILED,
                details={"failures": failures[:20]},
                hint="remove the directory by hand; it may hold plaintext",
            )


def _wipe_dir(dir_fd: int, failures: list[str]) -> None:
    """Empty the directory behind ``dir_fd`` without following symbolic links."""
    with os.scandir(dir_fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        try:
            if is_dir:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _wipe_dir(sub, failures)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dir_fd)
                continue
            _truncate(dir_fd, name)
            os.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            failures.append(f"{name}: {exc.strerror}")


def _truncate(dir_fd: int, name: str) -> None:
    """Drop a regular file's data now, even while some descriptor still holds it open."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            return
        fd = os.open(
            name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return  # unlinking still releases the data once no descriptor holds it
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
