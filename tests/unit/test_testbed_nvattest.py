"""The stand-in nvattest without processes: its command line, result codes, JSON document,
detached EAT and verifier, on reports built here in the fake NVML's layout."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from testbed import gpu as fakegpu
from testbed import nvattest, pki
from testbed import nvattest_cli as cli
from testbed.faults import Fault, Faults

pytestmark = pytest.mark.unit

NONCE = bytes(range(32))
DRIVER = "550.127.05"
VBIOS = "96.00.9F.00.04"


# --- a GPU built here -------------------------------------------------------------------------


class Gpu:
    """A root, ICA, device and attestation certificate, and reports in fake_nvml.c's layout."""

    def __init__(self) -> None:
        self.root = pki.issue("unit NVIDIA Device Identity CA", pki.p384_key(), ca=True, days=3650)
        ica = pki.issue("unit GH100 ICA", pki.p384_key(), self.root, ca=True, days=3650)
        self.device = pki.issue("unit GH100 A01 FSP BROM", pki.p384_key(), ica, ca=True, days=3650)
        self.leaf = pki.issue("unit GH100 A01 GSP FMC LF", pki.p384_key(), self.device)
        self.chain = self.leaf.cert_pem + self.device.cert_pem + ica.cert_pem + self.root.cert_pem

    def report(
        self,
        nonce: bytes = NONCE,
        *,
        driver: str = DRIVER,
        vbios: str = VBIOS,
        devtools: bool = False,
        tamper: int = 0,
        key: ec.EllipticCurvePrivateKey | None = None,
        mangle: Callable[[bytes], bytes] | None = None,
    ) -> bytes:
        body = bytearray(b"\x11\xe0\x01\xff" + nonce + b"\x00")
        body += b"\x11\x60\x00\x00" + bytes([8]) + (8 * 55).to_bytes(3, "little")
        for index in range(1, 9):
            if index <= 4:
                component = f"vbios:{vbios}"
            elif index <= 7:
                component = f"driver:{driver}"
            else:
                component = f"mode:cc=on,devtools={'on' if devtools else 'off'}"
            value = bytearray(fakegpu.measurement(index, component))
            if tamper == index:
                value[0] ^= 0xFF
            kind = 0x03 if index == 8 else 0x01
            body += struct.pack("<BBHBH", index, 1, 51, kind, 48) + value
        body += bytes(32)
        opaque = b""
        for kind, text in ((3, driver), (4, "GPU-unit"), (6, vbios)):
            data = text.encode() + b"\0"
            opaque += struct.pack("<HH", kind, len(data)) + data
        body += struct.pack("<H", len(opaque)) + opaque
        data = mangle(bytes(body)) if mangle else bytes(body)
        signer = key or self.leaf.key
        assert isinstance(signer, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(signer.sign(data, ec.ECDSA(hashes.SHA384())))
        return data + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def evidence(self, report: bytes | None = None, **kw: Any) -> nvattest.GpuEvidence:
        return nvattest.GpuEvidence(
            index=0,
            uuid="GPU-unit",
            architecture=kw.pop("architecture", nvattest.NVML_ARCH_HOPPER),
            report=report if report is not None else self.report(),
            cert_chain=kw.pop("chain", self.chain),
            nonce=kw.pop("nonce", NONCE),
        )


@pytest.fixture(scope="module")
def unit_gpu() -> Gpu:
    return Gpu()


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    path = tmp_path / "reference-measurements.json"
    data = {
        "driver": DRIVER,
        "vbios": VBIOS,
        "measurements": fakegpu.reference_measurements(DRIVER, VBIOS),
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def faults(tmp_path: Path) -> Faults:
    return Faults(tmp_path / "faults.json")


def collateral(reference: Path, faults: Faults | None = None, **kw: str) -> nvattest.Collateral:
    return nvattest.Collateral(
        reference=reference,
        rim_url=kw.get("rim_url", "https://rim.attestation.nvidia.com"),
        ocsp_url=kw.get("ocsp_url", "https://ocsp.ndis.nvidia.com"),
        faults=faults,
        log=nvattest.Log(io.StringIO(), "off"),
    )


def verify(gpu: Gpu, reference: Path, faults: Faults | None = None, **kw: Any) -> dict[str, Any]:
    evidence = kw.pop("evidence", None) or gpu.evidence()
    return nvattest.verify_gpu(
        evidence,
        kw.pop("root", gpu.root.cert),
        collateral(reference, faults, **kw),
        nvattest.VerifyOptions(),
    )


def rc_of(call: Callable[[], object]) -> int:
    with pytest.raises(nvattest.NvatError) as info:
        call()
    return info.value.rc


# --- command line ----------------------------------------------------------------------------


def test_parses_the_adapter_command_line() -> None:
    opts = cli.parse(
        [
            "attest",
            "--device",
            "gpu",
            "--verifier",
            "local",
            "--nonce",
            "ab" * 32,
            "--format",
            "json",
        ],
        env={},
    )
    assert opts.command == "attest"
    assert opts.text("nonce") == "ab" * 32
    assert opts.text("format") == "json"
    assert opts.text("rim_url") == "https://rim.attestation.nvidia.com"
    assert opts.text("ocsp_url") == "https://ocsp.ndis.nvidia.com"
    assert opts.switch("verify_rim_signatures") is True


def test_defaults_forms_and_environment(tmp_path: Path) -> None:
    opts = cli.parse(
        ["-f", "json", "attest", "-dgpu", "--rim-url=http://r", "--no-verify-rim-signatures"],
        env={"NVAT_OCSP_BASE_URL": "http://o", "NVAT_LOG_LEVEL": "off"},
    )
    assert opts.text("format") == "json"
    assert opts.text("device") == "gpu"
    assert opts.text("rim_url") == "http://r"
    assert opts.text("ocsp_url") == "http://o"
    assert opts.text("log_level") == "off"
    assert opts.switch("verify_rim_signatures") is False
    assert cli.parse(["attest"], env={}).text("format") == "text"  # the real default
    assert cli.parse(["attest", "--rim-dir", str(tmp_path)], env={}).text("rim_dir") == str(
        tmp_path
    )


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["attest", "--bogus"], 109, "The following argument was not expected: --bogus"),
        (["attest", "--tls-ca-cert", "x"], 109, "The following arguments were not expected:"),
        (["attest", "--ocsp-cert-id-hash", "sha-384"], 109, "not expected"),
        (["attest", "extra"], 109, "The following argument was not expected: extra"),
        (["frobnicate"], 109, "not expected: frobnicate"),
        (["attest", "--device", "tpu"], 105, "--device: tpu not in {gpu,nvswitch}"),
        (["attest", "--format", "yaml"], 105, "--format: yaml not in {text,json}"),
        (["attest", "--verifier", "nras"], 105, "--verifier: nras not in {local,remote}"),
        (["attest", "--nonce"], 114, "--nonce: 1 required TEXT missing"),
        (["attest", "--nonce", "aa", "--nonce", "bb"], 114, "--nonce"),
        (["attest", "--rim-dir", "/nonexistent/rims"], 105, "Directory does not exist"),
        (["attest", "--relying-party-policy", "/nonexistent.rego"], 105, "File does not exist"),
        (["attest", "--gpu-evidence-source", "file"], 105, "--gpu-evidence-file must be provided"),
        (["attest", "--gpu-evidence-source", "corelib"], 105, "--gpu-architecture is required"),
        (["collect-evidence", "--rim-url", "x"], 109, "not expected: --rim-url x"),
    ],
)
def test_parse_errors_are_cli11s(argv: list[str], code: int, message: str) -> None:
    with pytest.raises(cli.CliError) as info:
        cli.parse(argv, env={})
    assert info.value.exit_code == code
    assert message in info.value.message


