"""Running per-chunk work on every core, with bounded memory.

Chunks of a sealed package are independent (each has its own nonce and tag, and its offsets
follow from the header), so sealing and unsealing hand chunk indices out to a few threads. The
AES-GCM and pread/pwrite calls release the GIL, so threads run truly in parallel; each owns two
preallocated buffers, which bounds memory by ``workers * 2 * buffer size`` whatever the model
size.

The first failure stops the others (each finishes at most the chunk it is on) and is raised to
the caller. A signal in the waiting main thread (``Interrupted``) does the same.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from loader import signals
from loader.dest import WRITE_SLICE, WriteFailed

# Memory all workers' buffers may take together: with the interpreter and libraries (~31 MiB)
# this keeps an unseal under 64 MiB of peak RSS.
BUFFER_BUDGET = 24 << 20
MAX_WORKERS = 4

# work(index, inbuf, outbuf): process chunk `index` using the thread's two buffers.
ChunkWork = Callable[[int, memoryview, memoryview], None]


def default_workers(buffer_size: int) -> int:
    """As many threads as usable CPUs, at most :data:`MAX_WORKERS`, within the budget."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS, BUFFER_BUDGET // (2 * buffer_size)))


_ZEROS = bytes(64 << 10)


def wipe_buffer(buf: bytearray) -> None:
    """Zero ``buf`` in place, a slice at a time (no temporary as large as the buffer)."""
    for start in range(0, len(buf), len(_ZEROS)):
        end = min(start + len(_ZEROS), len(buf))
        buf[start:end] = _ZEROS[: end - start]


class _Schedule:
    """Which chunk a worker does next.

    The indices are cut into one contiguous region per worker. A worker takes its own region
    from the front; once that is done it takes chunks from the back of the region with the
    most left. So workers mostly stay in different parts of the stream (in a multi-file model,
    in different files: writes to one file serialise in the kernel, writes to different files
    do not), each reads sequentially, and none idles while work is left.
    """

    def __init__(self, count: int, workers: int) -> None:
        bounds = [count * k // workers for k in range(workers + 1)]
        self._front = bounds[:-1]
        self._back = bounds[1:]
        self._lock = threading.Lock()

    def take(self, worker: int) -> int | None:
        with self._lock:
            if self._front[worker] < self._back[worker]:
                self._front[worker] += 1
                return self._front[worker] - 1
            victim = max(range(len(self._front)), key=lambda r: self._back[r] - self._front[r])
            if self._front[victim] < self._back[victim]:
                self._back[victim] -= 1
                return self._back[victim]
            return None


def run_chunks(
    count: int, work: ChunkWork, *, buffer_size: int, workers: int | None = None
) -> None:
    """Call ``work`` once for every index in ``range(count)``, on parallel threads.

    Returns when all are done; raises the first exception any call raised (the rest of the
    work is abandoned). Buffers are zeroed before the threads end.
    """
    nthreads = min(workers or default_workers(buffer_size), max(1, count))
    schedule = _Schedule(count, nthreads)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(worker: int) -> None:
        inbuf, outbuf = bytearray(buffer_size), bytearray(buffer_size)
        inview, outview = memoryview(inbuf), memoryview(outbuf)
        try:
            while not stop.is_set():
                index = schedule.take(worker)
                if index is None:
                    return
                work(index, inview, outview)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        finally:
            inview.release()
            outview.release()
            wipe_buffer(inbuf)
            wipe_buffer(outbuf)

    threads = [
        threading.Thread(target=loop, args=(n,), name=f"chunk-worker-{n}", daemon=True)
        for n in range(nthreads)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        # On an interrupt, let every thread finish its chunk before the caller cleans up:
        # a thread still writing could otherwise outlive the wipe.
        with signals.deferred():
            stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
    if errors:
        raise errors[0]


class OpenFiles:
    """Descriptors of the files chunks read from or write to, shared by the workers.

    A file is opened by ``opener(file)`` when its first chunk comes up and closed (after
    ``on_done(file, fd)``, when given) once ``release`` has been called for each of its
    ``chunks(file)`` chunks, so only the few files in flight are open at a time.
    """

    def __init__(
        self,
        opener: Callable[[int], int],
        chunks: Callable[[int], int],
        on_done: Callable[[int, int], None] | None = None,
    ) -> None:
        self._opener = opener
        self._chunks = chunks
        self._on_done = on_done
        self._fds: dict[int, int] = {}
        self._left: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, file: int) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._opener(file)
                self._fds[file] = fd
                self._left[file] = self._chunks(file)
            return fd

    def release(self, file: int) -> None:
        with self._lock:
            self._left[file] -= 1
            if self._left[file]:
                return
            del self._left[file]
            fd = self._fds.pop(file)
        try:
            if self._on_done is not None:
                self._on_done(file, fd)
        finally:
            os.close(fd)

    def close_all(self) -> None:
        """Close what is still open: only after a failure, which this must not mask."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            self._left.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def pwrite_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` in calls of at most WRITE_SLICE bytes,
    retrying short writes. An OS error is raised as :class:`~loader.dest.WriteFailed`, which
    the destination's context reports as ``dest-write`` / ``no-space``."""
    views = [b for b in buffers if len(b)]
    while views:
        # One call takes up to WRITE_SLICE bytes, across buffers (a chunk's tail and its tag).
        batch, room = [], WRITE_SLICE
        for view in views:
            if not room:
                break
            batch.append(view[:room])
            room -= len(batch[-1])
        try:
            written = os.pwritev(fd, batch, offset)
        except OSError as exc:
            raise WriteFailed(exc.errno, exc.strerror) from exc
        if written <= 0:  # pragma: no cover - a regular file never takes nothing
            raise WriteFailed(errno.EIO, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]
