"""attestd run as a real process for tests and benchmarks: its socket in a short temporary
directory, its sd_notify messages captured on a datagram socket of our own (as systemd's
``NOTIFY_SOCKET`` would receive them), its stderr kept in a file."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from confinfer.attestd_api import Client, Health, State
from confinfer.errors import ServiceError

ROOT = Path(__file__).resolve().parent.parent
ATTESTD = ROOT / ".venv" / "bin" / "attestd"
T = TypeVar("T")

# Fast timers, so that every transition happens within seconds.
FAST = {
    "CONFINFER_GPU_FAST_CHECK_S": "0.2",
    "CONFINFER_GPU_EVIDENCE_INTERVAL_S": "3",
    "CONFINFER_GPU_GRACE_S": "10",
    "CONFINFER_GPU_RESET_GRACE_S": "30",
    "CONFINFER_VTPM_ATTEST_INTERVAL_S": "3",
    "CONFINFER_VTPM_GRACE_S": "10",
    "CONFINFER_HTTP_TIMEOUT_S": "5",
    "CONFINFER_MAX_RETRIES": "0",
    "CONFINFER_GPU_EVIDENCE_TIMEOUT_S": "20",
}


class NotifyListener:
    """A ``NOTIFY_SOCKET``: every datagram kept as a dict of its ``KEY=value`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(
                line.split("=", 1) for line in data.decode("utf-8").split("\n") if "=" in line
            )
            with self._lock:
                self.messages.append(fields)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 60.0, every: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except ServiceError as exc:  # the socket is not there yet
            value, last = None, exc
        if value is not None:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


@dataclass
class Attestd:
    """A running attestd; :meth:`stop` (SIGTERM) returns its exit status."""

    proc: subprocess.Popen[bytes]
    socket_path: Path
    notify: NotifyListener
    log_path: Path
    workdir: Path
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @property
    def client(self) -> Client:
        return Client(self.socket_path, timeout=10.0)

    def health(self) -> Health:
        return self.client.health()

    def wait_state(self, state: State, reason: str | None = None, timeout: float = 60.0) -> Health:
        def probe() -> Health | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"attestd exited {self.proc.returncode}:\n{self.log()}")
            health = self.health()
            if health.state is state and (reason is None or health.reason == reason):
                return health
            return None

        try:
            return wait_for(f"{state} ({reason})", probe, timeout)
        except AssertionError as exc:
            with contextlib.suppress(ServiceError):
                exc.add_note(f"last health: {self.health()}")
            exc.add_note(f"log tail:\n{self.log()[-3000:]}")
            raise

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self.socket_path))
        conn = http.client.HTTPConnection("attestd", timeout=30)
        conn.sock = sock
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def metrics(self) -> str:
        status, body, _ = self.get("/metrics")
        assert status == 200
        return body.decode("utf-8")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"attestd ignored SIGTERM:\n{self.log()[-3000:]}") from None
        return self.proc.returncode


@contextlib.contextmanager
def running(
    env: Mapping[str, str], *, extra_args: tuple[str, ...] = (), wait_socket: bool = True
) -> Iterator[Attestd]:
    """Start attestd with ``env`` (the testbed's, usually) plus :data:`FAST`."""
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
    socket_path = workdir / "s"
    notify = NotifyListener(workdir / "n")
    log_path = workdir / "log"
    full = {**os.environ, **FAST, **env, "NOTIFY_SOCKET": str(notify.path)}
    full.pop("JOURNAL_STREAM", None)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(ATTESTD), "--socket", str(socket_path), *extra_args],
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    daemon = Attestd(proc, socket_path, notify, log_path, workdir, full)
    try:
        if wait_socket:
            wait_for(
                "attestd's socket",
                lambda: True if socket_path.exists() else _died(daemon),
                30.0,
            )
        yield daemon
    finally:
        with contextlib.suppress(AssertionError):
            daemon.stop()
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _died(daemon: Attestd) -> None:
    """None while attestd runs (keep waiting); an error once it has exited."""
    if daemon.proc.poll() is not None:
        raise AssertionError(f"attestd exited {daemon.proc.returncode}:\n{daemon.log()}")


def gpu_state(testbed_dir: Path) -> dict[str, str]:
    """The fake GPU's state file as a dict (``ready``, ``cc``, ...)."""
    text = (testbed_dir / "gpu" / "state").read_text(encoding="utf-8")
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
