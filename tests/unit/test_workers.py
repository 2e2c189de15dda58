"""pwrite_all: everything lands at its offset, in calls no larger than WRITE_SLICE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from loader import workers
from loader.dest import WRITE_SLICE

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
