"""images/caddy/Caddyfile on a real Caddy (Debian's 2.6), started the way caddy.service starts it.

Caddy runs on the host through the real ``images/caddy/caddy-run`` (which reads the API key from
``$CREDENTIALS_DIRECTORY/api-key``), with the deployment values a test needs in its environment:
``tls internal`` (``skip_install_trust`` is always on), the storage and every socket under the
test's directory, free loopback ports, ``bind 127.0.0.1``. Its stand-ins: an engine (aiohttp on
127.0.0.1:<port>, the port being ``CONFINFER_SERVING_PORT``) and attestd (aiohttp on a Unix
socket, ``CONFINFER_ATTESTD_SOCKET``). Both record what reached them, and either can be stopped.
Requests go over TLS to ``localhost`` with the internal CA's root as the only trust anchor.

Checked: the config validates and is ``caddy fmt`` clean; 401 JSON without the key (or with a
wrong one), 200 with it, and the key never reaches the engine; the security headers on every
kind of answer, and no ``Server``; ``/attestation/health`` and ``/attestation/evidence`` reach
attestd's socket without a key; attestd's ``/metrics`` and ``/v1/events`` are not reachable;
the engine down gives 503 with attestd's health body (its reason); attestd down too gives the
static 503 ``attestd-unavailable``; plain HTTP redirects; caddy-run refuses a missing or
malformed key and keeps it off the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
CADDYFILE = REPO / "images" / "caddy" / "Caddyfile"
CADDY_RUN = REPO / "images" / "caddy" / "caddy-run"
CADDY = Path("/usr/bin/caddy")  # caddy-run execs this path, as on the VM
START_TIMEOUT_S = 15.0
REVOKED = {"state": "revoked", "reason": "gpu-cc-off", "line": "GPU 0: CC mode is off"}
EXPECTED_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "cache-control": "no-store",
}

if not CADDY.is_file():
    pytest.skip(
        f"{CADDY} is missing (Debian's caddy package: apt-get install caddy)",
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the stand-ins ----------------------------------------------------------------------------


@dataclass
class Seen:
    """What reached a stand-in: path, query string and the Authorization header, if any."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]


