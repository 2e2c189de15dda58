"""attestd's vTPM check against the testbed: MAA guest attestation with the claims policy, and
the AK certificate's renewal through IMDS into the swtpm vTPM.

Faults are the testbed's knobs (``fault maa --down``, ``fault ak-renew --status N``) and its
``ak-cert --days-left N`` command; a hostile IMDS that answers a certificate for another key is
a small HTTP server in this process, in front of the same real vTPM.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from attestd.state import (
    AkCertRenewalFailed,
    AkCertRenewed,
    VtpmNonCompliant,
    VtpmPassed,
    VtpmUnreachable,
)
from attestd.vtpm import VtpmChecker
from confinfer import config
from confinfer.errors import Reason, TpmError
from confinfer.tpm import AK_CERT_INDEX, Vtpm, rsa_numbers

if TYPE_CHECKING:
    from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY_S = 86400.0


@pytest.fixture
def tb(testbed: RunningTestbed) -> Iterator[RunningTestbed]:
    """The module's testbed, with every fault cleared after each test."""
    try:
        yield testbed
    finally:
        testbed.cli("fault", "--clear")


def cfg_for(tb: RunningTestbed, tmp_path: Path, **env: str) -> config.Config:
    return config.load(tmp_path / "no-etc", environ={**tb.env, "CONFINFER_MAX_RETRIES": "0", **env})


def vtpm_cert(cfg: config.Config) -> x509.Certificate:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        return x509.load_der_x509_certificate(vtpm.ak_cert())


def ak_numbers(cfg: config.Config) -> tuple[int, int]:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        return rsa_numbers(vtpm.ak_public())


def nv_size(cfg: config.Config) -> int:
    with Vtpm(cfg.tpm_tcti) as vtpm:
        return len(vtpm.read_nv(AK_CERT_INDEX))


def set_days_left(tb: RunningTestbed, days: int) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(tb.cli("ak-cert", "--days-left", str(days)).stdout)
    return out


def armed_faults(tb: RunningTestbed) -> dict[str, Any]:
    path = tb.dir / "faults.json"
    data: dict[str, Any] = json.loads(path.read_text("utf-8") or "{}") if path.exists() else {}
    return data


# --- attestation ------------------------------------------------------------------------------


def test_a_pass_carries_the_tokens_expiry(tb: RunningTestbed, tmp_path: Path) -> None:
    checker = VtpmChecker(cfg_for(tb, tmp_path))
    result = checker.attest(nonce=b"n-1", bound_data={"tls-key-sha256": "ab" * 32})
    assert isinstance(result.observation, VtpmPassed), result.observation
    assert result.claims is not None and result.token is not None
    assert result.observation.token_expiry == result.expiry == float(result.claims["exp"])
    assert result.expiry > time.time()
    assert result.claims["iss"] == tb.env["CONFINFER_MAA_URL"]
    assert result.duration_s > 0
    assert set(result.claims["x-ms-runtime"]["client-payload"]) == {"nonce", "tls-key-sha256"}


