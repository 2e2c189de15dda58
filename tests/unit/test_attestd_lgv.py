"""The LGV adapter's verdicts on crafted runner documents (no process is started here)."""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from attestd import lgv_runner
from attestd.gpuevidence import RunOutput, fresh_nonce
from attestd.lgv import (
    LgvBackend,
    LgvOptions,
    build_argv,
    build_env,
    decide,
    submod_digest,
)
from attestd.state import GpuCollateralUnreachable, GpuEvidenceFailed, GpuEvidencePassed
from confinfer.config import Config
from confinfer.errors import ConfigError, Reason
from testbed import lgv as standin

pytestmark = pytest.mark.unit

OPTIONS = LgvOptions(expected_count=1, venv=Path("/opt/lgv"))


def passing_state() -> standin.GpuState:
    state = standin.GpuState(
        arch=True,
        driver_version="550.127.05",
        vbios_version="96.00.9F.00.04",
        parsed=True,
        fwid_match=True,
        nonce_match=True,
        signature=True,
        no_conflict=True,
        measurements=True,
    )
    for chain in [state.report_chain, *state.rim_chains.values()]:
        chain.expiration, chain.status, chain.ocsp_status, chain.validated = (
            "2030-01-01T00:00:00",
            "valid",
            "good",
            True,
        )
    for flags in state.rims.values():
        flags.update(fetched=True, schema=True, signature=True, version=True, available=True)
    return state


def document(
    nonce: str,
    *,
    version: str = "3.0",
    gpus: int = 1,
    result: bool = True,
    edit: Callable[[list[dict[str, Any]]], None] | None = None,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """A runner document around the stand-in LGV's own claims and EAT."""
    monkeypatch.setattr(standin.BaseSettings, "CLAIMS_VERSION", version)
    claims = [passing_state().claims(version) for _ in range(gpus)]
    if edit is not None:
        edit(claims)
    marks: dict[str, list[Any]] = {"hwmodel": ["GH100"] * gpus, "ueid": [1] * gpus, "oemid": []}
    eat = standin.detached_eat(result, claims, nonce, marks)
    doc: dict[str, Any] = {
        "runner": 1,
        "stage": "done",
        "nonce": nonce,
        "lgv": {"package": "nv-local-gpu-verifier", "version": "2.7.3", "api": "upstream"},
        "nvml": {"initialized": True, "cc_feature": True, "ppcie": False, "devtools": False},
        "result": result,
        "detached_eat": eat,
        "errors": [],
        "collateral": [{"service": "rim", "outcome": "ok"}],
    }
    lgv_runner.decode_eat(eat, doc)
    return doc


def run(doc: Any, *, returncode: int | None = 0, **kw: Any) -> RunOutput:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return RunOutput(returncode, raw, kw.pop("stderr", b""), 1.0, **kw)


def verdict(doc: Any, nonce: str, options: LgvOptions = OPTIONS, **kw: Any) -> Any:
    return decide(run(doc, **kw), nonce, options, now=time.time())


# --- passing and the relying-party checks -------------------------------------------------------


@pytest.mark.parametrize("version", ["2.0", "3.0"])
def test_a_good_result_passes_and_keeps_the_bytes(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, version=version, monkeypatch=monkeypatch)
    result = verdict(doc, nonce)
    assert isinstance(result.observation, GpuEvidencePassed), result.observation
    assert result.raw_json == json.dumps(doc).encode()
    assert result.result_code is None
    assert result.claims[0]["eat_nonce"] == nonce
    assert f"claims {version}" in result.observation.detail


def test_the_overall_result_alone_is_never_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()

    def tamper(claims: list[dict[str, Any]]) -> None:
        claims[0]["measres"] = "fail"
        del claims[0]["secboot"], claims[0]["dbgstat"]

    result = verdict(document(nonce, edit=tamper, monkeypatch=monkeypatch), nonce)
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert "measurements do not match" in result.observation.detail


def test_a_false_overall_result_is_refused_even_with_good_claims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nonce = fresh_nonce()
    result = verdict(document(nonce, result=False, monkeypatch=monkeypatch), nonce)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert "overall attestation result is false" in str(result.observation)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("x-nvidia-gpu-attestation-report-nonce-match", False, Reason.GPU_NONCE_MISMATCH),
        ("x-nvidia-gpu-attestation-report-nonce-match", None, Reason.GPU_EVIDENCE_INVALID),
        ("eat_nonce", "00" * 32, Reason.GPU_NONCE_MISMATCH),
        ("x-nvidia-gpu-attestation-report-signature-verified", False, Reason.GPU_EVIDENCE_INVALID),
        ("x-nvidia-gpu-driver-rim-version-match", None, Reason.GPU_EVIDENCE_INVALID),
        ("dbgstat", "enabled", Reason.GPU_EVIDENCE_INVALID),
    ],
)
def test_each_claim_is_checked(
    name: str, value: object, reason: Reason, monkeypatch: pytest.MonkeyPatch
) -> None:
    nonce = fresh_nonce()

    def edit(claims: list[dict[str, Any]]) -> None:
        claims[0][name] = value

    doc = document(nonce, edit=edit, monkeypatch=monkeypatch)
    if name == "eat_nonce":  # the LGV writes its caller's nonce into each GPU token itself
        payload = doc["claims"][0] | {"eat_nonce": value}
        doc["claims"][0] = payload
        doc["detached_eat"][1]["GPU-0"] = forge(payload)
    assert verdict(doc, nonce).reason is reason


