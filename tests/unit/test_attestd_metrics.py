"""attestd's metrics: the named series, their labels and values, parsed from the text
exposition as a scraper reads it."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from attestd.metrics import CHECKS, EVIDENCE_OUTCOMES, Metrics
from confinfer.attestd_api import State
from confinfer.errors import Reason

pytestmark = pytest.mark.unit

Labels = tuple[tuple[str, str], ...]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[str, dict[Labels, float]]:
    """Sample name → (sorted labels → value), from the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_a_registry_of_its_own_never_the_global_one() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not REGISTRY
    assert first.registry is not second.registry
    first.transition(State.STARTING, State.HEALTHY)
    assert "attestd_transitions_total" not in samples(second)
    assert REGISTRY.get_sample_value("attestd_state", {"state": "starting"}) is None
    registry = CollectorRegistry()
    assert Metrics(registry).registry is registry


def test_state_is_one_for_the_current_and_zero_for_the_others() -> None:
    metrics = Metrics()
    assert samples(metrics)["attestd_state"] == {
        (("state", "starting"),): 1.0,
        (("state", "healthy"),): 0.0,
        (("state", "degraded"),): 0.0,
        (("state", "revoked"),): 0.0,
    }
    metrics.set_state(State.DEGRADED, Reason.MAA_UNAVAILABLE)
    metrics.set_state(State.REVOKED, Reason.GPU_CC_OFF)
    got = samples(metrics)
    assert got["attestd_state"] == {
        (("state", "starting"),): 0.0,
        (("state", "healthy"),): 0.0,
        (("state", "degraded"),): 0.0,
        (("state", "revoked"),): 1.0,
    }
    # One reason series only: the current one.
    assert got["attestd_state_reason"] == {(("reason", "gpu-cc-off"), ("state", "revoked")): 1.0}


def test_transitions_are_counted_from_and_to() -> None:
    metrics = Metrics()
    metrics.transition(State.STARTING, State.HEALTHY)
    metrics.transition(State.HEALTHY, State.DEGRADED)
    metrics.transition(State.DEGRADED, State.HEALTHY)
    metrics.transition(State.HEALTHY, State.DEGRADED)
    assert samples(metrics)["attestd_transitions_total"] == {
        (("from", "starting"), ("to", "healthy")): 1.0,
        (("from", "healthy"), ("to", "degraded")): 2.0,
        (("from", "degraded"), ("to", "healthy")): 1.0,
    }


def test_a_pass_sets_its_timestamp_and_the_age_is_computed_when_scraped() -> None:
    clock = Clock(10_000.0)
    metrics = Metrics(clock=clock)
    assert "attestd_last_success_age_seconds" not in samples(metrics)  # no pass yet
    metrics.check("vtpm", 1.25, None, now=9_990.0)
    metrics.check("gpu_evidence", 40.0, None, now=9_000.0)
    got = samples(metrics)
    assert got["attestd_last_success_timestamp_seconds"] == {
        (("check", "vtpm"),): 9_990.0,
        (("check", "gpu_evidence"),): 9_000.0,
    }
    assert got["attestd_last_success_age_seconds"] == {
        (("check", "gpu_evidence"),): 1_000.0,
        (("check", "vtpm"),): 10.0,
    }
    clock.now += 50  # no new check: the age still grows
    assert samples(metrics)["attestd_last_success_age_seconds"][(("check", "vtpm"),)] == 60.0