def test_concurrent_attestations_share_the_vtpm(tb: RunningTestbed, tmp_path: Path) -> None:
    checker = VtpmChecker(cfg_for(tb, tmp_path))
    results: list[Any] = []

    def run(i: int) -> None:
        results.append(checker.attest(nonce=f"n-{i}".encode()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    status = checker.ak_cert_status(time.time())
    for t in threads:
        t.join(90)
    assert [r.passed for r in results] == [True, True, True], [r.observation for r in results]
    assert status.days_left > 0


def test_maa_unreachable_is_unreachable(tb: RunningTestbed, tmp_path: Path) -> None:
    tb.cli("fault", "maa", "--down")
    result = VtpmChecker(cfg_for(tb, tmp_path)).attest()
    assert result.observation == VtpmUnreachable(Reason.MAA_UNAVAILABLE, result.observation.detail)
    assert "after 1 attempt(s)" in result.observation.detail
    assert result.token is None and result.expiry is None


def test_maa_503_is_unreachable(tb: RunningTestbed, tmp_path: Path) -> None:
    tb.cli("fault", "maa", "--status", "503")
    result = VtpmChecker(cfg_for(tb, tmp_path)).attest()
    assert isinstance(result.observation, VtpmUnreachable)
    assert result.observation.reason is Reason.MAA_UNAVAILABLE
    assert "HTTP 503" in result.observation.detail


def test_imds_down_is_unreachable(tb: RunningTestbed, tmp_path: Path) -> None:
    tb.cli("fault", "imds", "--down")
    result = VtpmChecker(cfg_for(tb, tmp_path)).attest()
    assert isinstance(result.observation, VtpmUnreachable)
    assert result.observation.reason is Reason.IMDS_UNAVAILABLE


def test_maa_refusal_is_non_compliant(tb: RunningTestbed, tmp_path: Path) -> None:
    tb.cli("fault", "maa", "--status", "400", "--count", "1")
    result = VtpmChecker(cfg_for(tb, tmp_path)).attest()
    assert isinstance(result.observation, VtpmNonCompliant)
    assert result.observation.reason is Reason.MAA_REFUSED


def test_a_policy_the_vm_does_not_meet_is_non_compliant(tb: RunningTestbed, tmp_path: Path) -> None:
    path = tmp_path / "vtpm-policy.json"
    rule = {"claim": "x-ms-isolation-tee.x-ms-compliance-status", "equals": "other"}
    authority = {"authority": tb.env["CONFINFER_MAA_URL"], "allOf": [rule]}
    path.write_text(json.dumps({"version": "1.0.0", "anyOf": [authority]}), "utf-8")
    result = VtpmChecker(cfg_for(tb, tmp_path, CONFINFER_VTPM_POLICY=str(path))).attest()
    assert result.observation == VtpmNonCompliant(
        Reason.POLICY_UNSATISFIED,
        'x-ms-isolation-tee.x-ms-compliance-status: expected "other", got "azure-compliant-cvm"',
    )
    assert result.token is None


def test_an_unreachable_vtpm_fails_closed(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path, CONFINFER_TPM_TCTI="swtpm:host=127.0.0.1,port=1")
    result = VtpmChecker(cfg).attest()
    assert isinstance(result.observation, VtpmNonCompliant)
    assert result.observation.reason is Reason.TPM_UNREACHABLE


# --- the AK certificate -------------------------------------------------------------------------


def test_not_due_asks_nothing_of_imds(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    set_days_left(tb, 200)
    before = vtpm_cert(cfg)
    tb.cli("fault", "imds", "--status", "503", "--count", "1")  # any IMDS request consumes it
    checker = VtpmChecker(cfg)
    assert checker.renew_if_due(time.time()) is None
    assert armed_faults(tb)["imds"]["count"] == 1
    assert vtpm_cert(cfg) == before
    status = checker.ak_cert_status(time.time())
    assert status.expiry == before.not_valid_after_utc.timestamp()
    assert 199 < status.days_left <= 200


@pytest.mark.parametrize("days", [10, -1])
def test_due_is_renewed_for_the_same_ak(tb: RunningTestbed, tmp_path: Path, days: int) -> None:
    cfg = cfg_for(tb, tmp_path)
    set_days_left(tb, days)
    old = vtpm_cert(cfg)
    now = time.time()
    result = VtpmChecker(cfg).renew_if_due(now)
    assert result is not None
    assert isinstance(result.observation, AkCertRenewed), result.observation
    new = vtpm_cert(cfg)
    assert new.serial_number != old.serial_number
    assert result.observation.cert_expiry == new.not_valid_after_utc.timestamp()
    # The testbed's vTPM CA issues AK certificates for a year.
    assert 364 < result.days_left < 366
    key = new.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert (key.public_numbers().n, key.public_numbers().e) == ak_numbers(cfg)
    assert nv_size(cfg) == len(new.public_bytes(serialization.Encoding.DER))
    # MAA accepts the renewed certificate: it verifies it at every attestation.
    assert VtpmChecker(cfg).attest().passed


def test_a_failed_renewal_keeps_the_current_certificate(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    set_days_left(tb, 10)
    current = vtpm_cert(cfg)
    tb.cli("fault", "ak-renew", "--status", "503")
    result = VtpmChecker(cfg).renew_if_due(time.time())
    assert result is not None
    observation = result.observation
    assert isinstance(observation, AkCertRenewalFailed), observation
    assert observation.cause is Reason.IMDS_UNAVAILABLE
    assert "HTTP 503" in observation.detail
    assert observation.cert_expiry == current.not_valid_after_utc.timestamp()
    assert 9 < result.days_left <= 10
    assert vtpm_cert(cfg) == current


def test_writing_the_ak_certificate_resizes_its_index(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    set_days_left(tb, 100)
    original = vtpm_cert(cfg).public_bytes(serialization.Encoding.DER)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a longer subject " * 3)])
    now = dt.datetime.now(dt.UTC)
    other = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert len(other) != len(original)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        with pytest.raises(TpmError) as caught:
            vtpm.write_ak_cert(other + b"\0")
        assert caught.value.reason is Reason.TPM_BAD_REQUEST
        assert vtpm.ak_cert() == original
        vtpm.write_ak_cert(other)
        assert vtpm.ak_cert() == other
        assert len(vtpm.read_nv(AK_CERT_INDEX)) == len(other)
        vtpm.write_ak_cert(original)  # back, and written in place the second time
        vtpm.write_ak_cert(original)
        assert vtpm.read_nv(AK_CERT_INDEX) == original
    assert VtpmChecker(cfg).attest().passed


# --- a hostile IMDS ---------------------------------------------------------------------------


def other_key_certificate(like: x509.Certificate) -> str:
    """A certificate like ``like`` but a year longer, for a key that is not the AK."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(like.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


class HostileImds:
    """IMDS as far as renewal goes, answering a certificate for another key."""

    def __init__(self, answer_pem: str) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path, dict(self.headers), b""))
                self._answer(200, b"8f6f3b6e-54a8-4c44-9a9e-0d1f3a2b4c5d", "text/plain")

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(size)
                outer.requests.append(("POST", self.path, dict(self.headers), body))
                answer = json.dumps({"AkCertPem": answer_pem}).encode()
                self._answer(200, answer, "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HostileImds:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_a_certificate_for_another_key_is_never_written(tb: RunningTestbed, tmp_path: Path) -> None:
    base = cfg_for(tb, tmp_path)
    set_days_left(tb, 10)
    current = vtpm_cert(base)
    with HostileImds(other_key_certificate(current)) as imds:
        cfg = cfg_for(tb, tmp_path, CONFINFER_IMDS_URL=imds.url)
        result = VtpmChecker(cfg).renew_if_due(time.time())
    assert result is not None
    observation = result.observation
    assert isinstance(observation, AkCertRenewalFailed), observation
    assert observation.cause is Reason.AK_CERT_RENEWAL_INVALID
    assert "another key than the vTPM's AK" in observation.detail
    assert observation.cert_expiry == current.not_valid_after_utc.timestamp()
    assert vtpm_cert(base) == current
    # What was asked, as Microsoft's guest library asks it.
    (get, post) = imds.requests
    assert get[0] == "GET"
    assert get[1] == "/metadata/instance/compute/vmId?api-version=2019-03-11&format=text"
    assert post[0] == "POST"
    path, _, query = post[1].partition("?")
    assert path == "/metadata/THIM/tvm/certificate/renew"
    params = urllib.parse.parse_qs(query)
    assert params["api-version"] == ["2023-07-01"]
    assert params["vmId"] == ["8f6f3b6e-54a8-4c44-9a9e-0d1f3a2b4c5d"]
    assert len(params["requestId"][0]) == 36
    assert all(r[2].get("Metadata") == "true" for r in imds.requests)
    posted = x509.load_pem_x509_certificate(urllib.parse.unquote(post[3].decode()).encode())
    assert posted == current
