"""attestd's socket protocol: the schema as hostile input, and the client against tiny
in-process servers on a Unix socket in a short temporary directory (threads, no processes).

Each server speaks raw HTTP/1.1 from a handler thread so that it can misbehave precisely: a
line far past the limit, invalid JSON, an unknown state, a status that contradicts the body.
"""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer import attestd_api
from confinfer.attestd_api import (
    Client,
    Event,
    Gpu,
    GpuSummary,
    Health,
    State,
    reason_fits,
)
from confinfer.errors import Kind, Reason, ServiceError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

GPUS = GpuSummary(1, 1, (Gpu("GPU-5a4b0c2e-0000-4000-8000-000000000001", True, True),))
HEALTHY = Health(
    state=State.HEALTHY,
    reason=Reason.ATTESTD_HEALTHY,
    line="attested: GPU evidence and vTPM attestation passed",
    since=1_764_000_000.5,
    last_gpu_pass=1_764_000_000.0,
    last_vtpm_pass=1_764_000_000.25,
    token_expiry=1_764_028_800,
    ak_cert_expiry=None,
    gpus=GPUS,
)
DEGRADED = replace(
    HEALTHY,
    state=State.DEGRADED,
    reason=Reason.MAA_UNAVAILABLE,
    line="vTPM attestation service unreachable: HTTP 503",
)
REVOKED_EVENT = Event(
    State.REVOKED,
    Reason.GPU_CC_OFF,
    "GPU fast check failed: CC off",
    1_764_000_100.0,
    State.HEALTHY,
)
FIRST_EVENT = Event(State.HEALTHY, Reason.ATTESTD_HEALTHY, "attested", 1_764_000_000.0, None)


def bad(fn: Callable[[], object], match: str | None = None) -> ServiceError:
    with pytest.raises(ServiceError, match=match) as info:
        fn()
    assert info.value.reason is Reason.ATTESTD_BAD_RESPONSE
    assert info.value.exit_code == 69
    return info.value


def unavailable(fn: Callable[[], object], match: str | None = None) -> ServiceError:
    with pytest.raises(ServiceError, match=match) as info:
        fn()
    assert info.value.reason is Reason.ATTESTD_UNAVAILABLE
    assert info.value.exit_code == 69
    return info.value


# --- the schema ------------------------------------------------------------------------------


def test_paths() -> None:
    assert attestd_api.HEALTH_PATH == "/v1/health"
    assert attestd_api.EVENTS_PATH == "/v1/events"
    assert attestd_api.EVIDENCE_PATH == "/v1/evidence"
    assert attestd_api.METRICS_PATH == "/metrics"
    assert attestd_api.DEFAULT_SOCKET == "/run/attestd/attestd.sock"


def test_states_are_the_four_of_the_design() -> None:
    assert [s.value for s in State] == ["starting", "healthy", "degraded", "revoked"]


def test_health_round_trip_and_schema() -> None:
    text = HEALTHY.to_json()
    assert "\n" not in text
    assert json.loads(text) == {
        "state": "healthy",
        "reason": "attestd-healthy",
        "line": "attested: GPU evidence and vTPM attestation passed",
        "since": 1764000000.5,
        "last_gpu_pass": 1764000000.0,
        "last_vtpm_pass": 1764000000.25,
        "token_expiry": 1764028800,
        "ak_cert_expiry": None,
        "gpus": {
            "count": 1,
            "expected": 1,
            "devices": [
                {"uuid": "GPU-5a4b0c2e-0000-4000-8000-000000000001", "cc": True, "ready": True}
            ],
        },
    }
    assert Health.from_json(text) == HEALTHY
    assert Health.from_json(text.encode()) == HEALTHY
    assert HEALTHY.http_status == 200
    assert DEGRADED.http_status == 503


def test_event_round_trip() -> None:
    for event in (FIRST_EVENT, REVOKED_EVENT):
        assert Event.from_json(event.to_json()) == event
    assert json.loads(FIRST_EVENT.to_json())["previous"] is None


