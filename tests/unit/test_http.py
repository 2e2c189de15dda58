"""The one HTTP layer against tiny in-process servers on 127.0.0.1 (threads, no processes).

Each server speaks raw HTTP/1.1 from a handler thread, so that it can misbehave precisely:
drip a body or its headers a byte at a time, send far more than the cap, redirect, throttle.
Every answer says ``Connection: close``, so one connection is one attempt and the server's
count of requests is the client's count of attempts. Backoff waits go to an injected ``sleep``
that only records them. No test asserts a wall-clock time except generous upper bounds.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confinfer import http
from confinfer.config import Config
from confinfer.errors import Reason, ServiceError
from confinfer.http import IMDS, JWKS, KEYVAULT, MAA, Http, Service

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

MiB = 1024 * 1024
CAP = 1 * MiB
BLOCK = 64 * 1024
HUGE = 100 * 1000 * 1000  # what the hostile server offers; never allocated


# --- the servers -----------------------------------------------------------------------------

Respond = Callable[["Server", socket.socket, int], None]
"""Answer one request on ``conn``; the int is the request's index (0 for the first attempt)."""


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, respond: Respond, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[bytes] = []  # request heads, in arrival order
        self.sent = 0  # body bytes the server managed to hand to its socket
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def send(self, conn: socket.socket, data: bytes) -> bool:
        """Send ``data``; False once the client has gone (or the test is over)."""
        if self.stop.is_set():
            return False
        try:
            conn.sendall(data)
        except OSError:
            return False
        return True

    def drip(self, conn: socket.socket, data: bytes, every_s: float = 0.2) -> None:
        """Send ``data`` one byte every ``every_s`` seconds until the client gives up."""
        for i in range(len(data)):
            if self.stop.wait(every_s) or not self.send(conn, data[i : i + 1]):
                return


class _Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        server = self.server
        raw: socket.socket = self.request
        raw.settimeout(30)
        with server.lock:
            server.connections += 1
        if server.tls is None:
            self._serve(raw)
            return
        try:
            conn = server.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate
        with conn:
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        server = self.server
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
        except OSError:
            return
        with server.lock:
            index = len(server.requests)
            server.requests.append(head)
        server.respond(server, conn, index)


