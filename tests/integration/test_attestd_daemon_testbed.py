"""attestd run for real against the testbed (swtpm vTPM, MAA, IMDS, the fake NVML, the stand-in
nvattest): every transition driven through the testbed's own knobs, asserted on the socket
(health, events, evidence, metrics), on the sd_notify messages and on the GPU ready state.

One daemon serves the module: each test breaks one thing, watches the state it causes, puts
the testbed back and waits for ``healthy`` again, so the way back (a new full pass) is tested
by every test too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from confinfer.attestd_api import Event, Evidence, State
from confinfer.errors import Reason, ServiceError
from tests.attestd_proc import Attestd, gpu_state, running, wait_for
from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Events:
    """The daemon's event stream, read in a thread into a list."""

    def __init__(self, daemon: Attestd) -> None:
        self.stream = daemon.client.events()
        self.items: list[Event] = []
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.items.append(event)
        except ServiceError as exc:
            self.error = exc

    def since(self, index: int) -> list[Event]:
        return self.items[index:]

    def close(self) -> None:
        self.stream.close()
        self._thread.join(10)


@pytest.fixture(scope="module")
def tls_key(testbed: RunningTestbed) -> Path:
    """A certificate standing in for Caddy's: the testbed vault's TLS certificate."""
    certs = sorted((testbed.dir / "pki").rglob("*.pem"))
    for path in certs:
        text = path.read_text(encoding="ascii", errors="replace")
        if "BEGIN CERTIFICATE" in text:
            return path
    raise AssertionError(f"no certificate under {testbed.dir / 'pki'}")


@pytest.fixture(scope="module")
def daemon(testbed: RunningTestbed, tls_key: Path) -> Iterator[Attestd]:
    env = {**testbed.env, "CONFINFER_EVIDENCE_TLS_KEY": str(tls_key)}
    with running(env) as started:
        yield started


