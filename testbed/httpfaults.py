"""The aiohttp middleware that applies a service's fault knobs (testbed.faults) to each request.

Order per request: added latency first, then either a dropped connection (``down``: the socket
is aborted, the client sees the peer disconnect with no answer) or an HTTP status with the
service's own error body (and ``Retry-After`` when set); otherwise the request is served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from testbed.faults import Faults


def middleware(faults: Faults | None, service: str, error_body: Callable[[int], Any]) -> Middleware:
    """A middleware that consults ``faults`` for ``service`` on every request."""

    @web.middleware
    async def apply_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = faults.take(service) if faults is not None else None
        if fault is None:
            return await handler(request)
        if fault.latency_s > 0:
            await asyncio.sleep(fault.latency_s)
        if fault.down:
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()  # never reaches the client: the socket is gone
        if fault.status is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else None
            return web.json_response(error_body(fault.status), status=fault.status, headers=headers)
        return await handler(request)

    return apply_faults
