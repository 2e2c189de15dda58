"""A running testbed (``python -m testbed up``) against the Azure facts it now reproduces: IMDS
instance metadata and AK-certificate renewal with the vTPM, the TLS chains the services present,
the release JWS signer, and the stand-in AzureAttestSKR executable."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from testbed import hcl
from testbed.keystore import KeyStore
from testbed.pki import Trust
from testbed.vtpm import HCL_REPORT_INDEX, Vtpm

if TYPE_CHECKING:
    from tests.integration.conftest import RunningTestbed, TestbedFactory

Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

META = {"Metadata": "true"}


def imds(tb: RunningTestbed, path: str, **params: str) -> requests.Response:
    return requests.get(
        tb.env["CONFINFER_IMDS_URL"] + path, params=params, headers=META, timeout=10
    )


def hcl_vm_unique_id(tb: RunningTestbed) -> str:
    """vmUniqueId in the HCL report the vTPM serves at NV 0x01400001."""
    raw = Vtpm.attach(tb.dir / "vtpm").read_nv(HCL_REPORT_INDEX)
    runtime = json.loads(hcl.parse_hcl_report(raw).runtime_data)
    value: str = runtime["vm-configuration"]["vmUniqueId"]
    return value


# ---- IMDS ---------------------------------------------------------------------------------------


def test_instance_metadata_names_this_vm(testbed: RunningTestbed) -> None:
    vm_id = (testbed.dir / "vm-id").read_text().strip()
    assert vm_id == str(uuid.UUID(vm_id))
    resp = imds(testbed, "/metadata/instance", **{"api-version": "2021-02-01"})
    assert resp.status_code == 200, resp.text
    compute = resp.json()["compute"]
    identities = json.loads((testbed.dir / "identities.json").read_text())
    assert compute["vmId"] == vm_id
    assert compute["subscriptionId"] == identities["subscription_id"]
    assert compute["securityProfile"]["securityType"] == "ConfidentialVM"
    text = imds(
        testbed,
        "/metadata/instance/compute/vmId",
        **{"api-version": "2019-03-11", "format": "text"},
    )
    assert (text.status_code, text.text) == (200, vm_id)
    location = imds(
        testbed,
        "/metadata/instance/compute/location",
        **{"api-version": "2021-02-01", "format": "text"},
    )
    assert (location.status_code, location.text) == (200, "eastus2")
    # The vTPM's HCL report carries the same id, uppercase, as vmUniqueId.
    assert hcl_vm_unique_id(testbed) == vm_id.upper()
    bare = requests.get(
        testbed.env["CONFINFER_IMDS_URL"] + "/metadata/instance",
        params={"api-version": "2021-02-01"},
        timeout=10,
    )
    assert (bare.status_code, bare.json()) == (
        400,
        {"error": "Bad request. Required metadata header not specified"},
    )


def test_vm_id_survives_down_and_up(
    testbed_factory: TestbedFactory, tmp_path: Path, testbed_cli: Cli
) -> None:
    directory = tmp_path / "tb"
    first = testbed_factory(directory)
    vm_id = imds(
        first, "/metadata/instance/compute/vmId", **{"api-version": "2021-02-01", "format": "text"}
    ).text
    testbed_cli("down", "--dir", str(directory))
    second = testbed_factory(directory)
    again = imds(
        second, "/metadata/instance/compute/vmId", **{"api-version": "2021-02-01", "format": "text"}
    ).text
    assert again == vm_id == (directory / "vm-id").read_text().strip()
    assert hcl_vm_unique_id(second) == vm_id.upper()


def test_ak_cert_near_expiry_then_renewal_as_the_guest_library_does_it(
    testbed: RunningTestbed,
) -> None:
    vtpm = Vtpm.attach(testbed.dir / "vtpm")
    original = x509.load_der_x509_certificate(vtpm.read_ak_certificate())
    proc = testbed.cli("ak-cert", "--days-left", "30")
    report = json.loads(proc.stdout)
    assert report["index"] == "0x01C101D0" and report["days_left"] == 30
    near = x509.load_der_x509_certificate(vtpm.read_ak_certificate())
    assert f"{near.serial_number:X}" == report["serial"]
    left = near.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29, hours=23) < left <= dt.timedelta(days=30)
    assert near.public_key() == original.public_key() == vtpm.ak_public()
    trust = Trust.load(testbed.dir / "pki")
    near.verify_directly_issued_by(trust.vtpm_ca.cert)

    # TpmCertOperations::RenewAndReplaceAkCert: vmId from IMDS, POST the current PEM
    # (URL-encoded), take AkCertPem, write its DER into NV 0x01C101D0 itself.
    vm_id = imds(
        testbed,
        "/metadata/instance/compute/vmId",
        **{"api-version": "2019-03-11", "format": "text"},
    ).text
    body = urllib.parse.quote(near.public_bytes(serialization.Encoding.PEM).decode(), safe="")
    params = {"api-version": "2023-07-01", "vmId": vm_id, "requestId": str(uuid.uuid4())}
    url = testbed.env["CONFINFER_IMDS_URL"] + "/metadata/THIM/tvm/certificate/renew"
    try:
        testbed.cli("fault", "ak-renew", "--status", "500", "--count", "1")
        failed = requests.post(url, params=params, data=body, headers=META, timeout=10)
        assert (failed.status_code, failed.json()) == (500, {"error": "injected fault: HTTP 500"})
        resp = requests.post(url, params=params, data=body, headers=META, timeout=10)
    finally:
        testbed.cli("fault", "--clear", "ak-renew")
    assert resp.status_code == 200, resp.text
    renewed = x509.load_pem_x509_certificate(resp.json()["AkCertPem"].encode())
    vtpm.replace_ak_certificate(renewed.public_bytes(serialization.Encoding.DER))
    stored = x509.load_der_x509_certificate(vtpm.read_ak_certificate())
    assert stored == renewed and stored.public_key() == vtpm.ak_public()
    assert stored.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=364)
    assert stored.subject == original.subject


def test_fault_cli_knows_the_new_knobs(testbed: RunningTestbed) -> None:
    try:
        testbed.cli("fault", "kv-release", "--foreign-signer", "--count", "1")
        testbed.cli("fault", "azureattestskr", "--latency", "0.1", "--count", "1")
        faults = json.loads((testbed.dir / "faults.json").read_text())
        assert faults["kv-release"]["foreign_signer"] is True
        assert faults["azureattestskr"]["latency_s"] == 0.1
    finally:
        testbed.cli("fault", "--clear")
    refused = testbed.cli("fault", "keyvault", "--foreign-signer", check=False)
    assert refused.returncode == 1
    assert refused.stderr == "testbed: usage: --foreign-signer is a kv-release fault\n"
    assert testbed.cli("ak-cert", "--days-left", "9999", check=False).returncode == 1


# ---- TLS ----------------------------------------------------------------------------------------


def test_services_present_leaf_and_intermediate(testbed: RunningTestbed) -> None:
    trust = Trust.load(testbed.dir / "pki")
    ca = testbed.env["CONFINFER_CA_BUNDLE"]
    for url, leaf in (
        (testbed.env["CONFINFER_KEYVAULT_URL"], trust.kv_tls),
        (testbed.env["CONFINFER_MAA_URL"], trust.tls),
    ):
        # A Python client trusting only the root (CONFINFER_CA_BUNDLE) connects: the server
        # presents the issuing CA too (Python's ssl fetches no missing intermediates).
        ctx = ssl.create_default_context(cafile=ca)
        parts = urllib.parse.urlsplit(url)
        with (
            socket.create_connection((parts.hostname, parts.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=parts.hostname) as tls,
        ):
            presented = tls.getpeercert(binary_form=True)
        assert presented == leaf.cert_der
    # What pki/kv-tls.pem holds: the leaf, then the issuing CA.
    chain = x509.load_pem_x509_certificates((testbed.dir / "pki" / "kv-tls.pem").read_bytes())
    assert chain == [trust.kv_tls.cert, trust.tls_issuing.cert]


# ---- the stand-in AzureAttestSKR ----------------------------------------------------------------


def kek_public(tb: RunningTestbed) -> rsa.RSAPublicKey:
    name, version = tb.env["CONFINFER_KEY_ID"].split("/")[-2:]
    kv = KeyStore(tb.dir / "keyvault").get(name, version)
    assert kv is not None
    return kv.private_key.public_key()


def test_skr_tool_is_written_and_exported(testbed: RunningTestbed) -> None:
    tool = Path(testbed.env["CONFINFER_TESTBED_SKR_TOOL"])
    assert tool == testbed.dir / "bin" / "AzureAttestSKR"
    assert os.access(tool, os.X_OK)
    assert "CONFINFER_SKR_TOOL" not in testbed.env


def test_skr_tool_unwraps_a_dek_wrapped_to_the_testbed_kek(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    dek = os.urandom(30) + b" \n"  # ends in whitespace: must survive
    wrapped = kek_public(testbed).encrypt(
        dek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    )
    b64 = base64.b64encode(wrapped).decode()
    tool = testbed.env["CONFINFER_TESTBED_SKR_TOOL"]
    argv = [
        tool,
        "-a",
        testbed.env["CONFINFER_MAA_URL"],
        "-k",
        testbed.env["CONFINFER_KEY_ID"],
        "-c",
        "imds",
        "-s",
        b64,
        "-u",
    ]
    # The caller's Python variables do not reach the stand-in's interpreter (python -I).
    env = testbed.environ(PYTHONPATH="/nonexistent", PYTHONHOME="/nonexistent")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == dek + b"\n"
    assert (tmp_path / "curl-ca-bundle.crt").is_symlink()
    entry = json.loads((testbed.dir / "run" / "azureattestskr.log").read_text().splitlines()[-1])
    assert entry["argv0"] == tool
    assert entry["argv"] == [*argv[1:7], "-s", f"<{len(b64)} chars>", "-u"]
    assert "CONFINFER_TPM_TCTI" in entry["env_not_read"]
    assert entry["cwd"] == str(tmp_path)
    # The wrong key: the vault's own refusal, as the real tool prints it.
    other = testbed.env["CONFINFER_KEY_ID"].rsplit("/", 1)[0] + "/" + "0" * 32
    proc = subprocess.run(
        [*argv[:4], other, *argv[5:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 4
    assert (
        proc.stderr.decode()
        .splitlines()[-1]
        .startswith('SKR HTTP request failed: HTTP 404: {"error":{"code":"KeyNotFound"')
    )
