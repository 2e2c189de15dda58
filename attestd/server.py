"""attestd's HTTP/1.1 server on its Unix socket (docs/attestd-api.md is the protocol).

``GET /v1/health``, ``GET /v1/events``, ``GET /v1/evidence?nonce=HEX`` and ``GET /metrics``,
answered from a :class:`Source` (the daemon). Every request is logged as one line naming its
caller by ``SO_PEERCRED`` (pid, uid, gid), so the journal shows which local process asked.

The socket is bound, given mode 0660 and its group, and only then listened on, so that no
client can connect while it is still open to others. A socket file left by an earlier run is
removed when nothing listens on it; anything else at the path (a regular file, a link, a live
socket) is refused and left as it is.

Evidence is a fresh vTPM attestation with MAA per answer, so it is rate-limited by a token
bucket (``evidence_per_min``, a burst of a tenth of it) and by a cap on answers in flight; a
request over either gets 429 at once and never waits in a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import os
import re
import socket
import stat
import struct
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from attestd.events import EventHub, Subscription
from attestd.metrics import Metrics
from confinfer.attestd_api import (
    EVENTS_PATH,
    EVIDENCE_PATH,
    HEALTH_PATH,
    MAX_NONCE_BYTES,
    METRICS_PATH,
    MIN_NONCE_BYTES,
    ErrorBody,
    Event,
    Evidence,
    Health,
    error_status,
)
from confinfer.errors import ConfigError, ConfinferError, Reason, printable

LOG = logging.getLogger("attestd.server")

SOCKET_MODE = 0o660
KEEPALIVE_S = 15.0  # an empty line on an idle event stream, so a dead peer is noticed
SHUTDOWN_TIMEOUT_S = 5.0  # how long close() lets evidence in flight finish
IDLE_CONNECTION_S = 75.0
CALLER_GONE = 499  # logged (nginx's code) for a request whose caller left before its answer
GONE_NOTE = " (the caller went away)"
_PEERCRED = struct.Struct("3i")
_HEX_NONCE = re.compile(r"[0-9A-Fa-f]+")


class Source(Protocol):
    """What the server answers from: the daemon's state, its metrics and its event hub."""

    metrics: Metrics
    events: EventHub

    def health(self) -> Health: ...

    def current_event(self) -> Event: ...

    async def evidence(self, nonce: bytes) -> Evidence:
        """Fresh evidence bound to ``nonce``; raises :class:`ConfinferError` with a reason
        when it cannot (``evidence-unavailable`` while not healthy). It may be cancelled when
        the caller goes away or the server closes."""
        ...


# --- the token bucket ------------------------------------------------------------------------


