"""``DIR/bin/nvattest``, the stand-in nvattest, against the fake GPU of a running testbed: the
happy path and each failure the way the real tool reports it (result code, exit status modulo
256, claims and detached EAT)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from testbed import pki
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 60
GOOD_STATE = ("cc=on", "devtools=off", "lost=0", "gpus=1", "tamper=0", "driver=550.127.05")


@dataclass(frozen=True)
class Run:
    status: int
    stdout: str
    stderr: str

    @property
    def doc(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


@pytest.fixture
def bed(testbed: RunningTestbed) -> Iterator[RunningTestbed]:
    """The module's testbed, put back to a good single GPU with no faults after each test."""
    yield testbed
    testbed.cli("fault", "--clear")
    testbed.cli("gpu", "set", *GOOD_STATE)


def nvattest(
    bed: RunningTestbed, *args: str, nonce: str | None = None, env: dict[str, str] | None = None
) -> Run:
    argv = [bed.env["CONFINFER_TESTBED_NVATTEST"], *args]
    if nonce is not None:
        argv += ["--nonce", nonce]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        env=bed.environ() if env is None else env,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def attest(bed: RunningTestbed, nonce: str | None = None, *extra: str) -> Run:
    nonce = nonce or secrets.token_hex(32)
    return nvattest(
        bed,
        "attest",
        "--device",
        "gpu",
        "--verifier",
        "local",
        "--format",
        "json",
        *extra,
        nonce=nonce,
    )


def payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def expect_failure(run: Run, rc: int) -> None:
    assert run.doc == {
        "claims": {},
        "detached_eat": {},
        "result_code": rc,
        "result_message": run.doc["result_message"],
    }, run.stderr
    assert run.status == rc % 256


def test_up_writes_the_tool(testbed: RunningTestbed) -> None:
    tool = Path(testbed.env["CONFINFER_TESTBED_NVATTEST"])
    assert tool == testbed.dir / "bin" / "nvattest"
    assert os.access(tool, os.X_OK)


def test_happy_path(bed: RunningTestbed) -> None:
    nonce = secrets.token_hex(32).upper()
    run = attest(bed, nonce)
    assert run.status == 0, run.stderr
    doc = run.doc
    assert doc["result_code"] == 0 and doc["result_message"] == "Ok"
    assert run.stdout.startswith('{\n    "claims": [\n')  # json.dump(4), keys sorted
    (claims,) = doc["claims"]
    assert claims["eat_nonce"] == nonce.lower()
    assert claims["measres"] == "success" and claims["secboot"] is True
    assert claims["x-nvidia-gpu-driver-version"] == "550.127.05"
    assert claims["x-nvidia-gpu-attestation-report-cert-chain"]["x-nvidia-cert-status"] == "valid"
    (label, overall), submods = doc["detached_eat"]
    assert label == "JWT" and list(submods) == ["GPU-0"]
    top = payload(overall)
    assert top["x-nvidia-overall-att-result"] is True
    assert top["eat_nonce"] == nonce.lower()
    digest = hashlib.sha256(submods["GPU-0"].encode()).hexdigest()
    assert top["submods"]["GPU-0"] == ["DIGEST", ["SHA256", digest]]
    assert overall.endswith(".") and submods["GPU-0"].endswith(".")  # alg none, no signature


def test_bound_to_its_testbed_without_the_environment(bed: RunningTestbed) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    run = nvattest(bed, "attest", "--format", "json", env=env)  # a random nonce of its own
    assert run.status == 0, run.stderr
    assert len(run.doc["claims"][0]["eat_nonce"]) == 64


def test_two_gpus(bed: RunningTestbed) -> None:
    bed.cli("gpu", "set", "gpus=2")
    run = attest(bed)
    assert run.status == 0, run.stderr
    assert len(run.doc["claims"]) == 2
    assert list(run.doc["detached_eat"][1]) == ["GPU-0", "GPU-1"]


@pytest.mark.parametrize(
    ("change", "rc"),
    [
        (("gpu", "cc-off"), 509),  # GPU is neither in CC nor in PPCIe mode
        (("gpu", "lose"), 501),  # NVML Error: the handle answers GPU_IS_LOST
        (("gpu", "set", "gpus=0"), 500),  # NVML Initialization Failed: GPU_NOT_FOUND
        (("gpu", "set", "driver=560.35.03"), 104),  # no RIM for that driver
        (("fault", "nvattest", "--inject", "nonce-mismatch"), 504),
        (("fault", "nvattest", "--inject", "bad-signature"), 508),
        (("fault", "nvattest-ocsp", "--down"), 2),  # curl gave up: Internal Error
        (("fault", "nvattest-rim", "--down"), 2),
        (("fault", "nvattest-rim", "--status", "404"), 104),
        (("fault", "nvattest-ocsp", "--status", "503"), 202),
    ],
)
def test_failures_without_claims(bed: RunningTestbed, change: tuple[str, ...], rc: int) -> None:
    bed.cli(*change)
    expect_failure(attest(bed), rc)


