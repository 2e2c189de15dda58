"""Fault knobs that the services consult on every request.

A fault is armed for one service with a count (how many requests it affects; -1 = until
cleared): an HTTP status to answer instead of the real reply (with an optional Retry-After),
added latency, or "down" (the connection is closed without an answer). The control plane
(``python -m testbed fault ...``) edits a JSON file; services re-read it when it changes, so
a knob set from another process takes effect on the next request.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

# The services' own knobs, then the narrower ones: "ak-renew" (IMDS's AK-certificate renewal
# route only), "kv-release" (Key Vault release answers only; adds foreign_signer) and
# "azureattestskr" (the stand-in AzureAttestSKR tool: status = the release's HTTP status,
# down = a transport failure, latency = a sleep); "nvattest" (the stand-in nvattest: inject =
# an evidence or OCSP-answer fault, latency = a sleep), "nvattest-rim" and "nvattest-ocsp" (the
# RIM service and OCSP responder as that tool sees them: down, status, latency).
SERVICES = (
    "imds",
    "maa",
    "keyvault",
    "ak-renew",
    "kv-release",
    "azureattestskr",
    "nvattest",
    "nvattest-rim",
    "nvattest-ocsp",
)


@dataclass
class Fault:
    status: int | None = None  # answer this HTTP status instead of the real reply
    retry_after: int | None = None  # seconds, sent as Retry-After with the status
    latency_s: float = 0.0  # sleep before answering
    down: bool = False  # drop the connection without an answer
    count: int = -1  # requests affected; -1 = until cleared
    foreign_signer: bool = False  # kv-release: sign with a valid certificate for another host
    inject: str | None = None  # nvattest: nonce-mismatch, bad-signature, ocsp-revoked, ...


class Faults:
    """Armed faults, persisted in one JSON file shared by the control plane and the services."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime_ns = -1
        self._armed: dict[str, Fault] = {}

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._armed, self._mtime_ns = {}, -1
            return
        if mtime == self._mtime_ns:
            return
        data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        self._armed = {name: Fault(**spec) for name, spec in data.items()}
        self._mtime_ns = mtime

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self._armed.items()}), "utf-8")
        os.replace(tmp, self.path)
        self._mtime_ns = self.path.stat().st_mtime_ns

    def arm(self, service: str, fault: Fault) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
        with self._lock:
            self._reload()
            self._armed[service] = fault
            self._save()

    def clear(self, service: str | None = None) -> None:
        with self._lock:
            self._reload()
            if service is None:
                self._armed.clear()
            else:
                self._armed.pop(service, None)
            self._save()

    def take(self, service: str) -> Fault | None:
        """The fault to apply to this request, if any; consumes one of its count."""
        with self._lock:
            self._reload()
            fault = self._armed.get(service)
            if fault is None:
                return None
            if fault.count > 0:
                fault.count -= 1
                if fault.count == 0:
                    del self._armed[service]
                self._save()
            return fault