def forge(payload: dict[str, Any]) -> str:
    return standin.hs256(payload)


@pytest.mark.parametrize(
    ("field", "value"),
    [("x-nvidia-cert-ocsp-status", "revoked"), ("x-nvidia-cert-status", "expired")],
)
def test_v3_certificate_chains_must_be_valid_and_good(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nonce = fresh_nonce()

    def edit(claims: list[dict[str, Any]]) -> None:
        claims[0]["x-nvidia-gpu-vbios-rim-cert-chain"][field] = value

    result = verdict(document(nonce, edit=edit, monkeypatch=monkeypatch), nonce)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert value in str(result.observation)


def test_v2_rim_certificate_claims_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()

    def edit(claims: list[dict[str, Any]]) -> None:
        claims[0]["x-nvidia-gpu-driver-rim-cert-validated"] = False

    doc = document(nonce, version="2.0", edit=edit, monkeypatch=monkeypatch)
    assert verdict(doc, nonce).reason is Reason.GPU_EVIDENCE_INVALID


def test_the_configured_count_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()
    two = document(nonce, gpus=2, monkeypatch=monkeypatch)
    assert verdict(two, nonce).reason is Reason.GPU_COUNT_MISMATCH
    assert verdict(two, nonce, LgvOptions(expected_count=2, venv=Path("/opt/lgv"))).passed
    one = document(nonce, monkeypatch=monkeypatch)
    assert (
        verdict(one, nonce, LgvOptions(expected_count=2, venv=Path("/opt/lgv"))).reason
        is Reason.GPU_COUNT_MISMATCH
    )


def test_no_gpu_attested_is_a_verifier_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, gpus=0, result=False, monkeypatch=monkeypatch)
    assert verdict(doc, nonce).reason is Reason.GPU_VERIFIER_FAILED


def test_a_stale_result_or_another_overall_nonce_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, monkeypatch=monkeypatch)
    late = decide(run(doc), nonce, OPTIONS, now=time.time() + 3 * OPTIONS.max_age_s)
    assert late.reason is Reason.GPU_EVIDENCE_INVALID
    assert "stale" in str(late.observation)
    overall = doc["overall_claims"] | {"eat_nonce": "11" * 32}
    doc["detached_eat"][0][1] = forge(overall)
    assert verdict(doc, nonce).reason is Reason.GPU_NONCE_MISMATCH


def test_each_gpu_token_is_bound_by_its_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, monkeypatch=monkeypatch)
    payload = doc["claims"][0]
    assert doc["overall_claims"]["submods"]["GPU-0"][1][1] == submod_digest(payload)
    swapped = payload | {"x-nvidia-gpu-driver-version": "999.1"}
    doc["detached_eat"][1]["GPU-0"] = forge(swapped)
    doc["claims"][0] = swapped
    result = verdict(doc, nonce)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert "digest" in str(result.observation)


def test_the_runners_claims_must_be_its_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, monkeypatch=monkeypatch)
    doc["claims"][0]["measres"] = "success, trust me"
    assert verdict(doc, nonce).reason is Reason.GPU_VERIFIER_FAILED


