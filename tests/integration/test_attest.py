"""Guest attestation end to end: confinfer's vTPM + MAA client against the testbed.

The testbed (``python -m testbed up``) is Azure's side: a provisioned swtpm behind a paravisor
proxy, IMDS (THIM), and an MAA that verifies the evidence and seals its token to the TPM key.
Every test here goes over real sockets and TLS; faults are the testbed's knobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from confinfer import config, hcl, maa
from confinfer.errors import AttestationError, Reason, ServiceError, TpmError
from confinfer.http import Http, Reply, Service
from confinfer.tpm import EphemeralKey, Quote, Vtpm
from tests.cli import run_confinfer

if TYPE_CHECKING:
    from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def cfg_for(tb: RunningTestbed, tmp_path: Path, **env: str) -> config.Config:
    return config.load(tmp_path / "no-etc", environ={**tb.env, **env})


def confinfer(tb: RunningTestbed, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_confinfer(
        "attest", *args, timeout=90, env=tb.environ(**{"CONFINFER_MAX_RETRIES": "2", **env})
    )


@pytest.fixture
def tb(testbed: RunningTestbed) -> Iterator[RunningTestbed]:
    """The module's testbed, with every fault cleared after each test."""
    try:
        yield testbed
    finally:
        testbed.cli("fault", "--clear")