def _health_obj(**changes: Any) -> dict[str, Any]:
    obj = HEALTHY.to_obj()
    obj.update(changes)
    return obj


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (_health_obj(state="compromised"), "unknown state"),
        (_health_obj(state=None), "unknown state"),
        (_health_obj(state=["healthy"]), "unknown state"),
        (_health_obj(reason="all-good"), "unknown reason"),
        (_health_obj(reason=7), "unknown reason"),
        (_health_obj(reason="gpu-cc-off"), "cannot explain the state healthy"),
        (_health_obj(state="revoked", reason="maa-unavailable"), "cannot explain"),
        (_health_obj(state="degraded", reason="attestd-starting"), "cannot explain"),
        (_health_obj(line="two\nlines"), "printable line"),
        (_health_obj(line="\x1b[2J"), "printable line"),
        (_health_obj(line="x" * 1001), "printable line"),
        (_health_obj(line=5), "not a string"),
        (_health_obj(since=True), "not a number"),
        (_health_obj(since="1764000000"), "not a number"),
        (_health_obj(since=-1), "not a time"),
        (_health_obj(since=10**400), "not a time"),
        (_health_obj(token_expiry=False), "not a number"),
        (_health_obj(gpus=[]), "not a JSON object"),
        (_health_obj(gpus={"count": 1, "expected": 1}), "missing devices"),
        (_health_obj(gpus={"count": 2, "expected": 1, "devices": []}), "count 2 but 0"),
        (_health_obj(gpus={"count": True, "expected": 1, "devices": []}), "not a count"),
        (_health_obj(gpus={"count": 65, "expected": 1, "devices": [{}] * 65}), "at most 64"),
        (_health_obj(gpus={"count": 0, "expected": -1, "devices": []}), "not a count"),
        (_health_obj(gpus={"count": 1, "expected": 1, "devices": ["GPU-1"]}), "not a JSON object"),
        (
            _health_obj(
                gpus={"count": 1, "expected": 1, "devices": [{"uuid": "G", "cc": 1, "ready": 1}]}
            ),
            "not true or false",
        ),
        (
            _health_obj(
                gpus={
                    "count": 1,
                    "expected": 1,
                    "devices": [{"uuid": "G", "cc": True, "ready": True, "x": 1}],
                }
            ),
            "unknown member 'x'",
        ),
        ({k: v for k, v in _health_obj().items() if k != "since"}, "missing since"),
        (_health_obj(extra=1), "unknown member 'extra'"),
        ([], "not a JSON object"),
        ("healthy", "not a JSON object"),
    ],
)
def test_health_refuses(obj: object, match: str) -> None:
    bad(lambda: Health.from_json(json.dumps(obj)), match)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"", "not strict JSON"),
        (b"{", "not strict JSON"),
        (b'{"state": NaN}', "not strict JSON"),
        (b'{"state": Infinity}', "not strict JSON"),
        (b'{"state": "healthy", "state": "revoked"}', "duplicate member"),
        (b"\xff\xfe{}", "not strict JSON"),
        (b"[" * 100_000, "not strict JSON"),
    ],
)
def test_health_refuses_what_is_not_strict_json(text: bytes, match: str) -> None:
    bad(lambda: Health.from_json(text), match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"previous": "rebooted"}, "unknown state"),
        ({"state": "gone"}, "unknown state"),
        ({"at": None}, "not a number"),
        ({"reason": "attestd-healthy"}, "cannot explain"),
        ({"line": "a\rb"}, "printable"),
        ({"extra": 1}, "unknown member"),
    ],
)
def test_event_refuses(changes: dict[str, Any], match: str) -> None:
    obj = REVOKED_EVENT.to_obj() | changes
    bad(lambda: Event.from_json(json.dumps(obj)), match)


def test_error_messages_are_printable() -> None:
    error = bad(lambda: Health.from_json(json.dumps(_health_obj(state="\n<0>forged\x1b[2J"))))
    assert error.message.isprintable()
    assert "\n" not in error.one_line()