class StandIns:
    """The engine (TCP) and attestd (Unix socket), served from one event loop in a thread."""

    def __init__(self, engine_port: int, attestd_socket: Path) -> None:
        self.engine_port = engine_port
        self.attestd_socket = attestd_socket
        self.engine_seen = Seen()
        self.attestd_seen = Seen()
        self.health: dict[str, Any] = dict(REVOKED)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: dict[str, web.AppRunner] = {}

    def __enter__(self) -> StandIns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self._runners):
            self.stop(name)
        self._call(self._cancel_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @staticmethod
    async def _cancel_tasks() -> None:
        """Connections Caddy kept alive still have a handler task each."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    async def _engine(self, request: web.Request) -> web.Response:
        self.engine_seen.requests.append(
            (request.path, request.query_string, request.headers.get("Authorization"))
        )
        body = await request.read()
        return web.json_response(
            {"object": "stand-in", "path": request.path, "bytes": len(body)},
            headers={"Server": "uvicorn"},
        )

    async def _attestd(self, request: web.Request) -> web.Response:
        self.attestd_seen.requests.append(
            (request.path, request.query_string, request.headers.get("Authorization"))
        )
        if request.method != "GET":  # as attestd does
            return web.json_response({"error": "GET only", "reason": "usage"}, status=405)
        if request.path == "/v1/health":
            status = 200 if self.health["state"] == "healthy" else 503
            return web.json_response(self.health, status=status)
        if request.path == "/v1/evidence":
            return web.json_response({"nonce": request.query.get("nonce"), "token": "x.y.z"})
        return web.json_response({"error": "attestd's own", "path": request.path})

    def start(self, name: str) -> None:
        async def go() -> None:
            app = web.Application(client_max_size=64 << 20)  # the limit under test is Caddy's
            if name == "engine":
                app.router.add_route("*", "/{tail:.*}", self._engine)
            else:
                app.router.add_route("*", "/{tail:.*}", self._attestd)
            runner = web.AppRunner(app)
            await runner.setup()
            site: web.BaseSite
            if name == "engine":
                site = web.TCPSite(runner, "127.0.0.1", self.engine_port)
            else:
                site = web.UnixSite(runner, str(self.attestd_socket))
            await site.start()
            self._runners[name] = runner

        if name not in self._runners:
            if name == "attestd":  # aiohttp leaves its socket file behind when it stops
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.attestd_socket)
            self._call(go())

    def stop(self, name: str) -> None:
        runner = self._runners.pop(name, None)
        if runner is not None:
            self._call(runner.cleanup())


# --- Caddy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caddy:
    proc: subprocess.Popen[bytes]
    https_port: int
    http_port: int
    api_key: str
    ca: Path
    log: Path

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request to ``localhost`` (the body sent chunked, without a length, when
        ``chunked``); returns status, headers (lower-case names; a repeated header joined with
        ", ") and body."""
        context = ssl.create_default_context(cafile=str(self.ca))
        conn = http.client.HTTPSConnection(
            "localhost", self.https_port, context=context, timeout=10
        )
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        try:
            if chunked and body is not None:
                conn.request(method, path, body=iter([body]), headers=sent, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            got: dict[str, str] = {}
            for name, value in resp.getheaders():
                got[name.lower()] = (
                    f"{got[name.lower()]}, {value}" if name.lower() in got else value
                )
            return resp.status, got, resp.read()
        finally:
            conn.close()

    def json(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, body = self.request(path, **kwargs)
        return status, headers, json.loads(body)


def caddy_environ(
    directory: Path, stand_ins: StandIns, https_port: int, http_port: int
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory / "home"),
        "XDG_DATA_HOME": str(directory / "data"),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "CREDENTIALS_DIRECTORY": str(directory / "credentials"),
        "CONFINFER_CADDYFILE": str(CADDYFILE),
        "CONFINFER_DOMAIN": "localhost",
        "CONFINFER_CADDY_TLS": "internal",
        "CONFINFER_CADDY_BIND": "127.0.0.1",
        "CONFINFER_HTTPS_PORT": str(https_port),
        "CONFINFER_HTTP_PORT": str(http_port),
        "CONFINFER_CADDY_STORAGE": str(directory / "storage"),
        "CONFINFER_CADDY_FALLBACK_SOCKET": str(directory / "unavailable.sock"),
        "CONFINFER_ATTESTD_SOCKET": str(stand_ins.attestd_socket),
        "CONFINFER_SERVING_PORT": str(stand_ins.engine_port),
    }


def handshake(port: int, ca: Path) -> bool:
    if not ca.is_file():
        return False
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


@pytest.fixture(scope="module")
def directory() -> Iterator[Path]:
    """Short (Unix socket paths are limited to 108 bytes), under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cf-caddy-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stand_ins(directory: Path) -> Iterator[StandIns]:
    with StandIns(free_port(), directory / "attestd.sock") as ins:
        ins.start("engine")
        ins.start("attestd")
        yield ins


@pytest.fixture(scope="module")
def caddy(directory: Path, stand_ins: StandIns) -> Iterator[Caddy]:
    https_port, http_port = free_port(), free_port()
    api_key = secrets.token_urlsafe(32)
    (directory / "credentials").mkdir(mode=0o700)
    (directory / "credentials" / "api-key").write_text(api_key + "\n", encoding="ascii")
    log = directory / "caddy.log"
    env = caddy_environ(directory, stand_ins, https_port, http_port)
    ca = directory / "storage" / "pki" / "authorities" / "local" / "root.crt"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CADDY_RUN)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not handshake(https_port, ca):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Caddy did not serve HTTPS (exit {proc.poll()}):\n"
                    f"{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)
        yield Caddy(proc, https_port, http_port, api_key, ca, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def both_up(stand_ins: StandIns, caddy: Caddy) -> Iterator[StandIns]:
    """Engine and attestd serving, attestd revoked unless the test says otherwise. Waits out
    the 2 s during which Caddy's passive health check avoids an attestd that was down."""
    stand_ins.start("engine")
    stand_ins.start("attestd")
    stand_ins.health = dict(REVOKED)
    deadline = time.monotonic() + 10
    while True:
        stand_ins.stop("engine")
        _, _, body = caddy.json("/v1/models", key=caddy.api_key)
        stand_ins.start("engine")
        if body.get("reason") == REVOKED["reason"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    yield stand_ins
    stand_ins.start("engine")
    stand_ins.start("attestd")


def assert_security_headers(headers: Mapping[str, str]) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert headers.get(name) == value, (name, headers)
    assert "server" not in headers, headers
    assert "via" not in headers, headers


# --- the config itself ------------------------------------------------------------------------


def test_caddyfile_validates_and_is_formatted(directory: Path, stand_ins: StandIns) -> None:
    env = {
        **caddy_environ(directory / "validate", stand_ins, free_port(), free_port()),
        "CONFINFER_API_KEY": "k" * 32,
    }
    proc = subprocess.run(
        [str(CADDY), "validate", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Valid configuration" in proc.stdout + proc.stderr
    fmt = subprocess.run(
        [str(CADDY), "fmt", str(CADDYFILE)], capture_output=True, text=True, timeout=60, check=True
    )
    assert fmt.stdout == CADDYFILE.read_text(encoding="utf-8"), "run `caddy fmt --overwrite`"


# --- the API key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", "Bearer ", "Basic {key}", "bearer {key}", "Bearer {key}x", "{key}"],
)
def test_inference_without_the_key_is_401(
    both_up: StandIns, caddy: Caddy, authorization: str | None
) -> None:
    headers = (
        {} if authorization is None else {"Authorization": authorization.format(key=caddy.api_key)}
    )
    before = len(both_up.engine_seen.requests)
    status, got, body = caddy.json(
        "/v1/chat/completions", method="POST", headers=headers, body=b"{}"
    )
    assert status == 401
    assert got["www-authenticate"] == 'Bearer realm="confinfer"'
    assert got["content-type"] == "application/json"
    assert body["reason"] == "api-key-required"
    assert body["error"]["code"] == "invalid_api_key"
    assert_security_headers(got)
    assert len(both_up.engine_seen.requests) == before  # nothing reached the engine


def test_inference_with_the_key_reaches_the_engine(both_up: StandIns, caddy: Caddy) -> None:
    status, got, body = caddy.json(
        "/v1/chat/completions?x=1", method="POST", key=caddy.api_key, body=b'{"model": "m"}'
    )
    assert status == 200, body
    assert body == {"object": "stand-in", "path": "/v1/chat/completions", "bytes": 14}
    assert both_up.engine_seen.requests[-1] == ("/v1/chat/completions", "x=1", None)
    assert_security_headers(got)  # the engine's "Server: uvicorn" is gone too


def test_a_large_body_is_413_not_an_engine_outage(both_up: StandIns, caddy: Caddy) -> None:
    big = b"x" * (17 * 1024 * 1024)
    for chunked in (False, True):
        status, got, body = caddy.json(
            "/v1/completions", method="POST", key=caddy.api_key, body=big, chunked=chunked
        )
        assert status == 413, body
        assert body["reason"] == "request-too-large"
        assert_security_headers(got)
    status, _, body = caddy.json(
        "/v1/completions", method="POST", key=caddy.api_key, body=b"x" * (15 * 1024 * 1024)
    )
    assert (status, body["bytes"]) == (200, 15 * 1024 * 1024)


# --- attestation and what stays private -------------------------------------------------------


def test_attestation_health_reaches_attestd_without_the_key(
    both_up: StandIns, caddy: Caddy
) -> None:
    both_up.health = {"state": "healthy", "reason": "attestd-healthy", "line": "attested"}
    status, got, body = caddy.json(
        "/attestation/health?verbose=1", headers={"Authorization": "Bearer anything"}
    )
    assert status == 200
    assert body == both_up.health
    # the path is attestd's, the query is dropped, and no Authorization header goes along
    assert both_up.attestd_seen.requests[-1] == ("/v1/health", "", None)
    assert_security_headers(got)
    both_up.health = dict(REVOKED)
    status, _, body = caddy.json("/attestation/health")
    assert (status, body) == (503, REVOKED)


def test_attestation_evidence_passes_the_nonce(both_up: StandIns, caddy: Caddy) -> None:
    nonce = secrets.token_hex(32)
    status, got, body = caddy.json(f"/attestation/evidence?nonce={nonce}")
    assert status == 200
    assert body == {"nonce": nonce, "token": "x.y.z"}
    assert both_up.attestd_seen.requests[-1] == ("/v1/evidence", f"nonce={nonce}", None)
    assert_security_headers(got)


@pytest.mark.parametrize(
    "path",
    [
        "/metrics",
        "/health",
        "/attestation/metrics",
        "/attestation/events",
        "/attestation/v1/health",
        "/attestation/../metrics",
        "/v1/../metrics",
        "/attestation",
        "/",
    ],
)
def test_other_routes_are_404_and_never_reach_attestd(
    both_up: StandIns, caddy: Caddy, path: str
) -> None:
    before = len(both_up.attestd_seen.requests), len(both_up.engine_seen.requests)
    status, got, body = caddy.json(path, key=caddy.api_key)
    assert status == 404, (path, body)
    assert body["reason"] == "usage"
    assert_security_headers(got)
    assert (len(both_up.attestd_seen.requests), len(both_up.engine_seen.requests)) == before


def test_v1_events_and_metrics_are_the_engines_not_attestds(
    both_up: StandIns, caddy: Caddy
) -> None:
    for path in ("/v1/events", "/v1/metrics"):
        status, _, body = caddy.json(path, key=caddy.api_key)
        assert (status, body["path"]) == (200, path)  # the stand-in engine answered
    assert not {"/v1/events", "/metrics", "/v1/metrics"} & set(both_up.attestd_seen.paths())


# --- the engine down --------------------------------------------------------------------------


def test_engine_down_is_503_with_attestds_reason(both_up: StandIns, caddy: Caddy) -> None:
    both_up.stop("engine")
    status, got, body = caddy.json(
        "/v1/chat/completions", method="POST", key=caddy.api_key, body=b"{}"
    )
    assert status == 503
    assert body == REVOKED  # attestd's own health answer, carried as is
    assert got["content-type"].startswith("application/json")
    assert_security_headers(got)
    # even when attestd is healthy (the engine is starting), the status stays 503
    both_up.health = {"state": "healthy", "reason": "attestd-healthy", "line": "attested"}
    status, _, body = caddy.json("/v1/models", key=caddy.api_key)
    assert (status, body["reason"]) == (503, "attestd-healthy")
    # the key is still checked first
    status, _, body = caddy.json("/v1/models")
    assert (status, body["reason"]) == (401, "api-key-required")


def test_engine_and_attestd_down_is_a_static_503(both_up: StandIns, caddy: Caddy) -> None:
    both_up.stop("engine")
    both_up.stop("attestd")
    expected = {
        "state": "unknown",
        "reason": "attestd-unavailable",
        "line": "attestd cannot be reached",
    }
    for _ in range(3):  # the first one finds attestd down, the next ones skip it
        status, got, body = caddy.json("/v1/chat/completions", method="POST", key=caddy.api_key)
        assert (status, body) == (503, expected)
        assert_security_headers(got)
    # a stale socket file (attestd killed) is the same as none
    with contextlib.suppress(FileNotFoundError):
        os.unlink(both_up.attestd_socket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(both_up.attestd_socket))
    status, _, body = caddy.json("/v1/models", key=caddy.api_key)
    assert (status, body) == (503, expected)
    status, got, body = caddy.json("/attestation/health")
    assert (status, body) == (503, expected)
    assert_security_headers(got)
    os.unlink(both_up.attestd_socket)


# --- plain HTTP and caddy-run -----------------------------------------------------------------


def test_plain_http_redirects_to_https(caddy: Caddy) -> None:
    conn = http.client.HTTPConnection("localhost", caddy.http_port, timeout=10)
    try:
        conn.request("GET", "/v1/models?a=b")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 308
        assert resp.getheader("Location") == f"https://localhost:{caddy.https_port}/v1/models?a=b"
        assert resp.getheader("Server") is None
    finally:
        conn.close()


def _plain(port: int, path: str, host: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_readyz_follows_the_engines_health_for_the_load_balancer(
    both_up: StandIns, caddy: Caddy
) -> None:
    # The probe comes from the load balancer, addressed to the instance's IP.
    status, headers, body = _plain(caddy.http_port, "/readyz", "10.0.0.4")
    assert (status, json.loads(body)) == (200, {"ready": True}), body
    assert headers["content-type"].startswith("application/json")
    assert "server" not in headers
    assert both_up.engine_seen.requests[-1] == ("/health", "", None)
    both_up.stop("engine")
    status, _, body = _plain(caddy.http_port, "/readyz", "10.0.0.4")
    assert (status, json.loads(body)) == (503, {"ready": False}), body
    # anything else on that host is sent to the API's name, never served in plain HTTP
    status, headers, _ = _plain(caddy.http_port, "/v1/models", "10.0.0.4")
    assert status == 308
    assert headers["location"] == f"https://localhost:{caddy.https_port}/v1/models"


def test_the_key_is_not_on_the_command_line(caddy: Caddy) -> None:
    pid = caddy.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"caddy\x00run" in cmdline  # caddy-run exec'd Caddy in its place
    assert caddy.api_key.encode() not in cmdline
    assert caddy.api_key.encode() not in caddy.log.read_bytes()
    assert oct(Path(f"/proc/{pid}/environ").stat().st_mode & 0o777) == "0o400"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "no API key credential"),
        ("", "must be 32 to 512 characters"),
        ("short", "must be 32 to 512 characters"),
        ("k" * 513, "must be 32 to 512 characters"),
        ("k" * 40 + " x", "a character outside"),
        ("k" * 40 + '"} respond 200 {"', "a character outside"),
        ("k" * 40 + "\nsecond line", "a character outside"),
    ],
)
def test_caddy_run_refuses_a_missing_or_malformed_key(
    tmp_path: Path, key: str | None, message: str
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    if key is not None:
        (credentials / "api-key").write_text(key, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(credentials)}
    proc = subprocess.run(
        [str(CADDY_RUN)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert proc.returncode == 78, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.startswith("<3>caddy-run: ")
    if key:
        assert key not in proc.stderr


def test_caddy_run_needs_the_credentials_directory() -> None:
    proc = subprocess.run(
        [str(CADDY_RUN)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert "no $CREDENTIALS_DIRECTORY" in proc.stderr
