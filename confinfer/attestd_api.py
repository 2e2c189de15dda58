"""attestd's socket protocol as its clients see it: paths, states, the health and event
schemas, and a synchronous client over the Unix socket.

attestd answers HTTP/1.1 with JSON on ``/run/attestd/attestd.sock``. The loader, ``confinfer
status`` and Caddy's health probes read it without importing ``attestd`` (DESIGN.md §2): the
types live here, and attestd serialises these same dataclasses.

- ``GET /v1/health``: one :class:`Health` object; HTTP 200 when healthy, 503 otherwise.
- ``GET /v1/events``: newline-delimited :class:`Event` objects, the current state first, then
  one per state change. Empty lines are keep-alives.
- ``GET /v1/evidence?nonce=HEX``: one :class:`Evidence` object, a fresh MAA token that binds
  the caller's nonce, the GPU verifier's result and the TLS key (DESIGN.md §9).
- ``GET /metrics``: Prometheus text, read by the metrics scraper.
- Any other answer that is not 200 is an :class:`ErrorBody`, ``{"error": ..., "reason": ...}``;
  :func:`error_status` is the HTTP status each reason's kind gets.

What comes over the socket is checked as hostile input (DESIGN.md §8): exact members and types,
finite numbers, known states and registered reasons, bounded sizes. Anything else is refused
with ``attestd-bad-response``; a socket that is missing, refuses or does not answer in time is
``attestd-unavailable``.

Times are seconds since the Unix epoch (UTC), as JSON numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import http.client
import json
import math
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from confinfer.closable import Closable
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    Kind,
    Reason,
    ServiceError,
    UsageError,
    printable,
)

DEFAULT_SOCKET = "/run/attestd/attestd.sock"
HEALTH_PATH = "/v1/health"
EVENTS_PATH = "/v1/events"
EVIDENCE_PATH = "/v1/evidence"
METRICS_PATH = "/metrics"

HOST = "attestd"  # the Host header: curl --unix-socket ... http://attestd/v1/health
MAX_HEALTH_BYTES = 256 * 1024
MAX_EVENT_LINE_BYTES = 16 * 1024
MAX_LINE_CHARS = 1000  # a state's human line
MAX_GPUS = 64
MAX_UUID_CHARS = 128
MAX_EVIDENCE_BYTES = 4 * 1024 * 1024  # the GPU result carries certificate chains per GPU
MAX_TOKEN_CHARS = 64 * 1024
MAX_ERROR_BYTES = 8 * 1024
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_RETRY_AFTER_S = 3600
EVIDENCE_TIMEOUT_S = 120.0  # a fresh attestation: the vTPM, IMDS and MAA, with retries
GPU_BACKENDS = ("nvattest", "lgv")


class State(enum.StrEnum):
    """attestd's state (DESIGN.md §4)."""

    STARTING = "starting"  # no full pass yet
    HEALTHY = "healthy"  # the last full pass holds
    DEGRADED = "degraded"  # a transient fault inside its grace
    REVOKED = "revoked"  # a measured hard failure, or a grace expired


def reason_fits(state: State, reason: Reason) -> bool:
    """Whether ``reason`` can explain ``state``: healthy has one reason; starting and degraded
    have reasons of the unavailable kind; revoked never has one (a fault inside its grace is
    not a revocation)."""
    if state is State.HEALTHY:
        return reason is Reason.ATTESTD_HEALTHY
    if reason is Reason.ATTESTD_HEALTHY:
        return False
    if state is State.REVOKED:
        return reason.kind is not Kind.UNAVAILABLE
    if state is State.DEGRADED and reason is Reason.ATTESTD_STARTING:
        return False
    return reason.kind is Kind.UNAVAILABLE


# --- the schema ------------------------------------------------------------------------------


