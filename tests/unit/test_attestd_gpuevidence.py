"""The nvattest adapter's verdicts on crafted output (no process is started here)."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest

from attestd.gpuevidence import (
    NvattestOptions,
    RunOutput,
    build_argv,
    build_env,
    classify_rc,
    decide,
    fresh_nonce,
)
from attestd.state import GpuCollateralUnreachable, GpuEvidenceFailed, GpuEvidencePassed
from confinfer.errors import Reason
from testbed import nvattest as standin

CHAIN = {
    "x-nvidia-cert-expiration-date": "2030-01-01T00:00:00Z",
    "x-nvidia-cert-ocsp-nonce-matches": True,
    "x-nvidia-cert-ocsp-response-valid": True,
    "x-nvidia-cert-ocsp-status": "good",
    "x-nvidia-cert-revocation-reason": None,
    "x-nvidia-cert-status": "valid",
}


def claim(nonce: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dbgstat": "disabled",
        "eat_nonce": nonce,
        "hwmodel": "GH100 A01 GSP BROM",
        "measres": "success",
        "oemid": "5703",
        "secboot": True,
        "ueid": "1",
        "x-nvidia-device-type": "gpu",
        "x-nvidia-gpu-claims-version": "3.0",
        "x-nvidia-mismatch-measurement-records": None,
    }
    for name in (
        "arch-check",
        "attestation-report-parsed",
        "attestation-report-signature-verified",
        "attestation-report-nonce-match",
        "attestation-report-cert-chain-fwid-match",
        "driver-rim-fetched",
        "driver-rim-signature-verified",
        "driver-rim-version-match",
        "driver-rim-measurements-available",
        "vbios-rim-fetched",
        "vbios-rim-signature-verified",
        "vbios-rim-version-match",
        "vbios-rim-measurements-available",
        "vbios-index-no-conflict",
    ):
        out[f"x-nvidia-gpu-{name}"] = True
    for chain in ("attestation-report", "driver-rim", "vbios-rim"):
        out[f"x-nvidia-gpu-{chain}-cert-chain"] = dict(CHAIN)
    return out


def document(nonce: str, n: int = 1, rc: int = 0, **edit: Any) -> dict[str, Any]:
    claims = [claim(nonce) for _ in range(n)]
    for key, value in edit.items():
        claims[0][key.replace("_", "-") if key.startswith("x_") else key] = value
    eat = standin.detached_eat(claims, nonce)
    return standin.attest_document(rc, claims, eat)


def run(doc: Any, *, raw: bytes | None = None, stderr: str = "", rc: int | None = 0) -> RunOutput:
    out = raw if raw is not None else standin.render(doc).encode()
    return RunOutput(rc, out, stderr.encode(), 0.1)


OPTS = NvattestOptions(expected_count=1)


def verdict(doc: Any, nonce: str, opts: NvattestOptions = OPTS, **kw: Any) -> Any:
    return decide(run(doc, **kw), nonce, opts, now=time.time())


def test_a_good_document_passes_and_keeps_its_bytes_and_hash() -> None:
    nonce = fresh_nonce()
    doc = document(nonce)
    result = verdict(doc, nonce)
    assert isinstance(result.observation, GpuEvidencePassed)
    assert result.raw_json == standin.render(doc).encode()
    import hashlib

    assert result.sha256 == hashlib.sha256(result.raw_json).hexdigest()
    assert result.detached_eat == doc["detached_eat"]


def test_argv_never_carries_a_policy_and_env_cannot_override_flags() -> None:
    opts = NvattestOptions(expected_count=1, env={"NVAT_FORMAT": "text", "PATH": "/bin"})
    argv = build_argv(opts, "ab" * 32)
    assert argv == [
        "nvattest", "attest", "--device", "gpu", "--verifier", "local",
        "--nonce", "ab" * 32, "--format", "json",
    ]  # fmt: skip
    env = build_env(opts)
    assert "NVAT_FORMAT" not in env and env["PATH"] == "/bin"


@pytest.mark.parametrize(
    ("edit", "reason", "needle"),
    [
        ({"measres": "fail"}, Reason.GPU_EVIDENCE_INVALID, "measurements"),
        ({"secboot": None}, Reason.GPU_EVIDENCE_INVALID, "secure boot"),
        ({"dbgstat": "enabled"}, Reason.GPU_EVIDENCE_INVALID, "debug"),
        ({"x-nvidia-gpu-driver-rim-signature-verified": False}, Reason.GPU_EVIDENCE_INVALID, "rim"),
        ({"x-nvidia-device-type": "nvswitch"}, Reason.GPU_EVIDENCE_INVALID, "device type"),
        ({"x-nvidia-gpu-claims-version": "4.0"}, Reason.GPU_EVIDENCE_INVALID, "version"),
    ],
)
def test_our_checks_refuse_a_result_code_0(
    edit: dict[str, Any], reason: Reason, needle: str
) -> None:
    """nvattest said Ok, but a claim says otherwise (a bug, a permissive build): refused."""
    nonce = fresh_nonce()
    doc = document(nonce)
    doc["claims"][0].update(edit)
    result = verdict(doc, nonce)
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is reason
    assert needle in result.observation.detail.lower()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("x-nvidia-cert-status", "expired", "expired"),
        ("x-nvidia-cert-ocsp-status", "revoked", "revoked"),
        ("x-nvidia-cert-ocsp-nonce-matches", False, "nonce"),
        ("x-nvidia-cert-ocsp-response-valid", False, "not valid"),
    ],
)
def test_every_chain_must_be_valid_and_ocsp_good(field: str, value: Any, needle: str) -> None:
    nonce = fresh_nonce()
    doc = document(nonce)
    doc["claims"][0]["x-nvidia-gpu-vbios-rim-cert-chain"][field] = value
    result = verdict(doc, nonce)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert needle in result.observation.detail


def test_the_nonce_must_be_ours_on_every_gpu_and_in_the_eat() -> None:
    nonce = fresh_nonce()
    doc = document(fresh_nonce(), n=2)  # someone else's result, replayed
    result = verdict(doc, nonce, NvattestOptions(expected_count=2))
    assert result.reason is Reason.GPU_NONCE_MISMATCH
    doc = document(nonce, n=2)
    doc["claims"][1]["eat_nonce"] = fresh_nonce()
    result = verdict(doc, nonce, NvattestOptions(expected_count=2))
    assert result.reason is Reason.GPU_NONCE_MISMATCH
    assert "GPU 1" in result.observation.detail
    doc = document(nonce)
    doc["detached_eat"] = standin.detached_eat(doc["claims"], fresh_nonce())
    assert verdict(doc, nonce).reason is Reason.GPU_NONCE_MISMATCH


def test_the_count_is_the_configured_one() -> None:
    nonce = fresh_nonce()
    result = verdict(document(nonce, n=1), nonce, NvattestOptions(expected_count=2))
    assert result.reason is Reason.GPU_COUNT_MISMATCH
    result = verdict(document(nonce, n=2), nonce, NvattestOptions(expected_count=1))
    assert result.reason is Reason.GPU_COUNT_MISMATCH


def test_the_eat_must_carry_the_claims_checked_and_be_fresh() -> None:
    nonce = fresh_nonce()
    doc = document(nonce)
    good = copy.deepcopy(doc["claims"])
    doc["claims"][0]["hwmodel"] = "other"  # printed claims differ from the EAT's
    assert verdict(doc, nonce).reason is Reason.GPU_EVIDENCE_INVALID
    doc["claims"] = good
    doc["detached_eat"] = standin.detached_eat(good, nonce, now=int(time.time()) - 1000)
    result = verdict(doc, nonce)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID and "stale" in result.observation.detail
    doc["detached_eat"] = standin.detached_eat(good, nonce, now=int(time.time()) + 1000)
    assert "future" in verdict(doc, nonce).observation.detail
    doc["detached_eat"] = standin.detached_eat(good, nonce)
    doc["detached_eat"][1]["GPU-0"] = doc["detached_eat"][1]["GPU-0"][:-3] + "x."
    assert verdict(doc, nonce).reason is Reason.GPU_EVIDENCE_INVALID
    doc["detached_eat"] = {}
    assert verdict(doc, nonce).reason is Reason.GPU_EVIDENCE_INVALID


def test_result_12_names_the_failing_claim() -> None:
    nonce = fresh_nonce()
    doc = document(nonce, rc=12)
    doc["claims"][0]["measres"] = "fail"
    doc["claims"][0]["x-nvidia-mismatch-measurement-records"] = [{"index": 8}]
    result = verdict(doc, nonce, rc=12)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert "[8]" in result.observation.detail
    # 12 whose claims look fine: still refused
    assert verdict(document(nonce, rc=12), nonce).reason is Reason.GPU_EVIDENCE_INVALID


@pytest.mark.parametrize(
    ("rc", "stderr", "reason"),
    [
        (504, "", Reason.GPU_NONCE_MISMATCH),
        (509, "", Reason.GPU_CC_OFF),
        (500, "", Reason.GPU_LOST),
        (501, "", Reason.GPU_LOST),
        (508, "", Reason.GPU_EVIDENCE_INVALID),
        (802, "", Reason.GPU_EVIDENCE_INVALID),
        (104, "", Reason.GPU_EVIDENCE_INVALID),
        (202, "", None),
        (205, "", None),
        (102, "", None),
        (103, "", None),
        (2, "[error] Gave up HTTP request after 6 attempts for POST https://o", None),
        (2, "[error] Fatal libcurl error code: 77", None),
        (2, "[error] Failed to parse attestation certificate chain", Reason.GPU_EVIDENCE_INVALID),
        (2, "[error] something else", Reason.GPU_VERIFIER_FAILED),
        (4, "", Reason.GPU_VERIFIER_FAILED),
        (301, "", Reason.GPU_VERIFIER_FAILED),
        (9999, "", Reason.GPU_VERIFIER_FAILED),
    ],
)
def test_result_codes_without_claims(rc: int, stderr: str, reason: Reason | None) -> None:
    assert classify_rc(rc, stderr) is reason
    nonce = fresh_nonce()
    doc = standin.attest_document(rc)
    result = verdict(doc, nonce, stderr=stderr, rc=rc % 256)
    if reason is None:
        assert isinstance(result.observation, GpuCollateralUnreachable)
        assert result.reason is Reason.GPU_COLLATERAL_UNAVAILABLE
    else:
        assert isinstance(result.observation, GpuEvidenceFailed)
        assert result.reason is reason
    assert result.result_code == rc


def test_exit_status_zero_does_not_rescue_a_failure_code() -> None:
    nonce = fresh_nonce()
    result = verdict(standin.attest_document(504), nonce, rc=0)
    assert result.reason is Reason.GPU_NONCE_MISMATCH


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1]",
        b'{"result_code": "0"}',
        b'{"result_code": true}',
        b'{"result_code": 0, "result_code": 0}',
        b'{"result_code": NaN}',
        b"\xff",
    ],
)
def test_no_valid_document_fails_closed(raw: bytes) -> None:
    result = verdict(None, fresh_nonce(), raw=raw)
    assert result.reason is Reason.GPU_VERIFIER_FAILED


def test_ok_without_claims_and_a_signal_fail_closed() -> None:
    nonce = fresh_nonce()
    doc = standin.attest_document(0) | {"claims": {}}
    assert verdict(doc, nonce).reason is Reason.GPU_VERIFIER_FAILED
    assert verdict(standin.attest_document(0), nonce).reason is Reason.GPU_COUNT_MISMATCH
    assert verdict(document(nonce), nonce, rc=-9).reason is Reason.GPU_VERIFIER_FAILED


def test_timeout_oversize_and_start_errors() -> None:
    nonce = fresh_nonce()
    out = decide(RunOutput(None, b"", b"", 2.0, timed_out=True), nonce, OPTS, now=time.time())
    assert isinstance(out.observation, GpuCollateralUnreachable)
    assert out.reason is Reason.GPU_VERIFIER_TIMEOUT
    out = decide(RunOutput(None, b"x", b"", 1.0, too_large=True), nonce, OPTS, now=time.time())
    assert out.reason is Reason.GPU_VERIFIER_FAILED
    out = decide(RunOutput(None, b"", b"", 0.0, start_error="No such file"), nonce, OPTS, now=0)
    assert out.reason is Reason.GPU_VERIFIER_FAILED


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="expected_count"):
        NvattestOptions(expected_count=0)
    with pytest.raises(ValueError, match="timeout_s"):
        NvattestOptions(expected_count=1, timeout_s=float("inf"))


def test_from_config() -> None:
    from confinfer.config import Config

    cfg = Config(nvattest_rim_url="https://rim.example", gpu_evidence_timeout_s=7.0)
    opts = NvattestOptions.from_config(cfg, 2)
    assert (opts.executable, opts.timeout_s, opts.expected_count) == ("nvattest", 7.0, 2)
    assert "--rim-url" in build_argv(opts, "00" * 32)
    assert json.dumps(build_argv(opts, "00" * 32)).count("--ocsp-url") == 0
