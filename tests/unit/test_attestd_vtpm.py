"""attestd.vtpm: the claims policy, how every failure becomes an observation, the vTPM lock, and
the AK certificate's renewal decision and checks; confinfer.imds's renewal client.

The vTPM and MAA are stand-ins here (the testbed runs the real ones, in
tests/integration/test_attestd_vtpm_testbed.py): a vTPM that holds an AK and its certificate in
memory, and ``maa.attest`` replaced by a function that answers or raises what a test needs.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_RSA_PARMS,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

from attestd import vtpm as checker_module
from attestd.state import (
    AkCertRenewalFailed,
    AkCertRenewed,
    VtpmNonCompliant,
    VtpmPassed,
    VtpmUnreachable,
)
from attestd.vtpm import (
    DEFAULT_POLICY,
    AkCertStatus,
    VtpmChecker,
    check_renewed,
    classify,
    default_policy,
    renewal_due,
)
from confinfer import imds, maa, policy
from confinfer.config import Config
from confinfer.errors import (
    ConfigError,
    ConfinferError,
    Kind,
    PolicyError,
    Reason,
    ServiceError,
    TpmError,
    UsageError,
)
from confinfer.http import Http, Reply, Service
from confinfer.maa import AttestationResult
from confinfer.tpm import Vtpm

pytestmark = pytest.mark.unit

MAA = "https://maa.example.attest.azure.net"
DAY = 86400.0
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
T = NOW.timestamp()


def cfg(**overrides: Any) -> Config:
    return Config(**{"maa_url": MAA, "max_retries": 0, **overrides})


# --- claims as MAA's AzureGuest token carries them --------------------------------------------


def guest_claims(**tee: Any) -> dict[str, Any]:
    return {
        "iss": MAA,
        "exp": T + 3600,
        "secureboot": True,
        "x-ms-attestation-type": "azurevm",
        "x-ms-isolation-tee": {
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-cvm",
            "x-ms-sevsnpvm-is-debuggable": False,
            **tee,
        },
    }


def test_the_default_policy_is_the_documented_one() -> None:
    assert [(r["claim"], r["equals"]) for r in DEFAULT_POLICY] == [
        ("x-ms-isolation-tee.x-ms-attestation-type", "sevsnpvm"),
        ("x-ms-isolation-tee.x-ms-compliance-status", "azure-compliant-cvm"),
        ("secureboot", True),
        ("x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", False),
    ]


def test_the_default_policys_authority_is_the_configured_maa() -> None:
    parsed = default_policy(cfg(maa_url=MAA + "/"))
    assert [a.url for a in parsed.authorities] == [MAA]
    policy.evaluate(parsed, guest_claims(), MAA)
    with pytest.raises(PolicyError) as caught:
        policy.evaluate(parsed, guest_claims(), "https://other.attest.azure.net")
    assert caught.value.reason is Reason.POLICY_UNTRUSTED_ISSUER


def test_the_default_policy_names_each_allowed_issuer() -> None:
    issuers = ("https://a.attest.azure.net", "https://b.attest.azure.net")
    parsed = default_policy(cfg(maa_allowed_issuers=issuers))
    assert [a.url for a in parsed.authorities] == list(issuers)
    policy.evaluate(parsed, {**guest_claims(), "iss": issuers[1]}, issuers[1])


@pytest.mark.parametrize(
    ("claims", "claim"),
    [
        (guest_claims(**{"x-ms-attestation-type": "tdxvm"}), "x-ms-attestation-type"),
        (guest_claims(**{"x-ms-compliance-status": "no"}), "x-ms-compliance-status"),
        (guest_claims(**{"x-ms-sevsnpvm-is-debuggable": True}), "is-debuggable"),
        ({**guest_claims(), "secureboot": False}, "secureboot"),
        ({**guest_claims(), "secureboot": "true"}, "secureboot"),
        ({k: v for k, v in guest_claims().items() if k != "secureboot"}, "secureboot"),
    ],
)
def test_the_default_policy_refuses_each_rule(claims: dict[str, Any], claim: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy.evaluate(default_policy(cfg()), claims, MAA)
    assert caught.value.reason is Reason.POLICY_UNSATISFIED
    assert claim in caught.value.details["claim"]


def test_a_policy_file_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    rule = {"claim": "x-ms-attestation-type", "equals": "azurevm"}
    path.write_text(
        json.dumps({"version": "1.0.0", "anyOf": [{"authority": MAA, "allOf": [rule]}]})
    )
    checker = VtpmChecker(cfg(vtpm_policy=path))
    assert checker.policy.authorities[0].rule.rules == (
        policy.Condition("x-ms-attestation-type", "equals", "azurevm"),
    )


def test_an_invalid_policy_file_fails_when_the_checker_is_made(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"version": "1.0.0", "anyOf": []}')
    with pytest.raises(ConfigError) as caught:
        VtpmChecker(cfg(vtpm_policy=path))
    assert caught.value.reason is Reason.POLICY_INVALID
    assert str(path) in caught.value.message


# --- classification -----------------------------------------------------------------------------

STATE_REASONS = {Reason.ATTESTD_STARTING, Reason.ATTESTD_HEALTHY, Reason.ATTESTD_REATTESTING}


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_becomes_an_observation_the_machine_takes(reason: Reason) -> None:
    observation = classify(ConfinferError("it\nfailed\x1b[2J", reason=reason))
    if reason.kind is Kind.UNAVAILABLE and reason not in STATE_REASONS:
        assert observation == VtpmUnreachable(reason, "it\\nfailed\\x1b[2J")
    elif reason in STATE_REASONS:
        assert isinstance(observation, VtpmNonCompliant)
        assert observation.reason is Reason.ATTESTATION
    else:
        assert observation == VtpmNonCompliant(reason, "it\\nfailed\\x1b[2J")


def test_a_long_message_is_cut() -> None:
    observation = classify(ServiceError("x" * 5000, reason=Reason.MAA_UNAVAILABLE))
    assert len(observation.detail) == checker_module.DETAIL_CHARS


# --- the checker with a stand-in vTPM and MAA ------------------------------------------------


@cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def tpm_public(key: rsa.RSAPublicKey) -> bytes:
    """A marshalled TPM2B_PUBLIC of ``key``, as the vTPM gives the AK's."""
    params = TPMS_RSA_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
        keyBits=2048,
        exponent=0,
    )
    n = key.public_numbers().n.to_bytes(256, "big")
    area = TPMT_PUBLIC(
        type=TPM2_ALG.RSA,
        nameAlg=TPM2_ALG.SHA256,
        parameters=TPMU_PUBLIC_PARMS(rsaDetail=params),
        unique=TPMU_PUBLIC_ID(rsa=n),
    )
    return bytes(TPM2B_PUBLIC(area).marshal())