def test_reasons_that_fit_each_state() -> None:
    assert [r for r in Reason if reason_fits(State.HEALTHY, r)] == [Reason.ATTESTD_HEALTHY]
    assert reason_fits(State.STARTING, Reason.ATTESTD_STARTING)
    assert reason_fits(State.STARTING, Reason.MAA_UNAVAILABLE)
    assert not reason_fits(State.STARTING, Reason.GPU_CC_OFF)
    assert reason_fits(State.DEGRADED, Reason.GPU_COLLATERAL_UNAVAILABLE)
    assert not reason_fits(State.DEGRADED, Reason.ATTESTD_STARTING)
    assert not reason_fits(State.DEGRADED, Reason.POLICY_UNSATISFIED)
    assert reason_fits(State.REVOKED, Reason.POLICY_UNSATISFIED)
    assert reason_fits(State.REVOKED, Reason.GRACE_EXPIRED)
    assert not reason_fits(State.REVOKED, Reason.ATTESTD_HEALTHY)
    for reason in Reason:
        if reason.kind is Kind.UNAVAILABLE:
            assert not reason_fits(State.REVOKED, reason)


_times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
_lines = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs", "Cf"))
    | st.just(" "),
    max_size=200,
).filter(str.isprintable)
_state_reason = st.tuples(st.sampled_from(list(State)), st.sampled_from(list(Reason))).filter(
    lambda sr: reason_fits(*sr)
)
_gpu = st.builds(
    Gpu, uuid=_lines.filter(lambda s: len(s) <= 128), cc=st.booleans(), ready=st.booleans()
)
_gpus = st.lists(_gpu, max_size=8).flatmap(
    lambda devices: st.builds(
        GpuSummary,
        count=st.just(len(devices)),
        expected=st.integers(0, 64),
        devices=st.just(tuple(devices)),
    )
)
_healths = _state_reason.flatmap(
    lambda sr: st.builds(
        Health,
        state=st.just(sr[0]),
        reason=st.just(sr[1]),
        line=_lines,
        since=_times,
        last_gpu_pass=st.none() | _times,
        last_vtpm_pass=st.none() | _times,
        token_expiry=st.none() | _times,
        ak_cert_expiry=st.none() | _times,
        gpus=_gpus,
    )
)


@given(_healths)
def test_any_health_round_trips(health: Health) -> None:
    assert Health.from_json(health.to_json()) == health


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_health_from_any_bytes_is_a_health_or_a_bad_response(data: bytes) -> None:
    try:
        Health.from_json(data)
    except ServiceError as exc:
        assert exc.reason is Reason.ATTESTD_BAD_RESPONSE


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.sampled_from(sorted(HEALTHY.to_obj())), _json)
def test_health_with_any_member_replaced_is_valid_or_refused(key: str, value: object) -> None:
    obj = _health_obj(**{key: value})
    try:
        health = Health.from_json(json.dumps(obj))
    except ServiceError as exc:
        assert exc.reason is Reason.ATTESTD_BAD_RESPONSE
    else:
        assert health.to_obj()[key] == value


# --- the servers -----------------------------------------------------------------------------

Respond = Callable[["Server", socket.socket, str], None]
"""Answer the request for ``path`` on the connection."""


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, respond: Respond) -> None:
        self.respond = respond
        self.stop = threading.Event()
        self.paths: list[str] = []
        super().__init__(path, Handler)


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            request_line = data.split(b"\r\n", 1)[0].decode("ascii")
            method, path, _version = request_line.split(" ")
            assert method == "GET"
            assert b"\r\nHost: attestd\r\n" in data
            self.server.paths.append(path)
            self.server.respond(self.server, conn, path)
        except OSError:
            pass  # the client hung up, as it does on a hostile answer


def answer(status: int, body: bytes, *, headers: str = "") -> Respond:
    reason = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}.get(status, "X")

    def respond(server: Server, conn: socket.socket, path: str) -> None:
        conn.sendall(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode()
            + body
        )

    return respond


