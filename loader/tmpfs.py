"""The model's tmpfs: sizing it, mounting it in the host's mount namespace, handing the tree to
the engine read-only, and taking it all away again.

The mount is the loader's own when ``/proc/self/mountinfo`` shows it at the model directory as a
``tmpfs`` whose source is :data:`SOURCE` and whose super options carry ``mode=700`` (the mode it
is always mounted with; the root's mode is changed only after the model is complete). Anything
else mounted there is refused (``model-dir-busy``): the loader never unmounts what it did not
mount. A mount of its own found at start is what a killed predecessor left (``kill -9`` in the
middle of a decrypt): it is emptied (files truncated, then removed) and unmounted before anything
else happens.

``noswap`` (Linux 6.4 and later) keeps the model's pages out of swap. Older kernels refuse the
option with EINVAL; the mount is then made without it, and only if no swap is active
(``/proc/swaps``) or ``model_allow_swap`` says so (``model-swap`` otherwise).

What the engine is handed: :func:`find_model_path` (the directory holding ``config.json``) and
``model.json`` next to the mount (:func:`write_handoff`), which vllm-supervisor reads.

Nothing here follows a symbolic link or leaves the tmpfs: trees are walked by descriptor
(:func:`os.fwalk`) and checked against the mount's device.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confinfer.errors import ConfinferError, Reason, UsageError

LOG = logging.getLogger(__name__)

HANDOFF_NAME = "model.json"  # next to the mount: what vllm-supervisor reads
MODEL_CONFIG = "config.json"  # what marks the directory the engine loads
MAX_MODEL_DEPTH = 3  # how deep below the mount the engine's directory may lie
SOURCE = "confinfer-model"  # the mount's source name: how a mount of ours is recognised
MOUNT_MODE = 0o700  # the root while plaintext is being written
SERVED_ROOT_MODE = 0o750  # root:serving_gid once the model is complete
SERVED_DIR_MODE = 0o550
SERVED_FILE_MODE = 0o440
SIZE_MARGIN = 0.05  # 5 % above the plaintext
SIZE_FLOOR = 16 << 20  # and a fixed floor for small models
PAGE = 4096  # every file and directory takes at least a page of tmpfs

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2
_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC

MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")


# --- decisions (pure) -------------------------------------------------------------------------


def tmpfs_size(plaintext_bytes: int, entries: int = 0, configured: int | None = None) -> int:
    """The tmpfs ``size=`` for a model of ``plaintext_bytes`` in ``entries`` files and
    directories: ``configured`` when set, else the plaintext with a page per entry, plus 5 %
    and a floor, rounded up to whole pages."""
    if configured is not None:
        return configured
    need = plaintext_bytes + entries * PAGE
    size = math.ceil(need * (1 + SIZE_MARGIN)) + SIZE_FLOOR
    return -(-size // PAGE) * PAGE


def mount_data(size: int, *, noswap: bool) -> str:
    """The tmpfs option string."""
    opts = [f"mode={MOUNT_MODE:04o}", f"size={size}", "uid=0", "gid=0"]
    if noswap:
        opts.append("noswap")
    return ",".join(opts)


def swap_refusal(noswap: bool, swap_active: bool, allow_swap: bool) -> ConfinferError | None:
    """Why the model must not be served on this mount, or None when it may.

    With ``noswap`` the pages never reach swap. Without it, they can only if swap is active,
    which ``model_allow_swap`` may accept.
    """
    if noswap or not swap_active or allow_swap:
        return None
    return ConfinferError(
        "swap is active and this kernel's tmpfs has no noswap option (Linux 6.4 and later): "
        "the model's plaintext could be written to swap",
        reason=Reason.MODEL_SWAP,
        hint="turn swap off (swapoff -a), use a kernel with tmpfs noswap, or set "
        "model_allow_swap = true if the swap device is encrypted",
    )


def swap_active(text: str) -> bool:
    """Whether ``/proc/swaps`` (its text) lists any active swap area."""
    return any(line.strip() for line in text.splitlines()[1:])


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``, as much as the loader needs of it."""

    mount_point: str
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def ours(self) -> bool:
        return (
            self.fstype == "tmpfs"
            and self.source == SOURCE
            and f"mode={MOUNT_MODE:o}" in self.super_options
        )


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/self/mountinfo`` text, in its order (later mounts stack on top)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            point = fields[4]
            fstype, source, options = fields[sep + 1], fields[sep + 2], fields[sep + 3]
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(_unescape(point), fstype, _unescape(source), tuple(options.split(","))))
    return mounts