def certificate(
    key: rsa.RSAPublicKey, *, days_left: float, valid_from: dt.datetime | None = None
) -> x509.Certificate:
    ca = rsa_key("ca")
    not_after = NOW + dt.timedelta(days=days_left)
    not_before = valid_from or min(NOW, not_after) - dt.timedelta(days=365)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vm")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vTPM CA")]))
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(ca, hashes.SHA256())
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class MemoryVtpm(Vtpm):
    """An AK and its certificate in memory; counts how many users hold it at once."""

    def __init__(self, ak: rsa.RSAPublicKey, cert: x509.Certificate) -> None:
        self.tcti = "memory"
        self._esys = None
        self.ak = ak
        self.cert_der = der(cert)
        self.written: list[bytes] = []
        self.fail_write: TpmError | None = None
        self.users = 0
        self.most_users = 0
        self.opened = 0
        self.lock = threading.Lock()

    def open(self, tcti: str) -> MemoryVtpm:
        with self.lock:
            self.opened += 1
            self.users += 1
            self.most_users = max(self.most_users, self.users)
        return self

    def close(self) -> None:
        with self.lock:
            self.users -= 1

    def ak_cert(self) -> bytes:
        time.sleep(0.01)  # long enough for another thread to overlap, if the lock let it
        return self.cert_der

    def ak_public(self) -> bytes:
        return tpm_public(self.ak)

    def write_ak_cert(self, data: bytes) -> None:
        if self.fail_write is not None:
            raise self.fail_write
        self.written.append(data)
        self.cert_der = data


