"""``confinfer status`` against attestd's real server (its event loop in a thread) on a Unix
socket in a short directory, with a fake source behind it."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from attestd.events import EventHub
from attestd.metrics import Metrics
from attestd.server import Server, start
from confinfer import cli, status_cli
from confinfer.attestd_api import Event, Evidence, Gpu, GpuSummary, Health, State
from confinfer.errors import ConfinferError, Reason

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

NOW = 1_764_000_000.0
GPUS = GpuSummary(
    2,
    2,
    (
        Gpu("GPU-5a4b0c2e-0000-4000-8000-000000000001", True, True),
        Gpu("GPU-5a4b0c2e-0000-4000-8000-000000000002", True, False),
    ),
)
HEALTHY = Health(
    state=State.HEALTHY,
    reason=Reason.ATTESTD_HEALTHY,
    line="attested: GPU evidence and vTPM attestation passed",
    since=NOW - 3 * 3600 - 12 * 60,
    last_gpu_pass=NOW - 5 * 60,
    last_vtpm_pass=NOW - 42,
    token_expiry=NOW + 7 * 3600 + 48 * 60,
    ak_cert_expiry=NOW + 312 * 86400,
    gpus=GPUS,
)
STARTING = Health(
    state=State.STARTING,
    reason=Reason.ATTESTD_STARTING,
    line="waiting for a pass of GPU evidence and vTPM attestation",
    since=NOW,
    last_gpu_pass=None,
    last_vtpm_pass=None,
    token_expiry=None,
    ak_cert_expiry=None,
    gpus=GpuSummary(0, 1, ()),
)
DEGRADED = replace(
    HEALTHY,
    state=State.DEGRADED,
    reason=Reason.MAA_UNAVAILABLE,
    line="vTPM attestation service unreachable: HTTP 503",
)
REVOKED = replace(
    HEALTHY,
    state=State.REVOKED,
    reason=Reason.GPU_CC_OFF,
    line="GPU fast check failed: GPU 0: confidential computing off",
)


class Source:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.events = EventHub()
        self.state = HEALTHY

    def health(self) -> Health:
        return self.state

    def current_event(self) -> Event:
        return Event(self.state.state, self.state.reason, self.state.line, NOW, None)

    async def evidence(self, nonce: bytes) -> Evidence:
        raise ConfinferError("not in these tests", reason=Reason.EVIDENCE_UNAVAILABLE)


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    if len(str(tmp_path / "attestd.sock")) < 100:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="ats"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def attestd(short_dir: Path, caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Source, Path]]:
    """attestd's server on its own event loop in a thread; its request lines kept off the
    command's stderr."""
    caplog.set_level(logging.ERROR, logger="attestd.server")
    source = Source()
    path = short_dir / "attestd.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="attestd-loop")
    thread.start()
    try:
        server: Server = asyncio.run_coroutine_threadsafe(
            start(source, path, group=None, evidence_per_min=60), loop
        ).result(timeout=30)
        try:
            yield source, path
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """cli.main installs SIGTERM/SIGINT handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table_shows_everything_an_operator_asks_first() -> None:
    assert status_cli.table(HEALTHY, NOW) == (
        "state:          healthy\n"
        "reason:         attestd-healthy\n"
        "line:           attested: GPU evidence and vTPM attestation passed\n"
        "since:          2025-11-24T12:48:00Z (3h 12m ago)\n"
        "last GPU pass:  2025-11-24T15:55:00Z (5m ago)\n"
        "last vTPM pass: 2025-11-24T15:59:18Z (42s ago)\n"
        "token expiry:   2025-11-24T23:48:00Z (in 7h 48m)\n"
        "AK certificate: 2026-10-02T16:00:00Z (312 days left)\n"
        "GPUs:           2/2\n"
        "  GPU-5a4b0c2e-0000-4000-8000-000000000001  cc=on  ready=yes\n"
        "  GPU-5a4b0c2e-0000-4000-8000-000000000002  cc=on  ready=no\n"
    )


def test_the_table_before_any_pass() -> None:
    text = status_cli.table(STARTING, NOW)
    assert "last GPU pass:  never\n" in text
    assert "last vTPM pass: never\n" in text
    assert "token expiry:   no token\n" in text
    assert "AK certificate: unknown\n" in text
    assert text.endswith("GPUs:           0/1\n")


def test_the_table_survives_times_far_out_and_expired_certificates() -> None:
    far = replace(HEALTHY, token_expiry=1e300, ak_cert_expiry=NOW - 3 * 86400)
    text = status_cli.table(far, NOW)
    assert "token expiry:   1e+300 (out of range)\n" in text
    assert "AK certificate: 2025-11-21T16:00:00Z (expired 3 days ago)\n" in text


@pytest.mark.parametrize(
    ("health", "code"),
    [(HEALTHY, 0), (STARTING, 2), (DEGRADED, 2), (REVOKED, 1)],
)
def test_exit_status_by_state(
    attestd: tuple[Source, Path],
    capsys: pytest.CaptureFixture[str],
    health: Health,
    code: int,
) -> None:
    source, path = attestd
    source.state = health
    got, out, err = status(capsys, "--socket", str(path))
    assert (got, err) == (code, "")
    assert out.startswith(f"state:          {health.state}\nreason:         {health.reason}\n")

    got, out, err = status(capsys, "--socket", str(path), "--format", "json")
    assert (got, err) == (code, "")
    assert json.loads(out) == health.to_obj()
    assert Health.from_json(out) == health


def test_the_socket_defaults_to_the_configuration(
    attestd: tuple[Source, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, path = attestd
    source.state = DEGRADED
    monkeypatch.setenv("CONFINFER_ATTESTD_SOCKET", str(path))
    got, out, _ = status(capsys, "--format", "json")
    assert got == 2
    assert json.loads(out)["reason"] == "maa-unavailable"


def test_an_unreachable_attestd_is_one_line_and_exit_1(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_dir / "absent.sock"
    for fmt in ("table", "json"):
        got, out, err = status(capsys, "--socket", str(path), "--format", fmt)
        assert got == 1
        assert out == ""
        lines = err.splitlines()
        assert lines[0] == f"confinfer: attestd-unavailable: attestd at {path}: no such socket " + (
            "(is attestd running?)"
        )
        assert [line for line in lines[1:] if not line.startswith("hint: ")] == []


def test_a_socket_that_is_not_attestds_is_a_bad_answer_and_exit_1(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    path = short_dir / "other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        got, out, err = status(capsys, "--socket", str(path))
    finally:
        thread.join(timeout=30)
        listener.close()
    assert (got, out) == (1, "")
    assert err.startswith("confinfer: attestd-bad-response: health: not strict JSON")


def test_status_is_registered_with_its_options() -> None:
    args = cli.build_parser().parse_args(["status"])
    assert (args.socket, args.format, args.func) == (None, "table", status_cli.run)
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["status", "--format", "yaml"])
    assert info.value.code == 64