@pytest.fixture(scope="module")
def events(daemon: Attestd) -> Iterator[Events]:
    daemon.wait_state(State.HEALTHY)
    stream = Events(daemon)
    yield stream
    stream.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels``
    (a counter split by other labels adds up), or None when there is none."""
    values = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'([a-zA-Z_]+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            values.append(float(match.group(3)))
    return sum(values) if values else None


def test_ready_only_after_the_first_full_pass(daemon: Attestd, testbed: RunningTestbed) -> None:
    health = daemon.wait_state(State.HEALTHY, "attestd-healthy")
    assert health.last_gpu_pass is not None and health.last_vtpm_pass is not None
    assert health.token_expiry is not None and health.token_expiry > health.last_vtpm_pass
    assert health.ak_cert_expiry is not None
    assert health.gpus.count == health.gpus.expected == 1
    assert [(g.cc, g.ready) for g in health.gpus.devices] == [(True, True)] or wait_for(
        "the ready state in health", lambda: daemon.health().gpus.devices[0].ready or None, 10
    )
    messages = daemon.notify.snapshot()
    ready_at = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
    before = [m["STATUS"] for m in messages[:ready_at] if "STATUS" in m]
    assert before and all(line.startswith("starting (") for line in before)
    assert messages[ready_at]["STATUS"].startswith("healthy (attestd-healthy): attested")
    assert any(m.get("WATCHDOG") == "1" for m in daemon.notify.snapshot())
    wait_for("the GPU ready state", lambda: gpu_state(testbed.dir).get("ready") == "1" or None)
    assert "state=healthy reason=attestd-healthy from=starting/" in daemon.log()


def test_health_answers_200_and_metrics_name_the_state(daemon: Attestd) -> None:
    daemon.wait_state(State.HEALTHY)
    status, body, headers = daemon.get("/v1/health")
    assert status == 200 and json.loads(body)["state"] == "healthy"
    assert headers["Content-Type"].startswith("application/json")
    text = daemon.metrics()
    assert metric(text, "attestd_state", state="healthy") == 1.0
    assert metric(text, "attestd_state", state="revoked") == 0.0
    assert (metric(text, "attestd_transitions_total", to="healthy") or 0) >= 1
    for check in ("gpu_fast", "gpu_evidence", "vtpm"):
        assert metric(text, "attestd_last_success_timestamp_seconds", check=check), check


def break_and_recover(
    daemon: Attestd,
    events: Events,
    testbed: RunningTestbed,
    breaks: list[str],
    restores: list[str],
    reason: Reason,
    state: State = State.REVOKED,
) -> None:
    daemon.wait_state(State.HEALTHY)
    mark = len(events.items)
    transitions = daemon.metrics()
    before = metric(transitions, "attestd_transitions_total", **{"to": state.value}) or 0.0
    try:
        testbed.cli(*breaks)
        health = daemon.wait_state(state, reason)
        assert daemon.client.health().http_status == 503
        status, body, _ = daemon.get("/v1/health")
        assert status == 503 and json.loads(body)["reason"] == reason
        event = wait_for(
            f"a {state} event",
            lambda: next((e for e in events.since(mark) if e.state is state), None),
            10,
        )
        assert event.reason == reason and event.previous is State.HEALTHY
        assert health.line and "\n" not in health.line
        text = daemon.metrics()
        assert metric(text, "attestd_state", state=state.value) == 1.0
        assert (metric(text, "attestd_transitions_total", to=state.value) or 0.0) > before
        if state is State.REVOKED and reason is Reason.GPU_CC_OFF:
            # With CC off NVML has no ready state to clear (NOT_SUPPORTED): attestd says so.
            wait_for(
                "the ready state refused",
                lambda: "cannot clear the GPU ready state" in daemon.log() or None,
                10,
            )
        elif state is State.REVOKED:
            wait_for(
                "the ready state cleared",
                lambda: gpu_state(testbed.dir).get("ready") == "0" or None,
                10,
            )
        if state is State.REVOKED:
            with pytest.raises(ServiceError) as refused:
                daemon.client.evidence(b"\x01" * 32)
            assert refused.value.reason is Reason.EVIDENCE_UNAVAILABLE
            statuses = [m["STATUS"] for m in daemon.notify.snapshot() if "STATUS" in m]
            assert any(s.startswith(f"revoked ({reason}): ") for s in statuses)
    finally:
        testbed.cli(*restores)
    daemon.wait_state(State.HEALTHY, timeout=90)
    wait_for("the ready state set", lambda: gpu_state(testbed.dir).get("ready") == "1" or None)
    assert events.items[-1].state is State.HEALTHY


GPU_FAULTS = [
    (["gpu", "cc-off"], ["gpu", "cc-on"], Reason.GPU_CC_OFF),
    (["gpu", "devtools-on"], ["gpu", "devtools-off"], Reason.GPU_DEVTOOLS),
    (["gpu", "set", "env=simulation"], ["gpu", "set", "env=production"], Reason.GPU_NOT_PRODUCTION),
    (["gpu", "lose"], ["gpu", "restore"], Reason.GPU_LOST),
    (["gpu", "set", "gpus=2"], ["gpu", "set", "gpus=1"], Reason.GPU_COUNT_MISMATCH),
]


@pytest.mark.parametrize(("breaks", "restores", "reason"), GPU_FAULTS, ids=lambda v: str(v))
def test_a_fast_check_failure_revokes_at_once(
    daemon: Attestd,
    events: Events,
    testbed: RunningTestbed,
    breaks: list[str],
    restores: list[str],
    reason: Reason,
) -> None:
    break_and_recover(daemon, events, testbed, breaks, restores, reason)


EVIDENCE_FAULTS = [
    ("bad-signature", Reason.GPU_EVIDENCE_INVALID),
    ("nonce-mismatch", Reason.GPU_NONCE_MISMATCH),
    ("ocsp-revoked", Reason.GPU_EVIDENCE_INVALID),
]


@pytest.mark.parametrize(("inject", "reason"), EVIDENCE_FAULTS)
def test_refused_gpu_evidence_revokes(
    daemon: Attestd, events: Events, testbed: RunningTestbed, inject: str, reason: Reason
) -> None:
    before = (
        metric(
            daemon.metrics(), "attestd_check_failures_total", check="gpu_evidence", reason=reason
        )
        or 0.0
    )
    break_and_recover(
        daemon,
        events,
        testbed,
        ["fault", "nvattest", "--inject", inject, "--count", "1"],
        ["fault", "--clear", "nvattest"],
        reason,
    )
    after = metric(
        daemon.metrics(), "attestd_check_failures_total", check="gpu_evidence", reason=reason
    )
    assert after is not None and after > before


def test_a_tampered_measurement_revokes(
    daemon: Attestd, events: Events, testbed: RunningTestbed
) -> None:
    break_and_recover(
        daemon,
        events,
        testbed,
        ["gpu", "set", "tamper=3"],
        ["gpu", "set", "tamper=0"],
        Reason.GPU_EVIDENCE_INVALID,
    )


OUTAGES = [
    ("nvattest-ocsp", ["--down"], Reason.GPU_COLLATERAL_UNAVAILABLE, "GPU evidence"),
    ("maa", ["--status", "503"], Reason.MAA_UNAVAILABLE, "vTPM attestation"),
]


@pytest.mark.parametrize(("service", "fault", "reason", "check"), OUTAGES)
def test_an_outage_is_degraded_within_the_grace_and_revoked_after(
    daemon: Attestd,
    events: Events,
    testbed: RunningTestbed,
    service: str,
    fault: list[str],
    reason: Reason,
    check: str,
) -> None:
    daemon.wait_state(State.HEALTHY)
    mark = len(events.items)
    try:
        testbed.cli("fault", service, *fault)
        degraded = daemon.wait_state(State.DEGRADED, reason)
        assert "revoked at" in degraded.line
        assert degraded.last_gpu_pass is not None and degraded.last_vtpm_pass is not None
        assert daemon.get("/v1/health")[0] == 503
        revoked = daemon.wait_state(State.REVOKED, Reason.GRACE_EXPIRED)
        assert check in revoked.line
    finally:
        testbed.cli("fault", "--clear", service)
    daemon.wait_state(State.HEALTHY, timeout=90)
    states = [e.state for e in events.since(mark)]
    assert states[:2] == [State.DEGRADED, State.REVOKED], states


def test_rim_not_found_is_measured_but_a_rim_outage_is_degraded(
    daemon: Attestd, events: Events, testbed: RunningTestbed
) -> None:
    break_and_recover(
        daemon,
        events,
        testbed,
        ["fault", "nvattest-rim", "--status", "404"],
        ["fault", "--clear", "nvattest-rim"],
        Reason.GPU_EVIDENCE_INVALID,
    )
    break_and_recover(
        daemon,
        events,
        testbed,
        ["fault", "nvattest-rim", "--status", "503"],
        ["fault", "--clear", "nvattest-rim"],
        Reason.GPU_COLLATERAL_UNAVAILABLE,
        State.DEGRADED,
    )


def test_a_short_maa_outage_never_leaves_healthy_for_revoked(
    daemon: Attestd, events: Events, testbed: RunningTestbed
) -> None:
    daemon.wait_state(State.HEALTHY)
    mark = len(events.items)
    testbed.cli("fault", "maa", "--status", "503", "--count", "1")
    try:
        daemon.wait_state(State.DEGRADED, Reason.MAA_UNAVAILABLE)
    finally:
        testbed.cli("fault", "--clear", "maa")
    daemon.wait_state(State.HEALTHY, timeout=60)
    assert State.REVOKED not in [e.state for e in events.since(mark)]


def test_ak_certificate_near_expiry_is_renewed_through_imds(
    daemon: Attestd, testbed: RunningTestbed
) -> None:
    before = daemon.wait_state(State.HEALTHY).ak_cert_expiry
    assert before is not None
    renewals = daemon.log().count("AK certificate renewed through IMDS")
    testbed.cli("ak-cert", "--days-left", "10")
    wait_for(
        "the AK certificate renewed",
        lambda: daemon.log().count("AK certificate renewed through IMDS") > renewals or None,
        60,
    )
    after = wait_for(
        "the renewed expiry in health",
        lambda: ((e := daemon.health().ak_cert_expiry) is not None and e > before + 1) or None,
        30,
    )
    assert after
    days = metric(daemon.metrics(), "attestd_ak_cert_days_left")
    assert days is not None and days > 300
    assert daemon.health().state is State.HEALTHY


def test_a_failed_ak_renewal_is_degraded_while_the_certificate_is_valid(
    daemon: Attestd, events: Events, testbed: RunningTestbed
) -> None:
    daemon.wait_state(State.HEALTHY)
    mark = len(events.items)
    try:
        testbed.cli("fault", "ak-renew", "--status", "500")
        testbed.cli("ak-cert", "--days-left", "10")
        degraded = daemon.wait_state(State.DEGRADED, Reason.AK_CERT_RENEWAL_FAILED)
        assert degraded.ak_cert_expiry is not None
        assert degraded.ak_cert_expiry < degraded.since + 11 * 86400
    finally:
        testbed.cli("fault", "--clear", "ak-renew")
    daemon.wait_state(State.HEALTHY, timeout=90)
    assert [e.state for e in events.since(mark)] == [State.DEGRADED, State.HEALTHY]


def test_evidence_binds_the_nonce_the_gpu_result_and_the_tls_key(
    daemon: Attestd, tls_key: Path
) -> None:
    daemon.wait_state(State.HEALTHY)
    nonce = bytes(range(32))
    evidence = daemon.client.evidence(nonce)
    assert isinstance(evidence, Evidence)
    assert evidence.nonce == nonce.hex()
    gpu = evidence.gpu_result.encode("utf-8")
    assert hashlib.sha256(gpu).hexdigest() == evidence.gpu_result_sha256
    assert json.loads(gpu)["result_code"] == 0
    cert = x509.load_pem_x509_certificate(tls_key.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert evidence.tls_key_sha256 == hashlib.sha256(spki).hexdigest()
    payload = evidence.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    echoed = claims["x-ms-runtime"]["client-payload"]

    def sent(value: str) -> set[str]:
        once = base64.b64encode(value.encode("ascii")).decode("ascii")
        return {once, base64.b64encode(once.encode("ascii")).decode("ascii")}

    assert echoed["nonce"] in {
        base64.b64encode(nonce).decode("ascii"),
        base64.b64encode(base64.b64encode(nonce)).decode("ascii"),
    }
    assert echoed["gpu-result-sha256"] in sent(evidence.gpu_result_sha256)
    assert echoed["tls-key-sha256"] in sent(evidence.tls_key_sha256)


def test_a_bad_evidence_nonce_is_a_400(daemon: Attestd) -> None:
    for query in ("", "?nonce=", "?nonce=zz", "?nonce=00", "?nonce=" + "ab" * 200):
        status, body, _ = daemon.get("/v1/evidence" + query)
        assert status == 400, (query, body)