AttestFn = Callable[..., AttestationResult]


@pytest.fixture
def memory_vtpm() -> MemoryVtpm:
    return MemoryVtpm(
        rsa_key("ak").public_key(), certificate(rsa_key("ak").public_key(), days_left=200)
    )


@pytest.fixture
def answer_maa(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[AttestFn], None]]:
    def install(fn: AttestFn) -> None:
        monkeypatch.setattr(maa, "attest", fn)

    yield install


def maa_answering(claims: Mapping[str, Any]) -> AttestFn:
    def attest(vtpm: Vtpm, cfg: Config, **kwargs: Any) -> AttestationResult:
        vtpm.ak_cert()
        return AttestationResult(token="a.b.c", claims=dict(claims), header={"alg": "RS256"})

    return attest


def maa_raising(exc: BaseException) -> AttestFn:
    def attest(vtpm: Vtpm, cfg: Config, **kwargs: Any) -> AttestationResult:
        raise exc

    return attest


def test_a_pass(memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None]) -> None:
    answer_maa(maa_answering(guest_claims()))
    result = VtpmChecker(cfg(), opener=memory_vtpm.open).attest(nonce=b"n")
    assert isinstance(result.observation, VtpmPassed)
    assert result.observation.token_expiry == result.expiry == T + 3600
    assert result.token == "a.b.c" and result.claims is not None
    assert memory_vtpm.users == 0


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            ServiceError("maa at u: HTTP 503 after 1 attempt(s)", reason=Reason.MAA_UNAVAILABLE),
            VtpmUnreachable,
        ),
        (ServiceError("imds at u: down", reason=Reason.IMDS_UNAVAILABLE), VtpmUnreachable),
        (ServiceError("jwks down", reason=Reason.TOKEN_JWKS_UNAVAILABLE), VtpmUnreachable),
        (ServiceError("too big", reason=Reason.RESPONSE_TOO_LARGE), VtpmUnreachable),
        (ConfinferError("400: bad", reason=Reason.MAA_REFUSED), VtpmNonCompliant),
        (ConfinferError("sig", reason=Reason.TOKEN_BAD_SIGNATURE), VtpmNonCompliant),
        (ConfinferError("unbound", reason=Reason.MAA_TOKEN_UNBOUND), VtpmNonCompliant),
        (TpmError("pcrs", reason=Reason.TPM_PCR_POLICY), VtpmNonCompliant),
        (TpmError("nv", reason=Reason.TPM_NV_MISSING), VtpmNonCompliant),
    ],
)
def test_failures_are_observations(
    memory_vtpm: MemoryVtpm,
    answer_maa: Callable[[AttestFn], None],
    exc: ConfinferError,
    expected: type,
) -> None:
    answer_maa(maa_raising(exc))
    result = VtpmChecker(cfg(), opener=memory_vtpm.open).attest()
    assert type(result.observation) is expected
    assert isinstance(result.observation, VtpmNonCompliant | VtpmUnreachable)
    assert result.observation.reason is exc.reason
    assert result.observation.detail == exc.message
    assert result.token is None and result.claims is None and result.expiry is None
    assert memory_vtpm.users == 0


def test_a_claim_off_policy_is_non_compliant_naming_it(
    memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None]
) -> None:
    answer_maa(maa_answering(guest_claims(**{"x-ms-sevsnpvm-is-debuggable": True})))
    result = VtpmChecker(cfg(), opener=memory_vtpm.open).attest()
    assert result.observation == VtpmNonCompliant(
        Reason.POLICY_UNSATISFIED,
        "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable: expected false, got true",
    )


def test_a_token_from_another_issuer_is_non_compliant(
    memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None]
) -> None:
    answer_maa(maa_answering({**guest_claims(), "iss": "https://evil.example"}))
    result = VtpmChecker(cfg(), opener=memory_vtpm.open).attest()
    assert isinstance(result.observation, VtpmNonCompliant)
    assert result.observation.reason is Reason.POLICY_UNTRUSTED_ISSUER