def test_environment_values_are_validated() -> None:
    with pytest.raises(cli.CliError) as info:
        cli.parse(["attest"], env={"NVAT_FORMAT": "xml"})
    assert info.value.exit_code == 105


def run_main(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = nvattest.main(["nvattest", *argv], testbed_dir=tmp_path, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_main_reports_parse_errors_on_stderr(tmp_path: Path) -> None:
    code, out, err = run_main(tmp_path, "attest", "--device", "gpu", "--frob")
    assert code == 109
    assert out == ""
    assert err == (
        "The following argument was not expected: --frob\nRun with --help for more information.\n"
    )


def test_help_version_and_no_subcommand(tmp_path: Path) -> None:
    code, out, err = run_main(tmp_path)
    assert code == 0 and "Subcommands:" in out
    code, out, _ = run_main(tmp_path, "attest", "--help")
    assert code == 0 and out
    code, out, err = run_main(tmp_path, "version")
    assert code == 0 and out == "" and err.startswith("nvattest 1.2.2 (linux/")


def test_each_run_is_logged_with_the_service_key_hidden(tmp_path: Path) -> None:
    run_main(tmp_path, "attest", "--service-key", "s3cret", "--bogus")
    entry = json.loads((tmp_path / "run" / "nvattest.log").read_text().splitlines()[-1])
    assert entry["argv"] == ["attest", "--service-key", "<6 chars>", "--bogus"]


# --- result codes, exit status, nonce ---------------------------------------------------------


@pytest.mark.parametrize(
    ("rc", "status"),
    [(0, 0), (2, 2), (11, 11), (12, 12), (500, 244), (501, 245), (509, 253), (802, 34)],
)
def test_exit_status_wraps_modulo_256(rc: int, status: int) -> None:
    assert nvattest.exit_status(rc) == status


def test_result_messages_are_the_sdks() -> None:
    assert nvattest.result_message(0) == "Ok"
    assert nvattest.result_message(12) == "Overall Attestation Result is False"
    assert nvattest.result_message(504) == "GPU Evidence Nonce Mismatch"
    assert nvattest.result_message(509) == "GPU is neither in CC nor in PPCIe mode"
    assert nvattest.result_message(4242) == "Undefined"


def test_nonce_parsing() -> None:
    assert nvattest.parse_nonce("0x" + "AB" * 32) == b"\xab" * 32
    assert nvattest.parse_nonce("cd" * 40) == b"\xcd" * 40  # longer is a valid nonce...
    for bad in ("ab" * 31, "abc", "zz" * 32, "", " " + "ab" * 32):
        assert rc_of(lambda b=bad: nvattest.parse_nonce(b)) == nvattest.RC_BAD_ARGUMENT  # type: ignore[misc]


# --- the document and the detached EAT --------------------------------------------------------


def test_document_without_claims_has_empty_objects() -> None:
    doc = nvattest.attest_document(509)
    assert doc == {
        "claims": {},
        "detached_eat": {},
        "result_code": 509,
        "result_message": "GPU is neither in CC nor in PPCIe mode",
    }
    text = nvattest.render(doc)
    assert text.endswith("}\n")
    assert text.splitlines()[1] == '    "claims": {},'


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")

    def part(text: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return data

    return part(header), part(payload), signature


def test_detached_eat_shape(unit_gpu: Gpu, reference: Path) -> None:
    claims = [verify(unit_gpu, reference), verify(unit_gpu, reference)]
    eat = nvattest.detached_eat(claims, NONCE.hex(), now=1_800_000_000)
    (label, overall), submods = eat
    assert label == "JWT"
    assert list(submods) == ["GPU-0", "GPU-1"]
    header, payload, signature = decode(overall)
    assert header == {"alg": "none"} and signature == ""
    assert payload["iss"] == "NVAT-LOCAL-VERIFIER"
    assert payload["sub"] == "NVIDIA-PLATFORM-ATTESTATION"
    assert payload["x-nvidia-ver"] == "3.0"
    assert payload["x-nvidia-overall-att-result"] is True
    assert payload["eat_nonce"] == NONCE.hex()
    assert payload["exp"] - payload["iat"] == 3600 and "nbf" not in payload
    assert len(payload["jti"]) == 64
    for name, token in submods.items():
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert payload["submods"][name] == ["DIGEST", ["SHA256", digest]]
        _, gpu_payload, _ = decode(token)
        assert gpu_payload["iss"] == "NVAT-LOCAL-VERIFIER"
        assert {k: v for k, v in gpu_payload.items() if k not in ("iat", "exp", "jti", "iss")} == (
            claims[0]
        )
    # the payload is nlohmann's compact dump: sorted keys, no blanks
    raw = base64.urlsafe_b64decode(overall.split(".")[1] + "==").decode()
    assert raw.startswith('{"eat_nonce":') and ", " not in raw


def test_overall_result_is_the_builtin_policy(unit_gpu: Gpu, reference: Path) -> None:
    good = verify(unit_gpu, reference)
    assert nvattest.overall_result([good])
    assert not nvattest.overall_result([])
    assert not nvattest.overall_result([good | {"measres": "fail"}])
    for chain in nvattest.CHAIN_CLAIMS:
        for key, value in (
            ("x-nvidia-cert-status", "expired"),
            ("x-nvidia-cert-ocsp-status", "revoked"),
            ("x-nvidia-cert-ocsp-nonce-matches", False),
            ("x-nvidia-cert-ocsp-response-valid", False),
        ):
            assert not nvattest.overall_result([good | {chain: good[chain] | {key: value}}])


# --- the verifier -----------------------------------------------------------------------------


def test_good_evidence_gives_the_v3_claims(unit_gpu: Gpu, reference: Path) -> None:
    claims = verify(unit_gpu, reference)
    assert claims["measres"] == "success"
    assert claims["secboot"] is True and claims["dbgstat"] == "disabled"
    assert claims["eat_nonce"] == NONCE.hex()
    assert claims["x-nvidia-mismatch-measurement-records"] is None
    assert claims["x-nvidia-gpu-driver-version"] == DRIVER
    assert claims["x-nvidia-gpu-vbios-version"] == VBIOS
    assert claims["x-nvidia-gpu-claims-version"] == "3.0"
    assert claims["hwmodel"] == "unit GH100 A01 FSP BROM"
    assert claims["ueid"] == str(unit_gpu.device.cert.serial_number)
    chain = claims["x-nvidia-gpu-attestation-report-cert-chain"]
    assert chain == {
        "x-nvidia-cert-expiration-date": unit_gpu.leaf.cert.not_valid_after_utc.strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "x-nvidia-cert-ocsp-nonce-matches": True,
        "x-nvidia-cert-ocsp-response-valid": True,
        "x-nvidia-cert-ocsp-status": "good",
        "x-nvidia-cert-revocation-reason": None,
        "x-nvidia-cert-status": "valid",
    }
    assert sorted(claims) == list(claims)  # the SDK's (sorted) key order


def test_nonce_echo_is_checked(unit_gpu: Gpu, reference: Path) -> None:
    replay = unit_gpu.evidence(unit_gpu.report(nonce=b"\x55" * 32))
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=replay)) == 504


def test_signature_is_checked_against_the_chain_leaf(unit_gpu: Gpu, reference: Path) -> None:
    other = pki.p384_key()
    forged = unit_gpu.evidence(unit_gpu.report(key=other))
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=forged)) == 508
    flipped = bytearray(unit_gpu.report())
    flipped[60] ^= 1
    evidence = unit_gpu.evidence(bytes(flipped))
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=evidence)) == 508


