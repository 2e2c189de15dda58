"""Where plaintext goes: a destination directory that is written safely and wiped on failure.

:class:`Destination` is the only way model plaintext reaches the file system. It creates only
directories and regular files, only inside its root, and never through a symbolic link: every
path is resolved one component at a time from a directory descriptor with ``O_NOFOLLOW``. It
charges every byte against an optional size cap before writing, and on any failure (including
a full file system and a signal) it wipes what it wrote, so that nothing of the plaintext stays.
Every OS error while writing becomes one ``dest-write`` (or ``no-space``) error that names the
destination and the OS's reason, never the content.

The wipe is iterative and descriptor-relative (``O_DIRECTORY | O_NOFOLLOW``, ``dir_fd``), so a
tree of any depth goes, ``PATH_MAX`` never applies, and a symbolic link swapped in cannot lead it
outside the destination. It also removes a committed tree: the served model, when attestation is
lost.

Modes are sanitised on the way in (:func:`file_mode`, :func:`dir_mode`): no setuid, setgid or
sticky bits, no group or other write.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
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


def _strerror(exc: OSError) -> str:
    if exc.strerror:
        return str(exc.strerror)
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def no_space_error(exc: OSError, where: Path | None = None) -> NoSpaceError | None:
    """The NoSpaceError for a write that hit ENOSPC/EDQUOT, else None."""
    if exc.errno not in _NO_SPACE:
        return None
    what = "the destination file system" if where is None else f"the file system of {where}"
    return NoSpaceError(
        f"{what} is full",
        hint="give the destination (tmpfs) more room than the model's size",
    )


class WriteFailed(OSError):
    """An OSError from writing into a file that a :class:`Destination` handed out.

    :func:`loader.workers.pwrite_all` raises it; the destination's context turns it into
    ``dest-write`` (or ``no-space``) naming the destination. A plain OSError raised in the
    ``with`` block passes through unchanged: it may come from elsewhere (reading the model).
    """


class Destination:
    """A directory that receives extracted plaintext and is wiped unless committed.

    ``root`` must not exist (it is then created, mode 0700) or be an empty directory. Use it as
    a context manager: an exception inside the block wipes and re-raises (a failed write into
    the destination, :class:`WriteFailed`, and ENOSPC/EDQUOT become ``dest-write`` and
    ``no-space`` errors that name ``root``); leaving the block normally commits. Every OS error
    of :meth:`mkdir` and :meth:`open_file` is ``dest-write`` (``no-space``) already.

    :meth:`wipe` works before and after :meth:`commit` (after it, when the served model must go:
    attestation was lost, the key revoked). It removes every file and directory below ``root``;
    ``root`` itself is removed when this object created it, and kept, empty and with its mode,
    when it existed before (a tmpfs mount point) or has become a mount point since.
    Methods are thread-safe.
    """

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()
        self._created = False
        self._state = "open"
        # The directory last walked to (its parts below root, a descriptor): files usually
        # follow one another in one directory, and deep trees need not be walked from the top.
        self._cached: tuple[tuple[str, ...], int] | None = None
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
                f"cannot create {self.root}: {_strerror(exc)}", reason=Reason.DEST_INVALID
            ) from None
        try:
            self._root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            self._forget_root()
            raise UsageError(
                f"{self.root} is not a directory (or is a symbolic link): {_strerror(exc)}",
                reason=Reason.DEST_INVALID,
            ) from None
        try:
            info = os.fstat(self._root_fd)
            if self._created:
                os.fchmod(self._root_fd, 0o700)
            busy = bool(os.listdir(self._root_fd))
        except OSError as exc:
            os.close(self._root_fd)
            self._forget_root()
            raise UsageError(
                f"cannot use {self.root}: {_strerror(exc)}", reason=Reason.DEST_INVALID
            ) from None
        if busy:
            os.close(self._root_fd)
            raise UsageError(
                f"{self.root} is not empty",
                reason=Reason.DEST_NOT_EMPTY,
                hint="give a new path or an empty directory",
            )
        self._ident = (info.st_dev, info.st_ino)

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
        if isinstance(exc, WriteFailed):
            raise self.write_error(exc) from exc
        if isinstance(exc, OSError):
            full = no_space_error(exc, self.root)
            if full is not None:
                raise full from exc

    def write_error(self, exc: OSError) -> ConfinferError:
        """The one-line error for an OS error while writing below root: ``no-space`` for
        ENOSPC/EDQUOT, else ``dest-write`` with the OS's words (never a path or content)."""
        full = no_space_error(exc, self.root)
        if full is not None:
            return full
        return ConfinferError(
            f"cannot write to {self.root}: {_strerror(exc)}",
            reason=Reason.DEST_WRITE,
            details={"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))},
            hint="check that the destination file system is mounted read-write and healthy",
        )

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

    def _subdir(self, parent: int, part: str, mode: int, conflict: str) -> int:
        """A descriptor of directory ``part`` in ``parent``, created with ``mode`` if missing."""
        try:
            os.mkdir(part, mode, dir_fd=parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self.write_error(exc) from exc
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise UnsafeArchiveError(conflict, reason=Reason.PATH_CONFLICT) from None
            raise self.write_error(exc) from exc

    def _remember(self, parts: tuple[str, ...], fd: int) -> None:
        old, self._cached = self._cached, (parts, os.dup(fd))
        if old is not None:
            os.close(old[1])

    def _forget_cached(self) -> None:
        old, self._cached = self._cached, None
        if old is not None:
            os.close(old[1])

    def _walk(self, parts: tuple[str, ...], name: str) -> int:
        """A descriptor of the directory ``parts`` below root, created (0755) as needed."""
        start, base = 0, self._root_fd
        if self._cached is not None:
            cached, cached_fd = self._cached
            if parts[: len(cached)] == cached:
                start, base = len(cached), cached_fd
        try:
            fd = os.dup(base)
        except OSError as exc:
            raise self.write_error(exc) from exc
        try:
            for part in parts[start:]:
                nxt = self._subdir(
                    fd,
                    part,
                    dir_mode(0o755),
                    f"{name!r} lies below something that is not a directory",
                )
                os.close(fd)
                fd = nxt
            if start < len(parts):
                self._remember(parts, fd)
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
                fd = self._subdir(
                    parent, path.name, 0o700, f"{str(rel)!r} exists and is not a directory"
                )
            finally:
                os.close(parent)
            try:
                os.fchmod(fd, dir_mode(mode))
                self._remember(path.parts, fd)
            except OSError as exc:
                raise self.write_error(exc) from exc
            finally:
                os.close(fd)
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
                    raise self.write_error(exc) from exc
            finally:
                os.close(parent)
            try:
                os.fchmod(fd, file_mode(mode))
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):
                    raise self.write_error(exc) from exc
                raise
            return fd

    # -- outcome --------------------------------------------------------------------------

    def commit(self) -> None:
        """Keep what was written; the destination takes no more writes (:meth:`wipe` still
        removes it)."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "committed"
            self._forget_cached()
            os.close(self._root_fd)
            self._root_fd = -1

    def wipe(self) -> None:
        """Remove everything below root (files are truncated first), committed or not; remove
        root too if this object created it and it is not a mount point.

        Idempotent: once a wipe has succeeded, later calls do nothing; after a failed one, the
        next call tries again. Signals are held back until it is done. Iterative, and every
        step is taken from a directory descriptor without following symbolic links, so any
        tree the file system can hold is removed, and nothing outside root. Raises
        ConfinferError (``wipe-failed``) when something could not be removed, or when root
        no longer is the directory that was written (it was replaced after the commit).
        """
        failures = _Failures()
        with signals.deferred(), self._lock:
            if self._state == "wiped":
                return
            if self._state == "open":
                self._forget_cached()
                fd, self._root_fd = self._root_fd, -1
            else:
                fd = self._reopen_root(failures)
            self._state = "wiped"
            if fd >= 0:
                try:
                    _wipe_tree(fd, failures)
                finally:
                    os.close(fd)
                if self._created and not failures:
                    self._remove_root(failures)
            if failures:
                self._state = "wipe-failed"
        if failures:
            raise ConfinferError(
                f"could not remove everything under {self.root}: {failures.shown[0]}",
                reason=Reason.WIPE_FAILED,
                details={"failures": failures.shown, "count": failures.count},
                hint="remove the directory by hand; it may hold plaintext",
            )

    def _reopen_root(self, failures: _Failures) -> int:
        """Root again after a commit (or a failed wipe): -1 when it is gone, and only if it
        is still the directory this object wrote into."""
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            LOG.info("%s is gone already; nothing to wipe", self.root)
            return -1
        except OSError as exc:
            failures.add(str(self.root), _strerror(exc))
            return -1
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != self._ident:
            os.close(fd)
            failures.add(str(self.root), "no longer the directory the model was written to")
            return -1
        return fd

    def _remove_root(self, failures: _Failures) -> None:
        try:
            os.rmdir(self.root)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # a mount point now: it stays, empty
                LOG.info("%s is a mount point; left in place, empty", self.root)
                return
            failures.add(str(self.root), _strerror(exc))


# -- wiping ------------------------------------------------------------------------------------

# Directory descriptors one wipe holds at most (besides root); a deeper tree reopens its
# ancestors through "..", checked against the identity each had on the way down.
_WIPE_FDS = 64
_FAILURES_SHOWN = 20


class _Failures:
    """What a wipe could not remove: the first few, and how many in all."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.count = 0

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.shown) < _FAILURES_SHOWN:
            self.shown.append(f"{where}: {why}")

    def __bool__(self) -> bool:
        return self.count > 0