def test_durations_for_every_check_and_failures_by_reason() -> None:
    metrics = Metrics()
    metrics.check("gpu_fast", 0.02, Reason.GPU_CC_OFF, now=1.0)
    metrics.check("gpu_fast", 0.03, Reason.GPU_CC_OFF, now=2.0)
    metrics.check("vtpm", 3.0, Reason.MAA_UNAVAILABLE, now=3.0)
    metrics.check("ak_cert", 0.5, None, now=4.0)
    got = samples(metrics)
    assert got["attestd_check_failures_total"] == {
        (("check", "gpu_fast"), ("reason", "gpu-cc-off")): 2.0,
        (("check", "vtpm"), ("reason", "maa-unavailable")): 1.0,
    }
    counts = got["attestd_check_duration_seconds_count"]
    assert counts == {
        (("check", "gpu_fast"),): 2.0,
        (("check", "gpu_evidence"),): 0.0,
        (("check", "vtpm"),): 1.0,
        (("check", "ak_cert"),): 1.0,
    }
    assert got["attestd_check_duration_seconds_sum"][(("check", "gpu_fast"),)] == pytest.approx(
        0.05
    )
    buckets = got["attestd_check_duration_seconds_bucket"]
    assert buckets[(("check", "vtpm"), ("le", "2.5"))] == 0.0
    assert buckets[(("check", "vtpm"), ("le", "5.0"))] == 1.0
    assert buckets[(("check", "vtpm"), ("le", "+Inf"))] == 1.0
    # A failure sets no success time.
    assert set(got["attestd_last_success_timestamp_seconds"]) == {(("check", "ak_cert"),)}


def test_unknown_checks_and_outcomes_are_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="unknown check"):
        metrics.check("gpu", 1.0, None, now=1.0)
    with pytest.raises(ValueError, match="unknown outcome"):
        metrics.evidence_request("ok")
    assert set(CHECKS) == {"gpu_fast", "gpu_evidence", "vtpm", "ak_cert"}


def test_evidence_requests_by_outcome_start_at_zero() -> None:
    metrics = Metrics()
    assert samples(metrics)["attestd_evidence_requests_total"] == {
        (("outcome", outcome),): 0.0 for outcome in EVIDENCE_OUTCOMES
    }
    metrics.evidence_request("served")
    metrics.evidence_request("served")
    metrics.evidence_request("rate_limited")
    metrics.evidence_request("refused")
    metrics.evidence_request("failed")
    assert samples(metrics)["attestd_evidence_requests_total"] == {
        (("outcome", "served"),): 2.0,
        (("outcome", "rate_limited"),): 1.0,
        (("outcome", "refused"),): 1.0,
        (("outcome", "failed"),): 1.0,
    }


def test_ak_certificate_days_and_token_expiry() -> None:
    metrics = Metrics()
    got = samples(metrics)
    # Unknown until set: absent, never a 0 that reads as long expired.
    assert "attestd_ak_cert_days_left" not in got
    assert "attestd_token_expiry_timestamp_seconds" not in got
    metrics.ak_cert_days_left(42.5)
    metrics.token_expiry(1_764_028_800.0)
    got = samples(metrics)
    assert got["attestd_ak_cert_days_left"] == {(): 42.5}
    assert got["attestd_token_expiry_timestamp_seconds"] == {(): 1_764_028_800.0}
    metrics.ak_cert_days_left(-1.0)  # expired
    assert samples(metrics)["attestd_ak_cert_days_left"] == {(): -1.0}


def test_the_text_names_each_series_with_help_and_type() -> None:
    metrics = Metrics()
    metrics.transition(State.STARTING, State.HEALTHY)
    metrics.check("vtpm", 1.0, Reason.MAA_UNAVAILABLE, now=1.0)
    metrics.check("vtpm", 1.0, None, now=2.0)
    metrics.ak_cert_days_left(30.0)
    metrics.token_expiry(3.0)
    text = metrics.render()[0].decode()
    for name, kind in [
        ("attestd_state", "gauge"),
        ("attestd_state_reason", "gauge"),
        ("attestd_transitions_total", "counter"),
        ("attestd_check_duration_seconds", "histogram"),
        ("attestd_check_failures_total", "counter"),
        ("attestd_last_success_timestamp_seconds", "gauge"),
        ("attestd_last_success_age_seconds", "gauge"),
        ("attestd_evidence_requests_total", "counter"),
        ("attestd_ak_cert_days_left", "gauge"),
        ("attestd_token_expiry_timestamp_seconds", "gauge"),
    ]:
        # Counters' families are named with or without _total, by prometheus_client version.
        names = {name, name.removesuffix("_total")}
        assert any(f"# TYPE {n} {kind}\n" in text for n in names), name
        assert any(f"# HELP {n} " in text for n in names), name
        assert f"\n{name}" in text  # a sample
