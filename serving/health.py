"""The engine's readiness probe: ``GET http://127.0.0.1:<port>/health``.

vLLM's OpenAI server answers ``/v1/models`` as soon as its HTTP server is up, before the model
is loaded; ``/health`` answers 200 only once the engine can serve, so readiness comes from it
alone. The probe is a loopback request with one socket timeout (connect and each read), a
capped body and no retries: the supervisor's loops decide what a failure means. It is not a
client of a remote service, so confinfer.http's retry and TLS policy does not apply.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass

from serving.container import LISTEN_HOST

PROBE_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 4096


@dataclass(frozen=True)
class Probe:
    """One probe's result: ``ok`` only for HTTP 200; ``detail`` says what came back instead."""

    ok: bool
    detail: str


def probe(port: int, *, host: str = LISTEN_HOST, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Ask the engine's ``/health`` once."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        response = conn.getresponse()
        response.read(MAX_BODY_BYTES)
        if response.status == 200:
            return Probe(True, "200")
        return Probe(False, f"HTTP {response.status}")
    except (OSError, http.client.HTTPException) as exc:
        return Probe(False, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