class TokenBucket:
    """``per_min`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, per_min: int, burst: int, clock: Callable[[], float]) -> None:
        if per_min < 1 or burst < 1:
            raise ValueError("the evidence rate and its burst must be at least 1")
        self._rate = per_min / 60.0
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


# --- the socket ------------------------------------------------------------------------------


def _socket_error(path: Path, why: str, hint: str | None = None) -> ConfinferError:
    return ConfinferError(
        f"attestd socket {printable(path, 200)}: {why}",
        reason=Reason.ATTESTD_SOCKET,
        details={"socket": str(path)},
        hint=hint,
    )


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"attestd_socket_group: no such group {printable(group, 64)!r}",
            reason=Reason.CONFIG_INVALID,
            details={"key": "attestd_socket_group"},
        ) from None


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        return False
    except OSError as exc:
        raise _socket_error(path, f"cannot tell whether it is in use: {exc.strerror}") from None
    finally:
        probe.close()
    return True


def _clear_stale(path: Path) -> None:
    """Remove a socket left at ``path`` by an earlier run; refuse anything else there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _socket_error(path, f"cannot inspect it: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise _socket_error(
            path,
            f"the path is {kind}; it is left as it is",
            hint="remove it by hand if it is not needed, or set attestd_socket",
        )
    if _listening(path):
        raise _socket_error(
            path, "another process listens on it", hint="is another attestd running?"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _socket_error(path, f"cannot remove the stale socket: {exc.strerror}") from None
    LOG.info("removed a stale socket at %s", path)


def _bind(path: Path, gid: int | None) -> tuple[socket.socket, tuple[int, int]]:
    """A socket bound at ``path`` with mode 0660 (and group ``gid``), not yet listening, and
    the file's (device, inode) to recognise it by when it is removed."""
    if not path.parent.is_dir():
        raise _socket_error(
            path,
            f"no directory {printable(path.parent, 200)}",
            hint="attestd.service creates it (RuntimeDirectory=attestd); else set attestd_socket",
        )
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        sock.bind(str(path))
        bound = True
        os.chmod(path, SOCKET_MODE)
        if gid is not None:
            os.chown(path, -1, gid)
        info = os.lstat(path)
    except OSError as exc:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise _socket_error(path, printable(exc.strerror or exc, 200)) from None
    sock.setblocking(False)
    return sock, (info.st_dev, info.st_ino)


def _peer(request: web.BaseRequest) -> str:
    """``pid=… uid=… gid=…`` of the process at the other end of the socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return "pid=? uid=? gid=?"
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
    except (OSError, struct.error):
        return "pid=? uid=? gid=?"
    return f"pid={pid} uid={uid} gid={gid}"


# --- answers ---------------------------------------------------------------------------------

_NO_STORE = {"Cache-Control": "no-store"}


class _Refusal(Exception):
    """A request answered with an :class:`ErrorBody`."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = error_status(reason) if status is None else status
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.Response(
            text=ErrorBody(self.message, self.reason).to_json(),
            status=self.status,
            content_type="application/json",
            headers={**_NO_STORE, **self.headers},
        )


def _nonce(query: list[tuple[str, str]]) -> bytes:
    """The nonce of ``?nonce=HEX``: the only parameter, given once."""
    unknown = sorted({key for key, _ in query} - {"nonce"})
    if unknown:
        raise _Refusal(Reason.USAGE, f"unknown query parameter {printable(unknown[0], 40)!r}")
    values = [value for _, value in query]
    if len(values) != 1:
        raise _Refusal(Reason.USAGE, "give exactly one nonce: ?nonce=HEX")
    text = values[0]
    if (
        _HEX_NONCE.fullmatch(text) is None
        or len(text) % 2
        or not MIN_NONCE_BYTES <= len(text) // 2 <= MAX_NONCE_BYTES
    ):
        raise _Refusal(
            Reason.USAGE,
            f"the nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes in hex",
        )
    return bytes.fromhex(text)


@dataclass
class _Log:
    """What one request's log line says beyond its method, path and status."""

    status: int = 0  # none yet
    note: str = ""


_LOG_KEY = web.RequestKey("attestd_log", _Log)


class Server:
    """A listening attestd socket; :meth:`close` stops it and removes the socket file."""

    def __init__(
        self,
        source: Source,
        path: Path,
        *,
        evidence_per_min: int,
        keepalive_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._source = source
        self._keepalive_s = keepalive_s
        self._per_min = evidence_per_min
        burst = max(1, evidence_per_min // 10)
        self._bucket = TokenBucket(evidence_per_min, burst, clock)
        self._max_in_flight = burst
        self._in_flight = 0
        self._streams: set[Subscription] = set()
        self._closing = False
        self._identity: tuple[int, int] | None = None
        self._runner: web.AppRunner | None = None
        self._health_body: tuple[Health, bytes] | None = None
        # Each connection's caller, read once (SO_PEERCRED names the process that connected).
        self._callers: weakref.WeakKeyDictionary[asyncio.BaseTransport, str] = (
            weakref.WeakKeyDictionary()
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get(HEALTH_PATH, self._health, allow_head=False)
        app.router.add_get(EVENTS_PATH, self._events, allow_head=False)
        app.router.add_get(EVIDENCE_PATH, self._evidence, allow_head=False)
        app.router.add_get(METRICS_PATH, self._metrics, allow_head=False)
        return app

    async def _listen(self, sock: socket.socket, identity: tuple[int, int]) -> None:
        self._identity = identity
        runner = web.AppRunner(
            self.app(),
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            access_log=None,  # the middleware logs each request, with its caller
            handler_cancellation=True,  # a caller that goes away ends its request
            keepalive_timeout=IDLE_CONNECTION_S,
            tcp_keepalive=False,
        )
        self._runner = runner
        await runner.setup()
        await web.SockSite(runner, sock).start()

    @property
    def streams(self) -> int:
        """Event streams open now."""
        return len(self._streams)

    async def close(self) -> None:
        """Stop accepting, end every event stream, let evidence in flight finish (a few
        seconds at most), and remove the socket file if it is still ours."""
        if self._closing:
            return
        self._closing = True
        for subscription in list(self._streams):
            subscription.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self._unlink()

    def _unlink(self) -> None:
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # --- the middleware: methods, errors, one log line -------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        line = _Log()
        request[_LOG_KEY] = line
        # Now: once the caller has gone, the socket has too.
        transport = request.transport
        caller = self._callers.get(transport) if transport is not None else None
        first = caller is None
        if caller is None:
            caller = _peer(request)
            if transport is not None:
                self._callers[transport] = caller
        try:
            if request.method != "GET":
                raise _Refusal(
                    Reason.USAGE,
                    f"method {printable(request.method, 20)} not allowed; only GET",
                    status=405,
                    headers={"Allow": "GET"},
                )
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                raise _Refusal(
                    Reason.USAGE, f"no such path {printable(request.path, 100)!r}", status=404
                ) from None
            except web.HTTPMethodNotAllowed:
                raise _Refusal(
                    Reason.USAGE, "only GET", status=405, headers={"Allow": "GET"}
                ) from None
            line.status = response.status
            return response
        except _Refusal as refusal:
            line.status = refusal.status
            line.note = line.note or f" reason={refusal.reason}"
            return refusal.response()
        except asyncio.CancelledError:
            if not line.status:
                line.status = CALLER_GONE
            if not line.note.endswith(GONE_NOTE):
                line.note += GONE_NOTE
            raise
        except Exception:
            LOG.exception("internal error answering %s", printable(request.path, 100))
            line.status = 500
            line.note = f" reason={Reason.ERROR}"
            return _Refusal(Reason.ERROR, "internal error", status=500).response()
        finally:
            level = self._level(request.path, line.status, first)
            if LOG.isEnabledFor(level):
                LOG.log(
                    level,
                    "%s %s %d %s%s",
                    printable(request.method, 20),
                    printable(request.path, 100),
                    line.status,
                    caller,
                    line.note,
                )

    @staticmethod
    def _level(path: str, status: int, first: bool) -> int:
        """Every caller is logged on its connection's first request; after that the routine
        polls (a health or metrics answer) only at debug, so a probe every second does not
        flood the journal. Evidence, events, refusals and errors are always logged."""
        if status == 500:
            return logging.WARNING
        if not first and path in (HEALTH_PATH, METRICS_PATH) and status in (200, 503):
            return logging.DEBUG
        return logging.INFO

    # --- the routes ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        health = self._source.health()
        cached = self._health_body
        if cached is None or cached[0] is not health:  # the source hands out one per change
            cached = self._health_body = (health, health.to_json().encode("utf-8"))
        return web.Response(
            body=cached[1],
            status=health.http_status,
            content_type="application/json",
            headers=_NO_STORE,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._source.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type, **_NO_STORE})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            raise _Refusal(Reason.ATTESTD_UNAVAILABLE, "attestd is stopping")
        # Subscribed before the first await, so close() cannot miss this stream.
        subscription = self._source.events.subscribe(self._source.current_event())
        self._streams.add(subscription)
        line = request[_LOG_KEY]
        sent = 0
        ended = ""
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", **_NO_STORE})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            line.status = response.status
            events = aiter(subscription)
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), self._keepalive_s)
                except TimeoutError:
                    await response.write(b"\n")
                    continue
                except StopAsyncIteration:
                    break
                await response.write(event.to_json().encode("utf-8") + b"\n")
                sent += 1
            if subscription.overflowed:
                ended = " (dropped: it fell behind)"
            await response.write_eof()
        except ConnectionResetError:
            ended = GONE_NOTE
        finally:
            subscription.close()
            self._streams.discard(subscription)
            line.note = f" events={sent}{ended}"
        return response

    async def _evidence(self, request: web.Request) -> web.Response:
        metrics = self._source.metrics
        try:
            nonce = _nonce(list(request.query.items()))
        except _Refusal:
            metrics.evidence_request("refused")
            raise
        wait = 1.0 if self._in_flight >= self._max_in_flight else self._bucket.take()
        if wait > 0:
            metrics.evidence_request("rate_limited")
            # A whole second at least; a rounding error never adds one.
            retry_after = str(max(1, math.ceil(wait - 1e-6)))
            raise _Refusal(
                Reason.EVIDENCE_RATE_LIMITED,
                f"evidence is limited to {self._per_min} a minute; ask again in {retry_after} s",
                headers={"Retry-After": retry_after},
            )
        self._in_flight += 1
        try:
            evidence = await self._source.evidence(nonce)
        except ConfinferError as exc:
            outcome = "refused" if exc.reason is Reason.EVIDENCE_UNAVAILABLE else "failed"
            metrics.evidence_request(outcome)
            raise _Refusal(exc.reason, exc.message) from None
        except Exception:
            metrics.evidence_request("failed")
            raise
        finally:
            self._in_flight -= 1
        metrics.evidence_request("served")
        return web.Response(
            text=evidence.to_json(),
            content_type="application/json",
            headers=_NO_STORE,
        )


async def start(
    source: Source,
    path: Path,
    *,
    group: str | None,
    evidence_per_min: int,
    keepalive_s: float = KEEPALIVE_S,
    clock: Callable[[], float] = time.monotonic,
) -> Server:
    """Serve ``source`` on the Unix socket ``path``; returns once it listens.

    ``group``: the socket's group (None: attestd's own). ``evidence_per_min``: the evidence
    rate. ``keepalive_s`` and ``clock`` (the rate limit's, monotonic) are for tests.
    """
    gid = _group_id(group) if group is not None else None
    server = Server(
        source, path, evidence_per_min=evidence_per_min, keepalive_s=keepalive_s, clock=clock
    )
    sock, identity = _bind(path, gid)
    try:
        await server._listen(sock, identity)
    except BaseException:
        sock.close()
        await server.close()
        raise
    LOG.info("listening on %s (mode %04o)", path, SOCKET_MODE)
    return server


__all__ = ["KEEPALIVE_S", "SOCKET_MODE", "Server", "Source", "TokenBucket", "start"]