@dataclass
class _Level:
    """A directory the wipe is inside: its descriptor (-1 while closed), its name in its
    parent, its (st_dev, st_ino), and the subdirectories still to remove."""

    fd: int
    name: str
    ident: tuple[int, int]
    subdirs: list[str] = field(default_factory=list)


class _Abandon(Exception):
    """The tree changed under the wipe so that it cannot go on safely."""


def _where(stack: list[_Level], name: str = "") -> str:
    """A shown path below root for a failure message: the last components only."""
    parts = [level.name for level in stack[1:]]
    if name:
        parts.append(name)
    text = "/".join(parts) or "."
    return text if len(text) <= 200 else ".../" + text[-196:]


def _wipe_tree(root_fd: int, failures: _Failures) -> None:
    """Empty the directory behind ``root_fd`` (which stays open), depth-first, without
    recursion and without following symbolic links; it stays on root's file system."""
    info = os.fstat(root_fd)
    dev = info.st_dev
    stack = [_Level(root_fd, "", (dev, info.st_ino))]
    stack[0].subdirs = _clear(stack, failures)
    try:
        while True:
            top = stack[-1]
            if top.subdirs:
                level = _enter(stack, top.subdirs.pop(), dev, failures)
                if level is not None:
                    stack.append(level)
                    shallow = len(stack) - 1 - _WIPE_FDS
                    if shallow >= 1 and stack[shallow].fd >= 0:
                        os.close(stack[shallow].fd)
                        stack[shallow].fd = -1
                    level.subdirs = _clear(stack, failures)
                continue
            if len(stack) == 1:
                return
            stack.pop()
            parent = stack[-1]
            try:
                if parent.fd < 0:
                    parent.fd = _reopen(stack, top)
            finally:
                os.close(top.fd)
            try:
                os.rmdir(top.name, dir_fd=parent.fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failures.add(_where(stack, top.name), _strerror(exc))
    except (_Abandon, OSError) as exc:
        why = _strerror(exc) if isinstance(exc, OSError) else str(exc)
        failures.add(_where(stack), why)
    finally:
        for level in stack[1:]:
            if level.fd >= 0:
                os.close(level.fd)


def _clear(stack: list[_Level], failures: _Failures) -> list[str]:
    """Remove the non-directories in the directory on top of ``stack``; return its
    subdirectories."""
    fd = stack[-1].fd
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, _is_dir(e)) for e in it]
    except OSError as exc:
        failures.add(_where(stack), _strerror(exc))
        return []
    subdirs = []
    for name, is_dir in entries:
        if is_dir or _remove_file(stack, name, failures):
            subdirs.append(name)
    return subdirs


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # unlinking it tells