def stream(lines: list[bytes], *, chunked: bool = False, then_hold: bool = True) -> Respond:
    """An event stream: these lines, then held open until the test ends (or closed)."""

    def respond(server: Server, conn: socket.socket, path: str) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else "Connection: close\r\n\r\n"
        conn.sendall(head.encode())
        for line in lines:
            conn.sendall(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
        if then_hold:
            server.stop.wait(30)
        if chunked:
            conn.sendall(b"0\r\n\r\n")

    return respond


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="atd"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def serve(short_dir: Path) -> Iterator[Callable[[Respond], tuple[Client, Server]]]:
    servers: list[tuple[Server, threading.Thread]] = []

    def start(respond: Respond) -> tuple[Client, Server]:
        path = str(short_dir / f"s{len(servers)}.sock")
        server = Server(path, respond)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return Client(path, timeout=5), server

    yield start
    for server, thread in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def events_of(client: Client, **kwargs: Any) -> Iterator[attestd_api.EventStream]:
    with client.events(**kwargs) as events:
        yield events


# --- health over the socket ------------------------------------------------------------------


def test_health_healthy(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    client, server = serve(answer(200, HEALTHY.to_json().encode()))
    assert client.health() == HEALTHY
    assert server.paths == ["/v1/health"]


def test_health_degraded_is_503_with_a_body(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    client, _ = serve(answer(503, DEGRADED.to_json().encode()))
    assert client.health() == DEGRADED


def test_health_status_must_agree_with_the_state(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    client, _ = serve(answer(200, DEGRADED.to_json().encode()))
    bad(client.health, "HTTP 200 for the state degraded")
    client, _ = serve(answer(503, HEALTHY.to_json().encode()))
    bad(client.health, "HTTP 503 for the state healthy")


def test_health_other_status(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    client, _ = serve(answer(404, b"not found"))
    bad(client.health, "HTTP 404")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>hello</html>", "not strict JSON"),
        (json.dumps(_health_obj(state="compromised")).encode(), "unknown state"),
        (json.dumps(_health_obj(reason="no-such-reason")).encode(), "unknown reason"),
    ],
)
def test_health_hostile_bodies(
    serve: Callable[[Respond], tuple[Client, Server]], body: bytes, match: str
) -> None:
    client, _ = serve(answer(200, body))
    bad(client.health, match)


def test_health_answer_past_the_cap_is_not_read(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    huge = attestd_api.MAX_HEALTH_BYTES * 4

    def respond(server: Server, conn: socket.socket, path: str) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (huge * 100)
        )
        block = b" " * 65536
        for _ in range(huge // len(block)):
            conn.sendall(block)

    client, _ = serve(respond)
    bad(client.health, "larger than")


def test_health_not_http(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    def respond(server: Server, conn: socket.socket, path: str) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    client, _ = serve(respond)
    bad(client.health, "not an HTTP answer")


def test_health_server_hangs_up(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    def respond(server: Server, conn: socket.socket, path: str) -> None:
        conn.shutdown(socket.SHUT_RDWR)

    client, _ = serve(respond)
    unavailable(client.health, "closed connection without response")


def test_health_truncated_body(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    def respond(server: Server, conn: socket.socket, path: str) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{")

    client, _ = serve(respond)
    bad(client.health, "shorter than its Content-Length")


def test_no_socket_is_unavailable(short_dir: Path) -> None:
    error = unavailable(Client(short_dir / "absent.sock").health, "no such socket")
    assert error.details == {"socket": str(short_dir / "absent.sock")}
    assert error.hint is not None and "systemctl status attestd" in error.hint


def test_refusing_socket_is_unavailable(short_dir: Path) -> None:
    path = str(short_dir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)  # bound, never listening: connections are refused
        unavailable(Client(path).health, "refuses connections")
        unavailable(Client(path).events, "refuses connections")


def test_socket_that_is_not_a_socket(short_dir: Path) -> None:
    path = short_dir / "plain-file"
    path.write_text("")
    unavailable(Client(path).health, "attestd at")


def test_silent_server_is_unavailable_after_the_timeout(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    def respond(server: Server, conn: socket.socket, path: str) -> None:
        server.stop.wait(30)

    client, _ = serve(respond)
    unavailable(Client(client.socket_path, timeout=0.2).health, "did not answer in time")


# --- the event stream ------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_events_in_order_with_keepalives(
    serve: Callable[[Respond], tuple[Client, Server]], chunked: bool
) -> None:
    lines = [
        FIRST_EVENT.to_json().encode() + b"\n",
        b"\n",
        REVOKED_EVENT.to_json().encode() + b"\r\n",
    ]
    client, server = serve(stream(lines, chunked=chunked))
    with events_of(client) as events:
        assert next(events) == FIRST_EVENT
        assert next(events) == REVOKED_EVENT
    assert server.paths == ["/v1/events"]
    with pytest.raises(StopIteration):
        next(events)


def test_events_split_across_chunks(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    line = REVOKED_EVENT.to_json().encode() + b"\n"
    client, _ = serve(stream([line[:10], line[10:30], line[30:]], chunked=True))
    with events_of(client) as events:
        assert next(events) == REVOKED_EVENT


@pytest.mark.parametrize("chunked", [False, True])
def test_end_of_stream_is_unavailable_never_a_quiet_stop(
    serve: Callable[[Respond], tuple[Client, Server]], chunked: bool
) -> None:
    client, _ = serve(
        stream([FIRST_EVENT.to_json().encode() + b"\n"], chunked=chunked, then_hold=False)
    )
    with events_of(client) as events:
        assert next(events) == FIRST_EVENT
        unavailable(lambda: next(events), "the event stream ended")
        with pytest.raises(StopIteration):
            next(events)


def test_event_line_past_the_limit(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    huge = b'{"state": "healthy", "line": "' + b"x" * (attestd_api.MAX_EVENT_LINE_BYTES * 8)
    client, _ = serve(stream([huge + b'"}\n']))
    with events_of(client) as events:
        bad(lambda: next(events), "longer than")


def test_event_line_cut_by_the_end_of_the_stream(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    client, _ = serve(stream([FIRST_EVENT.to_json().encode()[:20]], then_hold=False))
    with events_of(client) as events:
        bad(lambda: next(events), "inside a line")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"not json\n", "not strict JSON"),
        (
            json.dumps(REVOKED_EVENT.to_obj() | {"state": "compromised"}).encode() + b"\n",
            "unknown state",
        ),
        (
            json.dumps(REVOKED_EVENT.to_obj() | {"reason": "nope"}).encode() + b"\n",
            "unknown reason",
        ),
        (b"[]\n", "not a JSON object"),
    ],
)
def test_hostile_event_lines(
    serve: Callable[[Respond], tuple[Client, Server]], line: bytes, match: str
) -> None:
    client, _ = serve(stream([FIRST_EVENT.to_json().encode() + b"\n", line]))
    with events_of(client) as events:
        assert next(events) == FIRST_EVENT
        bad(lambda: next(events), match)
        with pytest.raises(StopIteration):
            next(events)  # a refused stream is closed, not resumed


def test_events_need_200(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    client, _ = serve(answer(503, b"{}"))
    bad(client.events, "HTTP 503")


def test_idle_timeout(serve: Callable[[Respond], tuple[Client, Server]]) -> None:
    client, _ = serve(stream([FIRST_EVENT.to_json().encode() + b"\n"]))
    with events_of(client, idle_timeout=0.2) as events:
        assert next(events) == FIRST_EVENT
        unavailable(lambda: next(events), "did not answer in time")


def test_close_from_another_thread_ends_a_blocked_read(
    serve: Callable[[Respond], tuple[Client, Server]],
) -> None:
    client, _ = serve(stream([FIRST_EVENT.to_json().encode() + b"\n"]))
    events = client.events()
    assert next(events) == FIRST_EVENT
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(next(events))
        except StopIteration:
            outcome.append("stopped")
        except ServiceError as exc:
            outcome.append(exc.reason)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # blocked on the held-open stream
    events.close()
    reader.join(10)
    assert outcome == ["stopped"]
