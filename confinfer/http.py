"""The one HTTP layer: every request to MAA, IMDS, a JWKS endpoint or Key Vault goes through here.

One policy for all of them:

- **A total deadline per attempt.** ``http_timeout_s`` bounds the whole exchange: connect, TLS,
  headers and body. A per-read timeout alone lets a server that drips one byte a second hold a
  request forever, so a timer shuts the attempt's sockets down when the deadline passes.
- **Capped bodies.** At most ``http_max_response_bytes`` are read from any answer; a larger one
  (declared or actual) is refused without reading the rest.
- **Bounded retries with one Retry-After rule.** 408, 429 and 5xx answers and connection
  failures are retried up to ``max_retries`` times, with jittered exponential backoff (0.5 s,
  1 s, 2 s ... at most 8 s) or what ``Retry-After`` asks for. A server asking for more than
  :data:`RETRY_AFTER_CAP_S` is not waited for: the request fails at once, saying when to retry.
  Callers use this only for requests that are safe to repeat (all of ours are: attestation,
  token and key reads, key release, wrap and unwrap have no side effects).
- **TLS** is verified against ``ca_bundle`` (or the system store); a TLS failure is never
  retried. Redirects are never followed.

Failures are :class:`~confinfer.errors.ServiceError` with the service's own reasons
(:class:`Service`); an answer that is not retryable is returned for the caller to judge.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from confinfer.closable import Closable
from confinfer.config import Config
from confinfer.errors import Reason, ServiceError, printable

LOG = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 30.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Service:
    """A remote service as messages and reasons name it."""

    name: str
    unavailable: Reason
    tls: Reason


MAA = Service("maa", Reason.MAA_UNAVAILABLE, Reason.MAA_TLS)
IMDS = Service("imds", Reason.IMDS_UNAVAILABLE, Reason.IMDS_TLS)
JWKS = Service("jwks", Reason.TOKEN_JWKS_UNAVAILABLE, Reason.MAA_TLS)
KEYVAULT = Service("keyvault", Reason.KEYVAULT_UNAVAILABLE, Reason.KEYVAULT_TLS)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer read whole (within the size cap)."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not (deep nesting included)."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(str(exc)) from None


# --- the deadline --------------------------------------------------------------------------


@dataclass
class _Deadline:
    seconds: float
    sockets: list[socket.socket] = field(default_factory=list)
    expired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self.lock:
            if self.expired:
                _shut(sock)
            elif sock not in self.sockets:
                self.sockets.append(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing left to stop


_CURRENT = threading.local()


def _watch(conn: HTTPConnection) -> None:
    deadline: _Deadline | None = getattr(_CURRENT, "deadline", None)
    if deadline is not None:
        deadline.watch(conn.sock)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)  # a kept-alive connection is reused without connect()
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


@contextmanager
def _deadline(seconds: float) -> Iterator[_Deadline]:
    deadline = _Deadline(seconds)
    timer = threading.Timer(seconds, deadline.expire)
    timer.daemon = True
    _CURRENT.deadline = deadline
    timer.start()
    try:
        yield deadline
    finally:
        timer.cancel()
        _CURRENT.deadline = None


# --- retries ---------------------------------------------------------------------------------


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 10:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int) -> float:
    """The wait before retry ``attempt + 1``: exponential, with jitter."""
    # Jitter keeps a fleet of VMs that lost a service at once from retrying in lockstep.
    jitter = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not a secret
    return jitter * min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**attempt)


class Http(Closable):
    """A session with the policy above. Not shared between threads; cheap to make."""

    def __init__(self, cfg: Config, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._cfg = cfg
        self._sleep = sleep
        self._session = requests.Session()
        self._session.trust_env = False  # proxies and netrc from the environment: no
        adapter = _Adapter()
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    def close(self) -> None:
        self._session.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        service: Service,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        """Send, retrying as the module says; the first answer that is not retried."""
        attempts = self._cfg.max_retries + 1
        last = "no attempt"
        for attempt in range(attempts):
            try:
                reply = self._once(method, url, service, headers, body)
            except _Retryable as exc:
                last, wait = str(exc), backoff(attempt)
            else:
                if reply.status not in RETRY_STATUSES:
                    return reply
                last = f"HTTP {reply.status}"
                asked = retry_after(reply.headers.get("Retry-After"))
                if asked is not None and asked > RETRY_AFTER_CAP_S:
                    raise ServiceError(
                        f"{service.name} at {url}: {last}, asked to retry in {asked:.0f} s",
                        reason=service.unavailable,
                        hint=f"the service is throttling; retry in {asked:.0f} s",
                    )
                wait = asked if asked is not None else backoff(attempt)
            if attempt + 1 < attempts:
                LOG.info(
                    "%s: %s; retry %d/%d in %.1f s",
                    service.name,
                    last,
                    attempt + 1,
                    attempts - 1,
                    wait,
                )
                self._sleep(wait)
        raise ServiceError(
            f"{service.name} at {url}: {last} after {attempts} attempt(s)",
            reason=service.unavailable,
        )

    def _once(
        self,
        method: str,
        url: str,
        service: Service,
        headers: Mapping[str, str] | None,
        body: bytes | None,
    ) -> Reply:
        cfg = self._cfg
        cap = cfg.http_max_response_bytes
        with _deadline(cfg.http_timeout_s) as deadline:
            try:
                answer = self._session.request(
                    method,
                    url,
                    headers=dict(headers or {}),
                    data=body,
                    timeout=cfg.http_timeout_s,
                    allow_redirects=False,
                    stream=True,
                    verify=str(cfg.ca_bundle) if cfg.ca_bundle else True,
                )
                with answer:
                    declared = answer.headers.get("Content-Length", "")
                    if declared.isascii() and declared.isdigit() and int(declared) > cap:
                        raise _too_large(service, url, cap)
                    data = bytearray()
                    for chunk in answer.iter_content(_CHUNK):
                        data += chunk
                        if len(data) > cap:
                            raise _too_large(service, url, cap)
                    if deadline.expired:
                        # Cut off where a closed connection may legally end a body: not an
                        # answer, however complete it looks.
                        raise _Retryable(f"no complete answer within {cfg.http_timeout_s:g} s")
                    return Reply(url, answer.status_code, answer.headers, bytes(data))
            except requests.exceptions.SSLError as exc:
                if deadline.expired:
                    raise _Retryable(f"no answer within {cfg.http_timeout_s:g} s") from None
                raise ServiceError(
                    f"{service.name} at {url}: TLS verification failed "
                    f"({printable(_ssl_reason(exc), 200)})",
                    reason=service.tls,
                    hint="set ca_bundle (CONFINFER_CA_BUNDLE) to the CA that issued its "
                    "certificate",
                ) from None
            except requests.RequestException as exc:
                if deadline.expired:
                    raise _Retryable(
                        f"no complete answer within {cfg.http_timeout_s:g} s"
                    ) from None
                raise _Retryable(exc.__class__.__name__) from None


class _Retryable(Exception):
    """One attempt failed in a way worth another (connection failure, deadline)."""


def _too_large(service: Service, url: str, cap: int) -> ServiceError:
    return ServiceError(
        f"{service.name} at {url}: the answer is larger than {cap} bytes; refused",
        reason=Reason.RESPONSE_TOO_LARGE,
        hint="raise http_max_response_bytes only if this service is known to answer that much",
    )


def _ssl_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "hostname"):
        if marker in text:
            start = text.find(marker)
            return text[start : start + 120].split("'")[0].split('"')[0].rstrip(" ()")
    return exc.__class__.__name__


def error_text(reply: Reply) -> str:
    """A service's ``{"error": {"code", "message"}}`` as one line (or the start of the body)."""
    try:
        body = reply.json()
    except ValueError:
        text = reply.body[:300].decode("utf-8", errors="replace")
        return printable(" ".join(text.split()), 300) or f"HTTP {reply.status}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        inner = error.get("innererror")
        code = inner.get("code") if isinstance(inner, dict) and inner.get("code") else None
        parts = [p for p in (code or error.get("code"), error.get("message")) if p]
        return printable(": ".join(str(p) for p in parts), 500) or f"HTTP {reply.status}"
    if isinstance(error, str):
        described = body.get("error_description")
        return printable(f"{error}: {described}" if described else error, 500)
    return f"HTTP {reply.status}"