def test_chain_must_reach_the_configured_root(unit_gpu: Gpu, reference: Path) -> None:
    stranger = pki.issue("another root", pki.p384_key(), ca=True)
    assert rc_of(lambda: verify(unit_gpu, reference, root=stranger.cert)) == 802
    garbage = unit_gpu.evidence(chain=b"not a pem")
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=garbage)) == 2


def test_malformed_report_is_invalid_evidence(unit_gpu: Gpu, reference: Path) -> None:
    broken = unit_gpu.evidence(unit_gpu.report(mangle=lambda b: b[:-5]))
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=broken)) == 503


def test_unsupported_architecture(unit_gpu: Gpu, reference: Path) -> None:
    ampere = unit_gpu.evidence(architecture=7)
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=ampere)) == 502


@pytest.mark.parametrize(
    ("kw", "index", "source"), [({"tamper": 3}, 3, "Firmware"), ({"devtools": True}, 8, "Driver")]
)
def test_measurement_mismatch(
    unit_gpu: Gpu, reference: Path, kw: dict[str, Any], index: int, source: str
) -> None:
    claims = verify(unit_gpu, reference, evidence=unit_gpu.evidence(unit_gpu.report(**kw)))
    assert claims["measres"] == "fail"
    assert claims["secboot"] is None and claims["dbgstat"] is None
    (record,) = claims["x-nvidia-mismatch-measurement-records"]
    assert record["index"] == index and record["measurementSource"] == source
    assert record["goldenSize"] == 48 and record["runtimeSize"] == 48
    assert record["goldenValue"] != record["runtimeValue"]
    assert not nvattest.overall_result([claims])