# --- collateral, early stops, broken output -------------------------------------------------


def chain_of(exc: BaseException) -> list[dict[str, Any]]:
    return lgv_runner.describe(exc)


def http(status: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("https://rim.example/x", status, "no", Message(), None)


@pytest.mark.parametrize(
    ("call", "unreachable"),
    [
        ({"service": "rim", "outcome": "pending"}, True),
        ({"service": "ocsp", "outcome": "error"}, True),  # chain set below: URLError
        ({"service": "rim", "outcome": "error", "status": 503}, True),
        ({"service": "rim", "outcome": "error", "status": 404}, False),
    ],
)
def test_collateral_failures(
    call: dict[str, Any], unreachable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, result=False, monkeypatch=monkeypatch)
    if call["outcome"] == "error":
        status = call.pop("status", None)
        cause: Exception = (
            http(status) if status else urllib.error.URLError(ConnectionRefusedError(111, "no"))
        )
        try:
            raise standin.RIMFetchError("Unable to fetch RIM") from cause
        except standin.RIMFetchError as exc:
            call["chain"] = chain_of(exc)
    doc["collateral"] = [call]
    result = verdict(doc, nonce)
    if unreachable:
        assert isinstance(result.observation, GpuCollateralUnreachable), result.observation
        assert result.reason is Reason.GPU_COLLATERAL_UNAVAILABLE
    else:
        assert isinstance(result.observation, GpuEvidenceFailed)
        assert result.reason is Reason.GPU_EVIDENCE_INVALID


@pytest.mark.parametrize(
    ("stage", "nvml", "reason"),
    [
        ("import", {}, Reason.GPU_VERIFIER_FAILED),
        ("api", {}, Reason.GPU_VERIFIER_FAILED),
        ("nvml", {"cc_feature": False, "ppcie": False}, Reason.GPU_CC_OFF),
        ("nvml", {"cc_feature": None}, Reason.GPU_LOST),
        ("collect", {"cc_feature": True}, Reason.GPU_LOST),
        ("attest", {"cc_feature": True}, Reason.GPU_VERIFIER_FAILED),
        ("elsewhere", {}, Reason.GPU_VERIFIER_FAILED),
    ],
)
def test_early_stops(stage: str, nvml: dict[str, Any], reason: Reason) -> None:
    nonce = fresh_nonce()
    doc = {"runner": 1, "stage": stage, "nonce": nonce, "nvml": nvml, "errors": []}
    doc["errors"] = [{"where": stage, "chain": chain_of(RuntimeError("boom"))}]
    result = verdict(doc, nonce)
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is reason


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"runner": 1, "runner": 1}',
        b'{"runner": 2, "stage": "done"}',
        b"[1, 2]",
        b'{"runner": 1, "stage": "done", "nonce": NaN}',
    ],
)
def test_garbage_fails_closed(raw: bytes) -> None:
    result = verdict(raw, fresh_nonce(), stderr=b"last words\n")
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "last words" in str(result.observation)


def test_another_nonce_a_crash_a_signal_and_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce = fresh_nonce()
    doc = document(nonce, monkeypatch=monkeypatch)
    assert verdict(doc, fresh_nonce()).reason is Reason.GPU_VERIFIER_FAILED
    crashed = verdict(b"", nonce, returncode=1, stderr=b"Traceback\nKeyError: 'x'\n")
    assert crashed.reason is Reason.GPU_VERIFIER_FAILED
    assert "exited 1: KeyError" in str(crashed.observation)
    assert verdict(doc, nonce, returncode=-9).reason is Reason.GPU_VERIFIER_FAILED
    late = decide(RunOutput(None, b"", b"", 9.0, timed_out=True), nonce, OPTIONS, now=time.time())
    assert isinstance(late.observation, GpuCollateralUnreachable)
    assert late.reason is Reason.GPU_VERIFIER_TIMEOUT
    big = decide(RunOutput(None, b"", b"", 1.0, too_large=True), nonce, OPTIONS, now=time.time())
    assert big.reason is Reason.GPU_VERIFIER_FAILED


# --- options, argv, the missing venv ----------------------------------------------------------


