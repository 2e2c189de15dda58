"""attestd.daemon without processes: what a transition makes the daemon do (READY, STATUS,
events, the GPU ready state, waking checks), what /v1/evidence binds, the graces it accepts,
and how its loops run and fail, with strict fakes for the GPU, the evidence backend and the
vTPM checker."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestd import daemon as daemon_module
from attestd.daemon import Daemon, policy_from_config, tls_key_sha256
from attestd.gpu import GpuChecker
from attestd.gpuevidence import GpuEvidenceResult
from attestd.state import (
    Check,
    GpuCollateralUnreachable,
    GpuEvidencePassed,
    GpuFastFailed,
    GpuFastOk,
    VtpmNonCompliant,
    VtpmPassed,
)
from attestd.vtpm import AkCertStatus, VtpmChecker, VtpmResult
from confinfer import sdnotify
from confinfer.attestd_api import GpuSummary, State
from confinfer.config import Config
from confinfer.errors import ConfigError, Reason, ServiceError

RAW = b'{"claims": [], "result_code": 0}\n'


@dataclass
class FakeGpu:
    ready_calls: list[bool] = field(default_factory=list)
    observation: Any = field(default_factory=GpuFastOk)

    def check(self) -> Any:
        return self.observation

    def summary(self) -> GpuSummary:
        return GpuSummary(count=1, expected=1, devices=())

    def set_ready(self) -> None:
        self.ready_calls.append(True)

    def clear_ready(self) -> None:
        self.ready_calls.append(False)


@dataclass
class FakeBackend:
    results: list[Any] = field(default_factory=list)
    name: str = "nvattest"
    calls: int = 0

    def attest(self, nonce: str | None = None) -> GpuEvidenceResult:
        self.calls += 1
        observation = self.results.pop(0) if self.results else GpuEvidencePassed()
        return GpuEvidenceResult(
            observation=observation,
            nonce="00" * 32,
            started_at=time.time(),
            duration_s=0.0,
            raw_json=RAW,
            sha256=hashlib.sha256(RAW).hexdigest(),
        )


@dataclass
class FakeVtpm:
    bound: list[Mapping[str, str] | None] = field(default_factory=list)
    nonces: list[bytes | None] = field(default_factory=list)
    observation: Any = None

    def attest(
        self, *, nonce: bytes | None = None, bound_data: Mapping[str, str] | None = None
    ) -> VtpmResult:
        self.nonces.append(nonce)
        self.bound.append(bound_data)
        expiry = time.time() + 3600
        observation = self.observation or VtpmPassed(token_expiry=expiry)
        return VtpmResult(observation, 0.0, token="a.b.c", expiry=expiry)

    def renew_if_due(self, now: float) -> None:
        return None

    def ak_cert_status(self, now: float) -> AkCertStatus:
        return AkCertStatus(expiry=now + 365 * 86400, days_left=365.0)


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    sent: list[tuple[str, str | None]] = []
    sd = sdnotify

    def record(key: str) -> Any:
        def send(value: str | None = None) -> bool:
            sent.append((key, value))
            return True

        return send

    monkeypatch.setattr(sd, "ready", record("READY"))
    monkeypatch.setattr(sd, "status", record("STATUS"))
    monkeypatch.setattr(sd, "watchdog", record("WATCHDOG"))
    monkeypatch.setattr(sd, "watchdog_interval", lambda: None)
    return sent


CFG = Config(gpu_fast_check_s=0.01, gpu_evidence_interval_s=0.05, vtpm_attest_interval_s=0.05)


def make(
    cfg: Config = CFG,
    *,
    gpu: FakeGpu | None = None,
    backend: FakeBackend | None = None,
    vtpm: FakeVtpm | None = None,
) -> tuple[Daemon, FakeGpu, FakeBackend, FakeVtpm]:
    gpu, backend, vtpm = gpu or FakeGpu(), backend or FakeBackend(), vtpm or FakeVtpm()
    made = Daemon(
        cfg,
        gpu=cast(GpuChecker, gpu),
        backend=backend,
        vtpm=cast(VtpmChecker, vtpm),
    )
    return made, gpu, backend, vtpm


async def settle(made: Daemon) -> None:
    """Let the ready-state task the daemon scheduled finish."""
    for _ in range(50):
        await asyncio.sleep(0)
    if made._ready_task is not None:
        await made._ready_task


def pass_both(made: Daemon) -> None:
    made.gpu_pass = made.backend.attest()
    made.feed(GpuEvidencePassed())
    made.feed(VtpmPassed(token_expiry=time.time() + 3600))


def test_ready_once_with_the_first_healthy_status(notified: list[Any]) -> None:
    async def scenario() -> None:
        made, gpu, _, _ = make()
        made.feed(GpuEvidencePassed())
        assert [k for k, _ in notified] == ["STATUS"]  # still starting: no READY
        made.feed(VtpmPassed(token_expiry=time.time() + 3600))
        assert notified[-1][0] == "READY"
        assert (notified[-1][1] or "").startswith("healthy (attestd-healthy): ")
        made.feed(GpuFastFailed(Reason.GPU_CC_OFF, "GPU 0: CC off"))
        pass_both(made)
        await settle(made)
        assert [k for k, _ in notified].count("READY") == 1
        assert gpu.ready_calls == [True, False, True]

    asyncio.run(scenario())


def test_a_revocation_publishes_an_event_and_wakes_both_checks(notified: list[Any]) -> None:
    async def scenario() -> None:
        made, _, _, _ = make()
        pass_both(made)
        subscription = made.events.subscribe(made.current_event())
        for check in Check:
            made._wake[check].clear()
        made.feed(GpuFastFailed(Reason.GPU_DEVTOOLS, "GPU 0: DevTools on"))
        first = await anext(subscription)
        second = await anext(subscription)
        assert first.state is State.HEALTHY
        assert (second.state, second.reason, second.previous) == (
            State.REVOKED,
            Reason.GPU_DEVTOOLS,
            State.HEALTHY,
        )
        assert all(made._wake[check].is_set() for check in Check)
        assert notified[-1] == ("STATUS", made.status.status_line())
        assert "revoked (gpu-devtools)" in made.status.status_line()
        subscription.close()

    asyncio.run(scenario())


def test_evidence_binds_the_gpu_result_and_the_tls_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "tls.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    made, _, _, vtpm = make(replace(CFG, evidence_tls_key=pem))

    async def scenario() -> None:
        pass_both(made)
        evidence = await made.evidence(b"\x07" * 32)
        assert vtpm.nonces[-1] == b"\x07" * 32
        assert vtpm.bound[-1] == {
            "gpu-result-sha256": hashlib.sha256(RAW).hexdigest(),
            "tls-key-sha256": tls_key_sha256(pem),
        }
        assert evidence.gpu_result.encode() == RAW
        assert evidence.tls_key_sha256 == tls_key_sha256(pem)
        assert (evidence.nonce, evidence.token) == ("07" * 32, "a.b.c")

    asyncio.run(scenario())


@pytest.mark.usefixtures("notified")
def test_no_evidence_unless_healthy() -> None:
    made, _, _, vtpm = make()

    async def scenario() -> None:
        with pytest.raises(ServiceError) as starting:
            await made.evidence(b"\x01" * 32)
        pass_both(made)
        made.feed(GpuCollateralUnreachable("OCSP down"))
        assert made.status.state is State.DEGRADED
        with pytest.raises(ServiceError) as degraded:
            await made.evidence(b"\x01" * 32)
        assert starting.value.reason is degraded.value.reason is Reason.EVIDENCE_UNAVAILABLE
        assert vtpm.nonces == []  # nothing was attested for a refused request

    asyncio.run(scenario())


@pytest.mark.usefixtures("notified")
def test_a_noncompliant_evidence_attestation_revokes() -> None:
    made, _, _, vtpm = make()

    async def scenario() -> None:
        pass_both(made)
        vtpm.observation = VtpmNonCompliant(Reason.POLICY_UNSATISFIED, "claim x")
        with pytest.raises(ServiceError) as refused:
            await made.evidence(b"\x01" * 32)
        assert refused.value.reason is Reason.EVIDENCE_UNAVAILABLE
        assert (made.status.state, made.status.reason) == (
            State.REVOKED,
            Reason.POLICY_UNSATISFIED,
        )

    asyncio.run(scenario())


def test_the_same_key_hashes_alike_as_a_certificate_and_a_public_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serving.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert tls_key_sha256(tmp_path / "cert.pem") == tls_key_sha256(tmp_path / "key.pem")
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n")
    for bad in ("junk.pem", "missing.pem"):
        with pytest.raises(ServiceError) as refused:
            tls_key_sha256(tmp_path / bad)
        assert refused.value.reason is Reason.EVIDENCE_UNAVAILABLE
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"gpu_grace_s": 900.0, "gpu_evidence_interval_s": 900.0},
        {"vtpm_grace_s": 60.0, "vtpm_attest_interval_s": 600.0},
    ],
)
def test_a_grace_shorter_than_its_interval_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as refused:
        policy_from_config(replace(Config(), **changes))
    assert refused.value.reason is Reason.CONFIG_INVALID
    assert "must be longer than" in str(refused.value)


def test_a_check_past_its_bound_is_hung() -> None:
    made, _, _, _ = make()
    assert made._hung() is None
    made._running["vtpm"] = (time.monotonic() - 10_000.0, 1.0)
    assert made._hung() == "vtpm"


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(daemon_module, "RETRY_FIRST_S", 0.01)
    yield


@pytest.mark.usefixtures("notified", "fast_retry")
def test_the_loops_reach_healthy_and_a_collateral_outage_is_retried() -> None:
    backend = FakeBackend(results=[GpuCollateralUnreachable("RIM down")] * 3)
    made, _, backend, _ = make(backend=backend)

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(made.run(stop))
        for _ in range(500):
            if made.status.state is State.HEALTHY:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await runner

    asyncio.run(scenario())
    assert made.status.state is State.HEALTHY
    assert backend.calls >= 4  # three outages, retried, then a pass


@pytest.mark.usefixtures("notified")
def test_a_bug_in_a_check_ends_the_daemon() -> None:
    class Broken(FakeGpu):
        def check(self) -> Any:
            raise RuntimeError("a bug")

    made, _, _, _ = make(gpu=Broken())

    async def scenario() -> None:
        await made.run(asyncio.Event())

    with pytest.raises(RuntimeError, match="a bug"):
        asyncio.run(scenario())
