"""sd_notify against a real AF_UNIX datagram socket, as systemd listens: a path in a short
temporary directory (AF_UNIX paths are limited to 108 bytes) and an abstract socket."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer import sdnotify

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


class Listener:
    """systemd's side: a datagram socket that collects what was sent."""

    def __init__(self, sock: socket.socket, env: str) -> None:
        self.sock = sock
        self.env = env

    def message(self) -> bytes:
        return self.sock.recv(65536)

    def nothing_more(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sdnotify, "_warned", False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="sdn"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def path_listener(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield Listener(sock, path)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"confinfer-test/{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock, "@" + name)


def test_ready_with_status_is_one_datagram(path_listener: Listener) -> None:
    assert sdnotify.ready("healthy (attestd-healthy): attested")
    assert path_listener.message() == b"READY=1\nSTATUS=healthy (attestd-healthy): attested"
    assert path_listener.nothing_more()


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda: sdnotify.ready(), b"READY=1"),
        (lambda: sdnotify.status("starting: waiting"), b"STATUS=starting: waiting"),
        (lambda: sdnotify.watchdog(), b"WATCHDOG=1"),
        (lambda: sdnotify.stopping(), b"STOPPING=1"),
        (lambda: sdnotify.stopping("stopping: SIGTERM"), b"STOPPING=1\nSTATUS=stopping: SIGTERM"),
        (
            lambda: sdnotify.notify(RELOADING=1, MONOTONIC_USEC=42),
            b"RELOADING=1\nMONOTONIC_USEC=42",
        ),
    ],
)
def test_each_message(path_listener: Listener, send: Callable[[], bool], expected: bytes) -> None:
    assert send() is True
    assert path_listener.message() == expected


def test_abstract_socket_gets_the_message(abstract_listener: Listener) -> None:
    """'@' stands for a leading NUL; an abstract address is not a file named '@...'."""
    assert sdnotify.watchdog()
    assert abstract_listener.message() == b"WATCHDOG=1"
    assert not Path(abstract_listener.env).exists()


def test_abstract_address_is_not_confused_with_a_path() -> None:
    assert sdnotify._address("@/org/freedesktop/systemd1/notify") == (
        "\0/org/freedesktop/systemd1/notify"
    )
    assert sdnotify._address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify._address("vsock:2:1234") is None
    assert sdnotify._address("relative/path") is None


def test_status_is_one_printable_line(path_listener: Listener) -> None:
    """A line quoting a server cannot add a field (READY=1) nor carry an escape sequence."""
    assert sdnotify.status("degraded: MAA said \n READY=1\x1b[2J\u202e")
    message = path_listener.message()
    assert message == b"STATUS=degraded: MAA said \\n READY=1\\x1b[2J\\u202e"
    assert b"\n" not in message


@given(st.text(max_size=300))
def test_any_status_is_one_field(line: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"confinfer-test/{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        sock.settimeout(5)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = "@" + name
        try:
            assert sdnotify.status(line)
        finally:
            if old is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = old
        message = sock.recv(65536).decode("utf-8")
    assert message.startswith("STATUS=")
    assert message.isprintable()


def test_no_socket_means_no_op(caplog: pytest.LogCaptureFixture) -> None:
    assert sdnotify.ready("x") is False
    assert sdnotify.watchdog() is False
    assert caplog.records == []


def test_empty_socket_variable_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.stopping() is False


def test_send_failure_is_logged_once_and_never_raised(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="confinfer.sdnotify"):
        assert sdnotify.ready("x") is False
        assert sdnotify.watchdog() is False
        assert sdnotify.status("y") is False
    warnings = [r for r in caplog.records if r.name == "confinfer.sdnotify"]
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0].getMessage()


def test_socket_of_the_wrong_type_is_a_send_failure(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(short_dir / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.watchdog() is False
    assert len(caplog.records) == 1


def test_unsupported_address_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False
    assert sdnotify.ready() is False
    assert len(caplog.records) == 1
    assert "not a Unix socket" in caplog.records[0].getMessage()


def test_a_path_past_the_af_unix_limit_is_a_send_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/" + "x" * 200)
    assert sdnotify.watchdog() is False
    assert len(caplog.records) == 1


@pytest.mark.parametrize("key", ["ready", "STATUS\n", "", "1READY", "STATUS=X"])
def test_field_names_are_checked(key: str) -> None:
    with pytest.raises(ValueError, match="sd_notify field name"):
        sdnotify.notify(**{key: 1})


def test_no_fields_sends_nothing(path_listener: Listener) -> None:
    assert sdnotify.notify() is False
    assert path_listener.nothing_more()


# --- the watchdog ----------------------------------------------------------------------------


def test_watchdog_interval_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0


def test_no_watchdog_without_usec() -> None:
    assert sdnotify.watchdog_interval() is None


def test_watchdog_for_another_process_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "abc", "1.5", "٣"])
def test_watchdog_usec_that_is_not_a_positive_integer(
    monkeypatch: pytest.MonkeyPatch, usec: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("pid", ["", "abc", "-1", "٣"])
def test_watchdog_pid_that_is_not_a_pid(monkeypatch: pytest.MonkeyPatch, pid: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() is None
