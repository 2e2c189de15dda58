"""attestd's socket server against a fake source, on real Unix sockets in a short directory.

Requests go out raw (exact status lines and headers), through aiohttp's client (the event
stream line by line, keep-alives included) and through confinfer's own synchronous client, run
in a thread, so both ends of the protocol meet here.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from attestd.events import EventHub
from attestd.metrics import Metrics
from attestd.server import Server, start
from confinfer.attestd_api import (
    EVENTS_PATH,
    EVIDENCE_PATH,
    HEALTH_PATH,
    METRICS_PATH,
    Client,
    ErrorBody,
    Event,
    Evidence,
    Gpu,
    GpuSummary,
    Health,
    State,
    error_status,
)
from confinfer.errors import (
    AttestationError,
    ConfigError,
    ConfinferError,
    Kind,
    Reason,
    ServiceError,
    UsageError,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

T = TypeVar("T")

GPUS = GpuSummary(1, 1, (Gpu("GPU-5a4b0c2e-0000-4000-8000-000000000001", True, True),))
HEALTHY = Health(
    state=State.HEALTHY,
    reason=Reason.ATTESTD_HEALTHY,
    line="attested: GPU evidence and vTPM attestation passed",
    since=1_764_000_000.0,
    last_gpu_pass=1_764_000_000.0,
    last_vtpm_pass=1_764_000_001.0,
    token_expiry=1_764_028_800.0,
    ak_cert_expiry=1_790_000_000.0,
    gpus=GPUS,
)
DEGRADED = Health(
    state=State.DEGRADED,
    reason=Reason.MAA_UNAVAILABLE,
    line="vTPM attestation service unreachable: HTTP 503",
    since=1_764_000_100.0,
    last_gpu_pass=1_764_000_000.0,
    last_vtpm_pass=1_764_000_001.0,
    token_expiry=1_764_028_800.0,
    ak_cert_expiry=None,
    gpus=GPUS,
)
FIRST = Event(State.HEALTHY, Reason.ATTESTD_HEALTHY, "attested", 1_764_000_000.0, None)
GPU_RESULT = '{\n  "result_code": 0,\n  "claims": {"x-nvidia-overall-att-result": true}\n}\n'
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln"
NONCE = bytes(range(32))


def revoked(n: int) -> Event:
    return Event(State.REVOKED, Reason.GPU_CC_OFF, f"GPU fast check failed ({n})", 2e9 + n, None)


def make_evidence(nonce: bytes) -> Evidence:
    return Evidence(
        nonce=nonce.hex(),
        token=TOKEN,
        gpu_result=GPU_RESULT,
        gpu_result_sha256=Evidence.digest(GPU_RESULT),
        gpu_backend="nvattest",
        gpu_attested_at=1_764_000_000.0,
        tls_key_sha256="ab" * 32,
        issued_at=1_764_000_002.0,
    )


class FakeSource:
    """The daemon's side, controlled by the test."""

    def __init__(self, *, queue_size: int = 64) -> None:
        self.metrics = Metrics()
        self.events = EventHub(queue_size=queue_size)
        self.state: Health | Exception = HEALTHY
        self.event = FIRST
        self.nonces: list[bytes] = []
        self.failure: ConfinferError | None = None
        self.gate: asyncio.Event | None = None
        self.answer: Callable[[bytes], Evidence] = make_evidence

    def health(self) -> Health:
        if isinstance(self.state, Exception):
            raise self.state
        return self.state

    def current_event(self) -> Event:
        return self.event

    async def evidence(self, nonce: bytes) -> Evidence:
        self.nonces.append(nonce)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.answer(nonce)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path when a socket path in it fits AF_UNIX's 108 bytes, else a short /tmp dir."""
    if len(str(tmp_path / "attestd.sock")) < 100:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="atd"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        result = await body()
        # Nothing of the server or its streams outlives close().
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return result

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def serving(
    source: FakeSource, path: Path, *, per_min: int = 60, **kwargs: Any
) -> AsyncIterator[Server]:
    server = await start(source, path, group=None, evidence_per_min=per_min, **kwargs)
    try:
        yield server
    finally:
        await server.close()