@contextmanager
def serve(respond: Respond, tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    server = Server(respond, tls)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


def answer(
    status: str, body: bytes = b"", headers: dict[str, str] | None = None, *, length: bool = True
) -> Respond:
    """A fixed answer (with Content-Length unless ``length`` is False)."""

    def respond(server: Server, conn: socket.socket, index: int) -> None:
        fields = {"Connection": "close", **(headers or {})}
        if length:
            fields["Content-Length"] = str(len(body))
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        server.send(conn, head.encode("ascii") + b"\r\n" + body)

    return respond


def in_turn(*responders: Respond) -> Respond:
    """The first request gets the first responder, and so on; the last one repeats."""

    def respond(server: Server, conn: socket.socket, index: int) -> None:
        responders[min(index, len(responders) - 1)](server, conn, index)

    return respond


def cfg(**over: Any) -> Config:
    return replace(
        Config(),
        **{"http_timeout_s": 5.0, "max_retries": 2, "http_max_response_bytes": CAP, **over},
    )


class Sleeps(list[float]):
    """The injected ``sleep``: records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def get(
    config: Config, url: str, service: Service = MAA, sleeps: Sleeps | None = None
) -> http.Reply:
    with Http(config, sleep=sleeps if sleeps is not None else Sleeps()) as session:
        return session.request("GET", url, service=service)


def failure(
    config: Config, url: str, service: Service = MAA, sleeps: Sleeps | None = None
) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        get(config, url, service, sleeps)
    return err.value


@pytest.fixture
def client_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes this test's thread receives from any socket (the client's side only)."""
    me = threading.get_ident()
    seen = [0]
    real = socket.socket.recv_into

    def recv_into(self: socket.socket, buffer: Any, *args: Any) -> int:
        n = real(self, buffer, *args)
        if threading.get_ident() == me:
            seen[0] += n
        return n

    monkeypatch.setattr(socket.socket, "recv_into", recv_into)
    return seen


# --- a plain answer --------------------------------------------------------------------------


def test_a_plain_answer_is_returned_whole() -> None:
    with serve(answer("200 OK", b'{"ok": true}', {"Content-Type": "application/json"})) as srv:
        reply = get(cfg(), srv.url + "/x")
    assert reply.status == 200
    assert reply.json() == {"ok": True}
    assert reply.url == srv.url + "/x"
    assert reply.headers["Content-Type"] == "application/json"
    assert srv.requests[0].startswith(b"GET /x HTTP/1.1\r\n")


def test_an_answer_that_is_not_retried_is_returned_for_the_caller_to_judge() -> None:
    sleeps = Sleeps()
    with serve(answer("404 Not Found", b"nope")) as srv:
        reply = get(cfg(), srv.url, sleeps=sleeps)
    assert (reply.status, reply.body) == (404, b"nope")
    assert len(srv.requests) == 1 and sleeps == []


# --- the total deadline ----------------------------------------------------------------------


def test_a_dripping_body_ends_at_the_deadline_of_each_attempt() -> None:
    """One byte every 0.2 s never trips a per-read timeout of 1 s; the total deadline does."""
    config = cfg(http_timeout_s=1.0, max_retries=2)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"

    def drip(server: Server, conn: socket.socket, index: int) -> None:
        if server.send(conn, head):
            server.drip(conn, b"x" * 1000)

    sleeps = Sleeps()
    start = time.monotonic()
    with serve(drip) as srv:
        err = failure(config, srv.url, KEYVAULT, sleeps)
    spent = time.monotonic() - start
    assert err.reason == Reason.KEYVAULT_UNAVAILABLE
    assert "no complete answer within 1 s after 3 attempt(s)" in err.message
    assert len(srv.requests) == config.max_retries + 1
    assert len(sleeps) == config.max_retries
    # Unbounded, the drip would take 3 x 200 s; a generous bound (20 x the deadlines).
    assert spent < 20 * (config.max_retries + 1) * config.http_timeout_s


# Without Content-Length the body ends when the connection does, and the deadline ends the
# connection: the truncated body must not pass for a whole answer.
def test_a_dripping_close_delimited_body_is_not_taken_for_a_whole_answer() -> None:
    config = cfg(http_timeout_s=1.0, max_retries=1)
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"

    def drip(server: Server, conn: socket.socket, index: int) -> None:
        if server.send(conn, head):
            server.drip(conn, b"x" * 1000)

    with serve(drip) as srv:
        err = failure(config, srv.url, MAA)
    assert err.reason == Reason.MAA_UNAVAILABLE
    assert len(srv.requests) == config.max_retries + 1


def drip_headers(declared: bool) -> Respond:
    """A status line (and Content-Length when ``declared``), then a header a byte at a time."""
    first = b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 5\r\n" if declared else b"")

    def respond(server: Server, conn: socket.socket, index: int) -> None:
        if server.send(conn, first):
            server.drip(conn, b"X-Slow: " + b"a" * 1000 + b"\r\n\r\nhello")

    return respond


def test_dripping_headers_end_at_the_deadline_too() -> None:
    config = cfg(http_timeout_s=1.0, max_retries=1)
    sleeps = Sleeps()
    start = time.monotonic()
    with serve(drip_headers(declared=True)) as srv:
        err = failure(config, srv.url, IMDS, sleeps)
    spent = time.monotonic() - start
    assert err.reason == Reason.IMDS_UNAVAILABLE
    assert "no complete answer within 1 s after 2 attempt(s)" in err.message
    assert len(srv.requests) == config.max_retries + 1
    assert len(sleeps) == config.max_retries
    assert spent < 20 * (config.max_retries + 1) * config.http_timeout_s


def test_dripping_headers_without_a_length_end_at_the_deadline() -> None:
    """Whatever the outcome (see the next test), the request does not hang."""
    config = cfg(http_timeout_s=1.0, max_retries=1)
    start = time.monotonic()
    with serve(drip_headers(declared=False)) as srv:
        try:
            get(config, srv.url, IMDS)
        except ServiceError:
            pass
    spent = time.monotonic() - start
    assert 1 <= len(srv.requests) <= config.max_retries + 1
    assert spent < 20 * (config.max_retries + 1) * config.http_timeout_s


def test_dripping_headers_without_a_length_are_not_taken_for_an_answer() -> None:
    # Cut by the deadline mid-header, http.client takes the half line for a header (urllib3
    # only logs HeaderParsingError) and EOF for the end of an empty close-delimited body.
    config = cfg(http_timeout_s=1.0, max_retries=1)
    with serve(drip_headers(declared=False)) as srv:
        err = failure(config, srv.url, IMDS)
    assert err.reason == Reason.IMDS_UNAVAILABLE
    assert len(srv.requests) == config.max_retries + 1


def test_a_silent_server_ends_at_the_deadline() -> None:
    def silent(server: Server, conn: socket.socket, index: int) -> None:
        server.stop.wait(60)

    config = cfg(http_timeout_s=1.0, max_retries=0)
    with serve(silent) as srv:
        err = failure(config, srv.url, MAA)
    assert err.reason == Reason.MAA_UNAVAILABLE
    assert len(srv.requests) == 1


# --- the size cap ----------------------------------------------------------------------------


def stream(*, declared: bool, chunked: bool = False) -> Respond:
    """A 100 MB answer streamed in 64 KiB blocks (one block allocated, reused)."""
    block = b"z" * BLOCK

    def respond(server: Server, conn: socket.socket, index: int) -> None:
        fields = "Connection: close\r\n"
        if declared:
            fields += f"Content-Length: {HUGE}\r\n"
        if chunked:
            fields += "Transfer-Encoding: chunked\r\n"
        if not server.send(conn, f"HTTP/1.1 200 OK\r\n{fields}\r\n".encode("ascii")):
            return
        frame = f"{BLOCK:x}\r\n".encode("ascii") + block + b"\r\n" if chunked else block
        for _ in range(HUGE // BLOCK):
            if not server.send(conn, frame):
                return
            with server.lock:
                server.sent += BLOCK

    return respond


@pytest.mark.parametrize(
    ("declared", "chunked"),
    [(True, False), (False, True), (False, False)],
    ids=["content-length", "chunked", "close-delimited"],
)
def test_a_100_mb_answer_is_refused_after_at_most_the_cap_and_one_block(
    client_bytes: list[int], declared: bool, chunked: bool
) -> None:
    sleeps = Sleeps()
    with serve(stream(declared=declared, chunked=chunked)) as srv:
        err = failure(cfg(max_retries=3), srv.url, MAA, sleeps)
    assert err.reason == Reason.RESPONSE_TOO_LARGE
    assert f"larger than {CAP} bytes" in err.message
    assert len(srv.requests) == 1 and sleeps == []  # refused, not retried
    # What the client read off its socket: headers, at most cap + one 64 KiB block of body,
    # chunk framing and one read-ahead buffer (io.DEFAULT_BUFFER_SIZE).
    assert client_bytes[0] <= CAP + BLOCK + 8 * 1024 + 1024
    if declared:
        assert client_bytes[0] <= BLOCK + 8 * 1024  # refused on the header alone


@pytest.mark.parametrize("size", [CAP - 1, CAP])
@pytest.mark.parametrize("length", [True, False], ids=["content-length", "close-delimited"])
def test_an_answer_up_to_the_cap_is_read_whole(size: int, length: bool) -> None:
    body = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    with serve(answer("200 OK", body, length=length)) as srv:
        reply = get(cfg(), srv.url)
    assert reply.status == 200
    assert reply.body == body


# --- retries and Retry-After -----------------------------------------------------------------


def test_429_with_retry_after_1_is_retried_after_exactly_that() -> None:
    sleeps = Sleeps()
    responder = in_turn(
        answer("429 Too Many Requests", b"slow down", {"Retry-After": "1"}),
        answer("200 OK", b"fine"),
    )
    with serve(responder) as srv:
        reply = get(cfg(), srv.url, MAA, sleeps)
    assert (reply.status, reply.body) == (200, b"fine")
    assert sleeps == [1.0]
    assert len(srv.requests) == 2


def test_retry_after_as_an_http_date_is_honoured() -> None:
    sleeps = Sleeps()
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    responder = in_turn(
        answer("503 Service Unavailable", b"", {"Retry-After": when}), answer("200 OK", b"fine")
    )
    with serve(responder) as srv:
        reply = get(cfg(), srv.url, KEYVAULT, sleeps)
    assert reply.status == 200
    assert len(sleeps) == 1 and 0.0 <= sleeps[0] <= 6.0


@pytest.mark.parametrize("service", [MAA, IMDS, JWKS, KEYVAULT], ids=lambda s: s.name)
def test_retry_after_beyond_the_cap_fails_at_once_saying_the_wait(service: Service) -> None:
    sleeps = Sleeps()
    responder = in_turn(
        answer("429 Too Many Requests", b"", {"Retry-After": "3600"}), answer("200 OK", b"too late")
    )
    with serve(responder) as srv:
        err = failure(cfg(max_retries=4), srv.url, service, sleeps)
    assert err.reason == service.unavailable
    assert "HTTP 429, asked to retry in 3600 s" in err.message
    assert err.hint is not None and "3600 s" in err.hint
    assert len(srv.requests) == 1 and sleeps == []


def test_retry_after_at_the_cap_is_waited_for() -> None:
    sleeps = Sleeps()
    cap = int(http.RETRY_AFTER_CAP_S)
    responder = in_turn(
        answer("429 Too Many Requests", b"", {"Retry-After": str(cap)}), answer("200 OK", b"fine")
    )
    with serve(responder) as srv:
        assert get(cfg(), srv.url, MAA, sleeps).status == 200
    assert sleeps == [http.RETRY_AFTER_CAP_S]


def test_5xx_without_retry_after_backs_off_then_gives_up() -> None:
    sleeps = Sleeps()
    config = cfg(max_retries=3)
    with serve(answer("503 Service Unavailable", b"busy")) as srv:
        err = failure(config, srv.url, MAA, sleeps)
    assert err.reason == Reason.MAA_UNAVAILABLE
    assert "HTTP 503 after 4 attempt(s)" in err.message
    assert len(srv.requests) == 4
    assert len(sleeps) == 3
    for attempt, wait in enumerate(sleeps):
        ceiling = min(http.BACKOFF_MAX_S, http.BACKOFF_FIRST_S * 2.0**attempt)
        assert ceiling / 2 <= wait <= ceiling


def test_a_refused_connection_is_retried_then_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    err = failure(cfg(max_retries=2), f"http://127.0.0.1:{port}/", IMDS, sleeps)
    assert err.reason == Reason.IMDS_UNAVAILABLE
    assert "after 3 attempt(s)" in err.message
    assert len(sleeps) == 2


def test_max_retries_zero_is_one_attempt() -> None:
    sleeps = Sleeps()
    with serve(answer("500 Internal Server Error")) as srv:
        err = failure(cfg(max_retries=0), srv.url, MAA, sleeps)
    assert "after 1 attempt(s)" in err.message
    assert len(srv.requests) == 1 and sleeps == []


# --- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    ["301 Moved Permanently", "302 Found", "307 Temporary Redirect", "308 Permanent Redirect"],
)
def test_redirects_are_not_followed(status: str) -> None:
    with serve(answer(status, b"", {"Location": "/elsewhere"})) as srv:
        reply = get(cfg(), srv.url + "/here")
    assert reply.status == int(status.split()[0])
    assert reply.headers["Location"] == "/elsewhere"
    assert len(srv.requests) == 1
    assert srv.requests[0].startswith(b"GET /here ")


# --- TLS -------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(directory: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server certificate for 127.0.0.1 from one CA, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = _ca(directory, "test-ca")
    _, _, other_path = _ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"ca": ca_path, "other": other_path, "cert": cert_path, "key": key_path}