def _remove_file(stack: list[_Level], name: str, failures: _Failures) -> bool:
    """Truncate and unlink ``name`` in the top directory; True if it is a directory after all."""
    fd = stack[-1].fd
    _truncate(fd, name)
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return True
    except OSError as exc:
        failures.add(_where(stack, name), _strerror(exc))
    return False


def _enter(stack: list[_Level], name: str, dev: int, failures: _Failures) -> _Level | None:
    """Open subdirectory ``name`` of the top directory; None when there is nothing to enter."""
    parent = stack[-1].fd
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            # Replaced by a file or a link since it was listed: remove that instead.
            _remove_file(stack, name, failures)
        else:
            failures.add(_where(stack, name), _strerror(exc))
        return None
    info = os.fstat(fd)
    if info.st_dev != dev:
        os.close(fd)
        failures.add(_where(stack, name), "another file system is mounted there")
        return None
    return _Level(fd, name, (info.st_dev, info.st_ino))


def _reopen(stack: list[_Level], child: _Level) -> int:
    """A descriptor of ``stack[-1]`` (closed to save descriptors), reached from ``child``
    through "..", or else walked down again by name from the nearest open ancestor; either
    way it must be the very directory seen on the way down."""
    want = stack[-1].ident
    try:
        fd = os.open("..", _DIR_FLAGS, dir_fd=child.fd)
    except OSError:
        fd = -1
    if fd >= 0:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == want:
            return fd
        os.close(fd)
    base = max(i for i, level in enumerate(stack) if level.fd >= 0)
    fd = os.dup(stack[base].fd)
    for level in stack[base + 1 :]:
        try:
            nxt = os.open(level.name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise _Abandon(f"a directory moved during the wipe ({_strerror(exc)})") from None
        os.close(fd)
        fd = nxt
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != level.ident:
            os.close(fd)
            raise _Abandon("a directory was replaced during the wipe")
    return fd


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
    except OSError:
        pass
    finally:
        os.close(fd)