def _bad(message: str) -> ServiceError:
    return ServiceError(
        printable(message, 300),
        reason=Reason.ATTESTD_BAD_RESPONSE,
        hint="the socket does not answer as attestd does; check its path and attestd's version",
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate member {key!r}")
        obj[key] = value
    return obj


def _load(data: str | bytes, what: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"{what}: not strict JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad(f"{what}: not a JSON object")
    return obj


def _members(obj: Mapping[str, Any], names: set[str], what: str) -> None:
    missing = sorted(names - obj.keys())
    unknown = sorted(obj.keys() - names)
    if missing:
        raise _bad(f"{what}: missing {', '.join(missing)}")
    if unknown:
        raise _bad(f"{what}: unknown member {unknown[0]!r}")


def _text(obj: Mapping[str, Any], key: str, what: str, limit: int = MAX_LINE_CHARS) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _bad(f"{what}.{key}: not a string")
    if len(value) > limit or not value.isprintable():
        raise _bad(f"{what}.{key}: not one printable line of at most {limit} characters")
    return value


def _time(obj: Mapping[str, Any], key: str, what: str) -> float:
    value = obj[key]
    # bool is an int in Python, never a time in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{what}.{key}: not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise _bad(f"{what}.{key}: not a time") from None
    if not math.isfinite(number) or number < 0:
        raise _bad(f"{what}.{key}: not a time")
    return number


def _optional_time(obj: Mapping[str, Any], key: str, what: str) -> float | None:
    return None if obj[key] is None else _time(obj, key, what)


def _flag(obj: Mapping[str, Any], key: str, what: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise _bad(f"{what}.{key}: not true or false")
    return value


def _count(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPUS:
        raise _bad(f"{what}.{key}: not a count from 0 to {MAX_GPUS}")
    return value


def _state(obj: Mapping[str, Any], key: str, what: str) -> State:
    value = obj[key]
    try:
        return State(value)
    except ValueError:
        raise _bad(f"{what}.{key}: unknown state {printable(value, 40)!r}") from None


def _reason(obj: Mapping[str, Any], state: State, what: str) -> Reason:
    value = obj["reason"]
    try:
        reason = Reason(value)
    except ValueError:
        raise _bad(f"{what}.reason: unknown reason {printable(value, 60)!r}") from None
    if not reason_fits(state, reason):
        raise _bad(f"{what}.reason: {reason} cannot explain the state {state}")
    return reason


@dataclass(frozen=True)
class Gpu:
    """One GPU as attestd's fast checks last saw it."""

    uuid: str
    cc: bool  # confidential computing on, in the production environment, DevTools off
    ready: bool  # the GPU ready state is set (only after a healthy full pass)

    def to_obj(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_obj(cls, obj: object, what: str) -> Self:
        if not isinstance(obj, dict):
            raise _bad(f"{what}: not a JSON object")
        _members(obj, {"uuid", "cc", "ready"}, what)
        return cls(
            uuid=_text(obj, "uuid", what, MAX_UUID_CHARS),
            cc=_flag(obj, "cc", what),
            ready=_flag(obj, "ready", what),
        )


@dataclass(frozen=True)
class GpuSummary:
    """The GPUs found (``count``, one :class:`Gpu` each) against the configured ``expected``."""

    count: int
    expected: int
    devices: tuple[Gpu, ...]

    def to_obj(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "expected": self.expected,
            "devices": [gpu.to_obj() for gpu in self.devices],
        }

    @classmethod
    def from_obj(cls, obj: object, what: str) -> Self:
        if not isinstance(obj, dict):
            raise _bad(f"{what}: not a JSON object")
        _members(obj, {"count", "expected", "devices"}, what)
        devices = obj["devices"]
        if not isinstance(devices, list) or len(devices) > MAX_GPUS:
            raise _bad(f"{what}.devices: not a list of at most {MAX_GPUS} GPUs")
        count = _count(obj, "count", what)
        if count != len(devices):
            raise _bad(f"{what}: count {count} but {len(devices)} devices")
        return cls(
            count=count,
            expected=_count(obj, "expected", what),
            devices=tuple(Gpu.from_obj(d, f"{what}.devices[{i}]") for i, d in enumerate(devices)),
        )


_HEALTH_MEMBERS = {
    "state",
    "reason",
    "line",
    "since",
    "last_gpu_pass",
    "last_vtpm_pass",
    "token_expiry",
    "ak_cert_expiry",
    "gpus",
}


@dataclass(frozen=True)
class Health:
    """The answer to ``GET /v1/health``.

    ``since``: when the current state began. ``last_gpu_pass``/``last_vtpm_pass``: the last full
    pass of GPU evidence and of vTPM attestation (None before the first). ``token_expiry``: when
    the last MAA token expires; ``ak_cert_expiry``: when the vTPM's AK certificate does.
    """

    state: State
    reason: Reason
    line: str
    since: float
    last_gpu_pass: float | None
    last_vtpm_pass: float | None
    token_expiry: float | None
    ak_cert_expiry: float | None
    gpus: GpuSummary

    @property
    def http_status(self) -> int:
        return 200 if self.state is State.HEALTHY else 503

    def to_obj(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason.value,
            "line": self.line,
            "since": self.since,
            "last_gpu_pass": self.last_gpu_pass,
            "last_vtpm_pass": self.last_vtpm_pass,
            "token_expiry": self.token_expiry,
            "ak_cert_expiry": self.ak_cert_expiry,
            "gpus": self.gpus.to_obj(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> Self:
        what = "health"
        obj = _load(data, what)
        _members(obj, _HEALTH_MEMBERS, what)
        state = _state(obj, "state", what)
        return cls(
            state=state,
            reason=_reason(obj, state, what),
            line=_text(obj, "line", what),
            since=_time(obj, "since", what),
            last_gpu_pass=_optional_time(obj, "last_gpu_pass", what),
            last_vtpm_pass=_optional_time(obj, "last_vtpm_pass", what),
            token_expiry=_optional_time(obj, "token_expiry", what),
            ak_cert_expiry=_optional_time(obj, "ak_cert_expiry", what),
            gpus=GpuSummary.from_obj(obj["gpus"], f"{what}.gpus"),
        )


@dataclass(frozen=True)
class Event:
    """One line of ``GET /v1/events``: attestd entered ``state`` at ``at``. ``previous`` is the
    state it left, None for the first line of a stream (the state at the time of the request)."""

    state: State
    reason: Reason
    line: str
    at: float
    previous: State | None

    def to_obj(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reason": self.reason.value,
            "line": self.line,
            "at": self.at,
            "previous": None if self.previous is None else self.previous.value,
        }

    def to_json(self) -> str:
        """One line of JSON, without the newline."""
        return json.dumps(self.to_obj(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> Self:
        what = "event"
        obj = _load(data, what)
        _members(obj, {"state", "reason", "line", "at", "previous"}, what)
        state = _state(obj, "state", what)
        return cls(
            state=state,
            reason=_reason(obj, state, what),
            line=_text(obj, "line", what),
            at=_time(obj, "at", what),
            previous=None if obj["previous"] is None else _state(obj, "previous", what),
        )


_HEX = re.compile(r"[0-9a-f]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _pattern(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise _bad(f"{what}.{key}: not of the expected form")
    return value


def _nonce_hex(obj: Mapping[str, Any], what: str) -> str:
    value = obj["nonce"]
    if (
        not isinstance(value, str)
        or not MIN_NONCE_BYTES * 2 <= len(value) <= MAX_NONCE_BYTES * 2
        or len(value) % 2
        or _HEX.fullmatch(value) is None
    ):
        raise _bad(
            f"{what}.nonce: not {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes in lowercase hex"
        )
    return value


_EVIDENCE_MEMBERS = {
    "nonce",
    "token",
    "gpu_result",
    "gpu_result_sha256",
    "gpu_backend",
    "gpu_attested_at",
    "tls_key_sha256",
    "issued_at",
}


@dataclass(frozen=True)
class Evidence:
    """The answer to ``GET /v1/evidence?nonce=HEX`` (DESIGN.md §9).

    ``nonce``: the caller's nonce in lowercase hex. ``token``: a fresh MAA token (compact JWS)
    whose ``x-ms-runtime.client-payload`` carries ``nonce``, ``gpu-result-sha256`` and, when a
    TLS key is configured, ``tls-key-sha256``. ``gpu_result``: the GPU verifier's JSON output
    exactly as it printed it, so that ``gpu_result_sha256`` is the SHA-256 of its UTF-8 bytes.
    ``gpu_backend``: which verifier (``nvattest`` or ``lgv``); ``gpu_attested_at``: when that
    result was obtained. ``tls_key_sha256``: SHA-256 of the TLS key's SubjectPublicKeyInfo
    (DER), None when none is bound. ``issued_at``: when this answer was made.

    Whoever checks evidence must still verify the token itself (issuer, JWKS, claims policy)
    and the GPU result against its own GPU policy; :meth:`from_json` checks only its shape and
    that the digest matches the result.
    """

    nonce: str
    token: str
    gpu_result: str
    gpu_result_sha256: str
    gpu_backend: str
    gpu_attested_at: float
    tls_key_sha256: str | None
    issued_at: float

    @staticmethod
    def digest(gpu_result: str) -> str:
        """``gpu_result_sha256`` for a GPU result."""
        return hashlib.sha256(gpu_result.encode("utf-8")).hexdigest()

    def to_obj(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes) -> Self:
        what = "evidence"
        obj = _load(data, what)
        _members(obj, _EVIDENCE_MEMBERS, what)
        token = obj["token"]
        if (
            not isinstance(token, str)
            or len(token) > MAX_TOKEN_CHARS
            or _JWS_COMPACT.fullmatch(token) is None
        ):
            raise _bad(f"{what}.token: not a compact JWS of at most {MAX_TOKEN_CHARS} characters")
        gpu_result = obj["gpu_result"]
        if not isinstance(gpu_result, str):
            raise _bad(f"{what}.gpu_result: not a string")
        digest = _pattern(obj, "gpu_result_sha256", _SHA256_HEX, what)
        if cls.digest(gpu_result) != digest:
            raise _bad(f"{what}.gpu_result_sha256: not the SHA-256 of gpu_result")
        backend = obj["gpu_backend"]
        if backend not in GPU_BACKENDS:
            raise _bad(f"{what}.gpu_backend: unknown backend {printable(backend, 40)!r}")
        tls = obj["tls_key_sha256"]
        return cls(
            nonce=_nonce_hex(obj, what),
            token=token,
            gpu_result=gpu_result,
            gpu_result_sha256=digest,
            gpu_backend=backend,
            gpu_attested_at=_time(obj, "gpu_attested_at", what),
            tls_key_sha256=None
            if tls is None
            else _pattern(obj, "tls_key_sha256", _SHA256_HEX, what),
            issued_at=_time(obj, "issued_at", what),
        )


# --- errors on the wire ----------------------------------------------------------------------

_STATUS = {
    Kind.USAGE: 400,
    Kind.REFUSED: 403,
    Kind.UNAVAILABLE: 503,
}


def error_status(reason: Reason) -> int:
    """The HTTP status of a failure answer: 429 for ``evidence-rate-limited``, then by the
    reason's kind: usage 400, refused 403, unavailable 503, anything else 500."""
    if reason is Reason.EVIDENCE_RATE_LIMITED:
        return 429
    return _STATUS.get(reason.kind, 500)


@dataclass(frozen=True)
class ErrorBody:
    """The body of every answer that is not 200 (health's 503 aside): one printable line and
    the registered reason."""

    error: str
    reason: Reason

    def to_json(self) -> str:
        return json.dumps(
            {"error": printable(self.error, MAX_LINE_CHARS), "reason": self.reason.value},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> Self:
        what = "error"
        obj = _load(data, what)
        _members(obj, {"error", "reason"}, what)
        value = obj["reason"]
        try:
            reason = Reason(value)
        except ValueError:
            raise _bad(f"{what}.reason: unknown reason {printable(value, 60)!r}") from None
        return cls(error=_text(obj, "error", what), reason=reason)

    def exception(self) -> ConfinferError:
        """The failure as the client raises it, its class taken from the reason's kind."""
        message = f"attestd: {self.error}"
        if self.reason.kind is Kind.UNAVAILABLE:
            return ServiceError(message, reason=self.reason)
        if self.reason.kind is Kind.REFUSED:
            return AttestationError(message, reason=self.reason)
        if self.reason.kind is Kind.USAGE:
            return UsageError(message, reason=self.reason)
        return ConfinferError(message, reason=self.reason)


# --- the client ------------------------------------------------------------------------------


def _unavailable(socket_path: str, why: str, hint: str | None = None) -> ServiceError:
    return ServiceError(
        f"attestd at {printable(socket_path, 200)}: {why}",
        reason=Reason.ATTESTD_UNAVAILABLE,
        details={"socket": socket_path},
        hint=hint or "check `systemctl status attestd` and the socket path (--socket)",
    )


def _os_failure(socket_path: str, exc: OSError) -> ServiceError:
    if isinstance(exc, TimeoutError):
        return _unavailable(socket_path, "did not answer in time")
    if isinstance(exc, FileNotFoundError):
        return _unavailable(socket_path, "no such socket (is attestd running?)")
    if isinstance(exc, ConnectionRefusedError):
        return _unavailable(socket_path, "the socket refuses connections (attestd is not running)")
    if isinstance(exc, PermissionError):
        return _unavailable(
            socket_path,
            "permission denied",
            hint="the socket is group-readable: run as a member of attestd's configured group",
        )
    return _unavailable(socket_path, printable(exc.strerror or exc, 200))


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__(HOST, timeout=timeout)
        self.socket_path = socket_path
        # http.client drops ``sock`` once a response takes the connection over; keep our own
        # reference so that a stream's read timeout and shutdown reach the socket.
        self.unix_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = self.unix_sock = sock


class Client:
    """A synchronous client for attestd's socket; one connection per request, thread-safe.

    ``timeout`` bounds connecting and each read; :meth:`events` may wait longer for a change.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str] = DEFAULT_SOCKET, *, timeout: float = 5.0
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def _get(
        self,
        path: str,
        accept: str,
        timeout: float | None,
        *,
        answer_timeout: float | None = None,
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Send the request; ``answer_timeout`` (default ``self.timeout``) bounds the wait for
        the status line, ``timeout`` each read after it."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            if answer_timeout is not None:
                conn.connect()
                if conn.unix_sock is not None:
                    conn.unix_sock.settimeout(answer_timeout)
            conn.request("GET", path, headers={"Accept": accept})
            response = conn.getresponse()
            if conn.unix_sock is not None:
                conn.unix_sock.settimeout(timeout)
        except OSError as exc:
            conn.close()
            raise _os_failure(self.socket_path, exc) from None
        except http.client.HTTPException as exc:
            conn.close()
            raise _bad(f"{path}: not an HTTP answer: {type(exc).__name__}") from None
        except BaseException:
            conn.close()
            raise
        return conn, response

    def _body(
        self,
        path: str,
        conn: _UnixConnection,
        response: http.client.HTTPResponse,
        limit: int,
    ) -> bytes:
        """The whole body, at most ``limit`` bytes, and exactly what Content-Length said."""
        try:
            body = response.read(limit + 1)
            unread = response.length  # what Content-Length promised and did not come
        except OSError as exc:
            raise _os_failure(self.socket_path, exc) from None
        except http.client.HTTPException as exc:
            raise _bad(f"{path}: broken answer: {type(exc).__name__}") from None
        finally:
            response.close()
            conn.close()
        if len(body) > limit:
            raise _bad(f"{path}: answer larger than {limit} bytes")
        if unread:
            raise _bad(f"{path}: answer shorter than its Content-Length")
        return body

    def health(self) -> Health:
        """attestd's current health (any state; the caller decides what a state means)."""
        conn, response = self._get(HEALTH_PATH, "application/json", self.timeout)
        body = self._body(HEALTH_PATH, conn, response, MAX_HEALTH_BYTES)
        if response.status not in (200, 503):
            raise _bad(f"{HEALTH_PATH}: HTTP {response.status}: {body[:200]!r}")
        health = Health.from_json(body)
        if health.http_status != response.status:
            raise _bad(f"{HEALTH_PATH}: HTTP {response.status} for the state {health.state}")
        return health

    def evidence(self, nonce: bytes, *, timeout: float = EVIDENCE_TIMEOUT_S) -> Evidence:
        """Fresh evidence bound to ``nonce`` (16 to 64 bytes). ``timeout`` bounds the wait for
        the answer: attestd attests afresh for it.

        A refusal is raised with attestd's own reason (``evidence-rate-limited`` with
        ``details['retry_after']`` in seconds, ``evidence-unavailable`` while attestd is not
        healthy, ...). The evidence is checked for its shape, its nonce and its GPU digest; the
        token is not verified here: that is the relying party's work.
        """
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            raise UsageError(
                f"a nonce is {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, not {len(nonce)}",
                reason=Reason.USAGE,
            )
        path = f"{EVIDENCE_PATH}?nonce={nonce.hex()}"
        conn, response = self._get(
            path, "application/json", self.timeout, answer_timeout=max(timeout, self.timeout)
        )
        retry_after = response.getheader("Retry-After")
        body = self._body(EVIDENCE_PATH, conn, response, MAX_EVIDENCE_BYTES)
        if response.status == 200:
            evidence = Evidence.from_json(body)
            if evidence.nonce != nonce.hex():
                raise _bad(f"{EVIDENCE_PATH}: evidence for another nonce")
            return evidence
        if len(body) > MAX_ERROR_BYTES:
            raise _bad(f"{EVIDENCE_PATH}: HTTP {response.status} with an oversized body")
        refusal = ErrorBody.from_json(body)
        if error_status(refusal.reason) != response.status:
            raise _bad(f"{EVIDENCE_PATH}: HTTP {response.status} for the reason {refusal.reason}")
        error = refusal.exception()
        if refusal.reason is Reason.EVIDENCE_RATE_LIMITED:
            if retry_after is None or re.fullmatch(r"[0-9]{1,6}", retry_after) is None:
                raise _bad(f"{EVIDENCE_PATH}: HTTP 429 without a Retry-After in seconds")
            error.details["retry_after"] = min(int(retry_after), MAX_RETRY_AFTER_S)
            error.hint = f"ask again in {error.details['retry_after']} s"
        raise error

    def events(self, *, idle_timeout: float | None = None) -> EventStream:
        """The event stream: the current state first, then each change, until closed.

        ``idle_timeout`` bounds the wait for the next line (None: wait as long as it takes). The
        stream never just ends: attestd going away is an ``attestd-unavailable`` error, so a
        consumer that stops on errors fails closed.
        """
        conn, response = self._get(EVENTS_PATH, "application/x-ndjson", idle_timeout)
        if response.status != 200:
            response.close()
            conn.close()
            raise _bad(f"{EVENTS_PATH}: HTTP {response.status}")
        return EventStream(self.socket_path, conn, response)


class EventStream(Closable, Iterator[Event]):
    """The lines of ``/v1/events`` as :class:`Event` objects; ``close()`` ends the request.

    ``close()`` may come from another thread while one waits in ``next()``: it shuts the socket
    down, which wakes the reader, and the reader then gives the connection back and stops.
    """

    def __init__(
        self, socket_path: str, conn: _UnixConnection, response: http.client.HTTPResponse
    ) -> None:
        self._socket_path = socket_path
        self._conn = conn
        self._response = response
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False
        self._released = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        while True:
            line = self._readline()
            if not line:
                self.close()
                raise _unavailable(self._socket_path, "the event stream ended")
            if not line.endswith(b"\n"):
                self.close()
                if len(line) > MAX_EVENT_LINE_BYTES:
                    raise _bad(f"{EVENTS_PATH}: a line longer than {MAX_EVENT_LINE_BYTES} bytes")
                raise _bad(f"{EVENTS_PATH}: the stream ended inside a line")
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            if not line:
                continue  # a keep-alive
            try:
                return Event.from_json(line)
            except ServiceError:
                self.close()
                raise

    def _readline(self) -> bytes:
        with self._lock:
            if self._closed:
                raise StopIteration
            self._reading = True
        failure: Exception | None = None
        try:
            line = self._response.readline(MAX_EVENT_LINE_BYTES + 1)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failure, line = exc, b""
        finally:
            with self._lock:
                self._reading = False
                closed = self._closed
        if closed:  # by another thread, while this one read
            self._release()
            raise StopIteration
        if failure is not None:
            self.close()
            if isinstance(failure, OSError):
                raise _os_failure(self._socket_path, failure) from None
            raise _bad(f"{EVENTS_PATH}: broken stream: {type(failure).__name__}") from None
        return line

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        sock = self._conn.unix_sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not reading:  # else the reader releases, once it is out of http.client
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._response.close()
            self._conn.close()