@pytest.mark.parametrize("exp", [None, "soon", True, float("inf")])
def test_a_token_without_a_numeric_exp_is_non_compliant(
    memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None], exp: Any
) -> None:
    answer_maa(maa_answering({**guest_claims(), "exp": exp}))
    result = VtpmChecker(cfg(), opener=memory_vtpm.open).attest()
    assert isinstance(result.observation, VtpmNonCompliant)
    assert result.observation.reason is Reason.TOKEN_MALFORMED


def test_a_vtpm_that_cannot_be_opened_fails_closed(answer_maa: Callable[[AttestFn], None]) -> None:
    answer_maa(maa_answering(guest_claims()))

    def unreachable(tcti: str) -> Vtpm:
        raise TpmError("connect: cannot reach the vTPM", reason=Reason.TPM_UNREACHABLE)

    result = VtpmChecker(cfg(), opener=unreachable).attest()
    assert result.observation == VtpmNonCompliant(
        Reason.TPM_UNREACHABLE, "connect: cannot reach the vTPM"
    )


def test_a_bug_is_raised(memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None]) -> None:
    answer_maa(maa_raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        VtpmChecker(cfg(), opener=memory_vtpm.open).attest()
    assert memory_vtpm.users == 0


@pytest.mark.parametrize("bound", [{"nonce": "x"}, {"k": b"bytes"}, {1: "x"}])
def test_bound_data_that_cannot_be_carried_is_a_bug_not_a_measurement(
    memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None], bound: Any
) -> None:
    answer_maa(maa_answering(guest_claims()))
    with pytest.raises(UsageError):
        VtpmChecker(cfg(), opener=memory_vtpm.open).attest(bound_data=bound)
    assert memory_vtpm.opened == 0


def test_one_user_of_the_vtpm_at_a_time(
    memory_vtpm: MemoryVtpm, answer_maa: Callable[[AttestFn], None]
) -> None:
    answer_maa(maa_answering(guest_claims()))
    checker = VtpmChecker(cfg(), opener=memory_vtpm.open)
    work: list[Callable[[], object]] = [checker.attest] * 4
    work += [lambda: checker.ak_cert_status(T), lambda: checker.renew_if_due(T)] * 2
    threads = [threading.Thread(target=fn) for fn in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert memory_vtpm.opened == 8
    assert memory_vtpm.most_users == 1


# --- the AK certificate ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days_left", "due"),
    [(200.0, False), (90.0, False), (89.99, True), (10.0, True), (0.0, True), (-5.0, True)],
)
def test_renewal_is_due_below_the_configured_days(days_left: float, due: bool) -> None:
    assert renewal_due(AkCertStatus(T + days_left * DAY, days_left), 90) is due


def test_the_status_of_the_certificate_in_the_vtpm(memory_vtpm: MemoryVtpm) -> None:
    status = VtpmChecker(cfg(), opener=memory_vtpm.open).ak_cert_status(T)
    assert status == AkCertStatus(T + 200 * DAY, 200.0)


class Renewals:
    """``imds.renew_ak_certificate`` as the checker calls it: records and answers."""

    def __init__(self, answer: str | ConfinferError) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def __call__(self, http: Http, cfg: Config, current_pem: str, **kwargs: Any) -> str:
        self.asked.append(current_pem)
        if isinstance(self.answer, ConfinferError):
            raise self.answer
        return self.answer


def renewing(
    monkeypatch: pytest.MonkeyPatch, vtpm: MemoryVtpm, answer: str | ConfinferError
) -> tuple[VtpmChecker, Renewals]:
    renewals = Renewals(answer)
    monkeypatch.setattr(imds, "renew_ak_certificate", renewals)
    return VtpmChecker(cfg(ak_cert_renew_days=90), opener=vtpm.open), renewals


def test_not_due_asks_nothing(monkeypatch: pytest.MonkeyPatch, memory_vtpm: MemoryVtpm) -> None:
    checker, renewals = renewing(monkeypatch, memory_vtpm, "unused")
    assert checker.renew_if_due(T) is None
    assert renewals.asked == [] and memory_vtpm.written == []


