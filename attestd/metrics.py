"""attestd's Prometheus metrics, served as text on ``GET /metrics``.

Every series lives in the registry of one :class:`Metrics` (its own by default, never the
process-wide one), so that two daemons in one test process do not share counters. The series
(docs/attestd-api.md lists them with their labels):

- ``attestd_state{state}``: 1 for the current state, 0 for the three others;
  ``attestd_state_reason{state,reason}``: 1, one series, the current state and its reason;
- ``attestd_transitions_total{from,to}``: state changes;
- ``attestd_check_duration_seconds{check}``: how long each check took, pass or fail;
- ``attestd_check_failures_total{check,reason}``: failed checks by reason;
- ``attestd_last_success_timestamp_seconds{check}`` and ``attestd_last_success_age_seconds{check}``,
  the age computed when scraped, so an alert needs no clock arithmetic;
- ``attestd_evidence_requests_total{outcome}``: ``/v1/evidence`` answers by outcome;
- ``attestd_ak_cert_days_left`` and ``attestd_token_expiry_timestamp_seconds``, absent until
  first known.

The checks are ``gpu_fast`` (NVML), ``gpu_evidence`` (the GPU verifier), ``vtpm`` (MAA guest
attestation) and ``ak_cert`` (the AK certificate renewal).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from confinfer.attestd_api import State
from confinfer.errors import Reason

CHECKS = ("gpu_fast", "gpu_evidence", "vtpm", "ak_cert")
EVIDENCE_OUTCOMES = ("served", "rate_limited", "refused", "failed")

# From an NVML call (milliseconds) to an nvattest run with slow collateral (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _known(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


class _SuccessAge(Collector):
    """``attestd_last_success_age_seconds{check}``, computed from the clock at each scrape."""

    def __init__(self, last: dict[str, float], clock: Callable[[], float]) -> None:
        self._last = last
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        now = self._clock()
        for check, at in sorted(self._last.items()):
            family.add_metric([check], max(0.0, now - at))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "attestd_last_success_age_seconds",
            "Seconds since each check last passed (absent before its first pass).",
            labels=["check"],
        )


class _Once(Collector):
    """A gauge without labels that is absent until first set, so that "no token yet" does
    not read as "expired in 1970"."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self.value: float | None = None

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class Metrics:
    """The metrics of one attestd; ``clock`` gives the time for the success ages."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._state = Gauge(
            "attestd_state",
            "1 for attestd's current state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self._reason = Gauge(
            "attestd_state_reason",
            "1, labelled with the current state and the reason it carries.",
            ["state", "reason"],
            registry=r,
        )
        self._transitions = Counter(
            "attestd_transitions_total", "State changes.", ["from", "to"], registry=r
        )
        self._duration = Histogram(
            "attestd_check_duration_seconds",
            "How long each check took, pass or fail.",
            ["check"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._failures = Counter(
            "attestd_check_failures_total",
            "Failed checks by reason.",
            ["check", "reason"],
            registry=r,
        )
        self._last_success = Gauge(
            "attestd_last_success_timestamp_seconds",
            "When each check last passed (Unix time).",
            ["check"],
            registry=r,
        )
        self._last: dict[str, float] = {}
        r.register(_SuccessAge(self._last, clock))
        self._evidence = Counter(
            "attestd_evidence_requests_total",
            "Answers to /v1/evidence by outcome.",
            ["outcome"],
            registry=r,
        )
        self._ak_days = _Once(
            "attestd_ak_cert_days_left",
            "Days until the vTPM's AK certificate expires (negative once it has).",
        )
        self._token_expiry = _Once(
            "attestd_token_expiry_timestamp_seconds",
            "When the last MAA token expires (Unix time).",
        )
        r.register(self._ak_days)
        r.register(self._token_expiry)
        # Series that exist from the start, at 0, so that rate() and absent() behave.
        for check in CHECKS:
            self._duration.labels(check)
        for outcome in EVIDENCE_OUTCOMES:
            self._evidence.labels(outcome)
        self.set_state(State.STARTING, Reason.ATTESTD_STARTING)

    def set_state(self, state: State, reason: Reason) -> None:
        for each in State:
            self._state.labels(each.value).set(1 if each is state else 0)
        self._reason.clear()
        self._reason.labels(state.value, reason.value).set(1)

    def transition(self, before: State, after: State) -> None:
        self._transitions.labels(before.value, after.value).inc()

    def check(self, check: str, duration_s: float, reason: Reason | None, now: float) -> None:
        """One check's result: ``reason`` None for a pass at ``now``, else why it failed."""
        _known(check, CHECKS, "check")
        if math.isfinite(duration_s) and duration_s >= 0:
            self._duration.labels(check).observe(duration_s)
        if reason is None:
            self._last_success.labels(check).set(now)
            self._last[check] = now
        else:
            self._failures.labels(check, reason.value).inc()

    def evidence_request(self, outcome: str) -> None:
        self._evidence.labels(_known(outcome, EVIDENCE_OUTCOMES, "outcome")).inc()

    def ak_cert_days_left(self, days: float) -> None:
        self._ak_days.value = float(days)

    def token_expiry(self, expiry: float) -> None:
        self._token_expiry.value = float(expiry)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["CHECKS", "EVIDENCE_OUTCOMES", "Metrics"]