@pytest.mark.parametrize(
    ("change", "index"),
    [(("gpu", "devtools-on"), 8), (("gpu", "set", "tamper=3"), 3)],
)
def test_measurement_mismatch_is_overall_false(
    bed: RunningTestbed, change: tuple[str, ...], index: int
) -> None:
    bed.cli(*change)
    run = attest(bed)
    assert run.doc["result_code"] == 12 and run.status == 12
    (claims,) = run.doc["claims"]
    assert claims["measres"] == "fail" and claims["dbgstat"] is None
    assert [r["index"] for r in claims["x-nvidia-mismatch-measurement-records"]] == [index]
    assert payload(run.doc["detached_eat"][0][1])["x-nvidia-overall-att-result"] is False


def test_ocsp_revoked_is_overall_false(bed: RunningTestbed) -> None:
    bed.cli("fault", "nvattest", "--inject", "ocsp-revoked", "--count", "1")
    run = attest(bed)
    assert run.doc["result_code"] == 12
    chain = run.doc["claims"][0]["x-nvidia-gpu-attestation-report-cert-chain"]
    assert chain["x-nvidia-cert-ocsp-status"] == "revoked"
    assert attest(bed).doc["result_code"] == 0  # the count is used up


def test_report_signed_by_an_uncertified_key(bed: RunningTestbed) -> None:
    key_file = bed.dir / "gpu" / "attestation-key.pem"
    original = key_file.read_bytes()
    other = pki.p384_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.write_bytes(other)
    try:
        expect_failure(attest(bed), 508)
    finally:
        key_file.write_bytes(original)
    assert attest(bed).status == 0


def test_short_nonce_and_unknown_flags(bed: RunningTestbed) -> None:
    expect_failure(attest(bed, "ab" * 16), 4)  # Bad Argument: under 32 bytes
    expect_failure(attest(bed, "ab" * 40), 501)  # NVML wants exactly 32 bytes
    run = attest(bed, None, "--tls-ca-cert", "/etc/ssl/certs/ca-certificates.crt")  # 2.x only
    assert run.status == 109 and run.stdout == ""
    assert "not expected: --tls-ca-cert" in run.stderr


def test_runs_are_logged(bed: RunningTestbed) -> None:
    attest(bed, None, "--service-key", "k3y", "--ocsp-url", "http://127.0.0.1:9/ocsp")
    last = (bed.dir / "run" / "nvattest.log").read_text().splitlines()[-1]
    entry = json.loads(last)
    assert "--ocsp-url" in entry["argv"] and "<3 chars>" in entry["argv"]
    assert "k3y" not in last


def test_collect_evidence(bed: RunningTestbed) -> None:
    nonce = secrets.token_hex(32)
    run = nvattest(bed, "collect-evidence", "--format", "json", nonce=nonce)
    assert run.status == 0, run.stderr
    (evidence,) = run.doc["evidences"]
    assert evidence["arch"] == "HOPPER" and evidence["nonce"] == nonce
    report = base64.b64decode(evidence["evidence"])
    assert report[4:36] == bytes.fromhex(nonce)


def test_fault_knob_usage(bed: RunningTestbed) -> None:
    for argv in (
        ("fault", "nvattest", "--down"),
        ("fault", "imds", "--inject", "bad-signature"),
        ("fault", "nvattest", "--inject", "nonsense"),
    ):
        assert bed.cli(*argv, check=False).returncode != 0


def test_collected_evidence_is_reappraised_from_a_file(bed: RunningTestbed) -> None:
    nonce = secrets.token_hex(32)
    collected = nvattest(bed, "collect-evidence", "--format", "json", nonce=nonce)
    path = bed.dir / "evidence.json"
    path.write_text(collected.stdout, encoding="utf-8")
    argv = ("--gpu-evidence-source", "file", "--gpu-evidence-file", str(path))
    run = attest(bed, None, *argv)  # the file's nonce is the one checked
    assert run.status == 0, run.stderr
    assert run.doc["claims"][0]["eat_nonce"] == nonce
    bed.cli("gpu", "cc-off")  # no driver call is made
    assert attest(bed, None, *argv).status == 0