@pytest.mark.parametrize("days_left", [10, 0.5, -3])
def test_due_or_expired_is_renewed(monkeypatch: pytest.MonkeyPatch, days_left: float) -> None:
    ak = rsa_key("ak").public_key()
    vtpm = MemoryVtpm(ak, certificate(ak, days_left=days_left))
    current = vtpm.cert_der
    fresh = certificate(ak, days_left=365, valid_from=NOW - dt.timedelta(minutes=5))
    checker, renewals = renewing(monkeypatch, vtpm, pem(fresh))
    result = checker.renew_if_due(T)
    assert result is not None
    assert result.observation == AkCertRenewed(T + 365 * DAY)
    assert result.days_left == 365.0
    assert vtpm.written == [der(fresh)]
    # The current certificate was posted as the guest library posts it: one base64 line.
    (posted,) = renewals.asked
    assert posted == imds.certificate_pem(current)
    assert posted.count("\n") == 2


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda ak: certificate(rsa_key("other").public_key(), days_left=365), "another key"),
        (lambda ak: certificate(ak, days_left=10), "no later than the current one"),
        (lambda ak: certificate(ak, days_left=5), "no later than the current one"),
        (
            lambda ak: certificate(ak, days_left=400, valid_from=NOW + dt.timedelta(days=2)),
            "not valid now",
        ),
    ],
)
def test_an_answer_that_may_not_replace_the_certificate_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[rsa.RSAPublicKey], x509.Certificate],
    why: str,
) -> None:
    ak = rsa_key("ak").public_key()
    vtpm = MemoryVtpm(ak, certificate(ak, days_left=10))
    checker, _ = renewing(monkeypatch, vtpm, pem(answer(ak)))
    result = checker.renew_if_due(T)
    assert result is not None
    observation = result.observation
    assert isinstance(observation, AkCertRenewalFailed)
    assert observation.cause is Reason.AK_CERT_RENEWAL_INVALID
    assert why in observation.detail
    assert observation.cert_expiry == T + 10 * DAY
    assert result.days_left == 10.0
    assert vtpm.written == []


def test_an_unreachable_imds_keeps_the_current_certificate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ak = rsa_key("ak").public_key()
    vtpm = MemoryVtpm(ak, certificate(ak, days_left=10))
    down = ServiceError("imds at u: HTTP 503 after 1 attempt(s)", reason=Reason.IMDS_UNAVAILABLE)
    checker, _ = renewing(monkeypatch, vtpm, down)
    result = checker.renew_if_due(T)
    assert result is not None
    assert result.observation == AkCertRenewalFailed(
        Reason.IMDS_UNAVAILABLE, "imds at u: HTTP 503 after 1 attempt(s)", T + 10 * DAY
    )


def test_a_failed_write_is_a_failed_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    ak = rsa_key("ak").public_key()
    vtpm = MemoryVtpm(ak, certificate(ak, days_left=10))
    vtpm.fail_write = TpmError("write NV index 0x01C101D0: refused", reason=Reason.TPM_AUTH)
    fresh = certificate(ak, days_left=365)
    checker, _ = renewing(monkeypatch, vtpm, pem(fresh))
    result = checker.renew_if_due(T)
    assert result is not None
    assert isinstance(result.observation, AkCertRenewalFailed)
    assert result.observation.cause is Reason.TPM_AUTH
    assert result.observation.cert_expiry == T + 10 * DAY


def test_check_renewed_refuses_what_is_not_a_certificate() -> None:
    ak = rsa_key("ak").public_key()
    with pytest.raises(ConfinferError) as caught:
        check_renewed(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
            certificate(ak, days_left=1),
            tpm_public(ak),
            T,
        )
    assert caught.value.reason is Reason.AK_CERT_RENEWAL_INVALID


# --- confinfer.imds: the renewal client -----------------------------------------------------


