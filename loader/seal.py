"""Sealing a model directory into a package (the model owner's side of the format).

:func:`seal_model` scans the model directory (regular files and directories only), makes a fresh
DEK, has it wrapped by the KEK, and writes ``model.sealed`` into a :class:`Destination`:
every chunk is read, encrypted and written at its own offset by parallel workers, and the
prefix (magic, header, header tag) is written last, so a package cut short by a crash has no
magic. Any failure wipes the package directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from confinfer.errors import ConfinferError, Reason, UnsafeArchiveError, UsageError
from loader import format as fmt
from loader.aead import ChunkCipher, derive_chunk_key, header_tag
from loader.dest import Destination, dir_mode, file_mode, safe_relpath
from loader.keywrap import DekWrapper, new_dek, zero
from loader.progress import Progress
from loader.workers import OpenFiles, pwrite_all, run_chunks

_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass(frozen=True)
class ModelTree:
    """A scanned model directory: manifest entries in stream order, and what each file was."""

    root: Path
    directories: tuple[fmt.DirEntry, ...]
    files: tuple[fmt.FileEntry, ...]
    # (st_dev, st_ino, st_size, st_mtime_ns) per file, to notice changes while sealing.
    identities: tuple[tuple[int, int, int, int], ...]


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _sort_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def scan(model_dir: Path) -> ModelTree:
    """Walk ``model_dir`` in a stable order; refuse anything but regular files and directories."""
    try:
        top = os.stat(model_dir)
    except OSError as exc:
        raise UsageError(
            f"cannot read {model_dir}: {exc.strerror}", reason=Reason.MODEL_DIR
        ) from None
    if not stat.S_ISDIR(top.st_mode):
        raise UsageError(f"{model_dir} is not a directory", reason=Reason.MODEL_DIR)
    directories: list[fmt.DirEntry] = []
    files: list[fmt.FileEntry] = []
    identities: list[tuple[int, int, int, int]] = []
    # Depth-first, names in byte order, a directory listed before what it holds.
    stack: list[str] = [""]
    while stack:
        prefix = stack.pop()
        where = model_dir / prefix if prefix else model_dir
        try:
            with os.scandir(where) as it:
                entries = sorted(it, key=lambda e: _sort_key(e.name))
        except OSError as exc:
            raise UsageError(
                f"cannot list {where}: {exc.strerror}", reason=Reason.MODEL_DIR
            ) from None
        subdirs: list[str] = []
        for entry in entries:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            try:
                safe_relpath(rel)
            except UnsafeArchiveError as exc:
                raise UsageError(
                    f"{model_dir}: cannot seal {exc.message}", reason=Reason.UNSUPPORTED_FILE
                ) from None
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                directories.append(fmt.DirEntry(rel, dir_mode(stat.S_IMODE(info.st_mode))))
                subdirs.append(rel)
            elif stat.S_ISREG(info.st_mode):
                mode = file_mode(stat.S_IMODE(info.st_mode))
                files.append(fmt.FileEntry(rel, info.st_size, mode))
                identities.append(_identity(info))
            else:
                kind = _KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
                raise UsageError(
                    f"{model_dir / rel} is {kind}; only regular files and directories can be "
                    "sealed",
                    reason=Reason.UNSUPPORTED_FILE,
                    hint="replace links with the files they point to (cp -rL) and remove the rest",
                )
        stack.extend(reversed(subdirs))
    return ModelTree(model_dir, tuple(directories), tuple(files), tuple(identities))


def seal_model(
    model_dir: Path,
    out: Destination,
    wrapper: DekWrapper,
    *,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    workers: int | None = None,
) -> fmt.Header:
    """Seal ``model_dir`` into ``out`` (the package directory) under a fresh DEK."""
    if not 1 <= chunk_size <= fmt.MAX_CHUNK_SIZE:
        raise UsageError(
            f"the chunk size must be 1..{fmt.MAX_CHUNK_SIZE} bytes", reason=Reason.CHUNK_SIZE
        )
    tree = scan(model_dir)
    dek = new_dek()
    try:
        wrapped = wrapper.wrap(dek)
        return write_package(
            tree,
            out,
            dek=dek,
            wrapped_dek=wrapped.wrapped,
            key_id=wrapped.key_id,
            salt=os.urandom(fmt.SALT_LEN),
            created=fmt.now_rfc3339(),
            chunk_size=chunk_size,
            progress=progress,
            workers=workers,
        )
    finally:
        zero(dek)


def _changed(path: Path) -> ConfinferError:
    return ConfinferError(
        f"{path} changed while it was being sealed",
        reason=Reason.MODEL_CHANGED,
        hint="seal a model directory that nothing else writes to",
    )


def write_package(
    tree: ModelTree,
    out: Destination,
    *,
    dek: bytearray,
    wrapped_dek: bytes,
    key_id: str,
    salt: bytes,
    created: str,
    chunk_size: int,
    progress: Progress | None = None,
    workers: int | None = None,
) -> fmt.Header:
    """Write ``model.sealed`` for ``tree``; every input of the format is given explicitly."""
    header = fmt.Header(
        chunk_size=chunk_size,
        salt=salt,
        key_id=key_id,
        wrapped_dek=wrapped_dek,
        created=created,
        chunk_count=fmt.chunk_count(tree.files, chunk_size),
        directories=tree.directories,
        files=tree.files,
    )
    fmt.validate(header)
    header_bytes = header.encode()
    if len(header_bytes) > fmt.MAX_HEADER_LEN:
        raise UsageError(
            f"the model has too many files for one package ({len(tree.files)})",
            reason=Reason.MODEL_TOO_MANY_FILES,
        )
    prefix = fmt.authenticated_prefix(header_bytes)
    layout = fmt.Layout(header, len(header_bytes))
    if progress is not None:
        progress.set_total(header.total_size)
    key = derive_chunk_key(dek, salt)
    try:
        tag = header_tag(key, prefix)
        cipher = ChunkCipher(key, hashlib.sha256(prefix).digest())
        out_fd = out.open_file(fmt.PACKAGE_FILE, 0o644)
        try:
            _write_chunks(tree, layout, cipher, out_fd, progress, workers)
            # Last: until the prefix is in place the file does not even look like a package.
            pwrite_all(out_fd, [memoryview(prefix), memoryview(tag)], 0)
        finally:
            os.close(out_fd)
    finally:
        zero(key)
    return header


def _write_chunks(
    tree: ModelTree,
    layout: fmt.Layout,
    cipher: ChunkCipher,
    out_fd: int,
    progress: Progress | None,
    workers: int | None,
) -> None:
    def open_source(file: int) -> int:
        path = tree.root / tree.files[file].path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise _changed(path) from None
        if _identity(os.fstat(fd)) != tree.identities[file]:
            os.close(fd)
            raise _changed(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def unchanged(file: int, fd: int) -> None:
        if _identity(os.fstat(fd)) != tree.identities[file]:
            raise _changed(tree.root / tree.files[file].path)

    sources = OpenFiles(open_source, lambda f: len(layout.chunks_of(f)), unchanged)

    def work(index: int, inbuf: memoryview, outbuf: memoryview) -> None:
        ref = layout.chunk(index)
        plain = inbuf[: ref.length]
        if ref.file >= 0:
            fd = sources.acquire(ref.file)
            if os.preadv(fd, [plain], ref.file_offset) != ref.length:
                raise _changed(tree.root / tree.files[ref.file].path)
            sources.release(ref.file)
        tag = cipher.seal_into(index, ref.final, plain, outbuf)
        pwrite_all(out_fd, [outbuf[: ref.length], memoryview(tag)], ref.package_offset)
        if progress is not None:
            progress.advance(ref.length)

    try:
        run_chunks(layout.count, work, buffer_size=layout.chunk_size + fmt.TAG_LEN, workers=workers)
    finally:
        sources.close_all()