def tls_context(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    return context


def test_tls_to_a_trusted_server_works(pki: dict[str, Path]) -> None:
    with serve(answer("200 OK", b"hello"), tls=tls_context(pki)) as srv:
        reply = get(cfg(ca_bundle=pki["ca"]), srv.url)
    assert (reply.status, reply.body) == (200, b"hello")


@pytest.mark.parametrize("service", [MAA, IMDS, JWKS, KEYVAULT], ids=lambda s: s.name)
def test_an_untrusted_certificate_is_the_services_tls_reason_and_not_retried(
    pki: dict[str, Path], service: Service
) -> None:
    sleeps = Sleeps()
    with serve(answer("200 OK", b"secret"), tls=tls_context(pki)) as srv:
        err = failure(cfg(ca_bundle=pki["other"], max_retries=3), srv.url, service, sleeps)
    assert err.reason == service.tls
    assert "TLS verification failed" in err.message
    assert srv.connections == 1 and srv.requests == [] and sleeps == []


# --- Retry-After parsing (moved from the MAA tests) ----------------------------------------


def test_retry_after_forms() -> None:
    now = 1_800_000_000.0
    assert http.retry_after("2") == 2.0
    assert http.retry_after(" 7 ") == 7.0
    assert http.retry_after("86400") == 86400.0  # parsed as asked; request() applies the cap
    assert http.retry_after(None) is None
    assert http.retry_after("") is None
    assert http.retry_after("soon") is None
    assert http.retry_after("-1") is None
    assert http.retry_after("1.5") is None
    assert http.retry_after("\u0661") is None  # a digit, but not an ASCII one
    assert http.retry_after("9" * 11) is None
    later = email.utils.formatdate(now + 3600, usegmt=True)
    assert http.retry_after(later, now=now) == pytest.approx(3600.0)
    past = email.utils.formatdate(now - 60, usegmt=True)
    assert http.retry_after(past, now=now) == 0.0


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    for attempt in range(10):
        ceiling = min(http.BACKOFF_MAX_S, http.BACKOFF_FIRST_S * 2.0**attempt)
        for _ in range(20):
            assert ceiling / 2 <= http.backoff(attempt) <= ceiling
    assert http.backoff(30) <= http.BACKOFF_MAX_S