def test_no_rim_for_another_driver(unit_gpu: Gpu, reference: Path) -> None:
    newer = unit_gpu.evidence(unit_gpu.report(driver="560.35.03"))
    assert rc_of(lambda: verify(unit_gpu, reference, evidence=newer)) == 104
    missing = reference.with_name("missing.json")
    assert rc_of(lambda: verify(unit_gpu, missing)) == 104


@pytest.mark.parametrize(
    ("service", "fault", "rc"),
    [
        ("nvattest-ocsp", Fault(down=True), 2),
        ("nvattest-ocsp", Fault(status=503), 202),
        ("nvattest-ocsp", Fault(status=403), 205),
        ("nvattest-rim", Fault(down=True), 2),
        ("nvattest-rim", Fault(status=404), 104),
        ("nvattest-rim", Fault(status=401), 101),
        ("nvattest-rim", Fault(status=500), 102),
        ("nvattest", Fault(inject="bad-signature"), 508),
    ],
)
def test_collateral_faults(
    unit_gpu: Gpu, reference: Path, faults: Faults, service: str, fault: Fault, rc: int
) -> None:
    faults.arm(service, fault)
    assert rc_of(lambda: verify(unit_gpu, reference, faults)) == rc


def test_unsupported_url_scheme_is_a_curl_error(unit_gpu: Gpu, reference: Path) -> None:
    assert rc_of(lambda: verify(unit_gpu, reference, ocsp_url="ftp://ocsp")) == 2
    assert rc_of(lambda: verify(unit_gpu, reference, rim_url="file:///rims")) == 2