async def request(
    path: Path, target: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; the status, the headers (lower-case names) and the body."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(
        f"{method} {target} HTTP/1.1\r\nHost: attestd\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def refusal(body: bytes) -> ErrorBody:
    obj = json.loads(body)
    assert set(obj) == {"error", "reason"}
    assert "\n" not in obj["error"]
    return ErrorBody.from_json(body)


def peer() -> str:
    return f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"


def server_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attestd.server"]


async def until(condition: Callable[[], bool], tries: int = 4000) -> None:
    """Wait, a few milliseconds at a time, until ``condition()`` holds; fail after ``tries``."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


# --- health, metrics, methods, paths ---------------------------------------------------------


def test_health_is_200_when_healthy_and_503_otherwise(short_dir: Path) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            status, headers, text = await request(path, HEALTH_PATH)
            assert status == 200
            assert headers["content-type"].startswith("application/json")
            assert headers["cache-control"] == "no-store"
            assert Health.from_json(text) == HEALTHY
            assert json.loads(text) == HEALTHY.to_obj()

            source.state = DEGRADED
            status, headers, text = await request(path, HEALTH_PATH)
            assert status == 503
            assert Health.from_json(text) == DEGRADED
            # confinfer's own client reads both.
            assert await asyncio.to_thread(Client(path).health) == DEGRADED

    run(body)


def test_every_request_is_one_log_line_naming_the_peer(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            await request(path, HEALTH_PATH)
            await request(path, "/nope")
            await request(path, f"{EVIDENCE_PATH}?nonce=00")

    run(body)
    lines = [line for line in server_lines(caplog) if not line.startswith("listening")]
    assert lines == [
        f"GET {HEALTH_PATH} 200 {peer()}",
        f"GET /nope 404 {peer()} reason=usage",
        f"GET {EVIDENCE_PATH} 400 {peer()} reason=usage",
    ]


def test_only_get_is_allowed(short_dir: Path) -> None:
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(FakeSource(), path):
            for method in ("POST", "PUT", "DELETE", "HEAD"):
                status, headers, text = await request(path, HEALTH_PATH, method)
                assert status == 405
                assert headers["allow"] == "GET"
                if method != "HEAD":
                    assert refusal(text).reason is Reason.USAGE

    run(body)


def test_unknown_paths_are_404_json(short_dir: Path) -> None:
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(FakeSource(), path):
            for target in ("/", "/v1", "/v1/health/x", "/v2/health", "/metrics/"):
                status, _, text = await request(path, target)
                assert status == 404, target
                error = refusal(text)
                assert error.reason is Reason.USAGE
                assert "no such path" in error.error

    run(body)


def test_an_internal_error_is_500_json_and_logged(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    source.state = RuntimeError("bug")
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            status, _, text = await request(path, HEALTH_PATH)
            assert status == 500
            assert refusal(text) == ErrorBody("internal error", Reason.ERROR)

    run(body)
    assert f"GET {HEALTH_PATH} 500 {peer()} reason=error" in server_lines(caplog)


def test_metrics_are_the_sources_rendering(short_dir: Path) -> None:
    source = FakeSource()
    source.metrics.set_state(State.DEGRADED, Reason.MAA_UNAVAILABLE)
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            status, headers, text = await request(path, METRICS_PATH)
            assert status == 200
            _, content_type = source.metrics.render()
            assert headers["content-type"] == content_type
            assert 'attestd_state{state="degraded"} 1.0' in text.decode()
            assert (
                'attestd_state_reason{reason="maa-unavailable",state="degraded"} 1.0'
                in text.decode()
            )

    run(body)


# --- the socket file -------------------------------------------------------------------------


def test_socket_is_0660_and_removed_on_close(short_dir: Path) -> None:
    path = short_dir / "a.sock"

    async def body() -> None:
        server = await start(FakeSource(), path, group=None, evidence_per_min=60)
        assert server.path == path
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        await server.close()
        await server.close()  # idempotent
        assert not path.exists()

    run(body)
    with pytest.raises(ServiceError, match="no such socket") as info:
        Client(path).health()
    assert info.value.reason is Reason.ATTESTD_UNAVAILABLE


def _some_group() -> grp.struct_group:
    own = grp.getgrgid(os.getgid())
    if os.geteuid() != 0:
        return own
    return next((g for g in grp.getgrall() if g.gr_gid != own.gr_gid), own)


def test_socket_group_is_set(short_dir: Path) -> None:
    group = _some_group()
    path = short_dir / "a.sock"

    async def body() -> None:
        server = await start(FakeSource(), path, group=group.gr_name, evidence_per_min=60)
        try:
            assert os.lstat(path).st_gid == group.gr_gid
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        finally:
            await server.close()

    run(body)


def test_unknown_group_is_a_config_error_and_binds_nothing(short_dir: Path) -> None:
    path = short_dir / "a.sock"

    async def body() -> None:
        with pytest.raises(ConfigError) as info:
            await start(FakeSource(), path, group="no-such-group-x9", evidence_per_min=60)
        assert info.value.reason is Reason.CONFIG_INVALID
        assert "\n" not in info.value.message
        assert "no-such-group-x9" in info.value.message

    run(body)
    assert not os.path.lexists(path)


def test_a_stale_socket_is_replaced(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nothing listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def body() -> None:
        async with serving(FakeSource(), path):
            assert await asyncio.to_thread(Client(path).health) == HEALTHY

    run(body)


def _refused(path: Path) -> ConfinferError:
    async def body() -> ConfinferError:
        with pytest.raises(ConfinferError) as info:
            await start(FakeSource(), path, group=None, evidence_per_min=60)
        return info.value

    error = run(body)
    assert error.reason is Reason.ATTESTD_SOCKET
    assert error.exit_code == Kind.SYSTEM.exit_code
    assert "\n" not in error.message
    return error


def test_a_regular_file_at_the_path_is_refused_and_kept(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    path.write_text("precious\n")
    assert "not a socket" in _refused(path).message
    assert path.read_text() == "precious\n"


def test_a_symlink_at_the_path_is_refused_and_kept(short_dir: Path) -> None:
    target = short_dir / "target.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(target))
    stale.close()
    path = short_dir / "a.sock"
    path.symlink_to(target)
    assert "symbolic link" in _refused(path).message
    assert path.is_symlink()
    assert stat.S_ISSOCK(os.lstat(target).st_mode)


def test_a_live_socket_is_refused_and_kept(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        assert "another process listens" in _refused(path).message
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        live.close()


def test_a_missing_parent_is_refused(short_dir: Path) -> None:
    path = short_dir / "absent" / "a.sock"
    assert "no directory" in _refused(path).message
    assert not (short_dir / "absent").exists()


def test_close_leaves_a_socket_that_is_no_longer_its_own(short_dir: Path) -> None:
    path = short_dir / "a.sock"

    async def body() -> None:
        server = await start(FakeSource(), path, group=None, evidence_per_min=60)
        path.unlink()  # another attestd took the path over
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other.close()
        await server.close()

    run(body)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# --- evidence --------------------------------------------------------------------------------


def test_evidence_is_served_for_a_hex_nonce(short_dir: Path) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            status, headers, text = await request(
                path, f"{EVIDENCE_PATH}?nonce={NONCE.hex().upper()}"
            )
            assert status == 200
            assert headers["content-type"].startswith("application/json")
            assert headers["cache-control"] == "no-store"
            assert Evidence.from_json(text) == make_evidence(NONCE)
            evidence = await asyncio.to_thread(Client(path).evidence, NONCE)
            assert evidence == make_evidence(NONCE)

    run(body)
    assert source.nonces == [NONCE, NONCE]
    assert 'attestd_evidence_requests_total{outcome="served"} 2.0' in (
        source.metrics.render()[0].decode()
    )


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?nonce=",
        "?nonce=" + "ab" * 15,  # 15 bytes
        "?nonce=" + "ab" * 65,  # 65 bytes
        "?nonce=" + "a" * 33,  # odd
        "?nonce=" + "zz" * 16,
        "?nonce=0x" + "ab" * 16,
        "?nonce=" + "ab" * 8 + "%20" + "ab" * 8,
        "?nonce=" + "ab" * 16 + "%0a",
        "?nonce=" + "%D9%A1" * 32,  # Arabic-Indic digits are digits, not hex
        "?nonce=" + "ab" * 16 + "&nonce=" + "cd" * 16,
        "?nonce=" + "ab" * 16 + "&extra=1",
    ],
)
def test_a_bad_nonce_is_400_and_never_reaches_the_source(short_dir: Path, query: str) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            status, _, text = await request(path, EVIDENCE_PATH + query)
            assert status == 400
            assert refusal(text).reason is Reason.USAGE

    run(body)
    assert source.nonces == []
    assert 'attestd_evidence_requests_total{outcome="refused"} 1.0' in (
        source.metrics.render()[0].decode()
    )


def test_the_nonce_bounds_are_inclusive(short_dir: Path) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path, per_min=600):
            for size in (16, 64):
                status, _, _ = await request(path, f"{EVIDENCE_PATH}?nonce={'c7' * size}")
                assert status == 200

    run(body)
    assert source.nonces == [b"\xc7" * 16, b"\xc7" * 64]


def test_over_the_rate_is_429_with_retry_after(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    clock = FakeClock()
    path = short_dir / "a.sock"
    target = f"{EVIDENCE_PATH}?nonce={NONCE.hex()}"

    async def body() -> None:
        # 10 a minute: a burst of 1, then one every 6 s.
        async with serving(source, path, per_min=10, clock=clock):
            assert (await request(path, target))[0] == 200
            status, headers, text = await request(path, target)
            assert status == 429
            assert headers["retry-after"] == "6"
            assert refusal(text).reason is Reason.EVIDENCE_RATE_LIMITED

            clock.now += 4
            status, headers, _ = await request(path, target)
            assert (status, headers["retry-after"]) == (429, "2")

            with pytest.raises(ServiceError) as info:
                await asyncio.to_thread(Client(path).evidence, NONCE)
            assert info.value.reason is Reason.EVIDENCE_RATE_LIMITED
            assert info.value.details["retry_after"] == 2
            assert info.value.exit_code == Kind.UNAVAILABLE.exit_code

            clock.now += 2
            assert (await request(path, target))[0] == 200

    run(body)
    assert len(source.nonces) == 2
    text = source.metrics.render()[0].decode()
    assert 'attestd_evidence_requests_total{outcome="served"} 2.0' in text
    assert 'attestd_evidence_requests_total{outcome="rate_limited"} 3.0' in text
    assert f"GET {EVIDENCE_PATH} 429 {peer()} reason=evidence-rate-limited" in server_lines(caplog)


def test_requests_beyond_those_in_flight_are_refused_not_queued(short_dir: Path) -> None:
    source = FakeSource()
    source.gate = asyncio.Event()
    clock = FakeClock()
    path = short_dir / "a.sock"
    target = f"{EVIDENCE_PATH}?nonce={NONCE.hex()}"

    async def body() -> None:
        assert source.gate is not None
        async with serving(source, path, per_min=10, clock=clock):
            first = asyncio.create_task(request(path, target))
            await until(lambda: bool(source.nonces))  # the first is with the source now
            clock.now += 600  # the bucket is full again ...
            status, headers, text = await request(path, target)
            # ... but one is in flight, the most a burst of 1 allows.
            assert (status, headers["retry-after"]) == (429, "1")
            assert refusal(text).reason is Reason.EVIDENCE_RATE_LIMITED
            source.gate.set()
            assert (await first)[0] == 200
            # The refused request took no token.
            assert (await request(path, target))[0] == 200

    run(body)
    assert len(source.nonces) == 2


def test_a_caller_that_leaves_cancels_its_evidence(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    source.gate = asyncio.Event()  # never set: the source would wait for ever
    path = short_dir / "a.sock"
    gone = f"GET {EVIDENCE_PATH} 499 {peer()} (the caller went away)"

    async def body() -> None:
        async with serving(source, path) as server:
            _, writer = await asyncio.open_unix_connection(str(path))
            target = f"{EVIDENCE_PATH}?nonce={NONCE.hex()}"
            writer.write(f"GET {target} HTTP/1.1\r\nHost: attestd\r\n\r\n".encode())
            await writer.drain()
            await until(lambda: bool(source.nonces))
            writer.close()
            await writer.wait_closed()
            await until(lambda: gone in server_lines(caplog))
            assert server._in_flight == 0

    run(body)


@pytest.mark.parametrize(
    ("reason", "status", "error_class", "outcome"),
    [
        (Reason.EVIDENCE_UNAVAILABLE, 503, ServiceError, "refused"),
        (Reason.MAA_UNAVAILABLE, 503, ServiceError, "failed"),
        (Reason.MAA_REFUSED, 403, AttestationError, "failed"),
        (Reason.TPM_ERROR, 500, ConfinferError, "failed"),
    ],
)
def test_a_source_failure_is_answered_by_its_reasons_kind(
    short_dir: Path,
    reason: Reason,
    status: int,
    error_class: type[ConfinferError],
    outcome: str,
) -> None:
    source = FakeSource()
    source.failure = ConfinferError("cannot attest now\nreally", reason=reason)
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path, per_min=600):
            got, headers, text = await request(path, f"{EVIDENCE_PATH}?nonce={NONCE.hex()}")
            assert got == status == error_status(reason)
            assert "retry-after" not in headers
            assert refusal(text) == ErrorBody("cannot attest now\\nreally", reason)
            with pytest.raises(error_class) as info:
                await asyncio.to_thread(Client(path).evidence, NONCE)
            assert info.value.reason is reason
            assert "cannot attest now" in info.value.message

    run(body)
    text = source.metrics.render()[0].decode()
    assert f'attestd_evidence_requests_total{{outcome="{outcome}"}} 2.0' in text


def test_the_client_refuses_evidence_for_another_nonce(short_dir: Path) -> None:
    source = FakeSource()
    source.answer = lambda nonce: make_evidence(bytes(16))
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            with pytest.raises(ServiceError, match="another nonce") as info:
                await asyncio.to_thread(Client(path).evidence, NONCE)
            assert info.value.reason is Reason.ATTESTD_BAD_RESPONSE

    run(body)


def test_the_client_checks_the_nonce_size_before_asking() -> None:
    for nonce in (b"", bytes(15), bytes(65)):
        with pytest.raises(UsageError):
            Client("/nonexistent/attestd.sock").evidence(nonce)


# --- the client against answers attestd would not give --------------------------------------


@contextlib.asynccontextmanager
async def canned(path: Path, answer: bytes) -> AsyncIterator[None]:
    """A socket that answers every request with ``answer`` and closes."""

    done: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        finished = asyncio.get_running_loop().create_future()
        done.append(finished)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except ConnectionError:
            pass  # the client stopped reading, as it should past its limit
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            finished.set_result(None)

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.gather(*done)


def _http(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _refusing(status: str, reason: Reason, *headers: str) -> bytes:
    return _http(status, ErrorBody("x", reason).to_json().encode(), *headers)


def _evidence(old: str, new: str) -> bytes:
    text = make_evidence(NONCE).to_json()
    assert old in text
    return _http("200 OK", text.replace(old, new).encode())


RATE = Reason.EVIDENCE_RATE_LIMITED
BUSY = "503 Service Unavailable"


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (_refusing("429 Too Many Requests", RATE), "Retry-After"),
        (_refusing("429 Too Many Requests", RATE, "Retry-After: 1.5"), "Retry-After"),
        (_refusing(BUSY, Reason.MAA_REFUSED), "HTTP 503 for the reason"),
        (_http(BUSY, b'{"error":"x","reason":"no-such-reason"}'), "unknown reason"),
        (_http(BUSY, b'{"error":"x"}'), "missing reason"),
        (_http(BUSY, b"<html>busy</html>"), "not strict JSON"),
        (_evidence('"nvattest"', '"other"'), "backend"),
        (_evidence(TOKEN, "not a token"), "compact JWS"),
        (_evidence(NONCE.hex(), NONCE.hex().upper()), "lowercase hex"),
        (_evidence('"result_code', '"result-code'), "not the SHA-256"),
        (_evidence('"issued_at":1764000002.0', '"issued_at":true'), "issued_at"),
        (_evidence('"issued_at"', '"more":1,"issued_at"'), "unknown member"),
        (_http("200 OK", b'{"nonce":"' + b"0" * (5 * 1024 * 1024) + b'"}'), "larger than"),
    ],
)
def test_the_client_refuses_answers_that_are_not_attestds(
    short_dir: Path, answer: bytes, match: str
) -> None:
    path = short_dir / "c.sock"

    async def body() -> None:
        async with canned(path, answer):
            with pytest.raises(ServiceError, match=match) as info:
                await asyncio.to_thread(Client(path).evidence, NONCE)
            assert info.value.reason is Reason.ATTESTD_BAD_RESPONSE

    run(body)


def test_evidence_json_round_trip_and_schema() -> None:
    evidence = make_evidence(NONCE)
    text = evidence.to_json()
    assert "\n" not in text
    assert json.loads(text) == {
        "nonce": NONCE.hex(),
        "token": TOKEN,
        "gpu_result": GPU_RESULT,
        "gpu_result_sha256": Evidence.digest(GPU_RESULT),
        "gpu_backend": "nvattest",
        "gpu_attested_at": 1764000000.0,
        "tls_key_sha256": "ab" * 32,
        "issued_at": 1764000002.0,
    }
    assert Evidence.from_json(text) == evidence
    without_tls = Evidence.from_json(text.replace('"' + "ab" * 32 + '"', "null"))
    assert without_tls.tls_key_sha256 is None


# --- events ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stream(path: Path) -> AsyncIterator[aiohttp.ClientResponse]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
        session.get(f"http://attestd{EVENTS_PATH}") as response,
    ):
        yield response


async def next_event(response: aiohttp.ClientResponse) -> Event:
    while True:
        line = await response.content.readline()
        assert line.endswith(b"\n"), line
        if line != b"\n":
            return Event.from_json(line)


def test_events_stream_the_current_state_then_each_change(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path) as server, stream(path) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-ndjson"
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert response.headers["Cache-Control"] == "no-store"
            assert await next_event(response) == FIRST
            assert source.events.subscribers == 1
            assert server.streams == 1
            for n in range(3):
                source.events.publish(revoked(n))
            assert [await next_event(response) for _ in range(3)] == [revoked(n) for n in range(3)]
            await server.close()
            assert await response.content.read() == b""  # ended cleanly
            assert source.events.subscribers == 0

    run(body)
    assert f"GET {EVENTS_PATH} 200 {peer()} events=4" in server_lines(caplog)


def test_idle_streams_get_keep_alive_lines(short_dir: Path) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path, keepalive_s=0.01), stream(path) as response:
            assert await next_event(response) == FIRST
            assert await response.content.readline() == b"\n"
            assert await response.content.readline() == b"\n"
            source.events.publish(revoked(1))
            assert await next_event(response) == revoked(1)

    run(body)


def test_the_sync_client_reads_the_stream(short_dir: Path) -> None:
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path, keepalive_s=0.01):
            events = await asyncio.to_thread(Client(path).events, idle_timeout=30)
            try:
                assert await asyncio.to_thread(next, events) == FIRST
                source.events.publish(revoked(7))
                assert await asyncio.to_thread(next, events) == revoked(7)
            finally:
                events.close()
            await until(lambda: source.events.subscribers == 0)

    run(body)


def test_a_caller_that_goes_away_ends_its_stream(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource()
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path) as server:
            async with stream(path) as response:
                assert await next_event(response) == FIRST
            await until(lambda: source.events.subscribers == 0 and server.streams == 0)
            # The server still answers.
            assert (await request(path, HEALTH_PATH))[0] == 200

    run(body)
    assert f"GET {EVENTS_PATH} 200 {peer()} events=1 (the caller went away)" in server_lines(caplog)


def test_a_subscriber_that_falls_behind_is_dropped(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="attestd.server")
    source = FakeSource(queue_size=2)
    path = short_dir / "a.sock"

    async def body() -> None:
        async with serving(source, path):
            async with stream(path) as response:
                assert await next_event(response) == FIRST
                # Three changes before the stream's task runs again: more than it may queue.
                for n in range(3):
                    source.events.publish(revoked(n))
                assert await response.content.read() == b""  # it must reconnect
            assert source.events.subscribers == 0
            source.event = revoked(2)
            async with stream(path) as response:
                assert await next_event(response) == revoked(2)  # the state as it is now

    run(body)
    assert f"GET {EVENTS_PATH} 200 {peer()} events=1 (dropped: it fell behind)" in server_lines(
        caplog
    )


def test_close_ends_many_streams_and_evidence_in_flight_finishes(short_dir: Path) -> None:
    source = FakeSource()
    source.gate = asyncio.Event()
    path = short_dir / "a.sock"

    async def body() -> None:
        assert source.gate is not None
        server = await start(source, path, group=None, evidence_per_min=60)
        async with contextlib.AsyncExitStack() as stack:
            responses = [await stack.enter_async_context(stream(path)) for _ in range(5)]
            for response in responses:
                assert await next_event(response) == FIRST
            pending = asyncio.create_task(request(path, f"{EVIDENCE_PATH}?nonce={NONCE.hex()}"))
            await until(lambda: bool(source.nonces))
            closing = asyncio.create_task(server.close())
            for response in responses:
                assert await response.content.read() == b""
            source.gate.set()
            assert (await pending)[0] == 200
            await closing
        assert source.events.subscribers == 0
        assert not path.exists()

    run(body)


def test_routine_polls_after_the_first_are_logged_at_debug() -> None:
    from attestd.server import Server

    level = Server._level
    assert level("/v1/health", 200, True) == logging.INFO  # the caller is named once
    assert level("/v1/health", 200, False) == logging.DEBUG
    assert level("/v1/health", 503, False) == logging.DEBUG
    assert level("/metrics", 200, False) == logging.DEBUG
    assert level("/v1/evidence", 200, False) == logging.INFO
    assert level("/v1/events", 200, False) == logging.INFO
    assert level("/v1/health", 405, False) == logging.INFO
    assert level("/v1/health", 500, False) == logging.WARNING