def write_policy(path: Path, authority: str, status: str = "azure-compliant-cvm") -> Path:
    path.write_text(
        json.dumps(
            {
                "version": "1.0.0",
                "anyOf": [
                    {
                        "authority": authority,
                        "allOf": [
                            {
                                "claim": "x-ms-isolation-tee.x-ms-attestation-type",
                                "equals": "sevsnpvm",
                            },
                            {
                                "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                                "equals": status,
                            },
                        ],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    return path


def test_cli_prints_verified_claims_bound_to_the_nonce(tb: RunningTestbed, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.json", tb.env["CONFINFER_MAA_URL"] + "/")
    proc = confinfer(tb, "--nonce", "n-0123", "--policy", str(policy))
    assert proc.returncode == 0, proc.stderr
    claims = json.loads(proc.stdout)
    assert claims["iss"] == tb.env["CONFINFER_MAA_URL"]
    assert claims["x-ms-isolation-tee"]["x-ms-attestation-type"] == "sevsnpvm"
    assert claims["x-ms-azurevm-attested-pcrs"] == list(range(8))
    sent = base64.b64encode(b"n-0123").decode()
    echoed = claims["x-ms-runtime"]["client-payload"]["nonce"]
    assert echoed in (sent, base64.b64encode(sent.encode()).decode())
    (key,) = [k for k in claims["x-ms-runtime"]["keys"] if k["kid"] == "TpmEphemeralEncryptionKey"]
    assert key["key_ops"] == ["encrypt"]


def test_cli_policy_refusal_names_the_claim(tb: RunningTestbed, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.json", tb.env["CONFINFER_MAA_URL"], "other")
    proc = confinfer(tb, "--policy", str(policy))
    assert proc.returncode == Reason.POLICY_UNSATISFIED.exit_code
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        "confinfer: policy-unsatisfied: x-ms-isolation-tee.x-ms-compliance-status: "
        'expected "other", got "azure-compliant-cvm"'
    )


def test_cli_bad_policy_file_is_a_config_error(tb: RunningTestbed, tmp_path: Path) -> None:
    bad = tmp_path / "policy.json"
    bad.write_text('{"version": "1.0.0", "anyOf": []}', encoding="utf-8")
    proc = confinfer(tb, "--policy", str(bad))
    assert proc.returncode == Reason.POLICY_INVALID.exit_code
    assert "confinfer: policy-invalid: " in proc.stderr
    assert str(bad) in proc.stderr


def test_maa_429_honours_retry_after(tb: RunningTestbed) -> None:
    tb.cli("fault", "maa", "--status", "429", "--retry-after", "1", "--count", "1")
    proc = confinfer(tb)
    assert proc.returncode == 0, proc.stderr
    assert "maa: HTTP 429; retry 1/2 in 1.0 s" in proc.stderr
    assert json.loads(proc.stdout)["x-ms-attestation-type"] == "azurevm"


def test_maa_retry_after_beyond_the_cap_fails_at_once(tb: RunningTestbed) -> None:
    """A server asking for more than RETRY_AFTER_CAP_S is not waited for: no retry at all."""
    tb.cli("fault", "maa", "--status", "429", "--retry-after", "3600", "--count", "1")
    proc = confinfer(tb)
    assert proc.returncode == Reason.MAA_UNAVAILABLE.exit_code
    assert "confinfer: maa-unavailable: " in proc.stderr
    assert "HTTP 429, asked to retry in 3600 s" in proc.stderr
    assert "retry 1/" not in proc.stderr
    assert proc.stdout == ""


def test_maa_kept_failing_is_a_service_error(tb: RunningTestbed) -> None:
    tb.cli("fault", "maa", "--status", "503")
    proc = confinfer(tb, CONFINFER_MAX_RETRIES="1")
    assert proc.returncode == Reason.MAA_UNAVAILABLE.exit_code
    assert "confinfer: maa-unavailable: " in proc.stderr
    assert "HTTP 503 after 2 attempt(s)" in proc.stderr


def test_imds_down(tb: RunningTestbed) -> None:
    tb.cli("fault", "imds", "--down")
    proc = confinfer(tb, CONFINFER_MAX_RETRIES="1")
    assert proc.returncode == Reason.IMDS_UNAVAILABLE.exit_code
    assert "confinfer: imds-unavailable: " in proc.stderr
    assert "/metadata/THIM/amd/certification" in proc.stderr


def test_untrusted_issuer_is_refused(tb: RunningTestbed) -> None:
    proc = confinfer(tb, CONFINFER_MAA_ALLOWED_ISSUERS="https://sharedeus.eus.attest.azure.net")
    assert proc.returncode == Reason.TOKEN_UNTRUSTED_ISSUER.exit_code
    assert "confinfer: token-untrusted-issuer: " in proc.stderr


def test_untrusted_tls_is_refused(tb: RunningTestbed) -> None:
    other_ca = str(Path(tb.env["CONFINFER_CA_BUNDLE"]).with_name("vtpm-ca.pem"))
    proc = confinfer(tb, CONFINFER_CA_BUNDLE=other_ca)
    assert proc.returncode == Reason.MAA_TLS.exit_code
    assert "confinfer: maa-tls: " in proc.stderr


def test_unreachable_tpm(tb: RunningTestbed) -> None:
    proc = confinfer(tb, CONFINFER_TPM_TCTI="swtpm:host=127.0.0.1,port=1")
    assert proc.returncode == Reason.TPM_UNREACHABLE.exit_code
    assert "confinfer: tpm-unreachable: " in proc.stderr


# --- the library, with a vTPM that misbehaves in one precise way -----------------------------


class ForgedQuote(Vtpm):
    def quote(self, pcrs: Any = range(8), qualifying_data: bytes = b"") -> Quote:
        real = super().quote(pcrs, qualifying_data)
        return replace(real, signature=bytes(b ^ 1 for b in real.signature))


class PcrsChangeAfterKey(Vtpm):
    testbed_dir: Path

    def ephemeral_key(self) -> EphemeralKey:
        key = super().ephemeral_key()
        from testbed.vtpm import Vtpm as TestbedVtpm

        TestbedVtpm.attach(self.testbed_dir / "vtpm").extend_pcr(7, b"changed after the key")
        return key


def test_attest_library_result(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    with Vtpm(cfg.tpm_tcti) as vtpm:
        result = maa.attest(vtpm, cfg, nonce=b"\x00\xff", bound_data={"tls-spki": "abc"})
    assert result.header["alg"] == "RS256"
    assert result.claims["iss"] == cfg.maa_url
    payload = result.claims["x-ms-runtime"]["client-payload"]
    assert set(payload) == {"nonce", "tls-spki"}
    assert result.token.count(".") == 2


def test_maa_refusal_carries_its_message(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    with ForgedQuote(cfg.tpm_tcti) as vtpm, pytest.raises(AttestationError) as err:
        maa.attest(vtpm, cfg)
    assert err.value.reason == "maa-refused"
    assert "HTTP 400" in err.value.message
    assert "signature" in err.value.message.lower()


def test_pcr_change_after_the_key_stops_decryption(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    with PcrsChangeAfterKey(cfg.tpm_tcti) as vtpm:
        vtpm.testbed_dir = tb.dir
        with pytest.raises(TpmError) as err:
            maa.attest(vtpm, cfg)
    assert err.value.reason == "tpm-pcr-policy"
    # A new attestation, with a key made for the new PCRs, works again.
    with Vtpm(cfg.tpm_tcti) as vtpm:
        maa.attest(vtpm, cfg)


def test_refresh_report_binds_user_data(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    data = hashlib.sha512(b'{"tls-spki":"abc"}').digest()
    with Vtpm(cfg.tpm_tcti) as vtpm:
        before = vtpm.hcl_report()
        after = vtpm.refresh_report(data)
    assert after != before
    report = hcl.parse(after)
    report.check_binding()
    assert report.user_data == data
    assert report.runtime_claims["user-data"] == data.hex().upper()


def test_service_error_for_an_unreachable_maa(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = config.override(
        cfg_for(tb, tmp_path, CONFINFER_MAX_RETRIES="0"), maa_url="https://127.0.0.1:1"
    )
    with Vtpm(cfg.tpm_tcti) as vtpm, pytest.raises(ServiceError) as err:
        maa.attest(vtpm, cfg)
    assert err.value.reason == "maa-unavailable"


# --- a network that tampers with or replays MAA's answer ------------------------------------


class Tampering(Http):
    """The one HTTP layer, but AzureGuest answers pass through ``edit`` first."""

    def __init__(self, cfg: config.Config, edit: Callable[[bytes], bytes]) -> None:
        super().__init__(cfg)
        self.edit = edit
        self.answers: list[bytes] = []

    def __enter__(self) -> Tampering:
        return self

    def request(
        self,
        method: str,
        url: str,
        *,
        service: Service,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        reply = super().request(method, url, service=service, headers=headers, body=body)
        if "/attest/AzureGuest" in url and reply.status == 200:
            self.answers.append(reply.body)
            reply = replace(reply, body=self.edit(reply.body))
        return reply


def _edit_envelope(content: bytes, field: str) -> bytes:
    envelope = json.loads(maa.b64_any(json.loads(content)["token"], "token"))
    raw = bytearray(base64.b64decode(envelope[field]))
    raw[0] ^= 1
    envelope[field] = base64.b64encode(bytes(raw)).decode()
    sealed = base64.urlsafe_b64encode(json.dumps(envelope).encode()).decode().rstrip("=")
    return json.dumps({"token": sealed}).encode()


@pytest.mark.parametrize("field", ["Jwt", "AuthenticationData"])
def test_tampered_answer_fails_authentication(
    tb: RunningTestbed, tmp_path: Path, field: str
) -> None:
    cfg = cfg_for(tb, tmp_path)
    with (
        Tampering(cfg, lambda content: _edit_envelope(content, field)) as net,
        Vtpm(cfg.tpm_tcti) as vtpm,
        pytest.raises(AttestationError) as err,
    ):
        maa.attest(vtpm, cfg, http=net)
    assert err.value.reason == "maa-response-integrity"


def test_tampered_inner_key_does_not_decrypt(tb: RunningTestbed, tmp_path: Path) -> None:
    cfg = cfg_for(tb, tmp_path)
    with (
        Tampering(cfg, lambda content: _edit_envelope(content, "EncryptedInnerKey")) as net,
        Vtpm(cfg.tpm_tcti) as vtpm,
        pytest.raises(TpmError) as err,
    ):
        maa.attest(vtpm, cfg, http=net)
    assert err.value.reason == "tpm-decrypt-failed"


def test_replayed_answer_is_refused(tb: RunningTestbed, tmp_path: Path) -> None:
    """Within one boot the ephemeral key repeats; the nonce is what makes each answer fresh."""
    cfg = cfg_for(tb, tmp_path)
    with Tampering(cfg, lambda content: content) as recorder, Vtpm(cfg.tpm_tcti) as vtpm:
        maa.attest(vtpm, cfg, nonce=b"first", http=recorder)
    old = recorder.answers[0]
    with (
        Tampering(cfg, lambda content: old) as replay,
        Vtpm(cfg.tpm_tcti) as vtpm,
        pytest.raises(AttestationError) as err,
    ):
        maa.attest(vtpm, cfg, nonce=b"second", http=replay)
    assert err.value.reason == "maa-token-unbound"
    assert "nonce" in err.value.message