def test_ocsp_injections_are_claims(unit_gpu: Gpu, reference: Path, faults: Faults) -> None:
    faults.arm("nvattest", Fault(inject="ocsp-revoked", count=1))
    claims = verify(unit_gpu, reference, faults)
    chain = claims["x-nvidia-gpu-attestation-report-cert-chain"]
    assert chain["x-nvidia-cert-ocsp-status"] == "revoked"
    assert chain["x-nvidia-cert-revocation-reason"] == "keyCompromise"
    assert claims["measres"] == "success" and not nvattest.overall_result([claims])
    faults.arm("nvattest", Fault(inject="ocsp-nonce-mismatch", count=1))
    claims = verify(unit_gpu, reference, faults)
    for name in nvattest.CHAIN_CLAIMS:
        assert claims[name]["x-nvidia-cert-ocsp-nonce-matches"] is False
    assert nvattest.overall_result([verify(unit_gpu, reference, faults)])  # count used up


def test_expired_chain_is_a_claim(unit_gpu: Gpu, reference: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)  # past the leaf's 365 days
    claims = nvattest.verify_gpu(
        unit_gpu.evidence(),
        unit_gpu.root.cert,
        collateral(reference),
        nvattest.VerifyOptions(),
        now=later,
    )
    assert claims["x-nvidia-gpu-attestation-report-cert-chain"]["x-nvidia-cert-status"] == "expired"
    assert not nvattest.overall_result([claims])