def mounts_at(path: Path, text: str | None = None) -> list[Mount]:
    """The mounts stacked at ``path`` (bottom first); ``text`` defaults to this process's
    mountinfo."""
    if text is None:
        text = MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape")
    where = str(path)
    return [m for m in parse_mountinfo(text) if m.mount_point == where]


# --- system calls -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong]
_libc.mount.argtypes += [ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(target: Path, data: str) -> None:
    rc = _libc.mount(SOURCE.encode(), os.fsencode(target), b"tmpfs", _FLAGS, data.encode())
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _umount(target: Path, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _mount_error(target: Path, what: str, exc: OSError) -> ConfinferError:
    hint = None
    if exc.errno == errno.EPERM:
        hint = "model-loader must run as root with CAP_SYS_ADMIN, in the host's mount namespace"
    return ConfinferError(
        f"cannot {what} the model tmpfs at {target}: {exc.strerror}",
        reason=Reason.MODEL_MOUNT,
        hint=hint,
    )


# --- the mount --------------------------------------------------------------------------------


def mount_point(model_dir: Path) -> Path:
    """``model_dir`` made absolute and checked: a directory (created 0700 when missing, its
    parents 0755), never a symbolic link."""
    path = Path(os.path.abspath(model_dir))
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=MOUNT_MODE, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise UsageError(
            f"cannot create the model directory {path}: {exc.strerror}",
            reason=Reason.MODEL_DIR_BUSY,
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(
            f"{path} is not a directory (a symbolic link is not followed)",
            reason=Reason.MODEL_DIR_BUSY,
        )
    # The directory itself must not be reached through a link either (realpath moves it).
    if os.path.realpath(path) != str(path):
        raise UsageError(
            f"{path} lies below a symbolic link ({os.path.realpath(path)})",
            reason=Reason.MODEL_DIR_BUSY,
            hint="set model_dir to the real path",
        )
    return path


def clean_stale(target: Path, *, mountinfo: Path = MOUNTINFO) -> int:
    """Empty and unmount every mount of ours left at ``target``; refuse anything else there
    (``model-dir-busy``). Returns how many were removed."""
    removed = 0
    while True:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
        stack = mounts_at(target, text)
        if not stack:
            return removed
        top = stack[-1]
        if not top.ours:
            raise ConfinferError(
                f"{target} already has a {top.fstype} mount from {top.source!r} that "
                "model-loader did not make",
                reason=Reason.MODEL_DIR_BUSY,
                hint="unmount it, or set model_dir to a path of its own",
            )
        LOG.warning("a model tmpfs from an earlier run is still mounted at %s: wiping it", target)
        failures = clear_tree(target)
        if failures:
            LOG.warning("%d entries of the stale tmpfs resisted removal; unmounting", failures)
        unmount(target)
        removed += 1


def mount(target: Path, size: int, *, allow_swap: bool, swaps: Path = SWAPS) -> bool:
    """Mount the model tmpfs at ``target`` (mode 0700, ``size`` bytes, ``noswap`` where the
    kernel has it). Returns whether ``noswap`` is in effect; ``model-swap`` when pages could
    reach swap and that is not allowed."""
    try:
        _mount(target, mount_data(size, noswap=True))
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _mount_error(target, "mount", exc) from None
    try:
        active = swap_active(swaps.read_text(encoding="utf-8"))
    except OSError:
        active = True  # cannot tell: assume the worst
    refusal = swap_refusal(False, active, allow_swap)
    if refusal is not None:
        raise refusal
    try:
        _mount(target, mount_data(size, noswap=False))
    except OSError as exc:
        raise _mount_error(target, "mount", exc) from None
    LOG.warning("tmpfs at %s mounted without noswap (kernel before 6.4)", target)
    return False


def unmount(target: Path) -> None:
    """Unmount the tmpfs at ``target``; while something still holds it open, detach it (its
    files are already emptied by then, and it goes with the last holder)."""
    try:
        _umount(target)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            LOG.warning("%s is busy; detaching it", target)
            try:
                _umount(target, MNT_DETACH)
            except OSError as again:
                raise _mount_error(target, "detach", again) from None
            return
        if exc.errno == errno.EINVAL:  # not a mount point (any more)
            return
        raise _mount_error(target, "unmount", exc) from None


# --- trees ------------------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str], int]]:
    """Top-down descriptor walk of ``root``'s file system only, no links followed."""
    dev = os.stat(root, follow_symlinks=False).st_dev
    for top, dirs, files, fd in os.fwalk(root, follow_symlinks=False):
        if os.fstat(fd).st_dev != dev:
            dirs[:] = []
            continue
        yield top, dirs, files, fd


def hand_over(root: Path, gid: int) -> tuple[int, int]:
    """Make the complete model readable to group ``gid`` and to nobody's write: directories
    0550, files 0440, all owned by root and ``gid``, the mount root 0750. Returns the file
    count and their bytes. Anything but a regular file or a directory is a bug (the
    destination writes no other kind) and is refused."""
    files = total = 0
    for _top, dirs, names, fd in _walk(root):
        for name in names:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise ConfinferError(
                    f"{name!r} in the model tree is not a regular file",
                    reason=Reason.DEST_WRITE,
                )
            os.chown(name, 0, gid, dir_fd=fd, follow_symlinks=False)
            os.chmod(name, SERVED_FILE_MODE, dir_fd=fd, follow_symlinks=False)
            files += 1
            total += info.st_size
        for name in dirs:
            os.chown(name, 0, gid, dir_fd=fd, follow_symlinks=False)
            os.chmod(name, SERVED_DIR_MODE, dir_fd=fd, follow_symlinks=False)
    os.chown(root, 0, gid, follow_symlinks=False)
    os.chmod(root, SERVED_ROOT_MODE, follow_symlinks=False)
    return files, total


def clear_tree(root: Path) -> int:
    """Empty ``root`` (kept): every file truncated and removed, every directory removed,
    whatever their modes (each is made the owner's to write first, so that this works with
    CAP_FOWNER and without CAP_DAC_OVERRIDE). Returns how many entries could not be removed."""
    failures = 0
    for _top, dirs, names, fd in _walk(root):
        with contextlib.suppress(OSError):  # the unlinks below tell
            os.fchmod(fd, MOUNT_MODE)
        for name in names:
            try:
                if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    # Writable first: root without CAP_DAC_OVERRIDE (the unit) is only the owner.
                    os.chmod(name, 0o600, dir_fd=fd, follow_symlinks=False)
                    wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                    try:
                        os.ftruncate(wfd, 0)
                    finally:
                        os.close(wfd)
            except OSError:
                pass
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                failures += 1
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(name, MOUNT_MODE, dir_fd=fd, follow_symlinks=False)
    for _top, dirs, _names, fd in os.fwalk(root, topdown=False, follow_symlinks=False):
        for name in dirs:
            try:
                os.rmdir(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                failures += 1
    return failures


# --- what the engine is handed ----------------------------------------------------------------


def find_model_path(root: Path) -> Path:
    """The directory the engine loads: the shallowest one holding a regular ``config.json``
    (the mount itself for a sealed package, one level down for the tutorial's tar, which
    holds the model's directory). ``model-layout`` when there is none, or two at that depth."""
    level = [root]
    for _depth in range(MAX_MODEL_DEPTH + 1):
        hits = []
        below = []
        for directory in level:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name == MODEL_CONFIG and entry.is_file(follow_symlinks=False):
                        hits.append(directory)
                    elif entry.is_dir(follow_symlinks=False):
                        below.append(Path(entry.path))
        if len(hits) == 1:
            return hits[0]
        if hits:
            shown = ", ".join(str(h.relative_to(root)) for h in sorted(hits)[:3])
            raise UsageError(
                f"the model holds {len(hits)} directories with {MODEL_CONFIG} at one depth "
                f"({shown}); the engine needs one",
                reason=Reason.MODEL_LAYOUT,
                hint="seal the model's own directory (the one holding config.json)",
            )
        level = sorted(below)
    raise UsageError(
        f"the model holds no {MODEL_CONFIG} within {MAX_MODEL_DEPTH} levels of its root",
        reason=Reason.MODEL_LAYOUT,
        hint="seal a Hugging Face model directory (config.json, weights, tokenizer)",
    )


def write_handoff(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file in the same directory,
    then a rename), mode 0644."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfinferError(
            f"cannot write the hand-off file {path}: {exc.strerror}", reason=Reason.DEST_WRITE
        ) from None


def remove_handoff(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