class CannedImds(Http):
    """IMDS from memory, by path (the query carries a fresh request id each time)."""

    def __init__(self, replies: dict[str, tuple[int, bytes]]) -> None:
        super().__init__(Config(max_retries=0))
        self.replies = replies
        self.asked: list[tuple[str, str, dict[str, str], bytes | None]] = []

    def request(
        self,
        method: str,
        url: str,
        *,
        service: Service,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        assert service.name == "imds"
        self.asked.append((method, url, dict(headers or {}), body))
        path = urllib.parse.urlsplit(url).path
        status, data = self.replies.get(path, (404, b'{"error": "Not found"}'))
        return Reply(url, status, {}, data)


VM = "8F6F3B6E-54A8-4C44-9A9E-0D1F3A2B4C5D"
RENEW = imds.AK_RENEW_PATH
VMID = imds.VM_ID_PATH


def renew_with(replies: dict[str, tuple[int, bytes]]) -> tuple[str | ConfinferError, CannedImds]:
    http = CannedImds(replies)
    current = imds.certificate_pem(der(certificate(rsa_key("ak").public_key(), days_left=1)))
    try:
        return imds.renew_ak_certificate(http, Config(), current), http
    except ConfinferError as exc:
        return exc, http


def test_renewal_asks_as_the_guest_library_does() -> None:
    fresh = pem(certificate(rsa_key("ak").public_key(), days_left=365))
    answer, http = renew_with(
        {VMID: (200, VM.encode()), RENEW: (200, json.dumps({"AkCertPem": fresh}).encode())}
    )
    assert answer == fresh
    (get, post) = http.asked
    assert get[:2] == (
        "GET",
        "http://169.254.169.254/metadata/instance/compute/vmId?api-version=2019-03-11&format=text",
    )
    assert post[0] == "POST"
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(post[1]).query)
    assert query["api-version"] == ["2023-07-01"]
    assert query["vmId"] == [VM.lower()]
    assert len(query["requestId"][0]) == 36
    assert all(h["Metadata"] == "true" for _, _, h, _ in http.asked)
    assert post[3] is not None and b"\n" not in post[3] and b"%0A" in post[3]
    assert urllib.parse.unquote(post[3].decode()).startswith("-----BEGIN CERTIFICATE-----\n")


@pytest.mark.parametrize(
    ("replies", "reason", "words"),
    [
        ({VMID: (503, b'{"error": "down"}')}, Reason.IMDS_UNAVAILABLE, "HTTP 503"),
        ({VMID: (200, b"not-a-guid\x1b[2J")}, Reason.IMDS_BAD_RESPONSE, "\\x1b"),
        ({VMID: (200, b"0" * 100)}, Reason.IMDS_BAD_RESPONSE, "longer than 64"),
        (
            {VMID: (200, VM.encode()), RENEW: (400, b'{"error": "Bad request. nope"}')},
            Reason.IMDS_UNAVAILABLE,
            "Bad request. nope",
        ),
        ({VMID: (200, VM.encode()), RENEW: (200, b"[]")}, Reason.IMDS_BAD_RESPONSE, "object"),
        ({VMID: (200, VM.encode()), RENEW: (200, b"{}")}, Reason.IMDS_BAD_RESPONSE, "no AkCertPem"),
        (
            {
                VMID: (200, VM.encode()),
                RENEW: (200, json.dumps({"AkCertPem": "x" * 20000}).encode()),
            },
            Reason.IMDS_BAD_RESPONSE,
            "longer than",
        ),
        (
            {VMID: (200, VM.encode()), RENEW: (200, b'{"AkCertPem": "not pem"}')},
            Reason.IMDS_BAD_RESPONSE,
            "not a PEM certificate",
        ),
    ],
)
def test_renewal_answers_are_checked(
    replies: dict[str, tuple[int, bytes]], reason: Reason, words: str
) -> None:
    answer, _ = renew_with(replies)
    assert isinstance(answer, ConfinferError)
    assert answer.reason is reason
    assert words in answer.message
    assert "\n" not in answer.message and "\x1b" not in answer.message


def test_renewal_refuses_two_certificates() -> None:
    one = pem(certificate(rsa_key("ak").public_key(), days_left=365))
    body = json.dumps({"AkCertPem": one + one}).encode()
    answer, _ = renew_with({VMID: (200, VM.encode()), RENEW: (200, body)})
    assert isinstance(answer, ConfinferError)
    assert "2 certificates" in answer.message