def test_argv_env_and_config() -> None:
    options = LgvOptions(
        expected_count=1,
        venv=Path("/opt/lgv"),
        rim_url="https://rim.example",
        ocsp_url="https://ocsp.example",
        env={"NV_RIM_URL": "https://elsewhere", "PATH": "/bin"},
    )
    argv = build_argv(options, "ab" * 32)
    assert argv[:3] == ["/opt/lgv/bin/python", "-I", str(options.runner)]
    assert options.runner.name == "lgv_runner.py" and options.runner.is_file()
    assert argv[argv.index("--nonce") + 1] == "ab" * 32
    assert argv[argv.index("--claims-version") + 1] == "3.0"
    assert argv[argv.index("--rim-url") + 1] == "https://rim.example"
    assert argv[argv.index("--ocsp-url") + 1] == "https://ocsp.example"
    assert build_env(options) == {"PATH": "/bin"}
    cfg = Config(
        gpu_lgv_venv=Path("/opt/lgv"), nvattest_ocsp_url="https://o", gpu_evidence_timeout_s=7.0
    )
    from_cfg = LgvOptions.from_config(cfg, 2)
    assert (from_cfg.venv, from_cfg.ocsp_url, from_cfg.timeout_s) == (
        Path("/opt/lgv"),
        "https://o",
        7.0,
    )
    assert from_cfg.expected_count == 2
    with pytest.raises(ConfigError, match="gpu_lgv_venv"):
        LgvOptions.from_config(Config(), 1)
    with pytest.raises(ValueError, match="claims_version"):
        LgvOptions(expected_count=1, venv=Path("/x"), claims_version="1.0")


def test_a_missing_venv_is_one_clear_line(tmp_path: Path) -> None:
    backend = LgvBackend(LgvOptions(expected_count=1, venv=tmp_path / "nowhere"))
    assert backend.name == "lgv"
    result = backend.attest()
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    detail = result.observation.detail
    assert "\n" not in detail
    assert detail.startswith(f"no LGV virtualenv at {tmp_path / 'nowhere'}")


# --- the runner's own pieces (it runs under the LGV's interpreter) ------------------------------


def test_the_runner_asks_for_user_mode_and_strict_ocsp() -> None:
    options = lgv_runner.parse_args(["--nonce", "ab" * 32, "--ocsp-url", "https://o"])
    args = lgv_runner.arguments(options)
    assert args["user_mode"] is True
    assert args["allow_hold_cert"] is False
    assert args["ocsp_attestation_settings"] == "strict"
    assert args["ocsp_nonce_disabled"] is False and args["ocsp_nonce_enabled"] is True
    assert args["ocsp_url"] == args["ocsp_service_url"] == "https://o"
    assert args["rim_service_url"] is None
    assert args["claims_version"] == "3.0"
    assert args["driver_rim"] is None and args["vbios_rim"] is None
    assert args["test_no_gpu"] is False


def test_the_runner_keeps_exception_chains_from_log_records() -> None:
    capture = lgv_runner.Capture()
    log = logging.getLogger("test-lgv-capture")
    log.addHandler(capture)
    log.propagate = False
    try:
        try:
            raise standin.NonceMismatchError("nonce") from http(500)
        except standin.NonceMismatchError as exc:
            log.error(exc)
            log.exception("GPU Attestation failed")  # the same exception: kept once
    finally:
        log.removeHandler(capture)
    assert len(capture.errors) == 1
    chain = capture.errors[0]["chain"]
    assert chain[0]["type"] == "testbed.lgv.NonceMismatchError"
    assert chain[1]["http_status"] == 500
    assert "urllib.error.URLError" in chain[1]["mro"]


def test_the_runner_decodes_tokens_in_gpu_order() -> None:
    tokens = {f"GPU-{i}": standin.hs256({"i": i}) for i in (10, 2, 0, 1)}
    doc: dict[str, Any] = {}
    lgv_runner.decode_eat([["JWT", standin.hs256({"o": 1})], tokens], doc)
    assert doc["overall_claims"] == {"o": 1}
    assert [c["i"] for c in doc["claims"]] == [0, 1, 2, 10]
    assert lgv_runner.token_payload("x.!!.y") is None
    assert lgv_runner.token_payload(base64.b64encode(b"{}").decode()) is None
