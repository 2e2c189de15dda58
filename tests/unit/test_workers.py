"""pwrite_all: everything lands at its offset, in calls no larger than WRITE_SLICE, and a failed
write is a WriteFailed; OpenFiles.close_all never masks the failure it cleans up after."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from loader import workers
from loader.dest import WRITE_SLICE, WriteFailed

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("short", [False, True])
def test_writes_are_sliced_and_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    body = os.urandom(3 * WRITE_SLICE + 12345)
    tag = os.urandom(16)
    sizes: list[int] = []
    real = os.pwritev

    def recording(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        total = sum(len(b) for b in buffers)
        sizes.append(total)
        if short and total > 1000:
            # A short write, as a signal or a full disk may cause: only part goes out.
            return real(fd, [bytes(b"".join(bytes(b) for b in buffers)[: total // 3])], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", recording)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        workers.pwrite_all(fd, [memoryview(body), memoryview(tag)], 100)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[100:] == body + tag
    assert max(sizes) <= WRITE_SLICE
    assert sum(sizes) >= len(body) + len(tag)


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOSPC])
def test_write_errors_are_write_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The destination's context knows a WriteFailed for a failed write into it."""

    def fail(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", fail)
    with pytest.raises(WriteFailed) as info:
        workers.pwrite_all(0, [memoryview(b"x")], 0)
    assert (info.value.errno, info.value.strerror) == (code, os.strerror(code))


def test_close_all_keeps_going_past_a_failing_close(tmp_path: Path) -> None:
    opened: list[int] = []

    def opener(file: int) -> int:
        opened.append(os.open(tmp_path / f"f{file}", os.O_WRONLY | os.O_CREAT, 0o600))
        return opened[-1]

    files = workers.OpenFiles(opener, lambda f: 2)
    files.acquire(0)
    files.acquire(1)
    os.close(opened[0])  # closing it again fails (EBADF): close_all must not raise
    files.close_all()
    with pytest.raises(OSError):
        os.fstat(opened[1])
